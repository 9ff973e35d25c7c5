#pragma once
// DenseFfn: the feed-forward block of a non-MoE layer, one expert applied to every row. It is
// the boundary where input rows are checked for NaN/Inf; the expert inside is not.

#include <utility>

#include "hypermoe/core/finite.hpp"
#include "hypermoe/expert/expert_concept.hpp"
#include "hypermoe/core/layer_concept.hpp"

namespace hypermoe {

template <Expert E>
class DenseFfn {
public:
    using expert_type = E;
    static constexpr index_t static_in_width = E::static_in_width;
    static constexpr index_t static_out_width = E::static_out_width;

    explicit DenseFfn(E expert) : expert_(std::move(expert)) {}

    [[nodiscard]] index_t in_width() const noexcept { return expert_.in_width(); }
    [[nodiscard]] index_t out_width() const noexcept { return expert_.out_width(); }
    [[nodiscard]] const E& expert() const noexcept { return expert_; }
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const { return expert_.workspace_bytes(rows); }

    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx = {}) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "DenseFfn");
        check_finite(x, "DenseFfn::forward: input x");
        expert_.forward(x, y, ws, ctx);
    }

    [[nodiscard]] auto make_gradients() const
        requires requires(const E& e) { e.make_gradients(); }
    {
        return expert_.make_gradients();
    }
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const
        requires requires(const E& e) { e.backward_workspace_bytes(rows); }
    {
        return expert_.backward_workspace_bytes(rows);
    }

    /// The expert's backward (f32 weights only), after the same input check as forward.
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                  const Context& /*ctx*/ = {}) const {
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "DenseFfn");
        check_finite(x, "DenseFfn::backward: input x");
        expert_.backward(x, dy, dx, g, ws);
    }

private:
    E expert_;
};

} // namespace hypermoe
