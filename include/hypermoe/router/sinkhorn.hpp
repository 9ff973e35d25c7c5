#pragma once
// Balanced assignment by Sinkhorn iterations (S-BASE, Clark et al., arXiv 2202.01169; BASE
// layers, Lewis et al., arXiv 2103.16716): starting from P = exp(logit + selection bias - row
// max) (on the logits, as S-BASE: a softmax's probabilities would flatten P to within e^1),
// alternately scale columns so every expert holds T / E of the mass and rows so every token holds
// 1, a fixed number of times; each token then goes to the argmax of its balanced row (ties:
// lower index), weighted by its (unbalanced) score. Iterations run in double; the result is
// deterministic.

#include <cmath>

#include "hypermoe/core/error.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct SinkhornBalanced {
    static constexpr std::string_view name = "sinkhorn";
    static constexpr bool fixed_selection = true;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    index_t iterations = 8;

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return 1; }
    [[nodiscard]] std::size_t workspace_bytes(index_t tokens, index_t experts) const noexcept {
        return detail::padded_bytes<double>(tokens, experts) + detail::padded_bytes<double>(experts);
    }
    void validate(index_t /*experts*/) const {
        if (iterations < 0 || iterations > 1000)
            throw config_error(detail::concat("SinkhornBalanced: iterations is ", iterations, ", expected 0..1000"));
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& ws) const {
        const index_t tokens = in.scores.rows(), e = in.scores.cols();
        if (tokens == 0) return;
        Workspace::Scope scope(ws, workspace_bytes(tokens, e));
        const auto p = ws.take<double>(tokens * e);
        const auto col = ws.take<double>(e);
        const auto at = [&](index_t t, index_t x) -> double& { return p[std::size_t(t * e + x)]; };
        // The logit plus whatever selection-only bias the router adds to its scores.
        const auto logit = [&](index_t t, index_t x) {
            return double(in.logits(t, x)) + (double(in.selection_scores(t, x)) - double(in.scores(t, x)));
        };
        for (index_t t = 0; t < tokens; ++t) {
            double m = logit(t, 0);
            for (index_t x = 1; x < e; ++x) m = std::max(m, logit(t, x));
            for (index_t x = 0; x < e; ++x) at(t, x) = std::exp(logit(t, x) - m);
        }
        const double per_expert = double(tokens) / double(e);
        for (index_t it = 0; it < iterations; ++it) {
            std::fill(col.begin(), col.end(), 0.0);
            for (index_t t = 0; t < tokens; ++t)
                for (index_t x = 0; x < e; ++x) col[std::size_t(x)] += at(t, x);
            for (index_t t = 0; t < tokens; ++t) {
                double row = 0;
                for (index_t x = 0; x < e; ++x) row += at(t, x) *= per_expert / col[std::size_t(x)];
                for (index_t x = 0; x < e; ++x) at(t, x) /= row;
            }
        }
        for (index_t t = 0; t < tokens; ++t) {
            index_t best = 0;
            for (index_t x = 1; x < e; ++x)
                if (at(t, x) > at(t, best)) best = x;
            plan.ids(t)[0] = std::int32_t(best);
            plan.weights(t)[0] = in.scores(t, best);
        }
    }
};

} // namespace hypermoe
