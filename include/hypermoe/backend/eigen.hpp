#pragma once
// The Eigen backend (opt-in: include this header and depend on Eigen 3.4). Weights are kept as
// a row-major f32 (N, K) matrix; bf16 weights are widened once at construction (exact: every
// bf16 is a float), so results equal the reference's to float rounding.
//
// Threading is ours, not Eigen's: N is cut into fixed blocks of `column_block` outputs, one
// single-threaded Eigen GEMM (and its epilogue, while C is in cache) per block, blocks spread
// over OpenMP threads. Eigen's own parallel GEMM splits rows by thread count, which changed the
// summation order (measured: 1 vs 2 threads not bitwise equal at d = 256); with fixed blocks
// every output element is computed the same way for any thread count.

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/linear_spec.hpp"

namespace hypermoe {

struct eigen {
    static constexpr std::string_view name = "eigen";

    template <class Act>
    class linear : public detail::LinearBase {
        using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        using ConstMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
        using Map = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              bias_(bias.begin(), bias.end()), w_(n_, k_) {
            for (index_t r = 0; r < n_; ++r)
                for (index_t c = 0; c < k_; ++c) w_(r, c) = detail::stored_value(w.at(r, c), storage_);
        }

        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
            return accumulate_ ? detail::padded_bytes<float>(rows * n_) : 0;
        }

        /// Outputs per block: a multiple of the AVX-512 width, small enough to give both cores
        /// work at N = 1024.
        static constexpr index_t column_block = 128;

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            check_call(a, c);
            if (a.rows() == 0 || n_ == 0) return;
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            const ConstMap am(a.data(), a.rows(), k_, Eigen::OuterStride<>(a.stride()));
            const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(a.rows(), n_) : c;
            const index_t blocks = (n_ + column_block - 1) / column_block;
            const auto block = [&](index_t b) {
                const index_t n0 = b * column_block, nb = std::min(column_block, n_ - n0);
                const MatrixView<float> tb = t.col_block(n0, nb);
                Map(tb.data(), tb.rows(), nb, Eigen::OuterStride<>(tb.stride())).noalias() =
                    am * w_.middleRows(n0, nb).transpose();
                const float* bias = bias_.empty() ? nullptr : bias_.data() + n0;
                if (accumulate_) detail::epilogue_accumulate<Act>(tb, c.col_block(n0, nb), bias, scale);
                else detail::epilogue_in_place<Act>(tb, bias, scale);
            };
            // Always a parallel region (even for one block): inside it Eigen runs single-threaded.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
            for (index_t b = 0; b < blocks; ++b) block(b);
        }

    private:
        std::vector<float> bias_;
        RowMajor w_;
    };
};

static_assert(Backend<eigen>);

} // namespace hypermoe
