#pragma once
// Test-only reader for the fixtures in tests/data (safetensors + config.json). The library's
// own checked, memory-mapped reader is io/ (a later issue); this one trusts its input.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <hypermoe/core/dtype.hpp>
#include <hypermoe/core/matrix.hpp>

namespace hypermoe::test {

struct Tensor {
    std::string dtype;
    std::vector<index_t> shape;
    std::vector<unsigned char> bytes;

    [[nodiscard]] index_t numel() const {
        index_t n = 1;
        for (const index_t s : shape) n *= s;
        return n;
    }
    /// Element i widened to double.
    [[nodiscard]] double at(index_t i) const {
        const unsigned char* p = bytes.data();
        if (dtype == "F32") { float v; std::memcpy(&v, p + 4 * i, 4); return v; }
        if (dtype == "F64") { double v; std::memcpy(&v, p + 8 * i, 8); return v; }
        if (dtype == "BF16") { bf16 v; std::memcpy(&v.bits, p + 2 * i, 2); return v.to_float(); }
        if (dtype == "I32") { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
        throw std::runtime_error("fixture: unsupported dtype " + dtype);
    }
    /// As a (rows, cols) f32 matrix: rows = first dims folded, cols = last dim (1-D: one row).
    [[nodiscard]] Matrix<float> f32() const {
        const index_t cols = shape.empty() ? 1 : shape.back();
        Matrix<float> m(cols == 0 ? 0 : numel() / cols, cols);
        for (index_t i = 0; i < numel(); ++i) m.data()[i] = float(at(i));
        return m;
    }
    [[nodiscard]] Matrix<bf16> bf16_matrix() const {
        const index_t cols = shape.back();
        Matrix<bf16> m(numel() / cols, cols);
        std::memcpy(m.data(), bytes.data(), bytes.size());
        return m;
    }
    [[nodiscard]] std::vector<float> vec() const {
        std::vector<float> v(static_cast<std::size_t>(numel()));
        for (index_t i = 0; i < numel(); ++i) v[std::size_t(i)] = float(at(i));
        return v;
    }
};

struct SafeTensors {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> metadata;

    [[nodiscard]] const Tensor& operator[](const std::string& name) const {
        const auto it = tensors.find(name);
        if (it == tensors.end()) throw std::runtime_error("fixture: no tensor " + name);
        return it->second;
    }
    [[nodiscard]] bool has(const std::string& name) const { return tensors.count(name) != 0; }
};

inline SafeTensors read_safetensors(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("fixture: cannot open " + path);
    std::uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    std::string header(n, '\0');
    in.read(header.data(), std::streamsize(n));
    const std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    SafeTensors st;
    const nlohmann::json parsed = nlohmann::json::parse(header);
    for (const auto& [name, v] : parsed.items()) {
        if (name == "__metadata__") {
            for (const auto& [k, m] : v.items()) st.metadata[k] = m.is_string() ? m.get<std::string>() : m.dump();
            continue;
        }
        Tensor t;
        t.dtype = v.at("dtype").get<std::string>();
        t.shape = v.at("shape").get<std::vector<index_t>>();
        const auto off = v.at("data_offsets").get<std::vector<std::size_t>>();
        t.bytes.assign(data.begin() + std::ptrdiff_t(off[0]), data.begin() + std::ptrdiff_t(off[1]));
        st.tensors.emplace(name, std::move(t));
    }
    return st;
}

inline nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("fixture: cannot open " + path);
    return nlohmann::json::parse(in);
}

/// One fixture case: config, checkpoint, input and expected outputs.
struct FixtureCase {
    std::string name;
    nlohmann::json config;
    SafeTensors model, input, expected;
    [[nodiscard]] int layer() const { return std::stoi(input.metadata.at("layer")); }
};

inline FixtureCase load_case(const std::string& name) {
    const std::string dir = std::string(HYPERMOE_TEST_DATA) + "/" + name + "/";
    return {name, read_json(dir + "config.json"), read_safetensors(dir + "model.safetensors"),
            read_safetensors(dir + "input.safetensors"), read_safetensors(dir + "expected.safetensors")};
}

} // namespace hypermoe::test
