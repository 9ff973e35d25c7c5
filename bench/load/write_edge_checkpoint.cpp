// Writes the checkpoint bench/edge.sh measures `hypermoe run` on: one Mixtral-like MoE block
// (d = 1024, ff = 2816 SwiGLU, E = 8, top-2) with bf16 tensors (138 MB, the size issue 11
// quotes), fixed-seed weights, and 16 input rows in input.safetensors; plus the same block as
// llama.cpp would hold it in GGUF files with Q8_0 and Q4_0 experts (DIR/q8_0.gguf, DIR/q4_0.gguf,
// written by the test suite's GGUF writer).
// Usage: write_edge_checkpoint DIR
#include <cstdio>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "gguf_writer.hpp"

namespace hm = hypermoe;

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fputs("usage: write_edge_checkpoint DIR\n", stderr);
        return 2;
    }
    const std::string dir = argv[1];
    hm::write_synthetic_checkpoint(dir, {.family = hm::family("mixtral"), .d_model = 1024, .d_ff = 2816, .experts = 8,
                                         .top_k = 2, .layers = 1, .weights = hm::dtype::bf16});
    std::vector<float> x(16 * 1024);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 2654435761u % 2001) - 1000) / 1000.0f;
    hm::write_safetensors(dir + "/input.safetensors", {hm::f32_tensor("x", {16, 1024}, x)}, {{"layer", "0"}});
    const hm::Checkpoint ck(dir);
    hm::test::gguf_from(ck, {.experts = hm::test::Q8_0}).write(dir + "/q8_0.gguf");
    hm::test::gguf_from(ck, {.experts = hm::test::Q4_0}).write(dir + "/q4_0.gguf");
    return 0;
}
