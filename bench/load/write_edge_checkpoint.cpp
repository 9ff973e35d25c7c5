// Writes the checkpoint bench/edge.sh measures `hypermoe run` on: one Mixtral-like MoE block
// (d = 1024, ff = 2816 SwiGLU, E = 8, top-2) with bf16 tensors (138 MB, the size issue 11
// quotes), fixed-seed weights, and 16 input rows in input.safetensors; plus the same block as
// llama.cpp would hold it in GGUF files with Q8_0 and Q4_0 experts (DIR/q8_0.gguf, DIR/q4_0.gguf,
// written by the test suite's GGUF writer). D_MODEL and D_FF give other shapes, e.g. 4096 14336
// for Mixtral 8x7B's (2.8 GB of bf16).
// Usage: write_edge_checkpoint DIR [D_MODEL D_FF]
#include <cstdio>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "gguf_writer.hpp"

namespace hm = hypermoe;

int main(int argc, char** argv) {
    if (argc != 2 && argc != 4) {
        std::fputs("usage: write_edge_checkpoint DIR [D_MODEL D_FF]\n", stderr);
        return 2;
    }
    const std::string dir = argv[1];
    const hm::index_t d = argc == 4 ? std::stol(argv[2]) : 1024, ff = argc == 4 ? std::stol(argv[3]) : 2816;
    hm::write_synthetic_checkpoint(dir, {.family = hm::family("mixtral"), .d_model = d, .d_ff = ff, .experts = 8, .top_k = 2,
                                         .layers = 1, .weights = hm::dtype::bf16});
    std::vector<float> x(std::size_t(16 * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 2654435761u % 2001) - 1000) / 1000.0f;
    hm::write_safetensors(dir + "/input.safetensors", {hm::f32_tensor("x", {16, d}, x)}, {{"layer", "0"}});
    const hm::Checkpoint ck(dir);
    hm::test::gguf_from(ck, {.experts = hm::test::Q8_0}).write(dir + "/q8_0.gguf");
    hm::test::gguf_from(ck, {.experts = hm::test::Q4_0}).write(dir + "/q4_0.gguf");
    return 0;
}
