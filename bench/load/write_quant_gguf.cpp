// Writes the files docs/checkpoints.md measures the peak RSS of loading ggml quants on: a one-block
// Mixtral-family GGUF file whose routed experts are random blocks of ggml quant types (gate and up
// of one type, down of another; finite half scales of 2^-12 to 2^-10), its other tensors those of
// a fixed-seed synthetic block, the same block as F32 safetensors (DIR/hf), and 32 input rows
// (DIR/input.safetensors). Types by ggml id: 3 Q4_1, 6 Q5_0, 7 Q5_1, 20 IQ4_NL, 10 Q2_K, 11 Q3_K,
// 12 Q4_K, 13 Q5_K, 14 Q6_K, 23 IQ4_XS.
// Usage: write_quant_gguf DIR D_MODEL D_FF GATE_UP_TYPE DOWN_TYPE  (writes DIR/g<GATE_UP>_<DOWN>.gguf)
// e.g. 1024 2816 12 12 (the Mixtral-like block), 2048 1408 12 6 (Qwen1.5-MoE's shapes, Q4_K_M's
// mix), 4096 14336 12 12 (Mixtral 8x7B's shapes: 5.6 GB of F32 safetensors, 756 MiB of Q4_K).
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "gguf_writer.hpp"

namespace hm = hypermoe;

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fputs("usage: write_quant_gguf DIR D_MODEL D_FF GATE_UP_TYPE DOWN_TYPE\n", stderr);
        return 2;
    }
    const std::string dir = argv[1];
    const hm::index_t d = std::stol(argv[2]), ff = std::stol(argv[3]);
    const auto gate_up = std::uint32_t(std::stoul(argv[4])), down = std::uint32_t(std::stoul(argv[5]));
    // Where a block's half scales are (its elements and bytes: the GGUF reader's type table).
    const std::map<std::uint32_t, std::vector<std::size_t>> halves_at = {
        {3, {0, 2}}, {6, {0}}, {7, {0, 2}}, {20, {0}}, {10, {80, 82}}, {11, {108}}, {12, {0, 2}}, {13, {0, 2}}, {14, {208}}, {23, {0}}};
    if (halves_at.count(gate_up) == 0 || halves_at.count(down) == 0) {
        std::fputs("write_quant_gguf: types are ggml ids 3, 6, 7, 20, 10-14 or 23\n", stderr);
        return 2;
    }
    hm::write_synthetic_checkpoint(dir + "/hf", {.family = hm::family("mixtral"), .d_model = d, .d_ff = ff, .experts = 8, .top_k = 2,
                                                 .layers = 1});
    std::vector<float> x(std::size_t(32 * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 2654435761u % 2001) - 1000) / 1000.0f;
    hm::write_safetensors(dir + "/input.safetensors", {hm::f32_tensor("x", {32, d}, x)}, {{"layer", "0"}});
    const std::vector<std::byte> base = hm::test::gguf_from(hm::Checkpoint(dir + "/hf")).bytes();
    const hm::GgufView v(base, "base");
    hm::test::GgufWriter w;
    for (const auto& [k, val] : v.metadata())
        if (val.type == hm::gguf_type::u32) w.u32(k, std::uint32_t(*v.integer(k)));
        else if (val.type == hm::gguf_type::string) w.string(k, *v.string(k));
    std::mt19937_64 rng(1);
    std::uniform_real_distribution<float> scale(1.0f / 4096, 1.0f / 1024);
    for (const hm::TensorInfo& t : v.tensors()) {
        const auto data = v.data(t);
        std::vector<std::int64_t> ne(t.shape.rbegin(), t.shape.rend());
        if (t.name.find("_exps") == std::string::npos) {
            w.tensor(t.name, hm::test::F32, ne, {data.begin(), data.end()});
            continue;
        }
        const std::uint32_t type = t.name.find("down") != std::string::npos ? down : gate_up;
        const std::vector<std::size_t>& halves = halves_at.at(type);
        const hm::GgmlType& g = *hm::detail::find_ggml_type(type);
        const std::size_t n = g.block, size = g.bytes, blocks = std::size_t(t.numel()) / n;
        std::vector<std::byte> out(blocks * size);
        for (auto& b : out) b = std::byte(rng() & 0xFF);
        for (std::size_t i = 0; i < blocks; ++i)
            for (const std::size_t at : halves) {
                const std::uint16_t h = hm::f32_to_f16_bits(scale(rng));
                std::memcpy(out.data() + i * size + at, &h, 2);
            }
        w.tensor(t.name, type, ne, std::move(out));
    }
    w.write(dir + "/g" + argv[4] + "_" + argv[5] + ".gguf");
}
