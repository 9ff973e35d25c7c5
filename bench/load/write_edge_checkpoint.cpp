// Writes the checkpoint bench/edge.sh measures `hypermoe run` on: one Mixtral-like MoE block
// (d = 1024, ff = 2816 SwiGLU, E = 8, top-2) with bf16 tensors (138 MB, the size issue 11
// quotes), fixed-seed weights, and 16 input rows in input.safetensors.
// Usage: write_edge_checkpoint DIR
#include <cstdio>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

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
    return 0;
}
