#pragma once
// Expert choice (Zhou et al., arXiv 2202.09368): experts pick tokens. Each expert takes the c
// tokens with the highest selection score for it (ties: lower token index), c =
// round(tokens * capacity_factor / experts), clamped to [1, tokens]. A token may be taken by
// several experts or by none (its routed output is then zero). A token's slots list its experts
// in descending score, ties to the lower expert index; each is weighted by its score.

#include <algorithm>
#include <cmath>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct ExpertChoice {
    static constexpr std::string_view name = "expert_choice";
    static constexpr bool fixed_selection = false;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    /// Average experts per token (the paper's c); tokens per expert = tokens * c / experts.
    double capacity_factor = 2.0;

    [[nodiscard]] index_t slots(index_t experts) const noexcept { return experts; }
    [[nodiscard]] std::size_t workspace_bytes(index_t tokens, index_t /*experts*/) const noexcept {
        return detail::padded_bytes<std::int32_t>(tokens);
    }
    void validate(index_t /*experts*/) const {
        if (!(capacity_factor > 0) || !is_finite(float(capacity_factor)))
            throw config_error(detail::concat("ExpertChoice: capacity_factor is ", capacity_factor,
                                              ", expected a finite value > 0"));
    }
    /// Assignments of a batch: each expert takes tokens_per_expert tokens.
    [[nodiscard]] index_t max_assignments(index_t tokens, index_t experts) const noexcept {
        return detail::saturating_mul(experts, tokens_per_expert(tokens, experts));
    }
    /// Tokens each expert takes for a batch of `tokens`.
    [[nodiscard]] index_t tokens_per_expert(index_t tokens, index_t experts) const noexcept {
        const auto c = static_cast<index_t>(std::llround(double(tokens) * capacity_factor / double(experts)));
        return std::clamp<index_t>(c, tokens > 0 ? 1 : 0, tokens);
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& ws) const {
        const index_t tokens = in.scores.rows(), e = in.scores.cols();
        const index_t c = tokens_per_expert(tokens, e);
        Workspace::Scope scope(ws, workspace_bytes(tokens, e));
        const auto order = ws.take<std::int32_t>(tokens);
        for (index_t x = 0; x < e; ++x) {
            for (index_t t = 0; t < tokens; ++t) order[std::size_t(t)] = std::int32_t(t);
            const auto better = [&](std::int32_t a, std::int32_t b) {
                const float sa = in.selection_scores(a, x), sb = in.selection_scores(b, x);
                return sa > sb || (sa == sb && a < b);
            };
            std::partial_sort(order.begin(), order.begin() + c, order.end(), better);
            for (index_t i = 0; i < c; ++i) {
                const index_t t = order[std::size_t(i)];
                insert_ordered(plan, t, x, in.selection_scores(t, x), in.scores(t, x), in);
            }
        }
    }

private:
    /// Inserts expert x into token t's slots, keeping them in (selection score desc, id asc).
    static void insert_ordered(RoutingPlan& plan, index_t t, index_t x, float sel, float weight,
                               const SelectionInput& in) {
        const auto ids = plan.ids(t);
        const auto w = plan.weights(t);
        std::size_t j = 0;
        while (j < ids.size() && ids[j] >= 0) {
            const float other = in.selection_scores(t, ids[j]);
            if (sel > other || (sel == other && x < ids[j])) break;
            ++j;
        }
        for (std::size_t m = ids.size() - 1; m > j; --m) ids[m] = ids[m - 1], w[m] = w[m - 1];
        ids[j] = std::int32_t(x);
        w[j] = weight;
    }
};

} // namespace hypermoe
