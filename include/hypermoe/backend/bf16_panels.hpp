#pragma once
// bf16 weights, held once: every backend's linear over bf16 storage (oneDNN, Eigen) multiplies
// through these panels, for any row count. With few rows a linear map is bound by reading its
// weights, and no CPU without avx512_bf16 has a fast bf16 GEMM (oneDNN 2.6 emulates one at about
// 55 GFLOP/s). This kernel reads the weights as bf16, half the bytes of f32, widens them in
// registers (a 16-bit shift) and accumulates in f32 (exact arithmetic on the bf16 values), so it
// runs at the memory's speed with few rows and within 1.03x of oneDNN's f32 GEMM at 64 and 512
// rows on an AVX-512 machine (docs/benchmarks.md). The vector width is fixed when compiling
// (AVX-512 with -march=native on such a CPU; narrower otherwise).
//
// Layout: the N output columns in panels of 16; panel p holds W[16p .. 16p+15][0 .. K-1] as K
// rows of 16 contiguous bf16, the last panel zero-padded. Each thread streams whole panels front
// to back (a sequential read the hardware prefetches), four panels (64 columns) at a time, for
// blocks of up to 8 rows of A (up to 4 rows: all four panels at once; 5-8 rows: two at a time,
// so the accumulators fit the registers); the (K, 64) slice stays in L2 for the next block. A column is
// computed by one thread in a fixed order, so results do not depend on the thread count.
//
// The vector code uses the GCC/Clang vector extensions (16 floats: one AVX-512 register, two
// AVX2 ones); other compilers get the same arithmetic as plain loops.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"

namespace hypermoe::detail {

/// A linear map's weights as bf16 panels; copies share them (they are never written after packing).
class Bf16Panels {
public:
    static constexpr index_t panel = 16;     ///< output columns per panel
    static constexpr index_t group = 4;      ///< panels a thread computes together
    static constexpr index_t prefetch_rows = 64; ///< K rows ahead that the kernel prefetches (2 KiB a panel)
    static constexpr index_t row_block = 8;  ///< rows of A computed together (5-8 rows: 2 panels at a time)

    Bf16Panels() = default;

    /// Packs W (N, K), rounding each element to bf16 (exact for bf16 sources).
    explicit Bf16Panels(const WeightView& w)
        : k_(w.cols()), n_(w.rows()), panels_((n_ + panel - 1) / panel),
          data_(aligned_array<std::uint16_t>(static_cast<std::size_t>(std::max<index_t>(1, panels_ * k_ * panel)))) {
        for (index_t p = 0; p < panels_; ++p)
            for (index_t k = 0; k < k_; ++k)
                for (index_t j = 0; j < panel; ++j) {
                    const index_t n = p * panel + j;
                    data_[static_cast<std::size_t>((p * k_ + k) * panel + j)] =
                        n < n_ ? bf16::from_float(w.at(n, k)).bits : std::uint16_t{0};
                }
    }

    [[nodiscard]] bool empty() const noexcept { return data_ == nullptr; }

    /// c = [c +] scale * Act(a W^T + bias), what a backend's linear over bf16 storage computes:
    /// the product into t (c itself, or a (M, N) scratch when accumulating), then the shared
    /// epilogue. Every row count goes through the panels: the weights are held only here.
    template <class Act>
    void apply(ConstMatrixView<float> a, MatrixView<float> c, MatrixView<float> t, const float* bias, float scale,
               bool accumulate) const {
        multiply(a, t);
        if (accumulate) epilogue_accumulate<Act>(t, c, bias, scale);
        else epilogue_in_place<Act>(c, bias, scale);
    }

    /// c = a W^T for a (M, K) and c (M, N); the caller checked the shapes.
    void multiply(ConstMatrixView<float> a, MatrixView<float> c) const {
        const index_t groups = (panels_ + group - 1) / group;
        parallel_for(groups, a.rows() * k_ * n_, [&](index_t g) {
            const index_t p0 = g * group, panels = std::min(group, panels_ - p0);
            const index_t cols = std::min(group * panel, n_ - p0 * panel);
            const std::uint16_t* w = data_.get() + p0 * k_ * panel;
            for (index_t m = 0; m < a.rows(); m += row_block) {
                const index_t rows = std::min(row_block, a.rows() - m);
                tile_dispatch(rows, panels, a.row(m).data(), a.stride(), w, c.row(m).data() + p0 * panel, c.stride(),
                              cols);
            }
        });
    }

private:
#if defined(__GNUC__) || defined(__clang__)
    using vfloat = float __attribute__((vector_size(64)));
    using vuint = std::uint32_t __attribute__((vector_size(64)));
    using vhalf = std::uint16_t __attribute__((vector_size(32)));

    /// 16 bf16 at p, widened to floats into f. (Out-parameter: returning a 64-byte vector by
    /// value changes the ABI without AVX-512, which g++ warns about under -Werror.)
    static void widen(const std::uint16_t* p, vfloat& f) noexcept {
#if defined(__AVX512F__)
        // One vpmovzxwd + vpslld: compilers tuned for 256-bit vectors split the generic form.
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        f = reinterpret_cast<vfloat>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#else
        vhalf h;
        std::memcpy(&h, p, sizeof h);
        const vuint u = __builtin_convertvector(h, vuint) << 16;
        std::memcpy(&f, &u, sizeof f);
#endif
    }

    /// c[0..Rows)[0..min(cols, 16 Panels)) = a[0..Rows) x the Panels panels at w.
    template <int Rows, int Panels>
    void tile(const float* a, index_t lda, const std::uint16_t* w, float* c, index_t ldc, index_t cols) const noexcept {
        vfloat acc[Rows][Panels] = {};
        const index_t stride = k_ * panel; // elements from one panel to the next
        for (index_t k = 0; k < k_; ++k) {
            if (k % 2 == 0)
                for (int j = 0; j < Panels; ++j) __builtin_prefetch(w + j * stride + (k + prefetch_rows) * panel);
            vfloat wv[Panels];
            for (int j = 0; j < Panels; ++j) widen(w + j * stride + k * panel, wv[j]);
            for (int r = 0; r < Rows; ++r) {
                const float av = a[r * lda + k];
                for (int j = 0; j < Panels; ++j) acc[r][j] += av * wv[j];
            }
        }
        for (int r = 0; r < Rows; ++r)
            for (int j = 0; j < Panels; ++j) {
                const index_t valid = std::min(panel, cols - j * panel);
                std::memcpy(c + r * ldc + j * panel, &acc[r][j], sizeof(float) * static_cast<std::size_t>(valid));
            }
    }
#else
    template <int Rows, int Panels>
    void tile(const float* a, index_t lda, const std::uint16_t* w, float* c, index_t ldc, index_t cols) const noexcept {
        float acc[Rows][Panels * panel] = {};
        const index_t stride = k_ * panel;
        for (index_t k = 0; k < k_; ++k)
            for (int r = 0; r < Rows; ++r)
                for (int j = 0; j < Panels * panel; ++j)
                    acc[r][j] += a[r * lda + k] * bf16{w[(j / panel) * stride + k * panel + j % panel]}.to_float();
        for (int r = 0; r < Rows; ++r) std::copy_n(acc[r], std::min<index_t>(cols, Panels * panel), c + r * ldc);
    }
#endif

    template <int Rows>
    void tile_panels(index_t panels, const float* a, index_t lda, const std::uint16_t* w, float* c, index_t ldc,
                     index_t cols) const noexcept {
        switch (panels) {
        case 1: tile<Rows, 1>(a, lda, w, c, ldc, cols); break;
        case 2: tile<Rows, 2>(a, lda, w, c, ldc, cols); break;
        case 3: tile<Rows, 3>(a, lda, w, c, ldc, cols); break;
        default: tile<Rows, 4>(a, lda, w, c, ldc, cols); break;
        }
    }

    template <int Rows>
    void tile_halves(index_t panels, const float* a, index_t lda, const std::uint16_t* w, float* c, index_t ldc,
                     index_t cols) const noexcept {
        // Rows x 2 panels (2 Rows accumulators) at a time: each widened weight vector feeds Rows FMAs.
        for (index_t first = 0; first < panels; first += 2) {
            const std::uint16_t* wf = w + first * k_ * panel;
            float* cf = c + first * panel;
            if (panels - first == 1) tile<Rows, 1>(a, lda, wf, cf, ldc, cols - first * panel);
            else tile<Rows, 2>(a, lda, wf, cf, ldc, cols - first * panel);
        }
    }

    void tile_dispatch(index_t rows, index_t panels, const float* a, index_t lda, const std::uint16_t* w, float* c,
                       index_t ldc, index_t cols) const noexcept {
        switch (rows) {
        case 1: tile_panels<1>(panels, a, lda, w, c, ldc, cols); break;
        case 2: tile_panels<2>(panels, a, lda, w, c, ldc, cols); break;
        case 3: tile_panels<3>(panels, a, lda, w, c, ldc, cols); break;
        case 4: tile_panels<4>(panels, a, lda, w, c, ldc, cols); break;
        case 5: tile_halves<5>(panels, a, lda, w, c, ldc, cols); break;
        case 6: tile_halves<6>(panels, a, lda, w, c, ldc, cols); break;
        case 7: tile_halves<7>(panels, a, lda, w, c, ldc, cols); break;
        default: tile_halves<8>(panels, a, lda, w, c, ldc, cols); break;
        }
    }

    index_t k_ = 0, n_ = 0, panels_ = 0;
    std::shared_ptr<std::uint16_t[]> data_; ///< shared by copies, as oneDNN's weight memory is
};

} // namespace hypermoe::detail
