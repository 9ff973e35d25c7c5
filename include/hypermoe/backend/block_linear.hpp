#pragma once
// Linear maps over weights stored in the q8_0 / q4_0 block formats (core/quant.hpp), shared by
// every backend: a backend's linear whose storage is a block format holds a BlockLinear and
// forwards to it, so the weights are held once, as blocks (34 or 18 bytes per 32 weights), never
// widened. Arithmetic is `exact`: f32 on the weights' exact values. Each output row's blocks are
// dequantised once per group of up to 4 activation rows (q * d is exact in f32: at most 8 + 11
// significant bits), and the products are summed in f32.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>
#include <string_view>
#include <span>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HYPERMOE_BLOCK_AVX512 1
#else
#define HYPERMOE_BLOCK_AVX512 0
#endif

namespace hypermoe::detail {

/// The instructions the block kernels use, chosen once per process from the CPU: "avx512"
/// (AVX-512 F + BW: int8 widened in registers) or "portable" (plain C++). The environment
/// variable HYPERMOE_BLOCK_ISA=portable forces the portable kernel, so tests cover it on any CPU.
[[nodiscard]] inline std::string_view block_kernel_isa() {
    static const std::string_view isa = [] {
#if HYPERMOE_BLOCK_AVX512
        const char* cap = std::getenv("HYPERMOE_BLOCK_ISA");
        if (cap != nullptr && std::string_view(cap) == "portable") return std::string_view("portable");
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return std::string_view("avx512");
#endif
        return std::string_view("portable");
    }();
    return isa;
}

#if HYPERMOE_BLOCK_AVX512
/// Block b's 32 values (integers times the scale, exact in f32) as two 16-lane vectors.
__attribute__((target("avx512f,avx512bw"))) inline void block_values_avx512(const BlockQ8_0& blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(f16_bits_to_f32(blk.d));
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data()));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data() + 16));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
}
__attribute__((target("avx512f,avx512bw"))) inline void block_values_avx512(const BlockQ4_0& blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(f16_bits_to_f32(blk.d));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data()));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512i l = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)), eight);
    const __m512i h = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)), eight);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(l), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(h), d);
}

/// out[r] = sum over the row's blocks of values . x[r] (x[r][b] points at block b's 32 inputs).
template <int Rows, class Block>
__attribute__((target("avx512f,avx512bw"))) void block_dots_avx512(const Block* w, index_t blocks, const float* const* x,
                                                                  index_t full, const float* const* x_pad, float* out) {
    __m512 acc[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
    for (index_t b = 0; b < blocks; ++b) {
        __m512 lo, hi;
        block_values_avx512(w[b], lo, hi);
        for (int r = 0; r < Rows; ++r) {
            const float* xr = b < full ? x[r] + b * quant_block : x_pad[r];
            acc[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r]);
            acc[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r]);
        }
    }
    for (int r = 0; r < Rows; ++r) { // lanes added in a fixed order
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, acc[r]);
        float sum = 0.0f;
        for (const float v : lanes) sum += v;
        out[r] = sum;
    }
}
#endif

/// An (N, K) weight as N rows of ceil(K / 32) blocks of one format.
class BlockWeights {
public:
    BlockWeights() = default;
    BlockWeights(const WeightView& w, dtype format, const std::string& name)
        : format_(format), n_(w.rows()), k_(w.cols()), blocks_per_row_((w.cols() + quant_block - 1) / quant_block) {
        std::vector<float> row(static_cast<std::size_t>(k_));
        if (format == dtype::q8_0) q8_.resize(std::size_t(n_ * blocks_per_row_));
        else q4_.resize(std::size_t(n_ * blocks_per_row_));
        for (index_t r = 0; r < n_; ++r) {
            for (index_t c = 0; c < k_; ++c) row[std::size_t(c)] = w.at(r, c);
            const std::string what = concat(name, " row ", r);
            if (format == dtype::q8_0) quantize_row<BlockQ8_0>(row, std::span(q8_).subspan(std::size_t(r * blocks_per_row_), std::size_t(blocks_per_row_)), what);
            else quantize_row<BlockQ4_0>(row, std::span(q4_).subspan(std::size_t(r * blocks_per_row_), std::size_t(blocks_per_row_)), what);
        }
    }

    [[nodiscard]] dtype format() const noexcept { return format_; }
    [[nodiscard]] index_t blocks_per_row() const noexcept { return blocks_per_row_; }
    /// Bytes held: the blocks, scales included.
    [[nodiscard]] std::size_t bytes() const noexcept { return q8_.size() * sizeof(BlockQ8_0) + q4_.size() * sizeof(BlockQ4_0); }
    [[nodiscard]] std::span<const BlockQ8_0> q8_0() const noexcept { return q8_; }
    [[nodiscard]] std::span<const BlockQ4_0> q4_0() const noexcept { return q4_; }

    /// The 32 values of block b of row n.
    void dequantize_block(index_t n, index_t b, std::span<float, 32> out) const noexcept {
        const auto i = std::size_t(n * blocks_per_row_ + b);
        if (format_ == dtype::q8_0) dequantize(q8_[i], out);
        else dequantize(q4_[i], out);
    }
    /// Weight (n, k), exactly.
    [[nodiscard]] float at(index_t n, index_t k) const noexcept {
        std::array<float, 32> v;
        dequantize_block(n, k / quant_block, v);
        return v[std::size_t(k % quant_block)];
    }

private:
    dtype format_ = dtype::q8_0;
    index_t n_ = 0, k_ = 0, blocks_per_row_ = 0;
    std::vector<BlockQ8_0> q8_;
    std::vector<BlockQ4_0> q4_;
};

/// c = [c +] scale * Act(a W^T + b) with W in a block format; see the file comment.
template <class Act>
class BlockLinear {
public:
    BlockLinear(const WeightView& w, std::span<const float> bias, dtype format, const std::string& name, bool accumulate)
        : w_(w, format, name), bias_(bias.begin(), bias.end()), n_(w.rows()), k_(w.cols()), accumulate_(accumulate) {}

    [[nodiscard]] const BlockWeights& weights() const noexcept { return w_; }

    void operator()(ConstMatrixView<float> a, MatrixView<float> c, float scale) const {
        const index_t row_groups = (a.rows() + group_rows - 1) / group_rows;
        const index_t col_tiles = (n_ + tile - 1) / tile;
        parallel_for(row_groups * col_tiles, a.rows() * k_ * n_, [&](index_t item) {
            const index_t r0 = item / col_tiles * group_rows, j0 = item % col_tiles * tile;
            const index_t rows = std::min(group_rows, a.rows() - r0), cols = std::min(tile, n_ - j0);
            const auto go = [&]<index_t Rows>() {
                if (w_.format() == dtype::q8_0) run<Rows>(w_.q8_0(), a, c, r0, j0, cols, scale);
                else run<Rows>(w_.q4_0(), a, c, r0, j0, cols, scale);
            };
            switch (rows) { // a compile-time row count keeps every row's lanes in registers
            case 1: go.template operator()<1>(); break;
            case 2: go.template operator()<2>(); break;
            case 3: go.template operator()<3>(); break;
            default: go.template operator()<4>(); break;
            }
        });
    }

private:
    static constexpr index_t group_rows = 4; ///< activation rows that share one pass over a weight row
    static constexpr index_t tile = 32;      ///< outputs per work item
    static constexpr index_t lanes = 16;     ///< partial sums per row (one AVX-512 register)

    /// Block b's weights l and l + 16 (l < 16), as exact small integers: the block's values are
    /// these times its scale.
    static void integers(const BlockQ8_0& blk, index_t l, float& lo, float& hi) noexcept {
        lo = float(blk.qs[std::size_t(l)]), hi = float(blk.qs[std::size_t(l + 16)]);
    }
    static void integers(const BlockQ4_0& blk, index_t l, float& lo, float& hi) noexcept {
        const int byte = blk.qs[std::size_t(l)];
        lo = float((byte & 0x0F) - 8), hi = float((byte >> 4) - 8);
    }

    /// Outputs [j0, j0 + cols) of rows [r0, r0 + rows). Per block, the 32 products with the
    /// integers are summed into 16 lanes and scaled by the block's d there (the scale folded out
    /// of the inner loop: widen, multiply, add); each row's lanes are added in a fixed order at the
    /// end. f32 throughout, on the exact integers and scales.
    template <index_t rows, class Block>
    void run(std::span<const Block> blocks, ConstMatrixView<float> a, MatrixView<float> c, index_t r0, index_t j0,
             index_t cols, float scale) const {
        static_assert(rows >= 1 && rows <= group_rows);
        const index_t per_row = w_.blocks_per_row();
        alignas(64) float x_pad[rows][32] = {};
        const float* x_rows[rows];
        for (index_t r = 0; r < rows; ++r) x_rows[r] = a.row(r0 + r).data();
        const index_t full = k_ / quant_block; // blocks read straight from the rows; the rest padded
        for (index_t r = 0; r < rows && full < per_row; ++r)
            std::copy_n(a.row(r0 + r).data() + full * quant_block, k_ - full * quant_block, x_pad[r]);
#if HYPERMOE_BLOCK_AVX512
        if (avx512_) {
            const float* pads[rows];
            for (index_t r = 0; r < rows; ++r) pads[r] = x_pad[r];
            for (index_t j = j0; j < j0 + cols; ++j) {
                float sums[rows];
                block_dots_avx512<int(rows)>(blocks.data() + j * per_row, per_row, x_rows, full, pads, sums);
                finish<rows>(c, r0, j, sums, scale);
            }
            return;
        }
#endif
        for (index_t j = j0; j < j0 + cols; ++j) {
            const Block* wj = blocks.data() + j * per_row;
            alignas(64) float acc[rows][lanes] = {};
            for (index_t b = 0; b < per_row; ++b) {
                const Block& blk = wj[b];
                const float d = f16_bits_to_f32(blk.d);
                alignas(64) float lo[lanes], hi[lanes];
                for (index_t l = 0; l < lanes; ++l) integers(blk, l, lo[l], hi[l]);
                for (index_t r = 0; r < rows; ++r) {
                    const float* x = b < full ? x_rows[r] + b * quant_block : x_pad[r];
                    for (index_t l = 0; l < lanes; ++l) acc[r][l] += d * (lo[l] * x[l] + hi[l] * x[l + 16]);
                }
            }
            float sums[rows];
            for (index_t r = 0; r < rows; ++r) {
                sums[r] = 0.0f;
                for (index_t l = 0; l < lanes; ++l) sums[r] += acc[r][l];
            }
            finish<rows>(c, r0, j, sums, scale);
        }
    }

    /// Output j of rows [r0, r0 + rows): bias, activation, scale, accumulate.
    template <index_t rows>
    void finish(MatrixView<float> c, index_t r0, index_t j, const float* sums, float scale) const {
        for (index_t r = 0; r < rows; ++r) {
            const float v = scale * Act::apply(sums[r] + (bias_.empty() ? 0.0f : bias_[std::size_t(j)]));
            float& out = c(r0 + r, j);
            out = accumulate_ ? out + v : v;
        }
    }

    BlockWeights w_;
    std::vector<float> bias_;
    index_t n_, k_;
    bool accumulate_;
    bool avx512_ = block_kernel_isa() == "avx512";
};

} // namespace hypermoe::detail
