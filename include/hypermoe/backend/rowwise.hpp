#pragma once
// A linear map whose result for a row never depends on anything but that row: not on the other
// rows of the call, their number, the thread count or how the work is split. Each output
// element is summed over K in ascending order in f32 (vectorised across outputs, rows blocked
// for reuse of the weights), then the bias and activation are applied. The fast backends give
// up this property for speed (oneDNN picks a kernel by row bucket, Eigen a GEMV for one row), so
// code whose results must be independent of batch composition uses this map instead: HyperMoE's
// generation, whose adapter for a pattern must be the same bits whichever batch generated it.
// It models LinearMap, so it takes the same weights, options and errors as every backend.

#include <algorithm>
#include <span>
#include <vector>

#include "hypermoe/backend/block_linear.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/workspace.hpp"

namespace hypermoe::detail {

template <class Act>
class RowwiseLinear : public LinearBase {
public:
    RowwiseLinear(WeightView w, std::span<const float> bias, LinearOptions opt)
        : LinearBase(w, bias, opt), wt_(std::size_t(k_ * n_)), bias_(bias.begin(), bias.end()) {
        // Block formats are widened to their exact values: this map serves small weights (the
        // hypernetwork's), where one layout for every format keeps the kernel simple.
        const BlockWeights blocks = is_block_format(storage_) ? BlockWeights(w, storage_, name_) : BlockWeights();
        for (index_t r = 0; r < n_; ++r)
            for (index_t c = 0; c < k_; ++c)
                wt_[std::size_t(c * n_ + r)] = is_block_format(storage_) ? blocks.at(r, c) : stored_value(w.at(r, c), storage_);
    }

    [[nodiscard]] std::size_t workspace_bytes(index_t /*rows*/) const noexcept { return 0; }
    [[nodiscard]] bool has_bias() const noexcept { return !bias_.empty(); }

    /// c = [c +] scale * Act(a W^T + b).
    void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& /*ws*/, float scale = 1.0f) const {
        check_call(a, c);
        const index_t row_blocks = (a.rows() + block_rows - 1) / block_rows;
        const index_t col_tiles = (n_ + tile - 1) / tile;
        parallel_for(row_blocks * col_tiles, a.rows() * k_ * n_, [&](index_t item) {
            const index_t r0 = item / col_tiles * block_rows, j0 = item % col_tiles * tile;
            block<false>(a, c, r0, std::min(block_rows, a.rows() - r0), j0, std::min(tile, n_ - j0), scale);
        });
    }

    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const noexcept { return affine_gradient_bytes(rows); }

    /// The backward of operator()(a, c, ws, scale) given dc = dL/dC: da [+]= dz W,
    /// g.weight += dz^T a, g.bias += the column sums of dz, where dz = scale * dc * Act'(Z)
    /// (Z recomputed with the forward's own sums). Row-wise like the forward: every element
    /// of da and of the gradients is summed in one fixed order (da over N in double, the
    /// weight gradient over the rows in order), so the result does not depend on the thread
    /// count. f32 storage only.
    void backward(ConstMatrixView<float> a, ConstMatrixView<float> dc, MatrixView<float> da, const LinearGrads& g, Workspace& ws,
                  bool accumulate_input = false, float scale = 1.0f) const {
        check_backward(a, dc, da, g);
        Workspace::Scope scope(ws, backward_workspace_bytes(a.rows()));
        const index_t m = a.rows();
        const ConstMatrixView<float> dz = affine_gradient<Act>(dc, scale, ws, [&](MatrixView<float> z) {
            const index_t row_blocks = (m + block_rows - 1) / block_rows, col_tiles = (n_ + tile - 1) / tile;
            parallel_for(row_blocks * col_tiles, m * k_ * n_, [&](index_t item) {
                const index_t r0 = item / col_tiles * block_rows, j0 = item % col_tiles * tile;
                block<true>(a, z, r0, std::min(block_rows, m - r0), j0, std::min(tile, n_ - j0), 1.0f);
            });
        });
        // da (m, k) = dz (m, n) W (n, k): one dot over a row of W^T per element, in double, in
        // `lanes` partial sums (element j goes to lane j % lanes; the lanes are added in order):
        // a fixed order that vectorises.
        parallel_for(m * k_, m * k_ * n_, [&](index_t item) {
            const index_t r = item / k_, k = item % k_;
            const float* w = wt_.data() + k * n_;
            const float* g = dz.row(r).data();
            constexpr index_t lanes = 8;
            double part[lanes] = {};
            index_t j = 0;
            for (; j + lanes <= n_; j += lanes)
                for (index_t l = 0; l < lanes; ++l) part[l] += double(g[j + l]) * double(w[j + l]);
            for (; j < n_; ++j) part[j % lanes] += double(g[j]) * double(w[j]);
            double acc = accumulate_input ? da(r, k) : 0.0;
            for (index_t l = 0; l < lanes; ++l) acc += part[l];
            da(r, k) = float(acc);
        });
        // dW (n, k) += dz^T a: row n of dW gathers the rows of a in order.
        parallel_for(n_, m * k_ * n_, [&](index_t n) {
            const auto out = g.weight.row(n);
            for (index_t r = 0; r < m; ++r) {
                const float s = dz(r, n);
                const auto in = a.row(r);
                for (index_t k = 0; k < k_; ++k) out[std::size_t(k)] += s * in[std::size_t(k)];
            }
        });
        add_column_sums(dz, g.bias);
    }

private:
    static constexpr index_t block_rows = 4; ///< rows that share one pass over a weight tile
    static constexpr index_t tile = 64;      ///< output columns per item (4 AVX-512 registers a row)

    /// Rows r0 .. r0+rows, columns j0 .. j0+cols of the call's result; with `pre_activation`,
    /// of Z = a W^T + b instead (for backward: no activation, no scale, no accumulation).
    template <bool pre_activation>
    void block(ConstMatrixView<float> a, MatrixView<float> c, index_t r0, index_t rows, index_t j0, index_t cols,
               float scale) const {
        float acc[block_rows][tile] = {};
        for (index_t i = 0; i < k_; ++i) {
            const float* w = wt_.data() + i * n_ + j0;
            for (index_t r = 0; r < rows; ++r) {
                const float x = a(r0 + r, i);
                HYPERMOE_SIMD
                for (index_t j = 0; j < cols; ++j) acc[r][j] += x * w[j];
            }
        }
        for (index_t r = 0; r < rows; ++r) {
            float* out = c.row(r0 + r).data() + j0;
            for (index_t j = 0; j < cols; ++j) {
                const float z = acc[r][j] + (bias_.empty() ? 0.0f : bias_[std::size_t(j0 + j)]);
                if constexpr (pre_activation) {
                    out[j] = z;
                } else {
                    const float v = scale * Act::apply(z);
                    out[j] = accumulate_ ? out[j] + v : v;
                }
            }
        }
    }

    std::vector<float> wt_;   ///< W^T (K, N) row-major
    std::vector<float> bias_; ///< N, or empty
};

/// The zeroed gradients of a row-wise map's weight (N, K) and bias (N, or empty without one),
/// and their GradientShape entries: what the HyperMoE parts built on it share.
template <class Act>
[[nodiscard]] Matrix<float> weight_gradient(const RowwiseLinear<Act>& lin) {
    return Matrix<float>(lin.out_features(), lin.in_features());
}
template <class Act>
[[nodiscard]] std::vector<float> bias_gradient(const RowwiseLinear<Act>& lin) {
    return std::vector<float>(lin.has_bias() ? std::size_t(lin.out_features()) : 0);
}
template <class Act>
[[nodiscard]] GradientShape weight_gradient_shape(const char* name, const Matrix<float>& g, const RowwiseLinear<Act>& lin) {
    return {name, g.rows(), g.cols(), lin.out_features(), lin.in_features()};
}
template <class Act>
[[nodiscard]] GradientShape bias_gradient_shape(const char* name, const std::vector<float>& g, const RowwiseLinear<Act>& lin) {
    return {name, index_t(g.size()), 1, lin.has_bias() ? lin.out_features() : 0, 1};
}

} // namespace hypermoe::detail
