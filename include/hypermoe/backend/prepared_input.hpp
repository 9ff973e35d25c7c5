#pragma once
// A linear map's input made ready for the map's tiles (PreparedInput), and the block formats'
// quantised activations it can carry (QuantizedRows): what every backend's LinearMap::prepare
// returns, apart from the kernels that read it, so that the panel kernels (panels.hpp) and the
// block kernels (block_linear.hpp) can both take it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>

#include "hypermoe/backend/cpu_isa.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/core/workspace.hpp"

HYPERMOE_INTRINSICS_BEGIN

namespace hypermoe::detail {

/// Activation rows quantised for the `fast` precision, in a workspace: per row, `blocks` blocks
/// of 32 integers in [-127, 127], each block with an f32 scale d = amax / 127, the integers'
/// sum (which takes the weights' unsigned offset out of an integer dot) and d x sum (the block's
/// sum of values, which q4_k's mins multiply).
struct QuantizedRows {
    index_t blocks = 0;
    std::span<std::int8_t> q;    ///< rows x blocks x 32
    std::span<float> d;          ///< rows x blocks
    std::span<std::int32_t> sum; ///< rows x blocks
    std::span<float> dsum;       ///< rows x blocks: d x sum

    /// Bytes of `rows` rows of `blocks` blocks in a workspace.
    [[nodiscard]] static std::size_t bytes(index_t rows, index_t blocks) noexcept {
        return padded_bytes<std::int8_t>(rows, blocks, quant_block) + 2 * padded_bytes<float>(rows, blocks) +
               padded_bytes<std::int32_t>(rows, blocks);
    }
    /// Takes the buffers from `ws` and quantises every row of `a` (in parallel over rows) into
    /// `blocks` blocks (the weights' per row).
    QuantizedRows(ConstMatrixView<float> a, index_t blocks_per_row, Workspace& ws)
        : blocks(blocks_per_row), q(ws.take<std::int8_t>(a.rows() * blocks * quant_block)), d(ws.take<float>(a.rows() * blocks)),
          sum(ws.take<std::int32_t>(a.rows() * blocks)), dsum(ws.take<float>(a.rows() * blocks)) {
        const kernel_isa isa = vector_kernel();
        parallel_for(a.rows(), a.rows() * a.cols() * 8, [&](index_t r) {
            quantize_row(a.row(r), r, isa);
            for (index_t b = r * blocks; b < (r + 1) * blocks; ++b) dsum[std::size_t(b)] = d[std::size_t(b)] * float(sum[std::size_t(b)]);
        });
    }
    [[nodiscard]] const std::int8_t* q_row(index_t r) const noexcept { return q.data() + r * blocks * quant_block; }
    [[nodiscard]] const float* d_row(index_t r) const noexcept { return d.data() + r * blocks; }
    [[nodiscard]] const std::int32_t* sum_row(index_t r) const noexcept { return sum.data() + r * blocks; }
    [[nodiscard]] const float* dsum_row(index_t r) const noexcept { return dsum.data() + r * blocks; }

private:
    /// q = x / d rounded to nearest even, d = amax / 127 (0 for a zero block); the tail of the
    /// last block is zero. A block holding a non-finite value gets d = NaN (and q = 0), so the
    /// outputs it reaches are NaN, as with `exact`. Whole blocks go through AVX-512 or AVX2 where
    /// present (the same operations, so the same bits).
    void quantize_row(std::span<const float> x, index_t r, [[maybe_unused]] kernel_isa isa) noexcept { // unused without x86 kernels
        const auto n = static_cast<index_t>(x.size());
        for (index_t b = 0; b < blocks; ++b) {
            std::int8_t* qb = q.data() + (r * blocks + b) * quant_block;
            const index_t len = std::clamp<index_t>(n - b * quant_block, 0, quant_block);
            const float* xb = x.data() + std::min(b * quant_block, n);
#if HYPERMOE_X86_KERNELS
            if (isa != kernel_isa::portable && len == quant_block) {
                if (isa == kernel_isa::avx2) quantize_block_avx2(xb, qb, d[std::size_t(r * blocks + b)], sum[std::size_t(r * blocks + b)]);
                else quantize_block_avx512(xb, qb, d[std::size_t(r * blocks + b)], sum[std::size_t(r * blocks + b)]);
                continue;
            }
#endif
            float amax = 0.0f;
            bool finite = true;
            for (index_t i = 0; i < len; ++i) {
                finite = finite && is_finite(xb[i]);
                amax = std::max(amax, std::abs(xb[i]));
            }
            const float db = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
            const float id = finite && db != 0.0f ? 1.0f / db : 0.0f;
            std::int32_t s = 0;
            for (index_t i = 0; i < quant_block; ++i) {
                qb[i] = i < len && id != 0.0f ? static_cast<std::int8_t>(std::nearbyint(xb[i] * id)) : std::int8_t(0);
                s += qb[i];
            }
            d[std::size_t(r * blocks + b)] = db;
            sum[std::size_t(r * blocks + b)] = s;
        }
    }

#if HYPERMOE_X86_KERNELS
    /// One whole block as quantize_row's scalar loop does it.
    __attribute__((target("avx512f,avx512bw"))) static void quantize_block_avx512(const float* x, std::int8_t* out, float& d,
                                                                                 std::int32_t& sum) noexcept {
        const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
        const __m512 abs_lo = _mm512_abs_ps(lo), abs_hi = _mm512_abs_ps(hi);
        // Non-finite: |x| is NaN or infinity, i.e. not below infinity (false for NaN too).
        const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
        const bool finite = (_mm512_cmp_ps_mask(abs_lo, inf, _CMP_LT_OQ) & _mm512_cmp_ps_mask(abs_hi, inf, _CMP_LT_OQ)) == 0xFFFF;
        if (!finite) {
            std::fill_n(out, quant_block, std::int8_t(0));
            d = std::numeric_limits<float>::quiet_NaN(), sum = 0;
            return;
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(abs_lo, abs_hi));
        d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m512 scale = _mm512_set1_ps(id);
        // Rounded to nearest even (the default MXCSR mode, as std::nearbyint uses), then narrowed.
        const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale)), q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(q_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtepi32_epi8(q_hi));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
    }

    /// The same on AVX2: 4 registers of 8.
    __attribute__((target("avx2"))) static void quantize_block_avx2(const float* x, std::int8_t* out, float& d, std::int32_t& sum) noexcept {
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
        __m256 v[4], amax = _mm256_setzero_ps();
        int finite = 0xFF;
        HYPERMOE_UNROLL
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            const __m256 a = _mm256_and_ps(v[i], magnitude);
            finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_LT_OQ));
            amax = _mm256_max_ps(amax, a);
        }
        if (finite != 0xFF) {
            std::fill_n(out, quant_block, std::int8_t(0));
            d = std::numeric_limits<float>::quiet_NaN(), sum = 0;
            return;
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        d = _mm_cvtss_f32(m) / 127.0f;
        const __m256 scale = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4]; // rounded to nearest even, as quantize_row's std::nearbyint
        HYPERMOE_UNROLL
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        // Narrowed (|q| <= 127: no saturation); the packs interleave 128-bit lanes, which the
        // permutation puts back in order.
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        sum = _mm_cvtsi128_si32(s4);
    }
#endif
};

} // namespace hypermoe::detail

namespace hypermoe {

/// A linear map's input made ready for the map's tiles (LinearMap::prepare): the rows, and
/// what the `fast` kernels read in their place, made once in the caller's workspace for every
/// tile of a product (a tile per call would repeat it: a Mixtral-like expert's forward tiles
/// call its gate|up product 12 times). bf16 `fast` rounds the rows to bf16 (`rounded`, or, where
/// the exact kernel computes it, their values in place of the input: `a`); the block
/// formats' `fast` quantises them per block of 32 (`quantized`); `exact` q4_k (and q4_0 and mxfp4
/// on AVX2) sums each block of inputs (`block_sums`). Views only: valid while the workspace scope
/// that prepare() took them in.
struct PreparedInput {
    ConstMatrixView<float> a;                          ///< the input (M, K), as the kernels multiply it
    ConstMatrixView<std::uint16_t> rounded;            ///< bf16 bits of a, or empty
    std::optional<detail::QuantizedRows> quantized;    ///< a quantised per block, or none
    std::span<const float> block_sums;                 ///< per row and block of 32, the inputs' sum, or empty
};

} // namespace hypermoe

HYPERMOE_INTRINSICS_END
