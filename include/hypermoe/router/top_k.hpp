#pragma once
// Top-k selection (Shazeer et al. 2017; Mixtral, Qwen2-MoE, OLMoE): the k experts with the
// highest selection score, in descending order, ties to the lower expert index. Each is weighted
// by its (unbiased) score.

#include "hypermoe/core/error.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct TopK {
    static constexpr std::string_view name = "top_k";
    static constexpr bool fixed_selection = true;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    index_t k = 2;

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return k; }
    [[nodiscard]] std::size_t workspace_bytes(index_t, index_t) const noexcept { return 0; }
    void validate(index_t experts) const {
        if (k < 1 || k > experts)
            throw config_error(detail::concat("TopK: k is ", k, ", expected 1 <= k <= experts = ", experts));
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& /*ws*/) const {
        const index_t e = in.scores.cols();
        // Tokens are independent: in parallel, each writing only its own plan row.
        detail::parallel_for(in.scores.rows(), in.scores.rows() * e * k, [&](index_t t) {
            const auto ids = plan.ids(t);
            const auto w = plan.weights(t);
            detail::ordered_top_k(
                e, k, [&](index_t i) { return in.selection_scores(t, i); }, detail::all_allowed,
                [&](index_t j, index_t i) {
                    ids[std::size_t(j)] = std::int32_t(i);
                    w[std::size_t(j)] = in.scores(t, i);
                });
        });
    }
};

} // namespace hypermoe
