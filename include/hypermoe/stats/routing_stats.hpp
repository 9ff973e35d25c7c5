#pragma once
// RoutingStats: what a RoutingPlan says about load balance and routing behaviour. Computed from
// the plan alone (entropy also needs the router logits), so every router is measured the same way.

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "hypermoe/core/matrix.hpp"
#include "hypermoe/router/losses.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/score.hpp"

namespace hypermoe {

struct RoutingStats {
    /// Kept assignments per expert (the rows each expert computes).
    std::vector<index_t> tokens_per_expert;
    /// Coefficient of variation of tokens_per_expert: sqrt(cv_squared(load(plan))), the one
    /// definition the load loss uses too (sample std / mean, as Shazeer et al.); 0 = balanced.
    double load_cv = 0;
    /// max / mean of tokens_per_expert; 1 = balanced.
    double max_over_mean = 0;
    /// Tokens that capacity dropped.
    index_t dropped = 0;
    /// Experts with at least one token.
    index_t experts_used = 0;
    /// Mean over tokens of the softmax entropy of the router logits (nats); empty without logits.
    std::optional<double> entropy;
    /// Mean over t >= 1 of |S_t n S_{t-1}| / |S_t|: how often adjacent tokens share experts.
    double adjacent_overlap = 0;
};

/// Statistics of `plan`; pass the router logits (T, E) to get the entropy too.
[[nodiscard]] inline RoutingStats routing_stats(const RoutingPlan& plan, ConstMatrixView<float> logits = {}) {
    RoutingStats s;
    const index_t e_count = plan.experts(), t_count = plan.tokens();
    s.tokens_per_expert.resize(std::size_t(e_count));
    double sum = 0;
    index_t most = 0;
    for (index_t e = 0; e < e_count; ++e) {
        const index_t n = plan.rows_of(e);
        s.tokens_per_expert[std::size_t(e)] = n;
        sum += double(n);
        most = std::max(most, n);
        s.experts_used += n > 0;
    }
    const double mean = e_count > 0 ? sum / double(e_count) : 0;
    if (mean > 0) s.max_over_mean = double(most) / mean;
    s.load_cv = std::sqrt(cv_squared(load(plan)));
    for (index_t t = 0; t < t_count; ++t) s.dropped += !plan.kept(t);
    if (t_count > 1) {
        double overlap = 0;
        for (index_t t = 1; t < t_count; ++t) {
            index_t shared = 0, size = 0;
            for (const std::int32_t e : plan.ids(t)) {
                if (e < 0) continue;
                ++size;
                const auto prev = plan.ids(t - 1);
                shared += std::find(prev.begin(), prev.end(), e) != prev.end();
            }
            overlap += size > 0 ? double(shared) / double(size) : 0.0;
        }
        s.adjacent_overlap = overlap / double(t_count - 1);
    }
    if (logits.rows() == t_count && logits.cols() == e_count && t_count > 0) {
        std::vector<float> p(static_cast<std::size_t>(e_count));
        double h = 0;
        for (index_t t = 0; t < t_count; ++t) {
            Softmax::apply(logits.row(t), p);
            for (const float v : p)
                if (v > 0) h -= double(v) * std::log(double(v));
        }
        s.entropy = h / double(t_count);
    }
    return s;
}

} // namespace hypermoe
