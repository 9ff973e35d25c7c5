#pragma once
// Group-limited top-k (DeepSeek-V3, arXiv 2412.19437, `noaux_tc`): the E experts form n_group
// contiguous groups; a group's score is the sum of its two best selection scores; the
// topk_group best groups are kept (ties: lower group index), then the top k of the kept
// experts are selected. With a selection-only bias (ScoredRouter) the bias picks the experts
// and the unbiased score weights them.

#include <array>

#include "hypermoe/core/error.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct GroupLimitedTopK {
    static constexpr std::string_view name = "group_limited_top_k";
    static constexpr bool fixed_selection = true;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    /// Largest supported group count (DeepSeek-V3 uses 8); keeps group scores on the stack.
    static constexpr index_t max_groups = 64;
    index_t k = 8;
    index_t n_group = 8;
    index_t topk_group = 4;

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return k; }
    [[nodiscard]] std::size_t workspace_bytes(index_t, index_t) const noexcept { return 0; }
    void validate(index_t experts) const {
        if (n_group < 1 || n_group > max_groups || experts % n_group != 0)
            throw config_error(detail::concat("GroupLimitedTopK: n_group is ", n_group, ", expected a divisor of experts = ",
                                              experts, " in [1, ", max_groups, "]"));
        const index_t per_group = experts / n_group;
        if (per_group < 2)
            throw config_error(detail::concat("GroupLimitedTopK: ", per_group,
                                              " experts per group, expected >= 2 (a group scores its two best)"));
        if (topk_group < 1 || topk_group > n_group)
            throw config_error(detail::concat("GroupLimitedTopK: topk_group is ", topk_group,
                                              ", expected 1 <= topk_group <= n_group = ", n_group));
        if (k < 1 || k > topk_group * per_group)
            throw config_error(detail::concat("GroupLimitedTopK: k is ", k, ", expected 1 <= k <= topk_group * ",
                                              per_group, " = ", topk_group * per_group));
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& /*ws*/) const {
        const index_t e = in.scores.cols(), per_group = e / n_group;
        // Tokens are independent: in parallel, each writing only its own plan row.
        detail::parallel_for(in.scores.rows(), in.scores.rows() * e * (k + 2), [&](index_t t) {
            std::array<float, max_groups> group_score{};
            std::array<bool, max_groups> kept{};
            const auto c = in.selection_scores.row(t);
            for (index_t g = 0; g < n_group; ++g) {
                float sum = 0;
                detail::ordered_top_k(
                    per_group, 2, [&](index_t i) { return c[std::size_t(g * per_group + i)]; }, detail::all_allowed,
                    [&](index_t, index_t i) { sum += c[std::size_t(g * per_group + i)]; });
                group_score[std::size_t(g)] = sum;
                kept[std::size_t(g)] = false;
            }
            detail::ordered_top_k(
                n_group, topk_group, [&](index_t g) { return group_score[std::size_t(g)]; }, detail::all_allowed,
                [&](index_t, index_t g) { kept[std::size_t(g)] = true; });
            const auto ids = plan.ids(t);
            const auto w = plan.weights(t);
            detail::ordered_top_k(
                e, k, [&](index_t i) { return c[std::size_t(i)]; },
                [&](index_t i) { return kept[std::size_t(i / per_group)]; },
                [&](index_t j, index_t i) {
                    ids[std::size_t(j)] = std::int32_t(i);
                    w[std::size_t(j)] = in.scores(t, i);
                });
        });
    }
};

} // namespace hypermoe
