#pragma once
// The Eigen backend (opt-in: include this header and depend on Eigen 3.4). Weights are kept as
// a row-major f32 (N, K) matrix; bf16 weights are widened once at construction (exact: every
// bf16 is a float), so results equal the reference's to float rounding. The GEMM is Eigen's
// (threaded with OpenMP when the build enables it); the epilogue is one pass over C.

#include <Eigen/Core>

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
    class linear {
        using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        using ConstMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
        using Map = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : name_(std::move(opt.name)), accumulate_(opt.accumulate), k_(w.cols()), n_(w.rows()),
              storage_(detail::validate_linear(w, bias, {name_, accumulate_, opt.storage})),
              bias_(bias.begin(), bias.end()), w_(n_, k_) {
            for (index_t r = 0; r < n_; ++r)
                for (index_t c = 0; c < k_; ++c) w_(r, c) = detail::stored_value(w.at(r, c), storage_);
        }

        [[nodiscard]] index_t in_features() const noexcept { return k_; }
        [[nodiscard]] index_t out_features() const noexcept { return n_; }
        [[nodiscard]] dtype storage() const noexcept { return storage_; }
        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
            return accumulate_ ? detail::padded_bytes<float>(rows * n_) : 0;
        }

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            detail::check_linear_call(a, c, k_, n_, name_);
            if (a.rows() == 0) return;
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            const ConstMap am(a.data(), a.rows(), k_, Eigen::OuterStride<>(a.stride()));
            const float* bias = bias_.empty() ? nullptr : bias_.data();
            if (accumulate_) {
                MatrixView<float> t = ws.take_matrix<float>(a.rows(), n_);
                Map(t.data(), t.rows(), n_, Eigen::OuterStride<>(n_)).noalias() = am * w_.transpose();
                detail::epilogue_accumulate<Act>(t, c, bias, scale);
            } else {
                Map(c.data(), c.rows(), n_, Eigen::OuterStride<>(c.stride())).noalias() = am * w_.transpose();
                detail::epilogue_in_place<Act>(c, bias, scale);
            }
        }

    private:
        std::string name_;
        bool accumulate_;
        index_t k_, n_;
        dtype storage_;
        std::vector<float> bias_;
        RowMajor w_;
    };
};

static_assert(Backend<eigen>);

} // namespace hypermoe
