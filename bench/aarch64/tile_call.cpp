// One call of a block-format `fast` tile kernel on AArch64, for bench/aarch64/count: the portable
// kernel (0), NEON's (1) or SDOT's (2), over one tile of 32 outputs x 1024 inputs, for 1-6 rows.
// Usage: tile_call KERNEL ROWS FORMAT (0 q8_0, 1 q4_0, 2 mxfp4, 3 q4_k)
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "hypermoe/backend/block_linear.hpp"

using namespace hypermoe;
using namespace hypermoe::detail;

int main(int argc, char** argv) {
    if (argc != 4) return std::fprintf(stderr, "usage: tile_call KERNEL ROWS FORMAT\n"), 2;
    const int kernel = std::atoi(argv[1]), rows = std::clamp(std::atoi(argv[2]), 1, 6), format = std::atoi(argv[3]);
    const index_t n = 32, k = 1024;
    std::vector<float> w(std::size_t(n * k)), a(std::size_t(rows * k)), out(std::size_t(rows * n));
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (float& v : w) v = normal(rng);
    for (float& v : a) v = normal(rng);
    const dtype f = format == 0 ? dtype::q8_0 : format == 1 ? dtype::q4_0 : format == 2 ? dtype::mxfp4 : dtype::q4_k;
    const BlockWeights weights(ConstMatrixView<float>(w.data(), n, k, k), f, "w");
    Workspace ws;
    Workspace::Scope scope(ws, QuantizedRows::bytes(rows, weights.blocks_per_row()));
    const QuantizedRows xq(ConstMatrixView<float>(a.data(), rows, k, k), weights.blocks_per_row(), ws);
    TileArgs t;
    t.wq = weights.tile_quants(0), t.wd = weights.tile_scales(0), t.nb = weights.blocks_per_row();
    t.mask[0] = t.mask[1] = 0xFFFF, t.out = out.data(), t.ldc = n;
    TileRows x;
    for (int r = 0; r < rows; ++r) x.q[r] = xq.q_row(r), x.d[r] = xq.d_row(r), x.sum[r] = xq.sum_row(r), x.dsum[r] = xq.dsum_row(r);
    with_block(f, [&]<class Block>() {
        if (kernel == 0) portable_tile<Block, true>(t, x, rows);
#if HYPERMOE_NEON_KERNELS
        else if (kernel == 1) neon_tile<Block, false>(t, x, rows);
#endif
#if HYPERMOE_NEON_SDOT
        else neon_tile<Block, true>(t, x, rows);
#endif
    });
    std::printf("%g\n", double(out[0]));
}
