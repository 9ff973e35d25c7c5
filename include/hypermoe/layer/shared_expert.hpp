#pragma once
// Shared experts: a dense expert every token passes through, added to the routed output.
// Qwen2-MoE gates it per token with sigmoid(x . g); DeepSeek-V3 adds it ungated (its width is
// moe_ff * n_shared_experts: the shared experts are one wider GLU).

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

/// No shared expert.
struct NoSharedExpert {
    static constexpr bool present = false;
    struct gradients_type {};
    [[nodiscard]] gradients_type make_gradients() const noexcept { return {}; }
};

/// Gradients of a SharedExpert: its expert's, and its gate's (1, d_model), empty when ungated.
template <class ExpertGradients>
struct SharedExpertGradients {
    ExpertGradients expert;
    Matrix<float> gate;
};

template <Expert S>
class SharedExpert {
public:
    static constexpr bool present = true;
    using expert_type = S;
    using backend_type = typename S::backend_type;

    /// Ungated (DeepSeek-V3).
    explicit SharedExpert(S expert) : expert_(std::move(expert)) {}
    /// Gated by sigmoid(x . gate) with gate of shape (1, d_model) (Qwen2-MoE).
    SharedExpert(S expert, WeightView gate) : expert_(std::move(expert)) {
        detail::check_weight_shape(gate, 1, expert_.d_model(), "SharedExpert", "gate");
        gate_.emplace(std::in_place, gate, std::span<const float>{}, LinearOptions{"SharedExpert weight 'gate'", false, dtype::f32});
    }

    [[nodiscard]] const S& expert() const noexcept { return expert_; }
    [[nodiscard]] bool gated() const noexcept { return gate_.has_value(); }

    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, expert_.d_model()) + detail::padded_bytes<float>(rows) +
               std::max(expert_.workspace_bytes(rows), gate_ ? (*gate_)->workspace_bytes(rows) : std::size_t{0});
    }

    /// y += g(x) * S(x), g = sigmoid(x . gate) or 1.
    void add_to(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws) const {
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        MatrixView<float> s = ws.take_matrix<float>(x.rows(), expert_.d_model()); // (T, d)
        MatrixView<float> g = ws.take_matrix<float>(x.rows(), 1);                  // (T, 1)
        expert_.forward(x, s, ws);
        if (gate_) (*gate_)(x, g, ws);
        for (index_t t = 0; t < x.rows(); ++t) {
            const float gt = gate_ ? float(1.0 / (1.0 + std::exp(-double(g(t, 0))))) : 1.0f;
            HYPERMOE_SIMD
            for (index_t j = 0; j < s.cols(); ++j) y(t, j) += gt * s(t, j);
        }
    }

    /// Zeroed gradients of the expert and the gate.
    [[nodiscard]] auto make_gradients() const
        requires requires(const S& e) { e.make_gradients(); }
    {
        using G = decltype(expert_.make_gradients());
        return SharedExpertGradients<G>{expert_.make_gradients(), gate_ ? Matrix<float>(1, expert_.d_model()) : Matrix<float>()};
    }

    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, expert_.d_model()) + 2 * detail::padded_bytes<float>(rows) +
               std::max({expert_.workspace_bytes(rows), expert_.backward_workspace_bytes(rows),
                         gate_ ? (*gate_)->workspace_bytes(rows) : std::size_t{0},
                         gate_ ? (*gate_)->backward_workspace_bytes(rows) : std::size_t{0}});
    }

    /// The backward of add_to(x, y): dx += the gradient through y += g(x) S(x) given dy, and
    /// the gradients of the expert and the gate added to `grads` (the gate's sigmoid output
    /// g = sigmoid(x w_g) gets dL/dg = dy . S(x)).
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, SharedExpertGradients<G>& grads,
                  Workspace& ws) const {
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const index_t m = x.rows(), d = expert_.d_model();
        if (grads.gate.rows() != (gate_ ? 1 : 0) || (gate_ && grads.gate.cols() != d))
            throw shape_error(detail::concat("SharedExpert::backward: gate gradient has shape ",
                                             detail::shape_str(grads.gate.rows(), grads.gate.cols()), ", expected ",
                                             detail::shape_str(gate_ ? 1 : 0, gate_ ? d : 0), " (use make_gradients())"));
        if (!gate_) return expert_.backward(x, dy, dx, grads.expert, ws, true);
        MatrixView<float> ds = ws.take_matrix<float>(m, d); // S(x), then g dy
        MatrixView<float> g = ws.take_matrix<float>(m, 1);  // gate logits
        MatrixView<float> dg = ws.take_matrix<float>(m, 1); // dL/d(gate logit)
        expert_.forward(x, ds, ws);
        (*gate_)(x, g, ws);
        for (index_t t = 0; t < m; ++t) {
            const double gt = 1.0 / (1.0 + std::exp(-double(g(t, 0))));
            double dot = 0;
            for (index_t j = 0; j < d; ++j) dot += double(dy(t, j)) * ds(t, j);
            dg(t, 0) = float(dot * gt * (1.0 - gt));
            for (index_t j = 0; j < d; ++j) ds(t, j) = float(gt) * dy(t, j);
        }
        expert_.backward(x, ds, dx, grads.expert, ws, true);
        (*gate_)->backward(x, dg, dx, LinearGrads{grads.gate.view()}, ws, true);
    }

private:
    S expert_;
    std::optional<detail::Shared<typename backend_type::template linear<Identity>>> gate_;
};

} // namespace hypermoe
