#pragma once
// FfnExpert: y = down(Act(up x + b_up)) + b_down, the feed-forward of GPT-2, T5/Switch and
// BERT-style models. up is (d_ff, d_model), down is (d_model, d_ff), nn.Linear layout; biases
// are optional. The activation runs fused in the up GEMM's epilogue.

#include <algorithm>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

/// Weights of an FfnExpert, borrowed for the constructor (which copies them into the backend).
struct FfnWeights {
    WeightView up;                        ///< (d_ff, d_model)
    WeightView down;                      ///< (d_model, d_ff)
    std::span<const float> up_bias = {};   ///< d_ff, or empty
    std::span<const float> down_bias = {}; ///< d_model, or empty
};

/// Options shared by the experts.
struct ExpertOptions {
    /// dtype the weights are stored in; defaults to the source's.
    std::optional<dtype> storage = std::nullopt;
    /// How q8_0 / q4_0 weights compute: `exact` or `fast` (core/dtype.hpp).
    precision prec = precision::exact;
};

/// Gradients of an FfnExpert's parameters, zeroed at creation (FfnExpert::make_gradients);
/// backward adds to them.
struct FfnGradients {
    Matrix<float> up;             ///< (d_ff, d_model)
    Matrix<float> down;           ///< (d_model, d_ff)
    std::vector<float> up_bias;   ///< d_ff, or empty when the expert has no up bias
    std::vector<float> down_bias; ///< d_model, or empty
};

template <Backend B, Activation Act, index_t D = dynamic, index_t FF = dynamic>
class FfnExpert : public detail::ExpertWidths<B, Act, D, FF> {
    using Widths = detail::ExpertWidths<B, Act, D, FF>;

public:
    using Widths::d_ff;
    using Widths::d_model;

    using gradients_type = FfnGradients;

    explicit FfnExpert(const FfnWeights& w, const ExpertOptions& opt = {})
        : Widths(checked_extents(w)), up_bias_(!w.up_bias.empty()), down_bias_(!w.down_bias.empty()),
          up_(std::in_place, w.up, w.up_bias, LinearOptions{"FfnExpert weight 'up'", false, opt.storage, opt.prec}),
          down_(std::in_place, w.down, w.down_bias, LinearOptions{"FfnExpert weight 'down'", false, opt.storage, opt.prec}) {}

    /// The linear maps (shared by copies of this expert).
    [[nodiscard]] const typename B::template linear<Act>& up() const noexcept { return *up_; }
    [[nodiscard]] const typename B::template linear<Identity>& down() const noexcept { return *down_; }


    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, d_ff()) + std::max(up_->workspace_bytes(rows), down_->workspace_bytes(rows));
    }

    /// Floats per row that a forward keeps for the backward (kept_width() columns of `keep`): the
    /// hidden activations h = Act(up x + b_up).
    [[nodiscard]] index_t kept_width() const noexcept { return d_ff(); }

    /// y = down(Act(up x + b_up)) + b_down for x (M, d_model), y (M, d_model). A non-empty
    /// `keep` (M, kept_width()) receives the hidden activations for the backward.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& /*ctx*/ = {},
                 MatrixView<float> keep = {}) const {
        detail::check_forward_shapes(x, y, d_model(), d_model(), "FfnExpert");
        detail::check_kept(x, keep, kept_width(), "FfnExpert", "keep");
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        MatrixView<float> h = keep.data() != nullptr ? keep : ws.take_matrix<float>(x.rows(), d_ff()); // (M, d_ff)
        up_(x, h, ws);
        down_(h, y, ws);
    }

    /// Zeroed gradients of this expert's parameters.
    [[nodiscard]] FfnGradients make_gradients() const {
        FfnGradients g{Matrix<float>(d_ff(), d_model()), Matrix<float>(d_model(), d_ff()), {}, {}};
        if (up_bias_) g.up_bias.assign(std::size_t(d_ff()), 0.0f);
        if (down_bias_) g.down_bias.assign(std::size_t(d_model()), 0.0f);
        return g;
    }

    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        return 2 * detail::padded_bytes<float>(rows, d_ff()) +
               std::max({up_->workspace_bytes(rows), up_->backward_workspace_bytes(rows), down_->workspace_bytes(rows),
                         down_->backward_workspace_bytes(rows)});
    }

    /// The backward of forward(x): dx [+]= dL/dx from dy = dL/dy, and the parameter gradients
    /// added to `g`. It reads the hidden activations from `kept` (what a forward with `keep` wrote
    /// for this x), or recomputes them from x; up's backward recomputes its pre-activations either
    /// way (the forward fuses the activation). A non-empty `y` (M, d_model) also gets forward(x),
    /// from the hidden activations (one product instead of a forward call's two). f32 storage
    /// only (config_error otherwise).
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, FfnGradients& g, Workspace& ws,
                  bool accumulate_input = false, MatrixView<float> y = {}, ConstMatrixView<float> kept = {}) const {
        detail::check_backward_shapes(x, dy, dx, d_model(), d_model(), "FfnExpert");
        detail::check_backward_output(x, y, d_model(), "FfnExpert");
        detail::check_kept(x, kept, kept_width(), "FfnExpert", "kept");
        detail::check_gradient_shapes("FfnExpert", {{"up", g.up.rows(), g.up.cols(), d_ff(), d_model()},
                                                     {"down", g.down.rows(), g.down.cols(), d_model(), d_ff()},
                                                     {"up_bias", index_t(g.up_bias.size()), 1, up_bias_ ? d_ff() : 0, 1},
                                                     {"down_bias", index_t(g.down_bias.size()), 1, down_bias_ ? d_model() : 0, 1}});
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        MatrixView<float> scratch = ws.take_matrix<float>(x.rows(), d_ff()); // Act(up x + b), unless kept
        MatrixView<float> dh = ws.take_matrix<float>(x.rows(), d_ff());      // dL/dh
        if (kept.data() == nullptr) up_(x, scratch, ws);
        const ConstMatrixView<float> h = kept.data() != nullptr ? kept : ConstMatrixView<float>(scratch);
        if (y.data() != nullptr) down_(h, y, ws);
        down_->backward(h, dy, dh, LinearGrads{g.down.view(), g.down_bias}, ws);
        up_->backward(x, dh, dx, LinearGrads{g.up.view(), g.up_bias}, ws, accumulate_input);
    }

private:
    static extents<D, FF> checked_extents(const FfnWeights& w) {
        const index_t d = w.up.cols(), ff = w.up.rows();
        detail::check_weight_width(D, d, "FfnExpert", "d_model", "up");
        detail::check_weight_width(FF, ff, "FfnExpert", "d_ff", "up");
        detail::check_weight_shape(w.down, d, ff, "FfnExpert", "down");
        return extents<D, FF>(d, ff);
    }

    bool up_bias_, down_bias_;
    detail::Shared<typename B::template linear<Act>> up_;
    detail::Shared<typename B::template linear<Identity>> down_;
};

} // namespace hypermoe
