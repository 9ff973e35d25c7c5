#pragma once
// ScoredRouter<Score, Selection>: the three independent stages of routing composed.
//   score      scores = Score(logits)                  (softmax, sigmoid, raw logits)
//   select     on scores + selection_bias              (any SelectionPolicy)
//   weight     w /= (sum w + epsilon) if renormalise; w *= scale
// It rejects non-finite logits (numeric_error naming the token), fills a RoutingPlan and builds
// its CSR. The router GEMM itself belongs to the layer (it runs on the layer's backend).

#include <algorithm>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/score.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

/// How selected experts' scores become combine weights.
struct Weighting {
    /// Divide by the sum of the selected scores (plus epsilon).
    bool renormalize = false;
    /// Added to the sum before dividing (DeepSeek-V3 uses 1e-20).
    double epsilon = 0.0;
    /// Multiplies every weight, after renormalising (DeepSeek's routed_scaling_factor).
    float scale = 1.0f;
};

/// Router options besides the selection policy.
struct RouterOptions {
    Weighting weighting = {};
    /// Added to the scores for selection only (DeepSeek-V3 e_score_correction_bias); empty = none.
    std::vector<float> selection_bias = {};
};

namespace detail {
/// Whether a router reads its logits: false for a selection policy that declares
/// `uses_logits = false` (hash routing), so the layer can skip the gate GEMM.
template <class R>
inline constexpr bool router_uses_logits = [] {
    if constexpr (requires { R::selection_type::uses_logits; }) return bool(R::selection_type::uses_logits);
    else return true;
}();
/// Whether a selection policy declares `weights_are_scores = true` (each selected expert's
/// combine weight is its score), which ScoredRouter::backward relies on.
template <class S>
inline constexpr bool weights_are_scores = [] {
    if constexpr (requires { S::weights_are_scores; }) return bool(S::weights_are_scores);
    else return false;
}();
/// Whether a selection policy declares `weights_are_selected_softmax = true` (the weights are
/// a softmax over the selected experts' selection values, which differ from the scores by a
/// constant per (token, expert), e.g. noise: noisy top-k).
template <class S>
inline constexpr bool weights_are_selected_softmax = [] {
    if constexpr (requires { S::weights_are_selected_softmax; }) return bool(S::weights_are_selected_softmax);
    else return false;
}();
/// Whether a selection policy declares `constant_weights = true` (weights that do not depend on
/// the scores, as hash routing's 1): its logits get no gradient.
template <class S>
inline constexpr bool weights_are_constant = [] {
    if constexpr (requires { S::constant_weights; }) return bool(S::constant_weights);
    else return false;
}();

/// Logit columns a selection policy reads beside the experts' (`extra_logit_columns`, e.g. noisy
/// top-k's noise logits), else 0.
template <class S>
[[nodiscard]] index_t extra_logit_columns(const S& policy, index_t experts) noexcept {
    if constexpr (requires { policy.extra_logit_columns(experts); }) return policy.extra_logit_columns(experts);
    else return 0;
}
/// The columns of the logits a router reads (its logit_columns(), else one per expert): the
/// rows of the layer's gate weight.
template <class R>
[[nodiscard]] index_t router_logit_columns(const R& router) noexcept {
    if constexpr (requires { router.logit_columns(); }) return router.logit_columns();
    else return router.experts();
}

/// What a router's logits must be: `experts` columns, plus `extra` beside them (noise logits),
/// (shape_error) and finite (numeric_error naming the token and column); `who` names the caller.
inline void check_router_logits(ConstMatrixView<float> logits, index_t experts, index_t extra, const char* who) {
    if (logits.cols() != experts + extra) {
        if (extra == 0)
            throw shape_error(concat(who, ": logits have ", logits.cols(), " columns, expected experts = ", experts));
        throw shape_error(concat(who, ": logits have ", logits.cols(), " columns, expected ", experts + extra, " (", experts,
                                 " experts' logits, then ", extra, " noise logits)"));
    }
    for (index_t t = 0; t < logits.rows(); ++t)
        if (const index_t e = find_non_finite(logits.row(t)); e >= 0) {
            if (e < experts)
                throw numeric_error(concat(who, ": token ", t, " has router logit ", logits(t, e), " for expert ", e,
                                           ", expected finite logits"));
            throw numeric_error(concat(who, ": token ", t, " has noise logit ", logits(t, e), " for expert ", e - experts,
                                       ", expected finite logits"));
        }
}
} // namespace detail

template <class R>
concept Router = requires(const R& r, ConstMatrixView<float> logits, const RouterContext& ctx, RoutingPlan& plan,
                          Workspace& ws, index_t tokens) {
    { r.experts() } -> std::same_as<index_t>;
    { r.slots() } -> std::same_as<index_t>;
    { r.workspace_bytes(tokens) } -> std::same_as<std::size_t>;
    r.route(logits, ctx, plan, ws);
};

template <ScoreFunction Score, SelectionPolicy Selection>
class ScoredRouter {
public:
    using score_type = Score;
    using selection_type = Selection;

    ScoredRouter(index_t experts, Selection selection, RouterOptions options = {})
        : experts_(experts), selection_(std::move(selection)), options_(std::move(options)) {
        if (experts < 1) throw config_error(detail::concat("Router: experts is ", experts, ", expected >= 1"));
        selection_.validate(experts);
        check_bias(options_.selection_bias, experts);
        const Weighting& w = options_.weighting;
        if (!(w.epsilon >= 0) || !is_finite(float(w.epsilon)) || !is_finite(w.scale))
            throw config_error(detail::concat("Router: weighting epsilon = ", w.epsilon, ", scale = ", w.scale,
                                              ", expected finite values, epsilon >= 0"));
    }

    [[nodiscard]] index_t experts() const noexcept { return experts_; }
    [[nodiscard]] index_t slots() const noexcept { return selection_.slots(experts_); }
    /// Columns of the logits route() reads: one per expert, then any the policy reads beside
    /// them (noisy top-k's learned noise scale: E more).
    [[nodiscard]] index_t logit_columns() const noexcept { return experts_ + detail::extra_logit_columns(selection_, experts_); }

    /// Replaces the selection-only bias (E values, or empty for none), e.g. after a step of
    /// auxiliary-loss-free balancing (router/bias_balancer.hpp). Not to run concurrently with
    /// route() on this router.
    void set_selection_bias(std::vector<float> bias) {
        check_bias(bias, experts_);
        options_.selection_bias = std::move(bias);
    }
    [[nodiscard]] const Selection& selection() const noexcept { return selection_; }
    [[nodiscard]] const RouterOptions& options() const noexcept { return options_; }

    [[nodiscard]] std::size_t workspace_bytes(index_t tokens) const noexcept {
        return 2 * detail::padded_bytes<float>(tokens, experts_) + selection_.workspace_bytes(tokens, experts_);
    }

    /// The most (token, expert) assignments a plan of `tokens` tokens can hold: what the policy
    /// says (expert choice: experts x tokens per expert), else tokens x slots.
    [[nodiscard]] index_t max_assignments(index_t tokens) const noexcept {
        if constexpr (requires { selection_.max_assignments(tokens, experts_); })
            return std::min(detail::saturating_mul(tokens, slots()), selection_.max_assignments(tokens, experts_));
        else
            return detail::saturating_mul(tokens, slots());
    }

    /// Scores, selects and weights `logits` (T, logit_columns()) into `plan`.
    void route(ConstMatrixView<float> logits, const RouterContext& context, RoutingPlan& plan, Workspace& ws) const {
        detail::check_router_logits(logits, experts_, logit_columns() - experts_, "Router::route");
        const index_t tokens = logits.rows();
        Workspace::Scope scope(ws, workspace_bytes(tokens));
        // Scores are per token: in parallel over tokens (as are the token-independent policies'
        // selections), each token's row computed the same way whatever the thread count.
        MatrixView<float> scores = ws.take_matrix<float>(tokens, experts_);
        MatrixView<float> biased = options_.selection_bias.empty() ? MatrixView<float>{}
                                                                   : ws.take_matrix<float>(tokens, experts_);
        detail::parallel_for(tokens, tokens * experts_ * 8, [&](index_t t) {
            Score::apply(logits.row(t).first(std::size_t(experts_)), scores.row(t));
            if (!options_.selection_bias.empty())
                for (index_t e = 0; e < experts_; ++e)
                    biased(t, e) = scores(t, e) + options_.selection_bias[std::size_t(e)];
        });
        const ConstMatrixView<float> selection_scores = options_.selection_bias.empty() ? ConstMatrixView<float>(scores)
                                                                                        : ConstMatrixView<float>(biased);
        plan.reset(tokens, experts_, slots());
        selection_.select(SelectionInput{logits, scores, selection_scores, context}, plan, ws);
        apply_weighting(plan);
        plan.build_index();
    }

    [[nodiscard]] std::size_t backward_workspace_bytes() const noexcept {
        return detail::padded_bytes<float>(experts_) + 2 * detail::padded_bytes<double>(experts_) + 2 * detail::padded_bytes<double>(slots());
    }

    /// The gradient of the logits (T, logit_columns()) from `dweights` (T, slots), the gradient
    /// of the combine weights of `plan`, which route() made from these logits under `context`. The selection is piecewise
    /// constant, so gradient flows only through the selected experts' scores: their
    /// renormalisation and scale, then the score function (softmax reaches every logit through
    /// its denominator; sigmoid only the selected ones). With noisy top-k the weights are a
    /// softmax over the selected noisy values H = c + scale n: H moves with the scores and, with
    /// a learned scale, with the noise logits (by n dscale/dr; the noise n is recomputed from the
    /// context's positions and noise seed, so pass route()'s context). The selection bias
    /// gets none, and a policy with constant weights (hash routing) gives zeros. Each token's sums run in double,
    /// in expert order.
    void backward(ConstMatrixView<float> logits, const RoutingPlan& plan, ConstMatrixView<float> dweights,
                  MatrixView<float> dlogits, Workspace& ws, const RouterContext& context = {}) const
        requires(detail::weights_are_scores<Selection> || detail::weights_are_constant<Selection> ||
                 detail::weights_are_selected_softmax<Selection>)
    {
        const index_t tokens = logits.rows();
        const index_t columns = logit_columns();
        if (logits.cols() != columns || plan.tokens() != tokens || plan.experts() != experts_ || plan.slots() != slots())
            throw shape_error(detail::concat("Router::backward: logits ", detail::shape_str(logits.rows(), logits.cols()),
                                             " and a plan of ", plan.tokens(), " tokens over ", plan.experts(), " experts, ",
                                             plan.slots(), " slots; expected ", columns, " logit columns and the plan route() made from these logits (",
                                             experts_, " experts, ", slots(), " slots)"));
        if (dweights.rows() != tokens || dweights.cols() != slots())
            throw shape_error(detail::concat("Router::backward: dweights has shape ",
                                             detail::shape_str(dweights.rows(), dweights.cols()), ", expected ",
                                             detail::shape_str(tokens, slots())));
        if (dlogits.rows() != tokens || dlogits.cols() != columns)
            throw shape_error(detail::concat("Router::backward: dlogits has shape ", detail::shape_str(dlogits.rows(), dlogits.cols()),
                                             ", expected ", detail::shape_str(tokens, columns)));
        if constexpr (detail::weights_are_constant<Selection>) {
            for (index_t t = 0; t < tokens; ++t) std::fill_n(dlogits.row(t).data(), columns, 0.0f);
            return;
        }
        Workspace::Scope scope(ws, backward_workspace_bytes());
        const std::span<float> scores = ws.take<float>(experts_);
        const std::span<double> ds = ws.take<double>(experts_), dl = ws.take<double>(experts_);
        const std::span<double> v = ws.take<double>(slots()), dv = ws.take<double>(slots());
        const Weighting& w = options_.weighting;
        for (index_t t = 0; t < tokens; ++t) {
            const std::span<const float> row = logits.row(t);
            Score::apply(row.first(std::size_t(experts_)), scores);
            std::fill(dlogits.row(t).begin() + experts_, dlogits.row(t).end(), 0.0f);
            std::fill(ds.begin(), ds.end(), 0.0);
            const auto ids = plan.ids(t);
            // v: the selected slots' values before the weighting: their scores, or (selected
            // softmax) the softmax weights, recovered from the plan's weights, which are
            // proportional to them and sum to 1 before the weighting.
            double total = 0;
            for (std::size_t j = 0; j < ids.size(); ++j) total += ids[j] >= 0 ? double(plan.weights(t)[j]) : 0.0;
            for (std::size_t j = 0; j < ids.size(); ++j) {
                if constexpr (detail::weights_are_selected_softmax<Selection>)
                    v[j] = ids[j] >= 0 && total != 0 ? double(plan.weights(t)[j]) / total : 0.0;
                else
                    v[j] = ids[j] >= 0 ? double(scores[std::size_t(ids[j])]) : 0.0;
            }
            double sum = 0, weighted = 0; // sum of the selected values; sum of dw * value
            for (std::size_t j = 0; j < ids.size(); ++j)
                if (ids[j] >= 0) sum += v[j], weighted += double(dweights(t, index_t(j))) * v[j];
            const double denominator = sum + w.epsilon;
            for (std::size_t j = 0; j < ids.size(); ++j) {
                const double dwj = ids[j] >= 0 ? double(dweights(t, index_t(j))) : 0.0;
                // w_j = scale v_j / (sum + eps): d/dv_j = scale (dw_j / D - sum_i dw_i v_i / D^2)
                dv[j] = w.renormalize ? double(w.scale) * (dwj / denominator - weighted / (denominator * denominator))
                                      : double(w.scale) * dwj;
            }
            if constexpr (detail::weights_are_selected_softmax<Selection>) {
                // v = softmax over the selected values H (H - score is constant): dH_i = v_i (dv_i - sum_j v_j dv_j).
                double mean = 0;
                for (std::size_t j = 0; j < ids.size(); ++j) mean += v[j] * dv[j];
                for (std::size_t j = 0; j < ids.size(); ++j) {
                    if (ids[j] < 0) continue;
                    const index_t e = ids[j];
                    const double dh = v[j] * (dv[j] - mean);
                    ds[std::size_t(e)] += dh;
                    // H = c + scale(r) n: the noise logit r_e gets dh n dscale/dr.
                    if constexpr (requires { selection_.scale_derivative(row, experts_, e); })
                        if (const double ds_dr = selection_.scale_derivative(row, experts_, e); ds_dr != 0)
                            dlogits(t, experts_ + e) =
                                float(dh * ds_dr * double(selection_.sample(context, t, e)));
                }
            } else {
                for (std::size_t j = 0; j < ids.size(); ++j)
                    if (ids[j] >= 0) ds[std::size_t(ids[j])] += dv[j];
            }
            Score::backward(scores, ds, dl);
            for (index_t e = 0; e < experts_; ++e) dlogits(t, e) = float(dl[std::size_t(e)]);
        }
    }

private:
    static void check_bias(const std::vector<float>& bias, index_t experts) {
        if (!bias.empty() && static_cast<index_t>(bias.size()) != experts)
            throw shape_error(detail::concat("Router: selection bias has ", bias.size(), " elements, expected experts = ",
                                              experts));
        if (const index_t i = find_non_finite(bias); i >= 0)
            throw weight_error(detail::concat("Router: selection bias element ", i, " is ", bias[std::size_t(i)],
                                              ", expected a finite value"));
    }

    void apply_weighting(RoutingPlan& plan) const {
        const Weighting& w = options_.weighting;
        if (!w.renormalize && w.scale == 1.0f) return;
        for (index_t t = 0; t < plan.tokens(); ++t) {
            const auto ids = plan.ids(t);
            const auto weights = plan.weights(t);
            double sum = 0;
            for (std::size_t j = 0; j < ids.size(); ++j)
                if (ids[j] >= 0) sum += weights[j];
            if (w.renormalize && !(sum + w.epsilon > 0))
                throw numeric_error(detail::concat("Router: token ", t, "'s selected scores sum to ", sum,
                                                   " (+ epsilon ", w.epsilon, "); cannot renormalise, expected a sum > 0"));
            const double factor = (w.renormalize ? 1.0 / (sum + w.epsilon) : 1.0) * w.scale;
            for (std::size_t j = 0; j < ids.size(); ++j)
                if (ids[j] >= 0) weights[j] = float(weights[j] * factor);
        }
    }

    index_t experts_;
    Selection selection_;
    RouterOptions options_;
};

} // namespace hypermoe
