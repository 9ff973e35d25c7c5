#pragma once
// Auxiliary routing losses, computed from a plan and the router's logits, for people who train
// elsewhere and want the same numbers. Values in double.

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "hypermoe/core/matrix.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/score.hpp"

namespace hypermoe {

/// Switch load-balancing loss (arXiv 2101.03961, eq. 4, as Hugging Face generalises it to top-k):
/// E * sum_e f_e * P_e, f_e = (assignments to e) / T, P_e = mean softmax probability of e.
/// 1 when routing is perfectly uniform (k = 1).
[[nodiscard]] inline double load_balancing_loss(const RoutingPlan& plan, ConstMatrixView<float> logits) {
    const index_t t_count = plan.tokens(), e_count = plan.experts();
    check_shape(logits, t_count, e_count, "load_balancing_loss", "logits");
    if (t_count == 0) return 0.0;
    std::vector<double> f(std::size_t(e_count), 0.0), p(std::size_t(e_count), 0.0);
    std::vector<float> probs(static_cast<std::size_t>(e_count));
    for (index_t t = 0; t < t_count; ++t) {
        for (const std::int32_t e : plan.ids(t))
            if (e >= 0) f[std::size_t(e)] += 1.0;
        Softmax::apply(logits.row(t), probs);
        for (index_t e = 0; e < e_count; ++e) p[std::size_t(e)] += probs[std::size_t(e)];
    }
    double loss = 0;
    for (index_t e = 0; e < e_count; ++e) loss += (f[std::size_t(e)] / double(t_count)) * (p[std::size_t(e)] / double(t_count));
    return double(e_count) * loss;
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

/// Load (kept assignments per expert) of a plan, for cv_squared.
[[nodiscard]] inline std::vector<double> load(const RoutingPlan& plan) {
    std::vector<double> l(std::size_t(plan.experts()), 0.0);
    for (index_t e = 0; e < plan.experts(); ++e) l[std::size_t(e)] = double(plan.rows_of(e));
    return l;
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

} // namespace hypermoe
