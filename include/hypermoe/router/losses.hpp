#pragma once
// Auxiliary routing losses, computed from a plan and the router's logits, and their gradients
// with respect to the logits (an MoE layer's backward adds them when the call's Context asks,
// core/context.hpp's AuxLossWeights). Values in double.

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "hypermoe/core/context.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/router/noisy_top_k.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/score.hpp"
#include "hypermoe/router/scored_router.hpp"

namespace hypermoe {

/// How load_balancing_loss counts and groups (defaults: Hugging Face's top-k form).
struct LoadBalancingOptions {
    /// Tokens per group: the loss is the mean of the groups' losses, as Switch Transformers
    /// computes it per sequence (rows [i G, (i + 1) G) are group i; a last, shorter group is a
    /// group of its own). 0 = the whole call is one group.
    index_t group_size = 0;
    /// Count a token that capacity dropped for expert 0 in each of its slots, as Hugging Face's
    /// SwitchTransformers does (argmax of the capacity-masked mask); otherwise it counts for the
    /// experts it selected, before capacity.
    bool dropped_as_first_expert = false;
};

/// The load-balancing options a call's Context asks for (core/context.hpp, AuxLossWeights).
[[nodiscard]] inline LoadBalancingOptions load_balancing_options(const Context& c) noexcept {
    return {c.aux_losses.per_sequence ? c.sequence_length : 0, c.aux_losses.dropped_as_first_expert};
}

namespace detail {

/// Rows of a load-balancing group.
[[nodiscard]] inline index_t balancing_group(index_t tokens, const LoadBalancingOptions& opt) noexcept {
    return opt.group_size > 0 ? std::min(opt.group_size, tokens) : tokens;
}

/// f (E) of tokens [t0, t1): the (token, slot) assignments to each expert, over the tokens.
inline void assignment_fractions(const RoutingPlan& plan, index_t t0, index_t t1, const LoadBalancingOptions& opt,
                                 std::span<double> f) {
    std::fill(f.begin(), f.end(), 0.0);
    for (index_t t = t0; t < t1; ++t)
        for (const std::int32_t e : plan.ids(t))
            if (e >= 0) f[(opt.dropped_as_first_expert && !plan.kept(t)) ? 0 : std::size_t(e)] += 1.0;
    for (double& v : f) v /= double(t1 - t0);
}

inline void check_loss_shapes(const RoutingPlan& plan, ConstMatrixView<float> logits, const char* who) {
    check_shape(logits, plan.tokens(), plan.experts(), who, "logits");
}

} // namespace detail

/// Switch load-balancing loss (arXiv 2101.03961, eq. 4, as Hugging Face generalises it to top-k):
/// E * sum_e f_e * P_e, f_e = (assignments to e) / T, P_e = mean softmax probability of e, the
/// mean over groups when `opt` groups the tokens. 1 when routing is perfectly uniform (k = 1).
[[nodiscard]] inline double load_balancing_loss(const RoutingPlan& plan, ConstMatrixView<float> logits,
                                                const LoadBalancingOptions& opt = {}) {
    const index_t t_count = plan.tokens(), e_count = plan.experts();
    detail::check_loss_shapes(plan, logits, "load_balancing_loss");
    if (t_count == 0) return 0.0;
    std::vector<double> f(static_cast<std::size_t>(e_count)), p(static_cast<std::size_t>(e_count));
    std::vector<float> probs(static_cast<std::size_t>(e_count));
    const index_t group = detail::balancing_group(t_count, opt);
    double total = 0;
    index_t groups = 0;
    for (index_t t0 = 0; t0 < t_count; t0 += group, ++groups) {
        const index_t t1 = std::min(t0 + group, t_count);
        detail::assignment_fractions(plan, t0, t1, opt, f);
        std::fill(p.begin(), p.end(), 0.0);
        for (index_t t = t0; t < t1; ++t) {
            Softmax::apply(logits.row(t), probs);
            for (index_t e = 0; e < e_count; ++e) p[std::size_t(e)] += probs[std::size_t(e)];
        }
        double loss = 0;
        for (index_t e = 0; e < e_count; ++e) loss += f[std::size_t(e)] * (p[std::size_t(e)] / double(t1 - t0));
        total += double(e_count) * loss;
    }
    return total / double(groups);
}

/// dlogits += scale * d load_balancing_loss / d logits. The counts f are piecewise constant, so
/// the gradient flows through the softmax probabilities only: for token t of a group of n,
/// E / (n groups) * p_j (f_j - sum_e f_e p_e). Scratch from `ws`; every sum in double.
inline void load_balancing_loss_backward(const RoutingPlan& plan, ConstMatrixView<float> logits, MatrixView<float> dlogits,
                                         double scale, Workspace& ws, const LoadBalancingOptions& opt = {}) {
    const index_t t_count = plan.tokens(), e_count = plan.experts();
    detail::check_loss_shapes(plan, logits, "load_balancing_loss_backward");
    check_shape(dlogits, t_count, e_count, "load_balancing_loss_backward", "dlogits");
    if (t_count == 0) return;
    Workspace::Scope scope(ws, detail::padded_bytes<double>(e_count) + detail::padded_bytes<float>(e_count));
    const std::span<double> f = ws.take<double>(e_count);
    const std::span<float> probs = ws.take<float>(e_count);
    const index_t group = detail::balancing_group(t_count, opt), groups = (t_count + group - 1) / group;
    for (index_t t0 = 0; t0 < t_count; t0 += group) {
        const index_t t1 = std::min(t0 + group, t_count);
        detail::assignment_fractions(plan, t0, t1, opt, f);
        const double c = scale * double(e_count) / (double(groups) * double(t1 - t0));
        for (index_t t = t0; t < t1; ++t) {
            Softmax::apply(logits.row(t), probs);
            double mean_f = 0;
            for (index_t e = 0; e < e_count; ++e) mean_f += f[std::size_t(e)] * probs[std::size_t(e)];
            for (index_t e = 0; e < e_count; ++e)
                dlogits(t, e) += float(c * probs[std::size_t(e)] * (f[std::size_t(e)] - mean_f));
        }
    }
}

/// Squared coefficient of variation of a per-expert quantity (Shazeer et al. 2017's importance
/// and load losses use it): var / mean^2, 0 when all equal.
[[nodiscard]] inline double cv_squared(std::span<const double> values) {
    if (values.size() < 2) return 0.0;
    double mean = 0;
    for (const double v : values) mean += v;
    mean /= double(values.size());
    if (mean == 0) return 0.0;
    double var = 0;
    for (const double v : values) var += (v - mean) * (v - mean);
    var /= double(values.size() - 1); // unbiased, as torch.var in Shazeer's reference code
    return var / (mean * mean);
}

namespace detail {
/// grad = scale * d cv_squared(v) / dv. With m the mean of the n values and s^2 their unbiased
/// variance, d cv^2 / dv_e = 2 (v_e - m) / ((n - 1) m^2) - 2 s^2 / (n m^3). False (grad
/// untouched) where cv_squared is 0 by definition (n < 2 or m = 0).
inline bool cv_squared_gradient(std::span<const double> v, std::span<double> grad, double scale) {
    const std::size_t n = v.size();
    if (n < 2) return false;
    double mean = 0;
    for (const double x : v) mean += x;
    mean /= double(n);
    if (mean == 0) return false;
    double var = 0;
    for (const double x : v) var += (x - mean) * (x - mean);
    var /= double(n - 1);
    for (std::size_t e = 0; e < n; ++e)
        grad[e] = scale * (2 * (v[e] - mean) / (double(n - 1) * mean * mean) - 2 * var / (double(n) * mean * mean * mean));
    return true;
}
} // namespace detail

/// Importance (sum of combine weights per expert) of a plan, for cv_squared.
[[nodiscard]] inline std::vector<double> importance(const RoutingPlan& plan) {
    std::vector<double> imp(std::size_t(plan.experts()), 0.0);
    for (index_t t = 0; t < plan.tokens(); ++t) {
        const auto ids = plan.ids(t);
        const auto w = plan.weights(t);
        for (std::size_t j = 0; j < ids.size(); ++j)
            if (ids[j] >= 0) imp[std::size_t(ids[j])] += w[j];
    }
    return imp;
}

/// dweights (T, slots) += scale * d cv_squared(importance(plan)) / d weights: Shazeer et al.'s
/// importance loss, whose gradient reaches the router through the combine weights: each
/// (token, slot) gets d cv^2 / d I_e of its expert e (detail::cv_squared_gradient). No change
/// when cv_squared is 0 by definition (n < 2 or m = 0).
inline void importance_loss_backward(const RoutingPlan& plan, MatrixView<float> dweights, double scale, Workspace& ws) {
    check_shape(dweights, plan.tokens(), plan.slots(), "importance_loss_backward", "dweights");
    const index_t n = plan.experts();
    if (n < 2) return;
    Workspace::Scope scope(ws, 2 * detail::padded_bytes<double>(n));
    const std::span<double> imp = ws.take<double>(n), grad = ws.take<double>(n);
    std::fill(imp.begin(), imp.end(), 0.0);
    for (index_t t = 0; t < plan.tokens(); ++t) {
        const auto ids = plan.ids(t);
        const auto w = plan.weights(t);
        for (std::size_t j = 0; j < ids.size(); ++j)
            if (ids[j] >= 0) imp[std::size_t(ids[j])] += w[j];
    }
    if (!detail::cv_squared_gradient(imp, grad, scale)) return;
    for (index_t t = 0; t < plan.tokens(); ++t) {
        const auto ids = plan.ids(t);
        for (std::size_t j = 0; j < ids.size(); ++j)
            if (ids[j] >= 0) dweights(t, index_t(j)) += float(grad[std::size_t(ids[j])]);
    }
}

/// Load (kept assignments per expert) of a plan, for cv_squared.
[[nodiscard]] inline std::vector<double> load(const RoutingPlan& plan) {
    std::vector<double> l(std::size_t(plan.experts()), 0.0);
    for (index_t e = 0; e < plan.experts(); ++e) l[std::size_t(e)] = double(plan.rows_of(e));
    return l;
}

namespace detail {
/// Whether R is a ScoredRouter with noisy top-k selection (the routers smooth_load accepts).
template <class R>
inline constexpr bool is_noisy_router = false;
template <class S>
inline constexpr bool is_noisy_router<ScoredRouter<S, NoisyTopK>> = true;

/// Per-token scratch of smooth_load_token.
struct SmoothLoadScratch {
    std::span<float> scores, selection, noisy, scale, noise; // (E) each
    std::span<index_t> top;                                  // (k + 1)
};

[[nodiscard]] inline std::size_t smooth_load_scratch_bytes(index_t experts, index_t k) noexcept {
    return 5 * padded_bytes<float>(experts) + padded_bytes<index_t>(k + 1);
}

[[nodiscard]] inline SmoothLoadScratch take_smooth_load_scratch(Workspace& ws, index_t experts, index_t k) {
    return {ws.take<float>(experts), ws.take<float>(experts), ws.take<float>(experts),
            ws.take<float>(experts), ws.take<float>(experts), ws.take<index_t>(k + 1)};
}

/// Token t's terms of the smooth load: f(e, P, density, theta, z) for each expert e, in expert
/// order, where P = P(t, e) = Phi(z), z = (c_te - H_theta) / scale_te, density = dP / dc_te =
/// -dP / dH_theta, and theta is the expert whose noisy value is e's threshold. The scores,
/// noise scales and noisy values are computed as route() computes them, so the top k here are
/// the plan's. Leaves token t's scores, scales and noise samples in `s`.
template <class S, class F>
void smooth_load_token(const ScoredRouter<S, NoisyTopK>& router, ConstMatrixView<float> logits, const Context& context,
                       index_t t, const SmoothLoadScratch& s, F&& f) {
    const NoisyTopK& policy = router.selection();
    const std::vector<float>& bias = router.options().selection_bias;
    const index_t experts = router.experts(), k = policy.k;
    const std::span<const float> row = logits.row(t);
    S::apply(row.first(std::size_t(experts)), s.scores);
    for (index_t e = 0; e < experts; ++e) {
        const std::size_t i = std::size_t(e);
        s.selection[i] = bias.empty() ? s.scores[i] : s.scores[i] + bias[i];
        s.scale[i] = policy.scale(row, experts, e);
        s.noise[i] = policy.sample(context, t, e);
        s.noisy[i] = NoisyTopK::noisy_value(s.selection[i], s.scale[i], s.noise[i]);
    }
    if (k >= experts) { // every expert is always selected
        for (index_t e = 0; e < experts; ++e) f(e, 1.0, 0.0, e, 0.0);
        return;
    }
    ordered_top_k(
        experts, k + 1, [&](index_t i) { return s.noisy[std::size_t(i)]; }, all_allowed,
        [&](index_t j, index_t i) { s.top[std::size_t(j)] = i; });
    for (index_t e = 0; e < experts; ++e) {
        const bool in = std::find(s.top.begin(), s.top.begin() + k, e) != s.top.begin() + k;
        // The k-th largest of the other experts' noisy values: the (k+1)-th of all, or the k-th.
        const index_t theta = s.top[std::size_t(in ? k : k - 1)];
        const double sigma = s.scale[std::size_t(e)];
        if (sigma == 0) {
            f(e, in ? 1.0 : 0.0, 0.0, theta, 0.0);
            continue;
        }
        const double z = (double(s.selection[std::size_t(e)]) - double(s.noisy[std::size_t(theta)])) / sigma;
        f(e, 0.5 * std::erfc(-z * 0.7071067811865476), std::exp(-0.5 * z * z) * 0.3989422804014327 / sigma, theta, z);
    }
}

} // namespace detail

/// Shazeer et al.'s smooth load estimator (arXiv 1701.06538, appendix A; `_prob_in_top_k` of the
/// HyperMoE reference code) of a noisy top-k router on `logits` (T, E) under the forward call's
/// `context` (its positions and noise seed give the noise route() drew): load_e = sum_t P(t, e),
/// where P(t, e) = Phi((c_te - H_theta) / scale_te) is the probability that e stays among token
/// t's top k if its own noise alone is drawn again. c = the selection scores (scores plus the
/// selection bias), H = c + scale * noise the noisy values selection ranks (scale: noise_std, or
/// the learned scale from the noise logits, NoisyTopK::scale), and H_theta the k-th largest of
/// the other experts' H (the (k+1)-th of all when e is selected, else the k-th). Unlike the
/// counts of load(plan), it is differentiable in the logits. With noise_std = 0 it is those
/// counts (P is the selection); with k = E every P is 1.
template <class S>
[[nodiscard]] std::vector<double> smooth_load(const ScoredRouter<S, NoisyTopK>& router, ConstMatrixView<float> logits,
                                              const Context& context = {}) {
    detail::check_router_logits(logits, router.experts(), router.logit_columns() - router.experts(), "smooth_load");
    const index_t experts = router.experts(), k = router.selection().k;
    Workspace ws;
    Workspace::Scope scope(ws, detail::smooth_load_scratch_bytes(experts, k));
    const detail::SmoothLoadScratch s = detail::take_smooth_load_scratch(ws, experts, k);
    std::vector<double> l(std::size_t(experts), 0.0);
    for (index_t t = 0; t < logits.rows(); ++t)
        detail::smooth_load_token(router, logits, context, t, s,
                                  [&](index_t e, double p, double, index_t, double) { l[std::size_t(e)] += p; });
    return l;
}

/// Shazeer et al.'s load loss: cv_squared(smooth_load(router, logits, context)).
template <class S>
[[nodiscard]] double smooth_load_loss(const ScoredRouter<S, NoisyTopK>& router, ConstMatrixView<float> logits,
                                      const Context& context = {}) {
    return cv_squared(smooth_load(router, logits, context));
}

/// Scratch of smooth_load_loss_backward.
template <class S>
[[nodiscard]] std::size_t smooth_load_loss_workspace_bytes(const ScoredRouter<S, NoisyTopK>& router) noexcept {
    const index_t experts = router.experts();
    return detail::smooth_load_scratch_bytes(experts, router.selection().k) + 5 * detail::padded_bytes<double>(experts);
}

/// dlogits += scale * d smooth_load_loss / d logits. Each P(t, e) moves with c_te (through the
/// score function to the logits) and against its threshold's noisy value H_theta, which moves
/// with c_t,theta; with a learned noise scale, also against scale_te (dP/dscale = -density z) and
/// with H_theta's scale (by its noise), through softplus to the noise logits. The noise samples
/// and the selection bias are constants. Two passes over the tokens (the loads, then their
/// gradient), every sum in double in token order. Scratch from `ws`.
template <class S>
void smooth_load_loss_backward(const ScoredRouter<S, NoisyTopK>& router, ConstMatrixView<float> logits, const Context& context,
                               MatrixView<float> dlogits, double scale, Workspace& ws) {
    detail::check_router_logits(logits, router.experts(), router.logit_columns() - router.experts(), "smooth_load_loss_backward");
    check_shape(dlogits, logits.rows(), router.logit_columns(), "smooth_load_loss_backward", "dlogits");
    const index_t experts = router.experts(), k = router.selection().k;
    Workspace::Scope scope(ws, smooth_load_loss_workspace_bytes(router));
    const detail::SmoothLoadScratch s = detail::take_smooth_load_scratch(ws, experts, k);
    const std::span<double> l = ws.take<double>(experts), grad = ws.take<double>(experts);
    const std::span<double> dc = ws.take<double>(experts), dl = ws.take<double>(experts), dscale = ws.take<double>(experts);
    std::fill(l.begin(), l.end(), 0.0);
    for (index_t t = 0; t < logits.rows(); ++t)
        detail::smooth_load_token(router, logits, context, t, s,
                                  [&](index_t e, double p, double, index_t, double) { l[std::size_t(e)] += p; });
    if (!detail::cv_squared_gradient(l, grad, scale)) return;
    const NoisyTopK& policy = router.selection();
    for (index_t t = 0; t < logits.rows(); ++t) {
        std::fill(dc.begin(), dc.end(), 0.0);
        std::fill(dscale.begin(), dscale.end(), 0.0);
        detail::smooth_load_token(router, logits, context, t, s, [&](index_t e, double, double density, index_t theta, double z) {
            const double c = grad[std::size_t(e)] * density;
            dc[std::size_t(e)] += c;
            dc[std::size_t(theta)] -= c; // H_theta = c_theta + scale_theta n_theta
            dscale[std::size_t(e)] -= c * z;
            dscale[std::size_t(theta)] -= c * double(s.noise[std::size_t(theta)]);
        });
        S::backward(s.scores, dc, dl);
        const std::span<const float> row = logits.row(t);
        for (index_t e = 0; e < experts; ++e) {
            dlogits(t, e) += float(dl[std::size_t(e)]);
            if (policy.learned_scale)
                dlogits(t, experts + e) += float(dscale[std::size_t(e)] * policy.scale_derivative(row, experts, e));
        }
    }
}

/// Router z-loss (ST-MoE, arXiv 2202.08906, eq. 5): mean over tokens of logsumexp(logits)^2.
[[nodiscard]] inline double router_z_loss(ConstMatrixView<float> logits) {
    if (logits.rows() == 0) return 0.0;
    double total = 0;
    for (index_t t = 0; t < logits.rows(); ++t) {
        double m = logits(t, 0);
        for (index_t e = 1; e < logits.cols(); ++e) m = std::max(m, double(logits(t, e)));
        double s = 0;
        for (index_t e = 0; e < logits.cols(); ++e) s += std::exp(double(logits(t, e)) - m);
        const double lse = m + std::log(s);
        total += lse * lse;
    }
    return total / double(logits.rows());
}

/// dlogits += scale * d router_z_loss / d logits = scale * 2 / T * lse_t * softmax(logits_t).
inline void router_z_loss_backward(ConstMatrixView<float> logits, MatrixView<float> dlogits, double scale) {
    check_shape(dlogits, logits.rows(), logits.cols(), "router_z_loss_backward", "dlogits");
    const index_t t_count = logits.rows();
    for (index_t t = 0; t < t_count; ++t) {
        double m = logits(t, 0);
        for (index_t e = 1; e < logits.cols(); ++e) m = std::max(m, double(logits(t, e)));
        double s = 0;
        for (index_t e = 0; e < logits.cols(); ++e) s += std::exp(double(logits(t, e)) - m);
        const double lse = m + std::log(s), c = scale * 2.0 / double(t_count) * lse;
        for (index_t e = 0; e < logits.cols(); ++e) dlogits(t, e) += float(c * std::exp(double(logits(t, e)) - m) / s);
    }
}

} // namespace hypermoe
