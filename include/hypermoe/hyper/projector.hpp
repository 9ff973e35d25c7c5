#pragma once
// Projector (per layer): z = W2 relu(W1 s + b1) + b2, d_e -> p -> q (the reference code's
// `embedding_process`: Linear, ReLU, Linear). It runs on the row-wise map whatever the backend
// B: a pattern's projection must be the same bits in any batch (see hypernetwork.hpp).

#include <span>

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

private:
    static WeightView checked(const ProjectorWeights& w) {
        detail::check_weight_shape(w.second, w.second.rows(), w.first.rows(), "Projector", "second");
        return w.first;
    }

    detail::Shared<detail::RowwiseLinear<Relu>> first_;
    detail::Shared<detail::RowwiseLinear<Identity>> second_;
};

} // namespace hypermoe
