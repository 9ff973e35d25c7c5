#pragma once
// Weights held once as panels of 16 output columns, multiplied by our own kernels: every
// backend's linear over bf16 storage (oneDNN, Eigen), the block formats' widened tiles
// (block_linear.hpp: `exact` on AVX2 with many rows), and the oneDNN backend's over f32 storage
// on CPUs where oneDNN 2.6 has no brgemm matmul (no AVX-512: its `gemm:jit` then allocates
// packing buffers on every call and splits K across threads, so its results change with the
// thread count; onednn.hpp). For any row count:
// - bf16, exact: the weights are widened in registers (a shift or a mask) and multiply the f32
//   activations in f32 FMAs: exact arithmetic on the bf16 values. With few rows a linear map is
//   bound by reading its weights, and this reads 2 bytes a weight, half of f32.
// - bf16, fast: the activations are rounded to bf16 once per call (into the caller's workspace)
//   and VDPBF16PS multiplies pairs of bf16 into f32 sums (AVX-512 BF16), 32 products per
//   instruction against the 16 of an f32 FMA. Without that instruction the rounded activations
//   are held as f32 values and the exact kernel multiplies them: the same products (a product of
//   two bf16 is exact in f32), summed in another order, as fast as `exact`.
// - f32: one load of 16 weights and one FMA per row of A.
// Which kernel runs is chosen at run time from the CPU (cpu_isa.hpp): AVX-512 or AVX2 intrinsics
// behind `target` attributes, or portable code (GCC/Clang vector extensions, which the compiler
// lowers to the build's own vector width; plain loops for other compilers).
//
// Layout: the N output columns in panels of 16. bf16: panel p holds W[16p .. 16p+15][0 .. K-1]
// as ceil(K/2) rows of 32 bf16, row j holding the pairs (W[n][2j], W[n][2j+1]) of the panel's 16
// columns n (VDPBF16PS's operand layout; K odd and the last panel are zero-padded). f32: K rows
// of the panel's 16 columns. Each thread streams whole panels front to back (a sequential read
// the hardware prefetches), four panels (64 columns) at a time, for blocks of up to 8 rows of A
// (up to 4 rows: all four panels at once; 5-8 rows: two at a time, so the accumulators fit the
// registers; VDPBF16PS, which needs no registers for widening, takes 6 rows x 4 panels, and f32
// on AVX2 blocks of 6 rows, 1 panel at a time); the (K, 64) slice stays in L2 for the next block.
// The backward passes' products run on the same kernels (panel_gemm: the right-hand operand
// packed into panels in the workspace first), which can also add to C. f32 panels go through
// K in slices of 1024 inputs (PanelKernels::k_slice: a group's slice stays in L2; L1-sized
// chunks were measured no faster). A column is computed by one thread in a fixed order, so
// results do not depend on the thread count.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "hypermoe/backend/cpu_isa.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/backend/prepared_input.hpp"
#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/workspace.hpp"

HYPERMOE_INTRINSICS_BEGIN

namespace hypermoe::detail {

/// The shape of one tile call: Rows rows of A (f32, or bf16 bits in bf16's `fast`) times Panels
/// panels of W (bf16 bits or f32).
template <class W, class In>
struct PanelTile {
    const In* a;             ///< first row of A
    index_t lda;             ///< elements from one row of A to the next
    const W* w;              ///< first panel
    index_t stride;          ///< elements from one panel to the next
    index_t k;               ///< inputs (A's valid columns; a bf16 A is zero-padded to whole pairs)
    float* c;                ///< first output
    index_t ldc;             ///< elements from one row of C to the next
    index_t cols;            ///< valid outputs from c on
    bool accumulate = false; ///< C += the product (else C =)
};
template <class In>
using Bf16Tile = PanelTile<std::uint16_t, In>;
using F32Tile = PanelTile<float, float>;

/// Stores (or adds, t.accumulate) the 16 sums of row r, panel p of a tile, up to t.cols.
template <class W, class In>
inline void panel_store_portable(const PanelTile<W, In>& t, int r, int p, const float* sums) noexcept {
    float* c = t.c + r * t.ldc + p * 16;
    const index_t valid = std::clamp<index_t>(t.cols - p * 16, 0, 16);
    for (index_t i = 0; i < valid; ++i) c[i] = t.accumulate ? c[i] + sums[i] : sums[i];
}

/// A's element i as a float (bf16 bits widened exactly).
template <class In>
[[nodiscard]] inline float bf16_panel_input(const In* a, index_t i) noexcept {
    if constexpr (std::is_same_v<In, float>) return a[i];
    else return bf16{a[i]}.to_float();
}

/// Bytes of the build's own vector registers, which the portable kernels' vector extensions
/// take one at a time: a panel's 16 floats in 1 (AVX-512), 2 (AVX) or 4 of them. Vectors wider
/// than the registers (a panel in one 64-byte vector) are lowered by GCC through the stack,
/// every broadcast of an input included: a bf16 tile of one row ran 8.6x slower than AVX2's.
inline constexpr int portable_vector_bytes =
#if defined(__AVX512F__)
    64;
#elif defined(__AVX__)
    32;
#else
    16;
#endif
/// The build's vector registers: 32 with AVX-512 and on AArch64, 16 with AVX, SSE and 32-bit ARM.
inline constexpr int portable_vector_registers =
#if defined(__AVX512F__) || defined(__aarch64__)
    32;
#else
    16;
#endif

/// Accumulators of 16 floats that one call of a portable kernel keeps: half the registers (16
/// with AVX-512, 4 with AVX and on AArch64, 2 with SSE), so that the weights' vectors fit beside
/// them. portable_panel_tile splits larger tiles. The AVX-512 kernels' tiles of up to 8 rows x 2
/// panels (16 accumulators) spilled every accumulator in portable code built for AVX2, and
/// would on NEON.
inline constexpr int portable_accumulators = portable_vector_bytes / 4 * portable_vector_registers / 2 / 16;

/// Runs the portable kernel `kernel` (a template operator()<Rows, Panels>) on tile t of Rows x
/// Panels, in calls of at most portable_accumulators accumulators: rows first in blocks of up to
/// that many, then panels. Each output is still summed in one call, over k in order: the
/// same bits as one call.
template <int Rows, int Panels, class W, class In, class Kernel>
void portable_panel_tile(const PanelTile<W, In>& t, const Kernel& kernel) noexcept {
    constexpr int rows = std::min(Rows, portable_accumulators), panels = std::max(1, std::min(Panels, portable_accumulators / rows));
    if constexpr (rows < Rows) {
        portable_panel_tile<rows, Panels>(t, kernel);
        PanelTile<W, In> rest = t;
        rest.a += rows * t.lda;
        rest.c += rows * t.ldc;
        portable_panel_tile<Rows - rows, Panels>(rest, kernel);
    } else if constexpr (panels < Panels) {
        kernel.template operator()<Rows, panels>(t);
        PanelTile<W, In> rest = t;
        rest.w += panels * t.stride;
        rest.c += panels * 16;
        rest.cols -= panels * 16;
        portable_panel_tile<Rows, Panels - panels>(rest, kernel);
    } else {
        kernel.template operator()<Rows, Panels>(t);
    }
}

/// K rows ahead that the kernels prefetch (32 pairs: 2 KiB a panel).
inline constexpr index_t bf16_prefetch_pairs = 32;

#if defined(__GNUC__) || defined(__clang__)
/// The exact kernel in GCC/Clang vector extensions, in vectors of the build's width.
template <int Rows, int Panels, class In>
void bf16_tile_portable(const Bf16Tile<In>& t) noexcept {
    using vfloat = float __attribute__((vector_size(portable_vector_bytes)));
    using vuint = std::uint32_t __attribute__((vector_size(portable_vector_bytes)));
    constexpr int lanes = portable_vector_bytes / 4, per_panel = 16 / lanes; // vectors a panel
    vfloat acc[Rows][Panels][per_panel] = {};
    const index_t full = t.k / 2;
    for (index_t j = 0; j <= full; ++j) {
        if (j == full && t.k % 2 == 0) break;
        vfloat lo[Panels][per_panel], hi[Panels][per_panel];
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p)
            HYPERMOE_UNROLL
            for (int v = 0; v < per_panel; ++v) {
                vuint x;
                std::memcpy(&x, t.w + p * t.stride + j * 32 + v * 2 * lanes, sizeof x);
                const vuint l = x << 16, h = x & 0xFFFF0000u;
                std::memcpy(&lo[p][v], &l, sizeof l);
                std::memcpy(&hi[p][v], &h, sizeof h);
            }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            const float a0 = bf16_panel_input(t.a + r * t.lda, 2 * j);
            const float a1 = j < full ? bf16_panel_input(t.a + r * t.lda, 2 * j + 1) : 0.0f;
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p)
                HYPERMOE_UNROLL
                for (int v = 0; v < per_panel; ++v) acc[r][p][v] += a0 * lo[p][v] + a1 * hi[p][v];
        }
    }
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) {
            float sums[16];
            std::memcpy(sums, &acc[r][p], sizeof sums);
            panel_store_portable(t, r, p, sums);
        }
}
#else
template <int Rows, int Panels, class In>
void bf16_tile_portable(const Bf16Tile<In>& t) noexcept {
    float acc[Rows][Panels * 16] = {};
    for (index_t k = 0; k < t.k; ++k)
        for (int r = 0; r < Rows; ++r)
            for (int n = 0; n < Panels * 16; ++n)
                acc[r][n] += bf16_panel_input(t.a + r * t.lda, k) *
                             bf16{t.w[(n / 16) * t.stride + (k / 2) * 32 + (n % 16) * 2 + k % 2]}.to_float();
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < Panels; ++p) panel_store_portable(t, r, p, acc[r] + 16 * p);
}
#endif

/// f32 weights in plain C++: 16 columns side by side, in vectors of the build's width with
/// GCC/Clang (plain loops for other compilers).
template <int Rows, int Panels>
void f32_tile_portable(const F32Tile& t) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    using vfloat = float __attribute__((vector_size(portable_vector_bytes)));
    constexpr int lanes = portable_vector_bytes / 4, per_panel = 16 / lanes;
    vfloat acc[Rows][Panels][per_panel] = {};
    for (index_t k = 0; k < t.k; ++k) {
        vfloat w[Panels][per_panel];
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p)
            HYPERMOE_UNROLL
            for (int v = 0; v < per_panel; ++v) {
                vfloat x; // loaded through a local: a memcpy into w itself keeps w on the stack (2x slower)
                std::memcpy(&x, t.w + p * t.stride + k * 16 + v * lanes, sizeof x);
                w[p][v] = x;
            }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            const float a = t.a[r * t.lda + k];
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p)
                HYPERMOE_UNROLL
                for (int v = 0; v < per_panel; ++v) acc[r][p][v] += a * w[p][v];
        }
    }
#else
    float acc[Rows][Panels][16] = {};
    for (index_t k = 0; k < t.k; ++k)
        for (int r = 0; r < Rows; ++r) {
            const float a = t.a[r * t.lda + k];
            for (int p = 0; p < Panels; ++p)
                for (int n = 0; n < 16; ++n) acc[r][p][n] += a * t.w[p * t.stride + k * 16 + n];
        }
#endif
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < Panels; ++p) {
            float sums[16];
            std::memcpy(sums, &acc[r][p], sizeof sums);
            panel_store_portable(t, r, p, sums);
        }
}

#if HYPERMOE_X86_KERNELS
/// Stores the Rows x Panels accumulators, masking the columns past t.cols.
template <int Rows, int Panels, class W, class In>
__attribute__((target("avx512f"))) inline void panel_tile_store(const PanelTile<W, In>& t, const __m512 (&acc)[Rows][Panels]) {
    HYPERMOE_UNROLL
    for (int p = 0; p < Panels; ++p) {
        const index_t valid = std::min<index_t>(16, t.cols - p * 16);
        const auto mask = static_cast<__mmask16>((1u << valid) - 1u);
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            float* c = t.c + r * t.ldc + p * 16;
            const __m512 sum = t.accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), acc[r][p]) : acc[r][p];
            _mm512_mask_storeu_ps(c, mask, sum);
        }
    }
}

/// The exact kernel in AVX-512 F: per row pair of a panel, one load, a shift (the even k) and a
/// mask (the odd k) widen 32 weights, which two FMAs per row of A multiply.
template <int Rows, int Panels, class In>
__attribute__((target("avx512f"))) void bf16_tile_avx512(const Bf16Tile<In>& t) {
    __m512 acc[Rows][Panels];
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const index_t full = t.k / 2;
    for (index_t j = 0; j < full; ++j) {
        __m512 lo[Panels], hi[Panels];
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) {
            const std::uint16_t* w = t.w + p * t.stride + j * 32;
            _mm_prefetch(reinterpret_cast<const char*>(w + bf16_prefetch_pairs * 32), _MM_HINT_T0);
            const __m512i x = _mm512_loadu_si512(w);
            lo[p] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            hi[p] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
        }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            const __m512 a0 = _mm512_set1_ps(bf16_panel_input(t.a + r * t.lda, 2 * j));
            const __m512 a1 = _mm512_set1_ps(bf16_panel_input(t.a + r * t.lda, 2 * j + 1));
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_fmadd_ps(a1, hi[p], _mm512_fmadd_ps(a0, lo[p], acc[r][p]));
        }
    }
    if (t.k % 2 != 0) // the last k alone (its pair's odd half is zero padding)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) {
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(t.w + p * t.stride + full * 32), 16));
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r)
                acc[r][p] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_panel_input(t.a + r * t.lda, 2 * full)), lo, acc[r][p]);
        }
    panel_tile_store<Rows, Panels>(t, acc);
}

/// Stores panels [p0, p0 + panels) of an AVX2 tile (two registers of 8 columns a panel), masking
/// the columns past t.cols.
template <int Rows, int PerCall, class W, class In>
__attribute__((target("avx2"))) inline void panel_tile_store_avx2(const PanelTile<W, In>& t, int p0, int panels,
                                                                  const __m256 (&acc)[Rows][PerCall][2]) {
    // Loops over the compile-time bounds, so that acc stays in registers (with `panels` as the
    // bound GCC kept it on the stack).
#pragma GCC unroll 8
    for (int p = 0; p < PerCall; ++p)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const index_t valid = p < panels ? std::clamp<index_t>(t.cols - (p0 + p) * 16 - 8 * h, 0, 8) : 0;
            if (valid == 0) continue;
            const __m256i lanes = avx2_lane_mask((1u << valid) - 1u);
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                float* c = t.c + r * t.ldc + (p0 + p) * 16 + 8 * h;
                const bool full = valid == 8;
                avx2_store_lanes(c, lanes, full, t.accumulate ? _mm256_add_ps(avx2_load_lanes(c, lanes, full), acc[r][p][h]) : acc[r][p][h]);
            }
        }
}

/// Panels an AVX2 tile of Rows rows computes together: 2 x that x Rows accumulators, beside the
/// rows' broadcast activations (the compiler keeps each across the panels) and a panel's weight
/// vectors, within 14 of the 16 registers. A count that left no room (2 rows x 3 panels,
/// 3 x 2: 12 accumulators) spilled them in the k loop: a GLU expert (d 1024, ff 2816, f32
/// weights, 1 thread, Zen 3) took 1.3x as long at 2 rows and 1.2x at 3 as with 2 and 1 panels,
/// bf16 `exact` 1.34x and 1.11x.
template <int Rows, int Panels>
inline constexpr int avx2_panels_per_call = std::max(1, std::min(Panels, (14 - 3 * Rows) / (2 * Rows)));
static_assert(avx2_panels_per_call<1, 4> == 4 && avx2_panels_per_call<2, 4> == 2 && avx2_panels_per_call<3, 4> == 1);

/// f32 weights on AVX-512: per k and panel one load of 16 weights, one FMA per row of A.
template <int Rows, int Panels>
__attribute__((target("avx512f"))) void f32_tile_avx512(const F32Tile& t) {
    __m512 acc[Rows][Panels];
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_setzero_ps();
    if (t.accumulate) // as f32_tile_avx2: C's lines arrive while the k loop runs
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p) _mm_prefetch(reinterpret_cast<const char*>(t.c + r * t.ldc + p * 16), _MM_HINT_T0);
    for (index_t k = 0; k < t.k; ++k) {
        __m512 w[Panels];
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) {
            const float* wp = t.w + p * t.stride + k * 16;
            _mm_prefetch(reinterpret_cast<const char*>(wp + 2 * bf16_prefetch_pairs * 16), _MM_HINT_T0);
            w[p] = _mm512_loadu_ps(wp);
        }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            const __m512 a = _mm512_set1_ps(t.a[r * t.lda + k]);
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_fmadd_ps(a, w[p], acc[r][p]);
        }
    }
    panel_tile_store<Rows, Panels>(t, acc);
}

/// f32 weights on AVX2 + FMA: the same, 8 columns a register, panels in groups that fit.
template <int Rows, int Panels>
__attribute__((target("avx2,fma"))) void f32_tile_avx2(const F32Tile& t) {
    constexpr int per_call = avx2_panels_per_call<Rows, Panels>;
    for (int p0 = 0; p0 < Panels; p0 += per_call) { // not unrolled: see bf16_tile_avx2
        const int panels = std::min(per_call, Panels - p0);
        __m256 acc[Rows][per_call][2];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < per_call; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
        if (t.accumulate) // C's lines arrive while the k loop runs (a backward's dW is far out of cache)
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r)
                HYPERMOE_UNROLL
                for (int p = 0; p < per_call && p < panels; ++p) _mm_prefetch(reinterpret_cast<const char*>(t.c + r * t.ldc + (p0 + p) * 16), _MM_HINT_T0);
        for (index_t k = 0; k < t.k; ++k)
            HYPERMOE_UNROLL
            for (int p = 0; p < per_call && p < panels; ++p) { // per_call: a compile-time bound
                const float* wp = t.w + (p0 + p) * t.stride + k * 16;
                _mm_prefetch(reinterpret_cast<const char*>(wp + 2 * bf16_prefetch_pairs * 16), _MM_HINT_T0);
                const __m256 lo = _mm256_loadu_ps(wp), hi = _mm256_loadu_ps(wp + 8);
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) {
                    const __m256 a = _mm256_broadcast_ss(t.a + r * t.lda + k);
                    acc[r][p][0] = _mm256_fmadd_ps(a, lo, acc[r][p][0]);
                    acc[r][p][1] = _mm256_fmadd_ps(a, hi, acc[r][p][1]);
                }
            }
        panel_tile_store_avx2<Rows, per_call>(t, p0, panels, acc);
    }
}

/// The exact kernel on AVX2 + FMA, for CPUs without AVX-512: the same widening per 32-byte half
/// of a row pair (8 columns). Rows x Panels is computed as groups of panels that fit the 16
/// registers (avx2_panels_per_call; each panel's weights are still read once per call).
template <int Rows, int Panels, class In>
__attribute__((target("avx2,fma"))) void bf16_tile_avx2(const Bf16Tile<In>& t) {
    constexpr int per_call = avx2_panels_per_call<Rows, Panels>;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const index_t full = t.k / 2;
    for (int p0 = 0; p0 < Panels; p0 += per_call) { // not unrolled: unrolled, this took 1.8x as long at -O3
        const int panels = std::min(per_call, Panels - p0);
        __m256 acc[Rows][per_call][2];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < per_call; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
        // Pair j of every panel of the group (the last one of an odd K holds one k: `both` false).
        // (A plain loop: a lambda would not inherit this function's target attribute.)
        for (index_t j = 0; j < (t.k + 1) / 2; ++j) {
            const bool both = j < full;
            HYPERMOE_UNROLL
            for (int p = 0; p < per_call && p < panels; ++p) { // per_call: a compile-time bound
                const std::uint16_t* w = t.w + (p0 + p) * t.stride + j * 32;
                _mm_prefetch(reinterpret_cast<const char*>(w + bf16_prefetch_pairs * 32), _MM_HINT_T0);
                HYPERMOE_UNROLL
                for (int h = 0; h < 2; ++h) {
                    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * h));
                    const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), hi = _mm256_castsi256_ps(_mm256_and_si256(x, high));
                    HYPERMOE_UNROLL
                    for (int r = 0; r < Rows; ++r) {
                        acc[r][p][h] = _mm256_fmadd_ps(_mm256_set1_ps(bf16_panel_input(t.a + r * t.lda, 2 * j)), lo, acc[r][p][h]);
                        if (both) acc[r][p][h] = _mm256_fmadd_ps(_mm256_set1_ps(bf16_panel_input(t.a + r * t.lda, 2 * j + 1)), hi, acc[r][p][h]);
                    }
                }
            }
        }
        panel_tile_store_avx2<Rows, per_call>(t, p0, panels, acc);
    }
}

/// The fast kernel in AVX-512 BF16: per row pair of a panel, one load of 32 weights and one
/// VDPBF16PS per row of A (its pair of bf16 activations broadcast), 32 products into 16 f32 sums.
/// A's rows are bf16, zero-padded to whole pairs.
template <int Rows, int Panels>
__attribute__((target("avx512f,avx512bf16"))) void bf16_tile_dpbf16(const Bf16Tile<std::uint16_t>& t) {
    __m512 acc[Rows][Panels];
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_setzero_ps();
    const index_t pairs = (t.k + 1) / 2;
    for (index_t j = 0; j < pairs; ++j) {
        __m512i w[Panels];
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p) {
            const std::uint16_t* wp = t.w + p * t.stride + j * 32;
            _mm_prefetch(reinterpret_cast<const char*>(wp + bf16_prefetch_pairs * 32), _MM_HINT_T0);
            w[p] = _mm512_loadu_si512(wp);
        }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            std::int32_t pair;
            std::memcpy(&pair, t.a + r * t.lda + 2 * j, sizeof pair);
            const __m512i a = _mm512_set1_epi32(pair);
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)a, (__m512bh)w[p]);
        }
    }
    panel_tile_store<Rows, Panels>(t, acc);
}
/// out[0, n) = in[0, n) rounded to bf16 (to nearest, ties to even), 16 at a time with
/// VCVTNEPS2BF16; a NaN stays a NaN. (The instruction flushes subnormal inputs to zero, which
/// VDPBF16PS would read as zero anyway.)
__attribute__((target("avx512f,avx512bf16"))) inline void bf16_round_avx512(const float* in, std::uint16_t* out, index_t n) {
    index_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
    for (; i < n; ++i) out[i] = bf16::from_float(in[i]).bits;
}
#endif

/// Each row of a rounded to bf16 (to nearest, ties to even) into out, rows ld >= a.cols()
/// elements apart, the columns past a.cols() zeroed. What the bf16 `fast` paths multiply.
/// - Out = std::uint16_t, the bf16 bits: for WeightPanels' VDPBF16PS kernel and the oneDNN
///   backend's bf16 primitive. With VCVTNEPS2BF16 where `vcvt` (the CPU has avx512_bf16), else
///   bf16::from_float.
/// - Out = float, the rounded values widened back (bf16::from_float, exact in f32): for the
///   exact kernels, which then compute bf16 `fast` on CPUs without VDPBF16PS.
/// Threaded over rows.
template <class Out>
void bf16_round_rows(ConstMatrixView<float> a, Out* out, index_t ld, [[maybe_unused]] bool vcvt) {
    static_assert(std::is_same_v<Out, std::uint16_t> || std::is_same_v<Out, float>, "bf16 bits, or their values");
    const index_t k = a.cols();
    parallel_for(a.rows(), a.rows() * ld, [&](index_t r) {
        Out* o = out + r * ld;
        const float* in = a.row(r).data();
        if constexpr (std::is_same_v<Out, float>) {
            HYPERMOE_SIMD
            for (index_t i = 0; i < k; ++i) o[i] = bf16::from_float(in[i]).to_float();
        } else {
#if HYPERMOE_X86_KERNELS
            if (vcvt) bf16_round_avx512(in, o, k);
            else
#endif
            {
                HYPERMOE_SIMD
                for (index_t i = 0; i < k; ++i) o[i] = bf16::from_float(in[i]).bits;
            }
        }
        std::fill(o + k, o + ld, Out{0});
    });
}

#if HYPERMOE_X86_KERNELS
/// dst[r * ldd + c] = src[c * lds + r] for a 16 x 16 block of floats (src's rows lds floats
/// apart): four 8 x 8 transposes (unpack, shuffle, lane permute).
__attribute__((target("avx2"))) inline void transpose16_avx2(const float* src, index_t lds, float* dst, index_t ldd = 16) noexcept {
    HYPERMOE_UNROLL
    for (int bi = 0; bi < 2; ++bi)     // block row of src: src rows 8 bi ..
        HYPERMOE_UNROLL
        for (int bj = 0; bj < 2; ++bj) { // block column of src: lanes 8 bj ..
            __m256 r[8], t[8];
            HYPERMOE_UNROLL
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (8 * bi + i) * lds + 8 * bj);
            HYPERMOE_UNROLL
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            HYPERMOE_UNROLL
            for (int i = 0; i < 8; i += 4) {
                r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
                r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
                r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
            }
            HYPERMOE_UNROLL
            for (int i = 0; i < 4; ++i) {
                t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
                t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
            }
            // t[i] is column i of the 8 x 8 block: dst row 8 bj + i, lanes 8 bi ..
            HYPERMOE_UNROLL
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (8 * bj + i) * ldd + 8 * bi, t[i]);
        }
}
#endif

/// dst[r * ldd + c] = src[c * lds + r] for r, c < 16: a 16 x 16 block transposed (of W into 16
/// rows of a panel: ldd = 16), on AVX2 unless `isa` is portable.
inline void transpose16(kernel_isa isa, const float* src, index_t lds, float* dst, index_t ldd = 16) noexcept {
#if HYPERMOE_X86_KERNELS
    if (isa != kernel_isa::portable) return transpose16_avx2(src, lds, dst, ldd);
#else
    (void)isa;
#endif
    for (index_t r = 0; r < 16; ++r)
        for (index_t c = 0; c < 16; ++c) dst[r * ldd + c] = src[c * lds + r];
}

/// dst (cols, rows) = src (rows, cols)^T, 16 x 16 blocks at a time (transpose16), threaded
/// over blocks of 16 columns: a backward's dz^T.
inline void transpose_matrix(kernel_isa isa, ConstMatrixView<float> src, MatrixView<float> dst) {
    const index_t rows = src.rows(), cols = src.cols();
    parallel_for((cols + 15) / 16, rows * cols, [&](index_t b) {
        const index_t c0 = 16 * b, c1 = std::min(cols, c0 + 16);
        index_t r0 = 0;
        if (c1 - c0 == 16)
            for (; r0 + 16 <= rows; r0 += 16)
                transpose16(isa, src.data() + r0 * src.stride() + c0, src.stride(), dst.data() + c0 * dst.stride() + r0, dst.stride());
        for (index_t r = r0; r < rows; ++r)
            for (index_t c = c0; c < c1; ++c) dst(c, r) = src(r, c);
    });
}

/// Which kernel multiplies a tile of a panel layout, chosen at run time from the CPU
/// (kernel_isa), and the walk over a whole product: WeightPanels' calls and panel_gemm's.
class PanelKernels {
public:
    static constexpr index_t panel = 16;       ///< output columns per panel
    static constexpr index_t group = 4;        ///< panels a thread computes together
    static constexpr index_t row_block = 8;    ///< rows of A computed together (5-8 rows: 2 panels at a time)

    explicit PanelKernels(kernel_isa isa) noexcept : kernel_(isa) {}
    [[nodiscard]] kernel_isa isa() const noexcept { return kernel_; }

    /// c [+]= a W^T for `rows` rows of a (f32, or bf16 bits; lda elements apart) and the n
    /// outputs held as panels at w (`stride` elements from one panel to the next, k inputs each);
    /// c's rows are ldc apart. Each thread takes groups of 4 panels, and each output is summed by
    /// one thread in k order: the bits do not depend on the thread count.
    /// With a panel range [p_begin, p_end): only those outputs (columns 16 p_begin .. of the
    /// product, at c), each summed as the whole product sums it, so a tile of a product has its
    /// bits.
    template <class W, class In>
    void multiply(const W* w, index_t stride, index_t k, index_t n, const In* a, index_t lda, index_t rows, float* c,
                  index_t ldc, bool accumulate, index_t p_begin = 0, index_t p_end = -1) const {
        const PanelRange r = range(n, p_begin, p_end);
        parallel_for(r.groups, rows * k * (r.end - 16 * p_begin), [&](index_t g) {
            const index_t p0 = p_begin + g * group;
            run_group(w + p0 * stride, stride, k, r.end, p0, a, lda, rows, c + (p0 - p_begin) * panel, ldc, accumulate);
        });
    }

    /// Floats of the per-thread scratch of multiply_packed with k inputs, for `threads` threads.
    [[nodiscard]] static index_t packed_scratch_floats(index_t k, int threads) noexcept {
        return saturating_mul(saturating_mul(index_t(std::max(threads, 1)), group * panel), std::max<index_t>(k, 0));
    }

    /// As multiply(), on f32 panels made group by group: each work item has pack(p0, count, out)
    /// write panels [p0, p0 + count) (k inputs each, k * 16 floats apart) into its thread's part
    /// of `scratch` (packed_scratch_floats(k, threads) floats, threads = current_threads()) and
    /// multiplies them while they are still in cache, so the whole packed operand is never
    /// written to memory. The same tiles as multiply(), so the same bits.
    /// With a panel range, as multiply().
    template <class Pack>
    void multiply_packed(index_t k, index_t n, const float* a, index_t lda, index_t rows, float* c, index_t ldc, bool accumulate,
                         float* scratch, Pack&& pack, index_t p_begin = 0, index_t p_end = -1) const {
        const PanelRange r = range(n, p_begin, p_end);
        // Small products on one thread, as parallel_for decides (the scratch has room for more).
        const int threads = saturating_mul(saturating_mul(rows, k), r.end - 16 * p_begin) >= parallel_grain ? current_threads() : 1;
        parallel_tasks(r.groups, threads, [&](index_t g, int slot) {
            const index_t p0 = p_begin + g * group, count = std::min(group, r.panels - p0);
            float* mine = scratch + index_t(slot) * group * panel * k;
            pack(p0, count, mine);
            run_group(static_cast<const float*>(mine), k * panel, k, r.end, p0, a, lda, rows, c + (p0 - p_begin) * panel, ldc,
                      accumulate);
        });
    }

    /// The rows of a times the up to `group` panels from p0 on (the first at w) of a product
    /// whose outputs end at column n, into c (column 16 p0 of the product), on the calling
    /// thread: one work item of multiply(). BlockLinear runs its widened tiles through it.
    template <class W, class In>
    void run_group(const W* w, index_t stride, index_t k, index_t n, index_t p0, const In* a, index_t lda, index_t rows, float* c,
                   index_t ldc, bool accumulate) const {
        const index_t panels = (n + panel - 1) / panel, count = std::min(group, panels - p0);
        PanelTile<W, In> t{nullptr, lda, w, stride, k, nullptr, ldc, std::min(group * panel, n - p0 * panel), accumulate};
        const index_t block = six_rows<W, In>() ? 6 : row_block, slice = k_slice<W>(k);
        for (index_t k0 = 0; k0 == 0 || k0 < k; k0 += slice) { // once for k = 0: C = 0 or C unchanged
            t.w = w + k0 * panel;
            t.k = std::min(slice, k - k0);
            t.accumulate = accumulate || k0 > 0;
            for (index_t m = 0; m < rows; m += block) {
                t.a = a + m * lda + k0;
                t.c = c + m * ldc;
                if (m + block < rows) prefetch_c(c + (m + block) * ldc, ldc, std::min(block, rows - m - block), t.cols);
                tile_rows(std::min(block, rows - m), count, t);
            }
        }
    }

private:
    /// Panels [p_begin, panels) of an n-column product, whose last output column is end - 1, in
    /// `groups` groups.
    struct PanelRange {
        index_t panels, end, groups;
    };
    [[nodiscard]] static PanelRange range(index_t n, index_t p_begin, index_t p_end) noexcept {
        const index_t all = (n + panel - 1) / panel, panels = p_end < 0 ? all : std::min(p_end, all);
        return {panels, std::min(n, panels * panel), (std::max<index_t>(panels - p_begin, 0) + group - 1) / group};
    }

    /// Inputs per slice of k that run_group takes through all the rows before the next slice:
    /// f32 panels in slices of 1024 inputs, so that a group's slice (4 panels x 1024 x 64 B =
    /// 256 KiB) stays in L2 while every row block reads it, and each slice's sums are added to
    /// C. A backward's dz W, whose k is N (5632 for a Mixtral-like gate|up): 4 panels' whole
    /// 1.4 MiB fell out of L2 between row blocks; the layer's dz W took 111-115 -> 105-110 ms of
    /// thread time, its backward 2.19-2.20x -> 2.14-2.16x its forward (2-core Zen 5, alternated
    /// in one process). Slices of 256 or 512 were no faster, 2048 as fast. bf16 panels (the
    /// edge formats' forward) are not sliced: unmeasured. The slices do not depend on the
    /// thread count, so neither do the bits.
    template <class W>
    [[nodiscard]] static index_t k_slice(index_t k) noexcept {
        constexpr index_t f32_slice = 1024;
        return std::is_same_v<W, float> && k > f32_slice ? f32_slice : std::max<index_t>(k, 1);
    }

    /// Asks for the next row block's lines of C (`rows` rows of `cols` floats, ldc apart) while
    /// this block computes: a tile's short k loop (a backward's dW, whose k is the token count)
    /// is too short to hide the memory latency of C's lines, which both C += and C = (a write
    /// allocates its line) wait for. dW += dz^T A of 5632 x 1024 with 128 tokens (2-core Zen 5):
    /// 6.0-6.2 -> 5.4-5.7 ms at 2 threads, 3-8% at 1; the forward's shapes unchanged.
    static void prefetch_c(const float* c, index_t ldc, index_t rows, index_t cols) noexcept {
        for (index_t r = 0; r < rows; ++r)
            for (index_t j = 0; j < cols; j += 16) __builtin_prefetch(c + r * ldc + j, 1);
    }

    /// Whether rows go in blocks of 6 instead of 8: on VDPBF16PS (no registers for widening, so
    /// 6 rows x 4 panels fit), and for f32 weights on AVX2, whose 16 registers then hold 6 rows
    /// x 1 panel (12 accumulators) instead of two 4-row halves of 8 (measured 7% faster, forward
    /// and backward, Mixtral-like layer on Zen 3).
    template <class W, class In>
    [[nodiscard]] bool six_rows() const noexcept {
        return dp<W, In>() || (std::is_same_v<W, float> && kernel_ == kernel_isa::avx2);
    }

    /// Whether tiles of bf16 weights and In activations run on VDPBF16PS.
    template <class W, class In>
    [[nodiscard]] bool dp() const noexcept {
        return std::is_same_v<W, std::uint16_t> && std::is_same_v<In, std::uint16_t> && kernel_ == kernel_isa::avx512_bf16;
    }

    /// One tile on the chosen kernel.
    template <int Rows, int Panels, class W, class In>
    void tile(const PanelTile<W, In>& t) const {
        if constexpr (Rows > 6) { // AVX2's 16 registers hold at most 6 rows' accumulators
            if (kernel_ == kernel_isa::avx2) {
                tile<4, Panels>(t);
                PanelTile<W, In> rest = t;
                rest.a += 4 * t.lda;
                rest.c += 4 * t.ldc;
                return tile<Rows - 4, Panels>(rest);
            }
        }
        if constexpr (std::is_same_v<W, float>) {
#if HYPERMOE_X86_KERNELS
            if (kernel_ == kernel_isa::avx2) return f32_tile_avx2<Rows, Panels>(t);
            if (kernel_ != kernel_isa::portable) return f32_tile_avx512<Rows, Panels>(t);
#endif
            portable_panel_tile<Rows, Panels>(t, []<int R, int P>(const F32Tile& u) { f32_tile_portable<R, P>(u); });
        } else {
#if HYPERMOE_X86_KERNELS
            if constexpr (std::is_same_v<In, std::uint16_t>)
                if (kernel_ == kernel_isa::avx512_bf16) return bf16_tile_dpbf16<Rows, Panels>(t);
            if (kernel_ == kernel_isa::avx2) return bf16_tile_avx2<Rows, Panels>(t);
            if (kernel_ != kernel_isa::portable) return bf16_tile_avx512<Rows, Panels>(t);
#endif
            portable_panel_tile<Rows, Panels>(t, []<int R, int P>(const PanelTile<W, In>& u) { bf16_tile_portable<R, P>(u); });
        }
    }

    template <int Rows, class W, class In>
    void tile_panels(index_t panels, const PanelTile<W, In>& t) const {
        switch (panels) {
        case 1: tile<Rows, 1>(t); break;
        case 2: tile<Rows, 2>(t); break;
        case 3: tile<Rows, 3>(t); break;
        default: tile<Rows, 4>(t); break;
        }
    }

    template <int Rows, class W, class In>
    void tile_halves(index_t panels, const PanelTile<W, In>& t) const {
        // Rows x 2 panels (2 Rows accumulators) at a time: each weight vector feeds Rows rows.
        for (index_t first = 0; first < panels; first += 2) {
            PanelTile<W, In> h = t;
            h.w += first * t.stride;
            h.c += first * panel;
            h.cols -= first * panel;
            if (panels - first == 1) tile<Rows, 1>(h);
            else tile<Rows, 2>(h);
        }
    }

    template <class W, class In>
    void tile_rows(index_t rows, index_t panels, const PanelTile<W, In>& t) const {
        switch (rows) {
        case 1: tile_panels<1>(panels, t); break;
        case 2: tile_panels<2>(panels, t); break;
        case 3: tile_panels<3>(panels, t); break;
        case 4: tile_panels<4>(panels, t); break;
        case 5: dp<W, In>() ? tile_panels<5>(panels, t) : tile_halves<5>(panels, t); break;
        case 6: dp<W, In>() ? tile_panels<6>(panels, t) : tile_halves<6>(panels, t); break;
        case 7: tile_halves<7>(panels, t); break;
        default: tile_halves<8>(panels, t); break;
        }
    }

    kernel_isa kernel_;
};

/// Floats of B (k, n) packed as f32 panels (pack_f32_panels).
[[nodiscard]] inline index_t f32_panel_floats(index_t k, index_t n) noexcept {
    return saturating_mul(saturating_mul((n + PanelKernels::panel - 1) / PanelKernels::panel, PanelKernels::panel), std::max<index_t>(k, 0));
}

/// B (k, n), element (i, j) = b(i, j), packed into `out` (f32_panel_floats(k, n) floats) as the
/// panel kernels read weights: column j goes to panel j / 16, lane j % 16, k rows (zero lanes
/// past n). Threaded over panels.
template <class At>
void pack_f32_panels(index_t k, index_t n, float* out, At&& b) {
    constexpr index_t panel = PanelKernels::panel;
    parallel_for((n + panel - 1) / panel, k * n, [&](index_t p) {
        const index_t j0 = p * panel, cols = std::min(panel, n - j0);
        float* dst = out + p * k * panel;
        for (index_t i = 0; i < k; ++i, dst += panel) {
            for (index_t c = 0; c < cols; ++c) dst[c] = b(i, j0 + c);
            std::fill(dst + cols, dst + panel, 0.0f);
        }
    });
}

/// The same from memory: B's element (i, j) is b[i * ldb + j] (row-major), or b[j * ldb + i]
/// with `b_cols` (column-major: W (N, K) row-major is B = W^T so, the usual case). Column-major B
/// is transposed 16 x 16 at a time through a block on the stack: whole cache lines read from 16
/// columns, whole panel rows written (3x faster than element by element: 1.1 ms for 2816 x 1024
/// at 2 threads here).
inline void pack_f32_panels(const float* b, index_t ldb, bool b_cols, index_t k, index_t n, float* out) {
    constexpr index_t panel = PanelKernels::panel;
    if (!b_cols) { // a panel's row is 16 consecutive floats of a row of B
        parallel_for((n + panel - 1) / panel, k * n, [&](index_t p) {
            const index_t j0 = p * panel, cols = std::min(panel, n - j0);
            float* dst = out + p * k * panel;
            for (index_t i = 0; i < k; ++i, dst += panel) {
                std::memcpy(dst, b + i * ldb + j0, std::size_t(cols) * sizeof(float));
                std::fill(dst + cols, dst + panel, 0.0f);
            }
        });
        return;
    }
    parallel_for((n + panel - 1) / panel, k * n, [&](index_t p) {
        const index_t j0 = p * panel, cols = std::min(panel, n - j0);
        float* dst = out + p * k * panel;
        float block[panel][panel]; // block[c][i]: column j0 + c, rows i0 + i
        index_t i0 = 0;
        for (; i0 + panel <= k; i0 += panel) {
            for (index_t c = 0; c < cols; ++c) std::copy_n(b + (j0 + c) * ldb + i0, panel, block[c]);
            for (index_t c = cols; c < panel; ++c) std::fill_n(block[c], panel, 0.0f);
            for (index_t i = 0; i < panel; ++i)
                for (index_t c = 0; c < panel; ++c) dst[(i0 + i) * panel + c] = block[c][i];
        }
        for (index_t i = i0; i < k; ++i)
            for (index_t c = 0; c < panel; ++c) dst[i * panel + c] = c < cols ? b[(j0 + c) * ldb + i] : 0.0f;
    });
}

/// A linear map's weights as panels of bf16 or f32 values; copies share them (they are never
/// written after packing).
class WeightPanels {
public:
    static constexpr index_t panel = PanelKernels::panel; ///< output columns per panel

    WeightPanels() = default;

    /// Packs W (N, K) as `values` (bf16: each element rounded to bf16, exact for bf16 sources;
    /// f32); calls run with precision `prec` (bf16 only) on the kernel this CPU offers.
    WeightPanels(const WeightView& w, dtype values, precision prec = precision::exact)
        : k_(w.cols()), n_(w.rows()), panels_((n_ + panel - 1) / panel), values_(values),
          kernel_(values == dtype::bf16 ? bf16_kernel(prec) : vector_kernel()), fast_(values == dtype::bf16 && prec == precision::fast) {
        if (values == dtype::f32) {
            f32_ = aligned_array<float>(static_cast<std::size_t>(std::max<index_t>(1, f32_panel_floats(k_, n_))));
            if (w.type() == dtype::f32) // B = W^T
                pack_f32_panels(reinterpret_cast<const float*>(w.row_bytes(0)), w.stride(), true, k_, n_, f32_.get());
            else
                pack_f32_panels(k_, n_, f32_.get(), [&](index_t k, index_t n) { return w.at(n, k); });
            return;
        }
        const index_t pairs = (k_ + 1) / 2;
        bf16_ = aligned_array<std::uint16_t>(static_cast<std::size_t>(std::max<index_t>(1, panels_ * pairs * 2 * panel)));
        for (index_t p = 0; p < panels_; ++p)
            for (index_t j = 0; j < pairs; ++j)
                for (index_t c = 0; c < panel; ++c)
                    for (index_t h = 0; h < 2; ++h) {
                        const index_t n = p * panel + c, k = 2 * j + h;
                        bf16_[static_cast<std::size_t>(((p * pairs + j) * panel + c) * 2 + h)] =
                            n < n_ && k < k_ ? bf16::from_float(w.at(n, k)).bits : std::uint16_t{0};
                    }
    }

    [[nodiscard]] bool empty() const noexcept { return bf16_ == nullptr && f32_ == nullptr; }
    /// The instructions this map's calls run on.
    [[nodiscard]] kernel_isa kernel() const noexcept { return kernel_; }
    /// Bytes held: the panels, padding included.
    [[nodiscard]] std::size_t bytes() const noexcept {
        return values_ == dtype::f32 ? std::size_t(panels_ * k_ * panel) * sizeof(float)
                                     : std::size_t(panels_ * ((k_ + 1) / 2) * 2 * panel) * sizeof(std::uint16_t);
    }

    /// Weight (n, k) as held.
    [[nodiscard]] float at(index_t n, index_t k) const noexcept {
        const index_t p = n / panel, c = n % panel;
        if (values_ == dtype::f32) return f32_[static_cast<std::size_t>((p * k_ + k) * panel + c)];
        const index_t pairs = (k_ + 1) / 2;
        return bf16{bf16_[static_cast<std::size_t>(((p * pairs + k / 2) * panel + c) * 2 + k % 2)]}.to_float();
    }
    /// Scratch of multiply_transposed for `threads` threads.
    [[nodiscard]] std::size_t transposed_workspace_bytes(int threads) const noexcept {
        return padded_bytes<float>(PanelKernels::packed_scratch_floats(n_, threads));
    }

    /// da (rows, K) [+]= dz (rows, N) W: the backward passes' dz W, W read as B (N, K) from the
    /// held f32 panels. Each work item transposes the 16 x 16 blocks of its 4 output panels into
    /// its thread's scratch and multiplies them there (PanelKernels::multiply_packed): no packed
    /// copy of the whole W. f32 panels only (the backward passes refuse other storage first).
    /// With a panel range [p_begin, p_end) of da's columns (da at column 16 p_begin), those
    /// columns alone, with the same bits.
    void multiply_transposed(const float* dz, index_t lddz, index_t rows, float* da, index_t ldda, bool accumulate,
                             Workspace& ws, index_t p_begin = 0, index_t p_end = -1) const {
        if (values_ != dtype::f32) throw config_error("WeightPanels::multiply_transposed: the panels hold bf16, expected f32");
        const int threads = current_threads();
        Workspace::Scope scope(ws, transposed_workspace_bytes(threads));
        float* scratch = ws.take<float>(PanelKernels::packed_scratch_floats(n_, threads)).data();
        PanelKernels(kernel_).multiply_packed(n_, k_, dz, lddz, rows, da, ldda, accumulate, scratch,
                                              [&](index_t q0, index_t count, float* out) { transpose_panels(q0, count, out); },
                                              p_begin, p_end);
    }

    /// c (rows, columns 16 p_begin .. of a W^T) = a W^T's panels [p_begin, p_end), exactly as
    /// apply() computes them: the f32 panels only (a backward's recomputed pre-activation).
    void multiply_columns(const float* a, index_t lda, index_t rows, float* c, index_t ldc, index_t p_begin, index_t p_end) const {
        if (values_ != dtype::f32) throw config_error("WeightPanels::multiply_columns: the panels hold bf16, expected f32");
        PanelKernels(kernel_).multiply(f32_.get(), k_ * panel, k_, n_, a, lda, rows, c, ldc, false, p_begin, p_end);
    }

    /// Scratch of apply() with `rows` rows: the product when accumulating, the rounded
    /// activations with `fast` (prepared_bytes).
    [[nodiscard]] std::size_t workspace_bytes(index_t rows, bool accumulate) const noexcept {
        if (rows <= 0) return 0;
        return (accumulate ? padded_bytes<float>(rows, n_) : 0) + prepared_bytes(rows);
    }

    /// Bytes prepare() takes for `rows` rows: with `fast`, the rows rounded to bf16 (bits for
    /// VDPBF16PS, else their values as f32).
    [[nodiscard]] std::size_t prepared_bytes(index_t rows) const noexcept {
        if (!fast_ || rows <= 0) return 0;
        return dp() ? padded_bytes<std::uint16_t>(rows, rounded_stride()) : padded_bytes<float>(rows, k_);
    }

    /// What every tile of a product with input `a` reads: with `fast`, a rounded to bf16 (in
    /// parallel over rows) into `ws` (the caller's scope, prepared_bytes(a.rows())). For
    /// VDPBF16PS as bf16 bits (`rounded`); on other CPUs as their values in f32, in place of the
    /// input (`a`), which the exact kernel multiplies: the same products (a product of two bf16
    /// is exact in f32), summed as that kernel sums them, at the exact kernel's speed. (Read as
    /// bf16 bits, every activation took a widening before its broadcast: the AVX2 kernel ran a
    /// GLU expert 1.4x slower than `exact` at 8 to 512 rows, Zen 3.)
    [[nodiscard]] PreparedInput prepare(ConstMatrixView<float> a, Workspace& ws) const {
        PreparedInput p{a, {}, {}, {}};
        if (!fast_ || a.rows() == 0) return p;
        if (!dp()) {
            const MatrixView<float> values = ws.take_matrix<float>(a.rows(), k_);
            bf16_round_rows(a, values.data(), values.stride(), false);
            p.a = values;
            return p;
        }
        const MatrixView<std::uint16_t> rounded = ws.take_matrix<std::uint16_t>(a.rows(), rounded_stride());
        bf16_round_rows(a, rounded.data(), rounded.stride(), true);
        p.rounded = rounded;
        return p;
    }

    /// c = [c +] scale * Act(a W^T + bias), what a backend's linear over these weights computes:
    /// the product into c itself (or a (M, N) scratch when accumulating), then the shared
    /// epilogue. The caller checked the shapes and reserved workspace_bytes(a.rows(), accumulate).
    template <class Act>
    void apply(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, const float* bias, float scale,
               bool accumulate) const {
        apply_columns<Act>(prepare(a, ws), c, 0, ws, bias, scale, accumulate);
    }

    /// Scratch of apply_columns for `rows` rows and `columns` columns: the product apart when
    /// accumulating.
    [[nodiscard]] static std::size_t columns_workspace_bytes(index_t rows, index_t columns, bool accumulate) noexcept {
        return accumulate && rows > 0 ? padded_bytes<float>(rows, columns) : 0;
    }

    /// Columns [n0, n0 + c.cols()) of apply()'s c from the prepared input (n0 a multiple of 16,
    /// c.cols() one too unless the columns reach N; `bias` the whole bias or null): the same
    /// panels summed the same way, so the same bits, on the calling thread's threads.
    template <class Act>
    void apply_columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, const float* bias, float scale,
                       bool accumulate) const {
        Workspace::Scope scope(ws, columns_workspace_bytes(p.a.rows(), c.cols(), accumulate));
        if (p.a.rows() == 0 || c.cols() == 0) return;
        const MatrixView<float> t = accumulate ? ws.take_matrix<float>(p.a.rows(), c.cols()) : c;
        const index_t p_begin = n0 / panel, p_end = (n0 + c.cols() + panel - 1) / panel;
        if (dp()) multiply(bf16_.get(), p.rounded.data(), p.rounded.stride(), p.a.rows(), t, p_begin, p_end);
        else if (values_ == dtype::f32) multiply(f32_.get(), p.a.data(), p.a.stride(), p.a.rows(), t, p_begin, p_end);
        else multiply(bf16_.get(), p.a.data(), p.a.stride(), p.a.rows(), t, p_begin, p_end);
        const float* b = bias != nullptr ? bias + n0 : nullptr;
        if (accumulate) epilogue_accumulate<Act>(t, c, b, scale);
        else epilogue_in_place<Act>(c, b, scale);
    }

private:
    /// Panels [q0, q0 + count) of W read as B (N, K) (panel q: inputs 16 q .. 16 q + 15 as its
    /// lanes, N rows) into `out`, k = N rows each: the held panels' 16 x 16 blocks transposed.
    void transpose_panels(index_t q0, index_t count, float* out) const {
        for (index_t q = q0; q < q0 + count; ++q, out += n_ * panel)
            for (index_t p = 0; p < panels_; ++p) {
                const float* src = f32_.get() + (p * k_ + q * panel) * panel; // rows k = 16 q .., lanes n = 16 p ..
                const index_t ks = std::min(panel, k_ - q * panel), ns = std::min(panel, n_ - p * panel);
                float* dst = out + p * panel * panel; // rows n = 16 p .., lanes k = 16 q ..
                if (ks == panel && ns == panel) {
                    transpose16(kernel_, src, panel, dst);
                    continue;
                }
                for (index_t n = 0; n < ns; ++n) {
                    for (index_t k = 0; k < ks; ++k) dst[n * panel + k] = src[k * panel + n];
                    std::fill(dst + n * panel + ks, dst + (n + 1) * panel, 0.0f);
                }
            }
    }

    /// Whether `fast` runs on VDPBF16PS (bf16 activations); otherwise on the exact kernel.
    [[nodiscard]] bool dp() const noexcept { return fast_ && kernel_ == kernel_isa::avx512_bf16; }

    /// Elements of a row of the rounded activations: K rounded up to pairs.
    [[nodiscard]] index_t rounded_stride() const noexcept { return 2 * ((k_ + 1) / 2); }

    /// t = panels [p_begin, p_end) of a W^T (columns 16 p_begin .. at t) for `rows` rows of a
    /// (f32, or bf16 bits) on this map's panels.
    template <class W, class In>
    void multiply(const W* w, const In* a, index_t lda, index_t rows, MatrixView<float> t, index_t p_begin, index_t p_end) const {
        const index_t stride = values_ == dtype::f32 ? k_ * panel : ((k_ + 1) / 2) * 2 * panel; // elements a panel
        PanelKernels(kernel_).multiply(w, stride, k_, n_, a, lda, rows, t.data(), t.stride(), false, p_begin, p_end);
    }

    index_t k_ = 0, n_ = 0, panels_ = 0;
    dtype values_ = dtype::bf16;
    std::shared_ptr<std::uint16_t[]> bf16_; ///< bf16 values (shared by copies, as oneDNN's weight memory is)
    std::shared_ptr<float[]> f32_;          ///< or f32 ones
    kernel_isa kernel_ = kernel_isa::portable;
    bool fast_ = false;
};

/// Scratch of panel_gemm with B (k, n).
[[nodiscard]] inline std::size_t panel_gemm_bytes(index_t k, index_t n) noexcept {
    return padded_bytes<float>(f32_panel_floats(k, n));
}

/// C (m, n) [+]= A (m, k) B (k, n), all f32, on the panel kernels of `isa`: B is packed into the
/// workspace (pack_f32_panels; the caller reserved panel_gemm_bytes(k, n)), then multiplied as
/// WeightPanels multiplies its weights. A's and C's rows are lda and ldc apart; B as in
/// pack_f32_panels. No allocation, and each output is summed by one thread in k order, so the
/// bits do not depend on the thread count: the backward passes' products (onednn.hpp). (B read
/// in place instead, a's rows 4 KiB apart alias in L1: the Mixtral-like layer's backward at
/// T = 512 took 141-148 instead of 111-120 ms on a 2-core Zen 5.)
inline void panel_gemm(kernel_isa isa, index_t m, index_t n, index_t k, const float* a, index_t lda, const float* b, index_t ldb,
                       bool b_cols, float* c, index_t ldc, bool accumulate, Workspace& ws) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (!accumulate)
            for (index_t r = 0; r < m; ++r) std::fill_n(c + r * ldc, n, 0.0f);
        return;
    }
    Workspace::Scope scope(ws, panel_gemm_bytes(k, n));
    const std::span<float> packed = ws.take<float>(f32_panel_floats(k, n));
    pack_f32_panels(b, ldb, b_cols, k, n, packed.data());
    PanelKernels(isa).multiply(packed.data(), k * PanelKernels::panel, k, n, a, lda, m, c, ldc, accumulate);
}

} // namespace hypermoe::detail

HYPERMOE_INTRINSICS_END
