#pragma once
// Shared experts: a dense expert every token passes through, added to the routed output.
// Qwen2-MoE gates it per token with sigmoid(x . g); DeepSeek-V3 adds it ungated (its width is
// moe_ff * n_shared_experts: the shared experts are one wider GLU).

#include <optional>
#include <utility>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

/// No shared expert.
struct NoSharedExpert {
    static constexpr bool present = false;
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
        gate_.emplace(std::in_place, gate, std::span<const float>{}, LinearOptions{"SharedExpert weight 'gate'"});
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
            for (index_t j = 0; j < s.cols(); ++j) y(t, j) += gt * s(t, j);
        }
    }

private:
    S expert_;
    std::optional<detail::Shared<typename backend_type::template linear<Identity>>> gate_;
};

} // namespace hypermoe
