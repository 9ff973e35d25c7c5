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
#include <limits>
#include <optional>
#include <string_view>
#include <span>
#include <type_traits>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/core/workspace.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HYPERMOE_BLOCK_AVX512 1
#else
#define HYPERMOE_BLOCK_AVX512 0
#endif

// GCC 12 flags the intrinsics' own _mm512_undefined_* start values as maybe uninitialised once
// they are inlined here (GCC bug 105593, fixed in 13); the warning is false.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace hypermoe::detail {

/// Instruction sets of the block kernels, weakest first.
enum class block_isa : std::uint8_t { portable, avx512, avx512_vnni };

[[nodiscard]] constexpr std::string_view to_string(block_isa i) noexcept {
    constexpr std::string_view names[] = {"portable", "avx512", "avx512_vnni"};
    return names[static_cast<int>(i)];
}

/// The best instructions this CPU offers the block kernels, found once per process from CPUID:
/// avx512_vnni (AVX-512 F, BW, VL and VNNI), avx512 (F and BW) or portable (plain C++). The
/// environment variable HYPERMOE_BLOCK_ISA caps it (`portable`, or `avx512` to leave VNNI out),
/// so the tests cover every kernel a CPU can run.
[[nodiscard]] inline block_isa cpu_block_isa() {
    static const block_isa isa = [] {
        block_isa best = block_isa::portable;
#if HYPERMOE_BLOCK_AVX512
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
            best = block_isa::avx512;
            if (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) best = block_isa::avx512_vnni;
        }
        if (const char* cap = std::getenv("HYPERMOE_BLOCK_ISA"); cap != nullptr) {
            if (std::string_view(cap) == "portable") best = block_isa::portable;
            else if (std::string_view(cap) == "avx512" && best == block_isa::avx512_vnni) best = block_isa::avx512;
        }
#endif
        return best;
    }();
    return isa;
}

/// The kernel a block-format linear of precision `p` runs on this CPU: `exact` uses AVX-512 F + BW
/// where present; `fast` uses VNNI where present and the portable integer kernel otherwise (same
/// block dots, so the results do not depend on the CPU beyond f32 summation order).
[[nodiscard]] inline block_isa block_kernel(precision p) {
    const block_isa cpu = cpu_block_isa();
    if (p == precision::exact) return cpu == block_isa::portable ? block_isa::portable : block_isa::avx512;
    return cpu == block_isa::avx512_vnni ? block_isa::avx512_vnni : block_isa::portable;
}

/// The name of block_kernel(p), as `hypermoe inspect` and `bench` print it.
[[nodiscard]] inline std::string_view block_kernel_isa(precision p = precision::exact) { return to_string(block_kernel(p)); }

/// Activation rows quantised for the `fast` precision, in a workspace: per row, `blocks` blocks
/// of 32 (the weight rows' count rounded up to even: VNNI takes two blocks per instruction), each
/// with integers in [-127, 127], an f32 scale d = amax / 127 and the integers' sum (which folds
/// q4_0's -8 out of the integer dot).
struct QuantizedRows {
    index_t blocks = 0;
    std::span<std::int8_t> q;   ///< rows x blocks x 32
    std::span<float> d;         ///< rows x blocks
    std::span<std::int32_t> sum; ///< rows x blocks

    /// Bytes of `rows` rows of `weight_blocks` blocks in a workspace.
    [[nodiscard]] static std::size_t bytes(index_t rows, index_t weight_blocks) noexcept {
        const index_t blocks = (weight_blocks + 1) / 2 * 2;
        return padded_bytes<std::int8_t>(rows, blocks, quant_block) + padded_bytes<float>(rows, blocks) +
               padded_bytes<std::int32_t>(rows, blocks);
    }
    /// Takes the buffers from `ws` and quantises every row of `a` (in parallel over rows).
    QuantizedRows(ConstMatrixView<float> a, index_t weight_blocks, Workspace& ws)
        : blocks((weight_blocks + 1) / 2 * 2), q(ws.take<std::int8_t>(a.rows() * blocks * quant_block)),
          d(ws.take<float>(a.rows() * blocks)), sum(ws.take<std::int32_t>(a.rows() * blocks)) {
        parallel_for(a.rows(), a.rows() * a.cols() * 8, [&](index_t r) { quantize_row(a.row(r), r); });
    }
    [[nodiscard]] const std::int8_t* q_row(index_t r) const noexcept { return q.data() + r * blocks * quant_block; }
    [[nodiscard]] const float* d_row(index_t r) const noexcept { return d.data() + r * blocks; }
    [[nodiscard]] const std::int32_t* sum_row(index_t r) const noexcept { return sum.data() + r * blocks; }

private:
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

/// The exact integer dot of a weight block with a quantised activation block (the block's
/// values are these integers times its d; q4_0's -8 included).
[[nodiscard]] inline std::int32_t block_int_dot(const BlockQ8_0& w, const std::int8_t* xq, std::int32_t) noexcept {
    std::int32_t s = 0;
    for (std::size_t i = 0; i < 32; ++i) s += std::int32_t(w.qs[i]) * xq[i];
    return s;
}
[[nodiscard]] inline std::int32_t block_int_dot(const BlockQ4_0& w, const std::int8_t* xq, std::int32_t xsum) noexcept {
    std::int32_t s = 0;
    for (std::size_t j = 0; j < 16; ++j) s += std::int32_t(w.qs[j] & 0x0F) * xq[j] + std::int32_t(w.qs[j] >> 4) * xq[j + 16];
    return s - 8 * xsum;
}

/// A block of zeros, read in place of the missing second block of an odd count.
template <class Block>
inline const Block zero_block{};

#if HYPERMOE_BLOCK_AVX512
#define HYPERMOE_AVX512_INLINE __attribute__((target("avx512f,avx512bw"))) inline

/// A block's 32 small integers (q8_0's q, q4_0's nibble - 8) as floats: elements 0..15 in lo,
/// 16..31 in hi.
HYPERMOE_AVX512_INLINE void block_integers_avx512(const BlockQ8_0& blk, __m512& lo, __m512& hi) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data()))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data() + 16))));
}
HYPERMOE_AVX512_INLINE void block_integers_avx512(const BlockQ4_0& blk, __m512& lo, __m512& hi) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs.data())));
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
}
/// 16 halves widened (VCVTPH2PS is AVX-512 F).
HYPERMOE_AVX512_INLINE __m512 widen_halves(__m256i h) { return _mm512_cvtph_ps(h); }
/// a in the low 256 bits, b in the high.
HYPERMOE_AVX512_INLINE __m512i join_halves(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
/// A half scale in all 16 lanes.
HYPERMOE_AVX512_INLINE __m512 broadcast_half(std::uint16_t h) { return widen_halves(_mm256_set1_epi16(static_cast<short>(h))); }

/// The 16 lanes added in a fixed order.
HYPERMOE_AVX512_INLINE float lane_sum(__m512 v) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    float sum = 0.0f;
    for (const float l : lanes) sum += l;
    return sum;
}

/// `exact`: out[r][c] = dot of weight row w[c] (`blocks` blocks) with activation row r; blocks
/// below `full` are read from x[r], the last one (if `full` < `blocks`) from the zero-padded x_pad[r].
template <int Rows, int Cols, class Block>
__attribute__((target("avx512f,avx512bw"))) void exact_dots_avx512(const Block* const* w, index_t full, index_t blocks,
                                                                  const float* const* x, const float* const* x_pad,
                                                                  float (*out)[Cols]) {
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
            __m512 lo, hi;
            block_integers_avx512(w[c][b], lo, hi);
            const __m512 d = broadcast_half(w[c][b].d);
            for (int r = 0; r < Rows; ++r) // the block's scale once per block: widen, multiply, add
                acc[r][c] = _mm512_fmadd_ps(d, _mm512_fmadd_ps(lo, xl[r], _mm512_mul_ps(hi, xh[r])), acc[r][c]);
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) out[r][c] = lane_sum(acc[r][c]);
}

#define HYPERMOE_VNNI_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline

/// Blocks b0 and b1 of a weight row as 64 unsigned bytes in element order (VNNI's u8 operand)
/// and their scales (lanes 0-7: b0's, 8-15: b1's). q4_0: the nibbles as stored; q8_0: |q|, with
/// `neg` marking the bytes whose q is negative.
HYPERMOE_VNNI_INLINE void weight_pair_vnni(const BlockQ4_0& b0, const BlockQ4_0& b1, __m512i& u, __m512& d, __mmask64& neg) {
    const __m256i bytes = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b1.qs.data())),
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0.qs.data())));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(bytes, m), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m);
    const __m512i v = join_halves(lo, hi); // lo0 lo1 hi0 hi1
    u = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));                // lo0 hi0 lo1 hi1
    d = widen_halves(_mm256_set_m128i(_mm_set1_epi16(static_cast<short>(b1.d)), _mm_set1_epi16(static_cast<short>(b0.d))));
    neg = 0;
}
HYPERMOE_VNNI_INLINE void weight_pair_vnni(const BlockQ8_0& b0, const BlockQ8_0& b1, __m512i& u, __m512& d, __mmask64& neg) {
    const __m512i v = join_halves(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0.qs.data())),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1.qs.data())));
    neg = _mm512_movepi8_mask(v);
    u = _mm512_abs_epi8(v);
    d = widen_halves(_mm256_set_m128i(_mm_set1_epi16(static_cast<short>(b1.d)), _mm_set1_epi16(static_cast<short>(b0.d))));
}

/// `fast`: out[r][c] = dot of weight row w[c] (`blocks` blocks) with the quantised activation
/// chunk x[r], two blocks per VNNI instruction. Each block's 8 int32 lanes start at -xsum, so
/// q4_0's -8 * xsum is folded into the integer sums (0 for q8_0).
template <int Rows, int Cols, class Block>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void fast_dots_vnni(const Block* const* w, index_t blocks,
                                                                                    const QuantizedRows& x, index_t r0,
                                                                                    float (*out)[Cols]) {
    constexpr bool q4 = std::is_same_v<Block, BlockQ4_0>;
    __m512 acc[Rows][Cols];
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
    for (index_t b = 0; b < blocks; b += 2) {
        __m512i u[Cols];
        __m512 dw[Cols];
        __mmask64 neg[Cols];
        for (int c = 0; c < Cols; ++c)
            weight_pair_vnni(w[c][b], b + 1 < blocks ? w[c][b + 1] : zero_block<Block>, u[c], dw[c], neg[c]);
        for (int r = 0; r < Rows; ++r) {
            const float* xd = x.d_row(r0 + r) + b;
            const std::int32_t* xs = x.sum_row(r0 + r) + b;
            const __m512i xv = _mm512_loadu_si512(x.q_row(r0 + r) + b * quant_block);
            const __m512 dx = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xd[0]), _mm512_set1_ps(xd[1]));
            const __m512i init = q4 ? _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(-xs[0]), _mm512_set1_epi32(-xs[1]))
                                    : _mm512_setzero_si512();
            for (int c = 0; c < Cols; ++c) {
                const __m512i signed_x = q4 ? xv : _mm512_mask_sub_epi8(xv, neg[c], _mm512_setzero_si512(), xv);
                const __m512i dot = _mm512_dpbusd_epi32(init, u[c], signed_x);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[c], dx), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int c = 0; c < Cols; ++c) out[r][c] = lane_sum(acc[r][c]);
}
#undef HYPERMOE_VNNI_INLINE
#undef HYPERMOE_AVX512_INLINE
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
    BlockLinear(const WeightView& w, std::span<const float> bias, dtype format, precision prec, const std::string& name,
                bool accumulate)
        : w_(w, format, name), bias_(bias.begin(), bias.end()), n_(w.rows()), k_(w.cols()), accumulate_(accumulate),
          kernel_(block_kernel(prec)), fast_(prec == precision::fast) {}

    [[nodiscard]] const BlockWeights& weights() const noexcept { return w_; }
    /// The instructions this map's calls run on.
    [[nodiscard]] block_isa kernel() const noexcept { return kernel_; }

    /// `fast` quantises the activations into the workspace first; `exact` needs none.
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
        return fast_ && rows > 0 ? QuantizedRows::bytes(rows, w_.blocks_per_row()) : 0;
    }

    void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale) const {
        Workspace::Scope scope(ws, workspace_bytes(a.rows()));
        std::optional<QuantizedRows> xq;
        if (fast_) xq.emplace(a, w_.blocks_per_row(), ws);
        const index_t row_groups = (a.rows() + group_rows - 1) / group_rows;
        const index_t col_tiles = (n_ + tile - 1) / tile;
        parallel_for(row_groups * col_tiles, a.rows() * k_ * n_, [&](index_t item) {
            const index_t r0 = item / col_tiles * group_rows, j0 = item % col_tiles * tile;
            const index_t rows = std::min(group_rows, a.rows() - r0), cols = std::min(tile, n_ - j0);
            const auto go = [&]<int Rows>() {
                if (w_.format() == dtype::q8_0) run<Rows>(w_.q8_0(), a, xq, c, r0, j0, cols, scale);
                else run<Rows>(w_.q4_0(), a, xq, c, r0, j0, cols, scale);
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

    /// Outputs [j0, j0 + cols) of rows [r0, r0 + Rows): sums[r][j - j0] = the dot products, then
    /// bias, activation, scale and accumulation.
    template <int Rows, class Block>
    void run(std::span<const Block> blocks, ConstMatrixView<float> a, const std::optional<QuantizedRows>& xq, MatrixView<float> c,
             index_t r0, index_t j0, index_t cols, float scale) const {
        float sums[Rows][tile] = {};
        if (xq) fast_sums<Rows>(blocks, *xq, r0, j0, cols, sums);
        else exact_sums<Rows>(blocks, a, r0, j0, cols, sums);
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
    void exact_sums(std::span<const Block> blocks, ConstMatrixView<float> a, index_t r0, index_t j0, index_t cols,
                    float (&sums)[Rows][tile]) const {
        const index_t per_row = w_.blocks_per_row();
        const index_t full = k_ / quant_block; // blocks read straight from the rows; the rest padded
        alignas(64) float x_pad[Rows][quant_block] = {};
        const float* x_rows[Rows];
        const float* pads[Rows];
        for (int r = 0; r < Rows; ++r) {
            x_rows[r] = a.row(r0 + r).data(), pads[r] = x_pad[r];
            if (full < per_row) std::copy_n(x_rows[r] + full * quant_block, k_ - full * quant_block, x_pad[r]);
        }
#if HYPERMOE_BLOCK_AVX512
        if (kernel_ != block_isa::portable) {
            over_columns<(Rows <= 2 ? 4 : 2)>(cols, [&]<int C>(index_t j) {
                const Block* w[C];
                for (int cc = 0; cc < C; ++cc) w[cc] = blocks.data() + (j0 + j + cc) * per_row;
                float out[Rows][C];
                exact_dots_avx512<Rows, C>(w, full, per_row, x_rows, pads, out);
                for (int r = 0; r < Rows; ++r)
                    for (int cc = 0; cc < C; ++cc) sums[r][j + cc] = out[r][cc];
            });
            return;
        }
#endif
        constexpr index_t lanes = 16; // partial sums per row, as the AVX-512 kernel keeps them
        for (index_t j = 0; j < cols; ++j) {
            const Block* wj = blocks.data() + (j0 + j) * per_row;
            float acc[Rows][lanes] = {};
            for (index_t b = 0; b < per_row; ++b) {
                alignas(64) float v[quant_block];
                dequantize(wj[b], std::span<float, 32>(v)); // exact: a small integer times d
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
    void fast_sums(std::span<const Block> blocks, const QuantizedRows& xq, index_t r0, index_t j0, index_t cols,
                   float (&sums)[Rows][tile]) const {
        const index_t per_row = w_.blocks_per_row();
#if HYPERMOE_BLOCK_AVX512
        if (kernel_ == block_isa::avx512_vnni) {
            over_columns<(Rows <= 2 ? 4 : 2)>(cols, [&]<int C>(index_t j) {
                const Block* w[C];
                for (int cc = 0; cc < C; ++cc) w[cc] = blocks.data() + (j0 + j + cc) * per_row;
                float out[Rows][C];
                fast_dots_vnni<Rows, C>(w, per_row, xq, r0, out);
                for (int r = 0; r < Rows; ++r)
                    for (int cc = 0; cc < C; ++cc) sums[r][j + cc] = out[r][cc];
            });
            return;
        }
#endif
        for (index_t j = 0; j < cols; ++j) {
            const Block* wj = blocks.data() + (j0 + j) * per_row;
            for (int r = 0; r < Rows; ++r) {
                const std::int8_t* q = xq.q_row(r0 + r);
                const float* d = xq.d_row(r0 + r);
                const std::int32_t* sum = xq.sum_row(r0 + r);
                for (index_t b = 0; b < per_row; ++b)
                    sums[r][j] += float(block_int_dot(wj[b], q + b * quant_block, sum[b])) * (f16_bits_to_f32(wj[b].d) * d[b]);
            }
        }
    }

    BlockWeights w_;
    std::vector<float> bias_;
    index_t n_, k_;
    bool accumulate_;
    block_isa kernel_;
    bool fast_;
};

} // namespace hypermoe::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
