// Writes the files docs/checkpoints.md measures the peak RSS of loading ggml quants on: a one-block
// Mixtral-family GGUF file whose routed experts are random blocks of ggml quant types (gate and up
// of one type, down of another; finite half scales of 2^-12 to 2^-10), its other tensors those of
// a fixed-seed synthetic block, the same block as F32 safetensors (DIR/hf), and 32 input rows
// (DIR/input.safetensors). Types by ggml id: 3 Q4_1, 6 Q5_0, 7 Q5_1, 20 IQ4_NL, 39 MXFP4 (its
// scale byte the power of two below the draw), 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 23 IQ4_XS.
// Usage: write_quant_gguf DIR D_MODEL D_FF GATE_UP_TYPE DOWN_TYPE  (writes DIR/g<GATE_UP>_<DOWN>.gguf)
// e.g. 1024 2816 12 12 (the Mixtral-like block), 2048 1408 12 6 (Qwen1.5-MoE's shapes, Q4_K_M's
// mix), 4096 14336 12 12 (Mixtral 8x7B's shapes: 5.6 GB of F32 safetensors, 756 MiB of Q4_K).
#include <algorithm>
#include <cstdio>
#include <iterator>
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
    const std::uint32_t widened[] = {3, 6, 7, 20, 39, 10, 11, 12, 13, 14, 23};
    if (std::count(std::begin(widened), std::end(widened), gate_up) == 0 || std::count(std::begin(widened), std::end(widened), down) == 0) {
        std::fputs("write_quant_gguf: types are ggml ids 3, 6, 7, 20, 39, 10-14 or 23\n", stderr);
        return 2;
    }
    hm::write_synthetic_checkpoint(dir + "/hf", {.family = hm::family("mixtral"), .d_model = d, .d_ff = ff, .experts = 8, .top_k = 2,
                                                 .layers = 1});
    std::vector<float> x(std::size_t(32 * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 2654435761u % 2001) - 1000) / 1000.0f;
    hm::write_safetensors(dir + "/input.safetensors", {hm::f32_tensor("x", {32, d}, x)}, {{"layer", "0"}});
    const std::vector<std::byte> base = hm::test::gguf_from(hm::Checkpoint(dir + "/hf")).bytes();
    std::mt19937_64 rng(1);
    const std::uniform_real_distribution<float> scale(1.0f / 4096, 1.0f / 1024);
    hm::test::GgufWriter w = hm::test::rewritten(base, [&](const std::string& name, hm::test::TensorEdit& t) {
        if (name.find("_exps") == std::string::npos) return true;
        t.type = name.find("down") != std::string::npos ? down : gate_up;
        std::int64_t count = 1;
        for (const std::int64_t n : t.ne) count *= n;
        t.bytes = hm::test::random_ggml_quant(t.type, count / hm::detail::find_ggml_type(t.type)->block, rng, scale);
        return true;
    });
    w.write(dir + "/g" + argv[4] + "_" + argv[5] + ".gguf");
}
