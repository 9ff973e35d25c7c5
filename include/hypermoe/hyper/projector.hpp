#pragma once
// Projector (per layer): z = W2 relu(W1 s + b1) + b2, d_e -> p -> q (the reference code's
// `embedding_process`: Linear, ReLU, Linear). It runs on the row-wise map whatever the backend
// B: a pattern's projection must be the same bits in any batch (see hypernetwork.hpp).

#include <algorithm>
#include <span>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/rowwise.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

struct ProjectorWeights {
    WeightView first;                 ///< (p, d_e)
    std::span<const float> first_bias; ///< p
    WeightView second;                ///< (q, p)
    std::span<const float> second_bias; ///< q
};

/// Gradients of a Projector's parameters (Projector::make_gradients); backward adds to them.
struct ProjectorGradients {
    Matrix<float> first; ///< (p, d_e)
    std::vector<float> first_bias;
    Matrix<float> second; ///< (q, p)
    std::vector<float> second_bias;
};

template <Backend B>
class Projector {
public:
    explicit Projector(const ProjectorWeights& w)
        : first_(std::in_place, checked(w), w.first_bias, LinearOptions{"Projector weight 'first'"}),
          second_(std::in_place, w.second, w.second_bias, LinearOptions{"Projector weight 'second'"}) {}

    [[nodiscard]] index_t in_dim() const noexcept { return first_->in_features(); }
    [[nodiscard]] index_t out_dim() const noexcept { return second_->out_features(); }
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, first_->out_features()) +
               std::max(first_->workspace_bytes(rows), second_->workspace_bytes(rows));
    }

    /// z (n, q) from s (n, d_e).
    void forward(ConstMatrixView<float> s, MatrixView<float> z, Workspace& ws) const {
        Workspace::Scope scope(ws, workspace_bytes(s.rows()));
        MatrixView<float> h = ws.take_matrix<float>(s.rows(), first_->out_features()); // (n, p)
        first_(s, h, ws);
        second_(h, z, ws);
    }

    [[nodiscard]] ProjectorGradients make_gradients() const {
        return {detail::weight_gradient(*first_), detail::bias_gradient(*first_), detail::weight_gradient(*second_),
                detail::bias_gradient(*second_)};
    }

    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        return 2 * detail::padded_bytes<float>(rows, first_->out_features()) +
               std::max({first_->workspace_bytes(rows), first_->backward_workspace_bytes(rows), second_->backward_workspace_bytes(rows)});
    }

    /// The backward of forward(s, z, ws): ds (n, d_e) from dz (n, q), the parameter gradients
    /// added to `g`; the hidden layer is recomputed from s.
    void backward(ConstMatrixView<float> s, ConstMatrixView<float> dz, MatrixView<float> ds, ProjectorGradients& g,
                  Workspace& ws) const {
        const index_t p = first_->out_features();
        detail::check_gradient_shapes("Projector", {detail::weight_gradient_shape("first", g.first, *first_),
                                                    detail::bias_gradient_shape("first_bias", g.first_bias, *first_),
                                                    detail::weight_gradient_shape("second", g.second, *second_),
                                                    detail::bias_gradient_shape("second_bias", g.second_bias, *second_)});
        Workspace::Scope scope(ws, backward_workspace_bytes(s.rows()));
        MatrixView<float> h = ws.take_matrix<float>(s.rows(), p), dh = ws.take_matrix<float>(s.rows(), p);
        (*first_)(s, h, ws);
        second_->backward(h, dz, dh, LinearGrads{g.second.view(), g.second_bias}, ws);
        first_->backward(s, dh, ds, LinearGrads{g.first.view(), g.first_bias}, ws);
    }

private:
    static WeightView checked(const ProjectorWeights& w) {
        detail::check_weight_shape(w.second, w.second.rows(), w.first.rows(), "Projector", "second");
        return w.first;
    }

    detail::Shared<detail::RowwiseLinear<Relu>> first_;
    detail::Shared<detail::RowwiseLinear<Identity>> second_;
};

} // namespace hypermoe
