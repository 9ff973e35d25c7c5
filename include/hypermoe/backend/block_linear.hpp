#pragma once
// Linear maps over weights stored in the q8_0 / q4_0 block formats (core/quant.hpp), shared by
// every backend: a backend's linear whose storage is a block format holds a BlockLinear and
// forwards to it, so the weights are held once, as blocks (34 or 18 bytes per 32 weights), never
// widened. Two precisions (core/dtype.hpp):
// - exact: f32 on the weights' exact values. Per block, the 32 products of the block's small
//   integers with the inputs are summed into 16 lanes and then scaled by the block's d (q * d is
//   exact in f32, so this equals f32 arithmetic on the dequantised weights up to the order of
//   the additions).
// - fast: the activations are quantised per block of 32 (QuantizedRows) and each block's
//   dot product is an integer one: VNNI's u8 x s8 products where the CPU has them. The weights'
//   integers enter as unsigned bytes: q4_0's nibbles as stored (0..15, the -8 folded into a
//   per-block correction -8 * sum(xq)), q8_0's as |q| with the activation's sign flipped where q
//   is negative. The integer sums are exact, so every kernel gives the same block dots; only the
//   f32 accumulation order differs between them.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <span>
#include <type_traits>
#include <vector>

#include "hypermoe/backend/cpu_isa.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/core/workspace.hpp"

HYPERMOE_INTRINSICS_BEGIN

namespace hypermoe::detail {

/// Blocks per group of the VNNI kernel: one 512-bit load of q4_0 integers holds 4 blocks (16
/// bytes each), of q8_0 integers 2 (32 bytes each). Rows of activations are padded to whole groups.
inline constexpr index_t vnni_group = 4;

/// Activation rows quantised for the `fast` precision, in a workspace. Per row, `blocks` blocks
/// of 32 (the weight rows' count rounded up to a multiple of 4), each with integers in
/// [-127, 127], an f32 scale d = amax / 127 and the integers' sum (which folds the weights'
/// unsigned offset out of the integer dot). For the VNNI kernel (`lanes`), also per 512-bit
/// group: the integers in the order the weights' bytes unpack (q4_0: the first 16 elements of 4
/// blocks, then their last 16; q8_0: as they are), and per int32 lane the scale and the start
/// value -offset * sum / (lanes per block).
struct QuantizedRows {
    index_t blocks = 0;
    std::span<std::int8_t> q;    ///< rows x blocks x 32, in element order
    std::span<float> d;          ///< rows x blocks
    std::span<std::int32_t> sum; ///< rows x blocks
    std::span<std::int8_t> lane_q;     ///< lanes only: rows x blocks x 32, in the weights' order
    std::span<float> lane_d;           ///< lanes only: rows x blocks / group x 16
    std::span<std::int32_t> lane_init; ///< lanes only: rows x blocks / group x 16

    /// Bytes of `rows` rows of `weight_blocks` blocks in a workspace.
    [[nodiscard]] static std::size_t bytes(index_t rows, index_t weight_blocks, bool lanes) noexcept {
        const index_t blocks = padded_blocks(weight_blocks);
        const std::size_t natural = padded_bytes<std::int8_t>(rows, blocks, quant_block) + padded_bytes<float>(rows, blocks) +
                                    padded_bytes<std::int32_t>(rows, blocks);
        if (!lanes) return natural;
        return natural + padded_bytes<std::int8_t>(rows, blocks, quant_block) + padded_bytes<float>(rows, blocks, lane_stride) +
               padded_bytes<std::int32_t>(rows, blocks, lane_stride);
    }
    /// Takes the buffers from `ws` and quantises every row of `a` (in parallel over rows); with
    /// `lanes`, lays them out for the VNNI kernel of weights in `format` too.
    QuantizedRows(ConstMatrixView<float> a, index_t weight_blocks, Workspace& ws, bool lanes = false, dtype format = dtype::q8_0)
        : blocks(padded_blocks(weight_blocks)), q(ws.take<std::int8_t>(a.rows() * blocks * quant_block)),
          d(ws.take<float>(a.rows() * blocks)), sum(ws.take<std::int32_t>(a.rows() * blocks)) {
        if (lanes) {
            lane_q = ws.take<std::int8_t>(a.rows() * blocks * quant_block);
            lane_d = ws.take<float>(a.rows() * blocks * lane_stride);
            lane_init = ws.take<std::int32_t>(a.rows() * blocks * lane_stride);
        }
        parallel_for(a.rows(), a.rows() * a.cols() * 8, [&](index_t r) {
            quantize_row(a.row(r), r);
            if (lanes) lay_out(r, format);
        });
    }
    [[nodiscard]] const std::int8_t* q_row(index_t r) const noexcept { return q.data() + r * blocks * quant_block; }
    [[nodiscard]] const float* d_row(index_t r) const noexcept { return d.data() + r * blocks; }
    [[nodiscard]] const std::int32_t* sum_row(index_t r) const noexcept { return sum.data() + r * blocks; }
    [[nodiscard]] const std::int8_t* lane_q_row(index_t r) const noexcept { return lane_q.data() + r * blocks * quant_block; }
    [[nodiscard]] const float* lane_d_row(index_t r) const noexcept { return lane_d.data() + r * blocks * lane_stride; }
    [[nodiscard]] const std::int32_t* lane_init_row(index_t r) const noexcept { return lane_init.data() + r * blocks * lane_stride; }

private:
    /// Lane values per block and row: 16 per group of 2 blocks at most.
    static constexpr index_t lane_stride = 8;

    [[nodiscard]] static constexpr index_t padded_blocks(index_t weight_blocks) noexcept {
        return (weight_blocks + vnni_group - 1) / vnni_group * vnni_group;
    }

    /// Row r's VNNI layout. Blocks per 512-bit group: 4 (q4_0) or 2 (q8_0); int32 lanes per
    /// block: 16 / that. The weights enter as unsigned bytes, q + 8 (q4_0's nibbles) or q + 128
    /// (q8_0's bytes with the sign bit flipped), so each block's dot carries offset * sum(xq),
    /// taken out by starting each of its lanes at -offset * sum / lanes.
    void lay_out(index_t r, dtype format) noexcept {
        const bool q4 = format == dtype::q4_0;
        const index_t per_group = q4 ? 4 : 2, lanes_per_block = 16 / per_group;
        const std::int32_t offset_per_lane = q4 ? 8 / 4 : 128 / 8;
        for (index_t g = 0; g < blocks / per_group; ++g) {
            std::int8_t* out = lane_q.data() + (r * blocks + g * per_group) * quant_block;
            const std::int8_t* in = q.data() + (r * blocks + g * per_group) * quant_block;
            for (index_t j = 0; j < per_group; ++j) {
                if (q4) { // first halves of the 4 blocks, then the second halves
                    std::copy_n(in + j * quant_block, 16, out + j * 16);
                    std::copy_n(in + j * quant_block + 16, 16, out + 64 + j * 16);
                } else {
                    std::copy_n(in + j * quant_block, quant_block, out + j * quant_block);
                }
                const index_t block = r * blocks + g * per_group + j;
                for (index_t l = 0; l < lanes_per_block; ++l) {
                    const auto i = std::size_t(r * blocks * lane_stride + g * 16 + j * lanes_per_block + l);
                    lane_d[i] = d[std::size_t(block)];
                    lane_init[i] = -offset_per_lane * sum[std::size_t(block)];
                }
            }
        }
    }

    /// q = x / d rounded to nearest even, d = amax / 127 (0 for a zero block); the tail of the
    /// last block and the padding blocks are zero. A block holding a non-finite value gets
    /// d = NaN (and q = 0), so the outputs it reaches are NaN, as with `exact`.
    void quantize_row(std::span<const float> x, index_t r) noexcept {
        const auto n = static_cast<index_t>(x.size());
        for (index_t b = 0; b < blocks; ++b) {
            std::int8_t* qb = q.data() + (r * blocks + b) * quant_block;
            const index_t len = std::clamp<index_t>(n - b * quant_block, 0, quant_block);
            const float* xb = x.data() + std::min(b * quant_block, n);
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
};

/// The exact integer dot of a weight block's integers (`qs`: ggml's bytes of a Block) with a
/// quantised activation block (the block's values are these integers times its d; q4_0's -8
/// included through the activations' sum).
template <class Block>
[[nodiscard]] std::int32_t block_int_dot(const std::uint8_t* qs, const std::int8_t* xq, std::int32_t xsum) noexcept {
    std::int32_t s = 0;
    if constexpr (std::is_same_v<Block, BlockQ8_0>) {
        // As the VNNI kernel takes it: the unsigned q + 128 times x, less 128 * sum(x). (GCC 12.2
        // with -O2 -march=native on an AVX-512 VNNI CPU turned the plain int8 x int8 sum into
        // VPDPBUSD, which reads q as unsigned: wrong sums, which test_backend's block_int_dot test
        // catches; unsigned x signed it compiles right.)
        for (std::size_t i = 0; i < 32; ++i) s += std::int32_t(std::uint8_t(qs[i] ^ 0x80u)) * xq[i];
        return s - 128 * xsum;
    } else {
        for (std::size_t j = 0; j < 16; ++j) s += std::int32_t(qs[j] & 0x0F) * xq[j] + std::int32_t(qs[j] >> 4) * xq[j + 16];
        return s - 8 * xsum;
    }
}

/// Integer bytes per block of a format.
template <class Block>
inline constexpr index_t block_bytes_of = std::is_same_v<Block, BlockQ8_0> ? 32 : 16;

#if HYPERMOE_X86_KERNELS
#define HYPERMOE_AVX512_INLINE __attribute__((target("avx512f,avx512bw"))) inline

/// A block's 32 small integers (q8_0's q, q4_0's nibble - 8) as floats: elements 0..15 in lo,
/// 16..31 in hi.
template <class Block>
HYPERMOE_AVX512_INLINE void block_integers_avx512(const std::uint8_t* qs, __m512& lo, __m512& hi) {
    if constexpr (std::is_same_v<Block, BlockQ8_0>) {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16))));
    } else {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        const __m512i eight = _mm512_set1_epi32(8);
        lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), eight));
        hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
    }
}
/// A half scale in all 16 lanes (VCVTPH2PS is AVX-512 F).
HYPERMOE_AVX512_INLINE __m512 broadcast_half(std::uint16_t h) { return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h))); }

/// The 16 lanes added in a fixed order.
HYPERMOE_AVX512_INLINE float lane_sum(__m512 v) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    float sum = 0.0f;
    for (const float l : lanes) sum += l;
    return sum;
}

/// `exact`: out[r][c] = dot of weight row c (integers qs[c], scales d[c], `blocks` blocks) with
/// activation row r; blocks below `full` are read from x[r], the last one (if `full` < `blocks`)
/// from the zero-padded x_pad[r].
template <int Rows, int Cols, class Block>
__attribute__((target("avx512f,avx512bw"))) void exact_dots_avx512(const std::uint8_t* const* qs, const std::uint16_t* const* d,
                                                                  index_t full, index_t blocks, const float* const* x,
                                                                  const float* const* x_pad, std::ptrdiff_t ahead,
                                                                  float (*out)[Cols]) {
    constexpr index_t bytes = block_bytes_of<Block>;
    __m512 acc[Rows][Cols];
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
    for (index_t b = 0; b < blocks; ++b) {
        __m512 xl[Rows], xh[Rows];
        for (int r = 0; r < Rows; ++r) {
            const float* p = b < full ? x[r] + b * quant_block : x_pad[r];
            xl[r] = _mm512_loadu_ps(p);
            xh[r] = _mm512_loadu_ps(p + 16);
        }
        for (int c = 0; c < Cols; ++c) {
            if ((b * bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(qs[c] + b * bytes + ahead), _MM_HINT_T0);
            __m512 lo, hi;
            block_integers_avx512<Block>(qs[c] + b * bytes, lo, hi);
            const __m512 scale = broadcast_half(d[c][b]);
            for (int r = 0; r < Rows; ++r) // the block's scale once per block: widen, multiply, add
                acc[r][c] = _mm512_fmadd_ps(scale, _mm512_fmadd_ps(lo, xl[r], _mm512_mul_ps(hi, xh[r])), acc[r][c]);
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) out[r][c] = lane_sum(acc[r][c]);
}

/// `fast`: out[r][c] = dot of weight row c (integers qs[c], scales d[c]) with quantised activation
/// row r in QuantizedRows' lane layout (xq, xd, xinit at the first group), over `groups` groups
/// of 4 (q4_0) or 2 (q8_0) blocks: one 512-bit load of weight bytes per group, one (q8_0) or two
/// (q4_0: low and high nibbles) VPDPBUSD per row, then the int32 lanes times (d_w * d_x) into f32.
template <int Rows, int Cols, class Block>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void fast_dots_vnni(
    const std::uint8_t* const* qs, const std::uint16_t* const* d, index_t groups, const std::int8_t* const* xq,
    const float* const* xd, const std::int32_t* const* xinit, std::ptrdiff_t ahead, float (*out)[Cols]) {
    constexpr bool q4 = std::is_same_v<Block, BlockQ4_0>;
    constexpr index_t per_group = q4 ? 4 : 2;
    // Lane l's block: l / 4 (q4_0, 4 lanes per block) or l / 8 (q8_0).
    const __m512i lane_block = q4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                  : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i nibble = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[Rows][Cols];
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
    for (index_t g = 0; g < groups; ++g) {
        __m512i lo[Cols], hi[Cols];
        __m512 dw[Cols];
        for (int c = 0; c < Cols; ++c) {
            // The weights stream from memory once: ask for the line `ahead` bytes on (the next
            // rows' same offset) so that short rows do not leave the prefetchers behind.
            _mm_prefetch(reinterpret_cast<const char*>(qs[c] + g * 64 + ahead), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(qs[c] + g * 64);
            if constexpr (q4) {
                lo[c] = _mm512_and_si512(v, nibble); // elements 0..15 of the 4 blocks: q + 8
                hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble); // elements 16..31
            } else {
                lo[c] = _mm512_xor_si512(v, sign); // q + 128, unsigned
                hi[c] = lo[c];
            }
            std::uint64_t halves = 0;
            std::memcpy(&halves, d[c] + g * per_group, per_group * sizeof(std::uint16_t));
            const __m512 scales = _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(halves))));
            dw[c] = _mm512_permutexvar_ps(lane_block, scales);
        }
        for (int r = 0; r < Rows; ++r) {
            const std::int8_t* xg = xq[r] + g * per_group * quant_block;
            const __m512i xa = _mm512_loadu_si512(xg);
            const __m512i xb = q4 ? _mm512_loadu_si512(xg + 64) : xa;
            const __m512 dx = _mm512_loadu_ps(xd[r] + g * 16);
            const __m512i init = _mm512_loadu_si512(xinit[r] + g * 16);
            for (int c = 0; c < Cols; ++c) {
                __m512i dot = _mm512_dpbusd_epi32(init, lo[c], xa);
                if constexpr (q4) dot = _mm512_dpbusd_epi32(dot, hi[c], xb);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[c], dx), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) out[r][c] = lane_sum(acc[r][c]);
}
#undef HYPERMOE_AVX512_INLINE
/// Blocks of k a prefill pass repacks and then runs every row over (8: 8 KiB of q8_0 bytes for
/// 32 columns, which stay in L1).
inline constexpr index_t prefill_chunk_blocks = 8;

/// 4 activation bytes at x in every int32 lane.
__attribute__((target("avx512f"))) inline __m512i broadcast_quad(const std::int8_t* x) {
    std::int32_t v;
    std::memcpy(&v, x, sizeof v);
    return _mm512_set1_epi32(v);
}

/// `fast` with many rows: c[r][0 .. 32) (+)= dot of activation row r with 32 weight columns
/// repacked by BlockLinear::repack (`wq`, `wd`: `nb` blocks), VNNI's operand layout: per block
/// and quad of k, 16 columns x 4 bytes, so one VPDPBUSD multiplies 4 k of 16 columns by one
/// broadcast of 4 activations. The weights enter unsigned (q + offset: q8_0's sign bit flipped,
/// q4_0's nibbles as stored), so each block's int32 sums start at -offset * sum(xq). Per block,
/// 8 VPDPBUSD per row and panel, then the int32 sums times (d_w * d_x) into f32.
template <int Rows, class Block>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void prefill_tile_vnni(
    const std::uint8_t* wq, const float* wd, index_t nb, const std::int8_t* const* xq, const float* const* xd,
    const std::int32_t* const* xsum, bool first, float* c, index_t ldc, index_t cols) {
    constexpr bool q4 = std::is_same_v<Block, BlockQ4_0>;
    constexpr std::int32_t offset = q4 ? 8 : 128;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __mmask16 mask[2];
    for (int p = 0; p < 2; ++p)
        mask[p] = static_cast<__mmask16>((1u << std::clamp<index_t>(cols - 16 * p, 0, 16)) - 1u);
    __m512 acc[Rows][2];
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < 2; ++p) acc[r][p] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[p], c + r * ldc + 16 * p);
    for (index_t b = 0; b < nb; ++b) {
        __m512i sum[Rows][2];
        for (int r = 0; r < Rows; ++r) sum[r][0] = sum[r][1] = _mm512_set1_epi32(-offset * xsum[r][b]);
        if constexpr (q4) { // per load: the low nibbles are k = 4L..4L+3, the high ones k = 16+4L..
            for (index_t l = 0; l < 4; ++l) {
                const std::uint8_t* w = wq + (b * 4 + l) * 128;
                __m512i lo[2], hi[2];
                for (int p = 0; p < 2; ++p) {
                    const __m512i v = _mm512_loadu_si512(w + 64 * p);
                    lo[p] = _mm512_and_si512(v, nibble);
                    hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                }
                for (int r = 0; r < Rows; ++r) {
                    const __m512i xl = broadcast_quad(xq[r] + b * quant_block + 4 * l), xh = broadcast_quad(xq[r] + b * quant_block + 16 + 4 * l);
                    for (int p = 0; p < 2; ++p) sum[r][p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[r][p], lo[p], xl), hi[p], xh);
                }
            }
        } else {
            for (index_t j = 0; j < 8; ++j) {
                const std::uint8_t* w = wq + (b * 8 + j) * 128;
                const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
                for (int r = 0; r < Rows; ++r) {
                    const __m512i x = broadcast_quad(xq[r] + b * quant_block + 4 * j);
                    sum[r][0] = _mm512_dpbusd_epi32(sum[r][0], w0, x);
                    sum[r][1] = _mm512_dpbusd_epi32(sum[r][1], w1, x);
                }
            }
        }
        const __m512 d0 = _mm512_loadu_ps(wd + b * 32), d1 = _mm512_loadu_ps(wd + b * 32 + 16);
        for (int r = 0; r < Rows; ++r) {
            const __m512 dx = _mm512_set1_ps(xd[r][b]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][0]), _mm512_mul_ps(d0, dx), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][1]), _mm512_mul_ps(d1, dx), acc[r][1]);
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < 2; ++p) _mm512_mask_storeu_ps(c + r * ldc + 16 * p, mask[p], acc[r][p]);
}
#endif

/// An (N, K) weight as N rows of ceil(K / 32) blocks of one format, held as two arrays: the
/// blocks' scales (half bits) and their integers (ggml's `qs` bytes: 16 per q4_0 block, 32 per
/// q8_0 block), each row contiguous. The same bytes as ggml's blocks, arranged so that one load
/// brings several blocks' integers (`block()` gives a block back in ggml's layout).
class BlockWeights {
public:
    BlockWeights() = default;
    BlockWeights(const WeightView& w, dtype format, const std::string& name)
        : format_(format), n_(w.rows()), k_(w.cols()), blocks_per_row_((w.cols() + quant_block - 1) / quant_block) {
        std::vector<float> row(static_cast<std::size_t>(k_));
        scales_.resize(std::size_t(n_ * blocks_per_row_));
        quants_.resize(std::size_t(n_ * blocks_per_row_ * block_bytes()));
        std::vector<BlockQ8_0> q8(format == dtype::q8_0 ? std::size_t(blocks_per_row_) : 0);
        std::vector<BlockQ4_0> q4(format == dtype::q4_0 ? std::size_t(blocks_per_row_) : 0);
        for (index_t r = 0; r < n_; ++r) {
            for (index_t c = 0; c < k_; ++c) row[std::size_t(c)] = w.at(r, c);
            const std::string what = concat(name, " row ", r);
            const auto keep = [&](const auto& blocks) {
                for (index_t b = 0; b < blocks_per_row_; ++b) {
                    const auto& blk = blocks[std::size_t(b)];
                    scales_[std::size_t(r * blocks_per_row_ + b)] = blk.d;
                    std::copy(blk.qs.begin(), blk.qs.end(), quants_.begin() + (r * blocks_per_row_ + b) * block_bytes());
                }
            };
            if (format == dtype::q8_0) quantize_row<BlockQ8_0>(row, q8, what), keep(q8);
            else quantize_row<BlockQ4_0>(row, q4, what), keep(q4);
        }
    }

    [[nodiscard]] dtype format() const noexcept { return format_; }
    [[nodiscard]] index_t blocks_per_row() const noexcept { return blocks_per_row_; }
    /// Integer bytes per block: 32 (q8_0) or 16 (q4_0).
    [[nodiscard]] index_t block_bytes() const noexcept { return format_ == dtype::q8_0 ? 32 : 16; }
    /// Bytes held: the integers and the scales, as many as ggml's blocks take.
    [[nodiscard]] std::size_t bytes() const noexcept { return quants_.size() + scales_.size() * sizeof(std::uint16_t); }
    /// Row n's scales and integers.
    [[nodiscard]] const std::uint16_t* scales(index_t n) const noexcept { return scales_.data() + n * blocks_per_row_; }
    [[nodiscard]] const std::uint8_t* quants(index_t n) const noexcept { return quants_.data() + n * blocks_per_row_ * block_bytes(); }

    /// Block b of row n in ggml's layout (Block matching format()).
    template <class Block>
    [[nodiscard]] Block block(index_t n, index_t b) const noexcept {
        Block blk;
        blk.d = scales(n)[b];
        std::copy_n(quants(n) + b * block_bytes(), blk.qs.size(), reinterpret_cast<std::uint8_t*>(blk.qs.data()));
        return blk;
    }
    /// The 32 values of block b of row n.
    void dequantize_block(index_t n, index_t b, std::span<float, 32> out) const noexcept {
        if (format_ == dtype::q8_0) dequantize(block<BlockQ8_0>(n, b), out);
        else dequantize(block<BlockQ4_0>(n, b), out);
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
    std::vector<std::uint16_t> scales_;
    std::vector<std::uint8_t> quants_;
};

/// c = [c +] scale * Act(a W^T + b) with W in a block format; see the file comment.
template <class Act>
class BlockLinear {
public:
    BlockLinear(const WeightView& w, std::span<const float> bias, dtype format, precision prec, const std::string& name,
                bool accumulate)
        : w_(w, format, name), bias_(bias.begin(), bias.end()), n_(w.rows()), k_(w.cols()), accumulate_(accumulate),
          kernel_(block_kernel(prec)), fast_(prec == precision::fast) {}

    [[nodiscard]] const BlockWeights& weights() const noexcept { return w_; }
    /// The instructions this map's calls run on.
    [[nodiscard]] kernel_isa kernel() const noexcept { return kernel_; }

    /// Rows from which `fast` on VNNI runs the prefill kernel (repacking the weights per call).
    static constexpr index_t prefill_rows = 16;

    /// `fast` quantises the activations into the workspace first (and the prefill kernel needs
    /// the product apart when accumulating); `exact` needs none. Never less than for fewer rows
    /// (callers size a workspace for the most rows a call may get): from prefill_rows on, at
    /// least what prefill_rows - 1 rows take in the VNNI kernel's lane layout.
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
        if (!fast_ || rows <= 0) return 0;
        const bool lanes = kernel_ == kernel_isa::avx512_vnni;
        if (!prefill(rows)) return QuantizedRows::bytes(rows, w_.blocks_per_row(), lanes);
        return std::max(QuantizedRows::bytes(rows, w_.blocks_per_row(), false) + (accumulate_ ? padded_bytes<float>(rows, n_) : 0),
                        QuantizedRows::bytes(prefill_rows - 1, w_.blocks_per_row(), lanes));
    }

    void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale) const {
        Workspace::Scope scope(ws, workspace_bytes(a.rows()));
#if HYPERMOE_X86_KERNELS
        if (prefill(a.rows())) {
            const QuantizedRows xq(a, w_.blocks_per_row(), ws);
            const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(a.rows(), n_) : c;
            if (w_.format() == dtype::q8_0) prefill_vnni<BlockQ8_0>(xq, a.rows(), t);
            else prefill_vnni<BlockQ4_0>(xq, a.rows(), t);
            const float* bias = bias_.empty() ? nullptr : bias_.data();
            if (accumulate_) epilogue_accumulate<Act>(t, c, bias, scale);
            else epilogue_in_place<Act>(c, bias, scale);
            return;
        }
#endif

        std::optional<QuantizedRows> xq;
        if (fast_) xq.emplace(a, w_.blocks_per_row(), ws, kernel_ == kernel_isa::avx512_vnni, w_.format());
        const index_t row_groups = (a.rows() + group_rows - 1) / group_rows;
        const index_t col_tiles = (n_ + tile - 1) / tile;
        parallel_for(row_groups * col_tiles, a.rows() * k_ * n_, [&](index_t item) {
            const index_t r0 = item / col_tiles * group_rows, j0 = item % col_tiles * tile;
            const index_t rows = std::min(group_rows, a.rows() - r0), cols = std::min(tile, n_ - j0);
            const auto go = [&]<int Rows>() {
                if (w_.format() == dtype::q8_0) run<Rows, BlockQ8_0>(a, xq, c, r0, j0, cols, scale);
                else run<Rows, BlockQ4_0>(a, xq, c, r0, j0, cols, scale);
            };
            switch (rows) { // a compile-time row count keeps every row's sums in registers
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

    [[nodiscard]] bool prefill(index_t rows) const noexcept {
        return fast_ && kernel_ == kernel_isa::avx512_vnni && rows >= prefill_rows;
    }

#if HYPERMOE_X86_KERNELS
    /// Rows of the prefill kernel per call: all their sums stay in registers.
    static constexpr index_t prefill_row_block = 6;

    /// t = a W^T (no epilogue) with many rows: per work item 32 columns, their weights repacked
    /// into the kernel's layout a chunk of blocks at a time (on the stack: 9 KiB), then every
    /// row block run over that chunk. Each column is computed by one thread in a fixed order.
    template <class Block>
    void prefill_vnni(const QuantizedRows& xq, index_t rows, MatrixView<float> t) const {
        const index_t per_row = w_.blocks_per_row(), items = (n_ + tile - 1) / tile;
        if (per_row == 0) { // K = 0: no blocks, the product is zero
            for (index_t r = 0; r < rows; ++r) std::fill_n(t.row(r).data(), n_, 0.0f);
            return;
        }
        parallel_for(items, rows * k_ * n_, [&](index_t item) {
            const index_t j0 = item * tile, cols = std::min(tile, n_ - j0);
            alignas(64) std::uint8_t wq[prefill_chunk_blocks * 8 * 128];
            alignas(64) float wd[prefill_chunk_blocks * 32];
            for (index_t b0 = 0; b0 < per_row; b0 += prefill_chunk_blocks) {
                const index_t nb = std::min(prefill_chunk_blocks, per_row - b0);
                repack<Block>(j0, b0, nb, wq, wd);
                for (index_t m = 0; m < rows; m += prefill_row_block) {
                    const std::int8_t* x[prefill_row_block] = {};
                    const float* d[prefill_row_block] = {};
                    const std::int32_t* sum[prefill_row_block] = {};
                    const index_t here = std::min(prefill_row_block, rows - m);
                    for (index_t r = 0; r < here; ++r)
                        x[r] = xq.q_row(m + r) + b0 * quant_block, d[r] = xq.d_row(m + r) + b0, sum[r] = xq.sum_row(m + r) + b0;
                    float* out = t.row(m).data() + j0;
                    const auto go = [&]<int Rows>() {
                        prefill_tile_vnni<Rows, Block>(wq, wd, nb, x, d, sum, b0 == 0, out, t.stride(), cols);
                    };
                    switch (here) {
                    case 1: go.template operator()<1>(); break;
                    case 2: go.template operator()<2>(); break;
                    case 3: go.template operator()<3>(); break;
                    case 4: go.template operator()<4>(); break;
                    case 5: go.template operator()<5>(); break;
                    default: go.template operator()<6>(); break;
                    }
                }
            }
        });
    }

    /// Columns [j0, j0 + 32) and blocks [b0, b0 + nb) in prefill_tile_vnni's layout: per block
    /// and quad of k, 2 x 16 columns x 4 bytes, unsigned (q8_0: q + 128; q4_0: the stored bytes,
    /// whose low nibbles are k = 4L.. and high ones k = 16 + 4L..); wd the blocks' scales as f32.
    /// Columns past N get zero weights and scales.
    template <class Block>
    void repack(index_t j0, index_t b0, index_t nb, std::uint8_t* wq, float* wd) const noexcept {
        constexpr bool q4 = std::is_same_v<Block, BlockQ4_0>;
        constexpr index_t quads = q4 ? 4 : 8; // 64-byte rows of the layout per block and 16 columns
        for (index_t c = 0; c < tile; ++c) {
            const index_t n = j0 + c, p = c / 16, lane = c % 16;
            const bool valid = n < n_;
            for (index_t b = 0; b < nb; ++b) {
                wd[b * 32 + c] = valid ? f16_bits_to_f32(w_.scales(n)[b0 + b]) : 0.0f;
                const std::uint8_t* q = valid ? w_.quants(n) + (b0 + b) * block_bytes_of<Block> : nullptr;
                for (index_t j = 0; j < quads; ++j) {
                    std::uint32_t v = q4 ? 0x88888888u : 0x80808080u; // a zero weight
                    if (valid) {
                        std::memcpy(&v, q + 4 * j, sizeof v);
                        if constexpr (!q4) v ^= 0x80808080u;
                    }
                    std::memcpy(wq + ((b * quads + j) * 2 + p) * 64 + lane * 4, &v, sizeof v);
                }
            }
        }
    }
#endif


    /// Outputs [j0, j0 + cols) of rows [r0, r0 + Rows): sums[r][j - j0] = the dot products, then
    /// bias, activation, scale and accumulation.
    template <int Rows, class Block>
    void run(ConstMatrixView<float> a, const std::optional<QuantizedRows>& xq, MatrixView<float> c, index_t r0, index_t j0,
             index_t cols, float scale) const {
        float sums[Rows][tile] = {};
        if (xq) fast_sums<Rows, Block>(*xq, r0, j0, cols, sums);
        else exact_sums<Rows, Block>(a, r0, j0, cols, sums);
        for (index_t j = 0; j < cols; ++j)
            for (index_t r = 0; r < Rows; ++r) {
                const float v = scale * Act::apply(sums[r][j] + (bias_.empty() ? 0.0f : bias_[std::size_t(j0 + j)]));
                float& out = c(r0 + r, j0 + j);
                out = accumulate_ ? out + v : v;
            }
    }

    /// Calls f.template operator()<C>(j) for j = 0, C, 2C, ... below cols with C = Cols, then one
    /// output at a time for the rest: several weight rows share each activation load.
    template <int Cols, class F>
    static void over_columns(index_t cols, F&& f) {
        index_t j = 0;
        for (; j + Cols <= cols; j += Cols) f.template operator()<Cols>(j);
        for (; j < cols; ++j) f.template operator()<1>(j);
    }

    template <int Rows, class Block>
    void exact_sums(ConstMatrixView<float> a, index_t r0, index_t j0, index_t cols, float (&sums)[Rows][tile]) const {
        const index_t per_row = w_.blocks_per_row();
        const index_t full = k_ / quant_block; // blocks read straight from the rows; the rest padded
        alignas(64) float x_pad[Rows][quant_block] = {};
        const float* x_rows[Rows];
        const float* pads[Rows];
        for (int r = 0; r < Rows; ++r) {
            x_rows[r] = a.row(r0 + r).data(), pads[r] = x_pad[r];
            if (full < per_row) std::copy_n(x_rows[r] + full * quant_block, k_ - full * quant_block, x_pad[r]);
        }
#if HYPERMOE_X86_KERNELS
        if (kernel_ != kernel_isa::portable) {
            over_columns<(Rows <= 2 ? 4 : 2)>(cols, [&]<int C>(index_t j) {
                const std::uint8_t* qs[C];
                const std::uint16_t* d[C];
                for (int cc = 0; cc < C; ++cc) qs[cc] = w_.quants(j0 + j + cc), d[cc] = w_.scales(j0 + j + cc);
                float out[Rows][C];
                const std::ptrdiff_t ahead = std::ptrdiff_t(C) * per_row * block_bytes_of<Block>; // the next C rows
                exact_dots_avx512<Rows, C, Block>(qs, d, full, per_row, x_rows, pads, ahead, out);
                for (int r = 0; r < Rows; ++r)
                    for (int cc = 0; cc < C; ++cc) sums[r][j + cc] = out[r][cc];
            });
            return;
        }
#endif
        constexpr index_t lanes = 16; // partial sums per row, as the AVX-512 kernel keeps them
        for (index_t j = 0; j < cols; ++j) {
            float acc[Rows][lanes] = {};
            for (index_t b = 0; b < per_row; ++b) {
                alignas(64) float v[quant_block];
                w_.dequantize_block(j0 + j, b, std::span<float, 32>(v)); // exact: a small integer times d
                for (int r = 0; r < Rows; ++r) {
                    const float* x = b < full ? x_rows[r] + b * quant_block : x_pad[r];
                    for (index_t l = 0; l < lanes; ++l) acc[r][l] += v[l] * x[l] + v[l + 16] * x[l + 16];
                }
            }
            for (int r = 0; r < Rows; ++r)
                for (index_t l = 0; l < lanes; ++l) sums[r][j] += acc[r][l];
        }
    }

    template <int Rows, class Block>
    void fast_sums(const QuantizedRows& xq, index_t r0, index_t j0, index_t cols, float (&sums)[Rows][tile]) const {
        const index_t per_row = w_.blocks_per_row();
        constexpr index_t bytes = block_bytes_of<Block>;
#if HYPERMOE_X86_KERNELS
        if (kernel_ == kernel_isa::avx512_vnni) {
            constexpr index_t per_group = std::is_same_v<Block, BlockQ4_0> ? 4 : 2;
            const index_t groups = per_row / per_group, tail = per_row % per_group;
            const std::int8_t* xs[Rows];
            const float* xd[Rows];
            const std::int32_t* xi[Rows];
            for (int r = 0; r < Rows; ++r) xs[r] = xq.lane_q_row(r0 + r), xd[r] = xq.lane_d_row(r0 + r), xi[r] = xq.lane_init_row(r0 + r);
            over_columns<(Rows <= 2 ? 4 : 2)>(cols, [&]<int C>(index_t j) {
                const std::uint8_t* qs[C];
                const std::uint16_t* d[C];
                for (int cc = 0; cc < C; ++cc) qs[cc] = w_.quants(j0 + j + cc), d[cc] = w_.scales(j0 + j + cc);
                float out[Rows][C];
                const std::ptrdiff_t ahead = std::ptrdiff_t(C) * per_row * bytes; // the next C rows
                fast_dots_vnni<Rows, C, Block>(qs, d, groups, xs, xd, xi, ahead, out);
                if (tail > 0) { // the row's last blocks, zero-padded to a whole group
                    alignas(64) std::uint8_t tail_qs[C][64] = {};
                    std::uint16_t tail_d[C][4] = {};
                    const std::uint8_t* tq[C];
                    const std::uint16_t* td[C];
                    for (int cc = 0; cc < C; ++cc) {
                        std::copy_n(qs[cc] + groups * per_group * bytes, tail * bytes, tail_qs[cc]);
                        std::copy_n(d[cc] + groups * per_group, tail, tail_d[cc]);
                        tq[cc] = tail_qs[cc], td[cc] = tail_d[cc];
                    }
                    const std::int8_t* txs[Rows];
                    const float* txd[Rows];
                    const std::int32_t* txi[Rows];
                    for (int r = 0; r < Rows; ++r)
                        txs[r] = xs[r] + groups * per_group * quant_block, txd[r] = xd[r] + groups * 16, txi[r] = xi[r] + groups * 16;
                    float more[Rows][C];
                    fast_dots_vnni<Rows, C, Block>(tq, td, 1, txs, txd, txi, 0, more);
                    for (int r = 0; r < Rows; ++r)
                        for (int cc = 0; cc < C; ++cc) out[r][cc] += more[r][cc];
                }
                for (int r = 0; r < Rows; ++r)
                    for (int cc = 0; cc < C; ++cc) sums[r][j + cc] = out[r][cc];
            });
            return;
        }
#endif
        for (index_t j = 0; j < cols; ++j) {
            const std::uint8_t* qs = w_.quants(j0 + j);
            const std::uint16_t* d = w_.scales(j0 + j);
            for (int r = 0; r < Rows; ++r) {
                const std::int8_t* q = xq.q_row(r0 + r);
                const float* dx = xq.d_row(r0 + r);
                const std::int32_t* sum = xq.sum_row(r0 + r);
                for (index_t b = 0; b < per_row; ++b)
                    sums[r][j] += float(block_int_dot<Block>(qs + b * bytes, q + b * quant_block, sum[b])) * (f16_bits_to_f32(d[b]) * dx[b]);
            }
        }
    }

    BlockWeights w_;
    std::vector<float> bias_;
    index_t n_, k_;
    bool accumulate_;
    kernel_isa kernel_;
    bool fast_;
};

} // namespace hypermoe::detail

HYPERMOE_INTRINSICS_END
