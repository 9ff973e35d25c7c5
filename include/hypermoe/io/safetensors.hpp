#pragma once
// safetensors (https://github.com/huggingface/safetensors, format: 8-byte little-endian header
// length N, N bytes of JSON, then the data): a reader that validates the whole header against
// the file before any tensor is used, and a writer.
//
// Checked, each a weight_error naming the file (and tensor): file shorter than 8 bytes; header
// length past the end of the file (or above 100 MB); header not JSON or not an object; a
// duplicate tensor name; an entry without dtype/shape/data_offsets or with the wrong JSON types;
// an unknown dtype; negative dimensions or an element count that overflows; offsets reversed,
// past the end of the data, or overlapping another tensor; a byte size that is not
// dtype size x element count. After that, no access reads outside the mapping.
//
// Opening maps the file read-only (mmap); F32 tensors whose data is 4-byte aligned are used in
// place as float views, everything else is converted on request.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// Element types a safetensors file may declare.
enum class tensor_dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

[[nodiscard]] inline std::optional<tensor_dtype> parse_tensor_dtype(std::string_view s) noexcept {
    static constexpr std::pair<std::string_view, tensor_dtype> names[] = {
        {"F64", tensor_dtype::f64}, {"F32", tensor_dtype::f32}, {"F16", tensor_dtype::f16}, {"BF16", tensor_dtype::bf16},
        {"I64", tensor_dtype::i64}, {"I32", tensor_dtype::i32}, {"I16", tensor_dtype::i16}, {"I8", tensor_dtype::i8},
        {"U8", tensor_dtype::u8},   {"BOOL", tensor_dtype::boolean}};
    for (const auto& [n, t] : names)
        if (n == s) return t;
    return std::nullopt;
}

[[nodiscard]] constexpr std::string_view to_string(tensor_dtype t) noexcept {
    constexpr std::string_view names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"};
    return names[static_cast<int>(t)];
}

[[nodiscard]] constexpr std::size_t size_of(tensor_dtype t) noexcept {
    constexpr std::size_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1};
    return sizes[static_cast<int>(t)];
}

/// IEEE half to float, exact.
[[nodiscard]] constexpr float f16_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (man << 13));
    if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
    if (man == 0) return std::bit_cast<float>(sign);
    const float v = float(man) * 0x1.0p-24f; // subnormal half: man x 2^-24
    return sign ? -v : v;
}

/// One tensor of a file: where its bytes are, and what they are.
struct TensorInfo {
    std::string name;
    tensor_dtype dtype;
    std::vector<index_t> shape;
    std::size_t begin = 0, end = 0; ///< byte offsets into the data section

    [[nodiscard]] index_t numel() const noexcept {
        index_t n = 1;
        for (const index_t s : shape) n *= s;
        return n;
    }
    [[nodiscard]] std::string shape_string() const {
        std::string s = "[";
        for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
        return s + "]";
    }
};

/// A parsed, validated safetensors image over bytes someone else owns (a mapping, a buffer).
class SafeTensorsView {
public:
    /// Validates `bytes` as a safetensors image; `source` names it in messages (a path).
    SafeTensorsView(std::span<const std::byte> bytes, std::string source) : bytes_(bytes), source_(std::move(source)) {
        parse();
    }

    [[nodiscard]] const std::string& source() const noexcept { return source_; }
    [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
    /// Metadata `key` as an integer in [min, max]; config_error naming the key and its value when
    /// it is missing, not a base-10 integer, or out of range.
    [[nodiscard]] index_t metadata_integer(const std::string& key, index_t min, index_t max) const {
        const auto it = metadata_.find(key);
        if (it == metadata_.end()) throw config_error(detail::concat("safetensors: no metadata '", key, "'"));
        const std::string& v = it->second;
        index_t out = 0;
        const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
        if (ec != std::errc{} || end != v.data() + v.size() || v.empty() || out < min || out > max)
            throw config_error(detail::concat("safetensors: metadata '", key, "' is \"", v, "\", expected an integer in [",
                                              min, ", ", max, "]"));
        return out;
    }
    [[nodiscard]] const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
    [[nodiscard]] bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }

    [[nodiscard]] const TensorInfo* find(std::string_view name) const noexcept {
        const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                         [](const TensorInfo& t, std::string_view n) { return t.name < n; });
        return it != tensors_.end() && it->name == name ? &*it : nullptr;
    }
    [[nodiscard]] const TensorInfo& info(std::string_view name) const {
        if (const TensorInfo* t = find(name)) return *t;
        throw weight_error(detail::concat(source_, ": no tensor '", name, "'"));
    }
    /// The raw bytes of a tensor.
    [[nodiscard]] std::span<const std::byte> data(const TensorInfo& t) const noexcept {
        return bytes_.subspan(data_start_ + t.begin, t.end - t.begin);
    }

    /// Element i of a tensor widened to double (any numeric dtype).
    [[nodiscard]] double element(const TensorInfo& t, index_t i) const noexcept {
        const std::byte* p = bytes_.data() + data_start_ + t.begin + std::size_t(i) * size_of(t.dtype);
        const auto load = [p]<class T>(T v) {
            std::memcpy(&v, p, sizeof(T));
            return v;
        };
        switch (t.dtype) {
        case tensor_dtype::f64: return load(double{});
        case tensor_dtype::f32: return load(float{});
        case tensor_dtype::f16: return f16_to_float(load(std::uint16_t{}));
        case tensor_dtype::bf16: return bf16{load(std::uint16_t{})}.to_float();
        case tensor_dtype::i64: return double(load(std::int64_t{}));
        case tensor_dtype::i32: return load(std::int32_t{});
        case tensor_dtype::i16: return load(std::int16_t{});
        case tensor_dtype::i8: return load(std::int8_t{});
        case tensor_dtype::u8: return load(std::uint8_t{});
        case tensor_dtype::boolean: return load(std::uint8_t{}) != 0;
        }
        return 0;
    }

    /// A tensor as a (rows, cols) float matrix: the last dimension is cols, the others fold into
    /// rows (a scalar or 1-D tensor is one row). Converts F64/F16/BF16/integers exactly or by
    /// rounding to nearest.
    [[nodiscard]] Matrix<float> to_f32(const TensorInfo& t) const {
        const index_t cols = t.shape.empty() ? 1 : t.shape.back();
        Matrix<float> m(cols == 0 ? 0 : t.numel() / cols, cols);
        if (t.dtype == tensor_dtype::f32) {
            std::memcpy(m.data(), data(t).data(), data(t).size());
        } else {
            for (index_t i = 0; i < t.numel(); ++i) m.data()[i] = float(element(t, i));
        }
        return m;
    }

    /// An F32 tensor's bytes as floats in place, when the data is 4-byte aligned; empty otherwise.
    [[nodiscard]] std::span<const float> f32_in_place(const TensorInfo& t) const noexcept {
        const std::byte* p = data(t).data();
        if (t.dtype != tensor_dtype::f32 || reinterpret_cast<std::uintptr_t>(p) % alignof(float) != 0) return {};
        return {reinterpret_cast<const float*>(p), std::size_t(t.numel())};
    }

private:
    [[noreturn]] void fail(const std::string& what) const { throw weight_error(detail::concat(source_, ": ", what)); }

    void parse() {
        if (bytes_.size() < 8) fail(detail::concat("file has ", bytes_.size(), " bytes, expected at least 8 (the header length)"));
        std::uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint64_t(std::to_integer<unsigned>(bytes_[std::size_t(i)]));
        constexpr std::uint64_t max_header = 100'000'000;
        if (n > bytes_.size() - 8 || n > max_header)
            fail(detail::concat("header length is ", n, " bytes, but only ", bytes_.size() - 8, " bytes follow"));
        data_start_ = 8 + std::size_t(n);
        const std::size_t data_size = bytes_.size() - data_start_;
        const auto* text = reinterpret_cast<const char*>(bytes_.data() + 8);

        // Duplicate names are invisible once parsed (the last wins), so the callback sees keys.
        std::vector<std::string> top_keys;
        const nlohmann::json::parser_callback_t on_event = [&](int depth, nlohmann::json::parse_event_t event,
                                                               nlohmann::json& parsed) {
            if (event == nlohmann::json::parse_event_t::key && depth == 1) top_keys.push_back(parsed.get<std::string>());
            return true;
        };
        nlohmann::json header;
        try {
            header = nlohmann::json::parse(text, text + n, on_event);
        } catch (const nlohmann::json::exception& e) {
            fail(detail::concat("header is not valid JSON (", e.what(), ")"));
        }
        if (!header.is_object()) fail("header is not a JSON object");
        std::sort(top_keys.begin(), top_keys.end());
        if (const auto d = std::adjacent_find(top_keys.begin(), top_keys.end()); d != top_keys.end())
            fail(detail::concat("tensor name '", *d, "' appears twice in the header"));

        for (const auto& [name, entry] : header.items()) {
            if (name == "__metadata__") {
                if (!entry.is_object()) fail("__metadata__ is not an object");
                for (const auto& [k, v] : entry.items()) {
                    if (!v.is_string()) fail(detail::concat("__metadata__ value '", k, "' is not a string"));
                    metadata_[k] = v.get<std::string>();
                }
                continue;
            }
            tensors_.push_back(parse_entry(name, entry, data_size));
        }
        std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
        for (std::size_t i = 1; i < tensors_.size(); ++i)
            if (tensors_[i].begin < tensors_[i - 1].end)
                fail(detail::concat("tensors '", tensors_[i - 1].name, "' [", tensors_[i - 1].begin, ", ", tensors_[i - 1].end,
                                    ") and '", tensors_[i].name, "' [", tensors_[i].begin, ", ", tensors_[i].end, ") overlap"));
        std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
    }

    TensorInfo parse_entry(const std::string& name, const nlohmann::json& e, std::size_t data_size) const {
        const auto bad = [&](const std::string& what) { fail(detail::concat("tensor '", name, "': ", what)); };
        if (!e.is_object()) bad("entry is not an object");
        const auto dt = e.find("dtype");
        const auto sh = e.find("shape");
        const auto off = e.find("data_offsets");
        if (dt == e.end() || sh == e.end() || off == e.end()) bad("entry needs dtype, shape and data_offsets");
        if (!dt->is_string()) bad("dtype is not a string");
        const auto type = parse_tensor_dtype(dt->get<std::string>());
        if (!type) bad(detail::concat("unknown dtype '", dt->get<std::string>(), "'"));
        TensorInfo t{name, *type, {}, 0, 0};
        if (!sh->is_array()) bad("shape is not an array");
        index_t count = 1;
        for (const auto& d : *sh) {
            if (!d.is_number_integer() || d.get<std::int64_t>() < 0) bad(detail::concat("shape ", sh->dump(), " has an entry that is not a non-negative integer"));
            const index_t v = d.get<index_t>();
            if (v != 0 && count > (index_t{1} << 50) / v) bad(detail::concat("shape ", sh->dump(), " has too many elements"));
            count *= v;
            t.shape.push_back(v);
        }
        if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
            bad(detail::concat("data_offsets ", off->dump(), " is not a pair of non-negative integers"));
        const auto b = (*off)[0].get<std::uint64_t>(), en = (*off)[1].get<std::uint64_t>();
        if (b > en) bad(detail::concat("data_offsets [", b, ", ", en, "] are reversed"));
        if (en > data_size) bad(detail::concat("data_offsets [", b, ", ", en, "] run past the ", data_size, " data bytes of the file"));
        const std::uint64_t expected = std::uint64_t(count) * size_of(*type);
        if (en - b != expected)
            bad(detail::concat("holds ", en - b, " bytes, but ", to_string(*type), " ", t.shape_string(), " needs ", expected));
        t.begin = std::size_t(b);
        t.end = std::size_t(en);
        return t;
    }

    std::span<const std::byte> bytes_;
    std::string source_;
    std::size_t data_start_ = 0;
    std::map<std::string, std::string> metadata_;
    std::vector<TensorInfo> tensors_;
};

/// A safetensors file, memory-mapped read-only for its lifetime.
class SafeTensorsFile {
public:
    explicit SafeTensorsFile(const std::string& path) : path_(path) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw weight_error(detail::concat(path, ": cannot open the file"));
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            ::close(fd);
            throw weight_error(detail::concat(path, ": cannot stat the file"));
        }
        size_ = std::size_t(st.st_size);
        if (size_ > 0) {
            void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                ::close(fd);
                throw weight_error(detail::concat(path, ": cannot map the file"));
            }
            map_ = static_cast<const std::byte*>(p);
        }
        ::close(fd);
        try {
            view_.emplace(std::span<const std::byte>(map_, size_), path);
        } catch (...) {
            unmap();
            throw;
        }
    }
    SafeTensorsFile(const SafeTensorsFile&) = delete;
    SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;
    ~SafeTensorsFile() { unmap(); }

    [[nodiscard]] const SafeTensorsView& view() const noexcept { return *view_; }
    [[nodiscard]] const std::string& path() const noexcept { return path_; }

    /// Drops the resident pages wholly inside `bytes` if they lie in this file's mapping (a no-op
    /// otherwise): a loader calls it once a tensor is packed into a layer's own storage, so the
    /// source is not held twice. The mapping is private and read-only, so a later read simply
    /// faults the same bytes in again from the file.
    void release(std::span<const std::byte> bytes) const noexcept {
        if (map_ == nullptr || bytes.empty() || bytes.data() < map_ || bytes.data() + bytes.size() > map_ + size_) return;
        const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
        const auto begin = (reinterpret_cast<std::uintptr_t>(bytes.data()) + page - 1) / page * page;
        const auto end = (reinterpret_cast<std::uintptr_t>(bytes.data()) + bytes.size()) / page * page;
        if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
    }

private:
    void unmap() noexcept {
        if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), size_);
        map_ = nullptr;
    }
    std::string path_;
    const std::byte* map_ = nullptr;
    std::size_t size_ = 0;
    std::optional<SafeTensorsView> view_;
};

/// A tensor to write: its dtype, shape and bytes (little-endian, row-major).
struct TensorToWrite {
    std::string name;
    tensor_dtype dtype;
    std::vector<index_t> shape;
    std::vector<std::byte> bytes;
};

/// Convenience constructors for the writer.
[[nodiscard]] inline TensorToWrite f32_tensor(std::string name, std::vector<index_t> shape, std::span<const float> v) {
    std::vector<std::byte> b(v.size() * sizeof(float));
    std::memcpy(b.data(), v.data(), b.size());
    return {std::move(name), tensor_dtype::f32, std::move(shape), std::move(b)};
}
[[nodiscard]] inline TensorToWrite i32_tensor(std::string name, std::vector<index_t> shape, std::span<const std::int32_t> v) {
    std::vector<std::byte> b(v.size() * sizeof(std::int32_t));
    std::memcpy(b.data(), v.data(), b.size());
    return {std::move(name), tensor_dtype::i32, std::move(shape), std::move(b)};
}

/// The bytes of a safetensors image (header padded with spaces to a multiple of 8).
[[nodiscard]] inline std::vector<std::byte> safetensors_bytes(const std::vector<TensorToWrite>& tensors,
                                                              const std::map<std::string, std::string>& metadata = {}) {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::size_t offset = 0;
    for (const auto& t : tensors) {
        index_t count = 1;
        for (const index_t s : t.shape) count *= s;
        if (t.bytes.size() != std::size_t(count) * size_of(t.dtype))
            throw weight_error(detail::concat("safetensors writer: tensor '", t.name, "' has ", t.bytes.size(), " bytes, expected ",
                                              std::size_t(count) * size_of(t.dtype)));
        header[t.name] = {{"dtype", to_string(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::vector<std::byte> out(8 + text.size() + offset);
    for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::byte((std::uint64_t(text.size()) >> (8 * i)) & 0xFFu);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::size_t at = 8 + text.size();
    for (const auto& t : tensors) {
        std::memcpy(out.data() + at, t.bytes.data(), t.bytes.size());
        at += t.bytes.size();
    }
    return out;
}

/// Writes a safetensors file; a weight_error names the path when it cannot be written.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
    const auto bytes = safetensors_bytes(tensors, metadata);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    if (!out) throw weight_error(detail::concat(path, ": cannot write the file"));
}

} // namespace hypermoe
