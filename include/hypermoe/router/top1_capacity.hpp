#pragma once
// Top-1 with expert capacity (Switch Transformer, arXiv 2101.03961): each token goes to its
// argmax expert (ties: lower index), weighted by that probability. Per sequence, a token is
// kept iff its 1-based position among the sequence's tokens routed to the same expert is
// <= capacity; a dropped token keeps its id and weight (MoeLayer decides what it outputs).

#include "hypermoe/core/error.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct Top1Capacity {
    static constexpr std::string_view name = "top1_capacity";
    static constexpr bool fixed_selection = true;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    /// Tokens an expert takes per sequence (Switch's `expert_capacity`).
    index_t capacity = 64;

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return 1; }
    [[nodiscard]] std::size_t workspace_bytes(index_t /*tokens*/, index_t experts) const noexcept {
        return detail::padded_bytes<index_t>(experts);
    }
    void validate(index_t /*experts*/) const {
        if (capacity < 1) throw config_error(detail::concat("Top1Capacity: capacity is ", capacity, ", expected >= 1"));
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& ws) const {
        const index_t tokens = in.scores.rows(), e = in.scores.cols();
        const index_t length = in.context.sequence_length > 0 ? in.context.sequence_length : tokens;
        if (tokens % (length > 0 ? length : 1) != 0)
            throw shape_error(detail::concat("Top1Capacity: ", tokens, " tokens do not split into sequences of ", length));
        Workspace::Scope scope(ws, workspace_bytes(tokens, e));
        const auto count = ws.take<index_t>(e);
        for (index_t t = 0; t < tokens; ++t) {
            if (t % length == 0) std::fill(count.begin(), count.end(), 0);
            index_t best = 0;
            detail::ordered_top_k(
                e, 1, [&](index_t i) { return in.selection_scores(t, i); }, detail::all_allowed,
                [&](index_t, index_t i) { best = i; });
            plan.ids(t)[0] = std::int32_t(best);
            plan.weights(t)[0] = in.scores(t, best);
            plan.set_kept(t, ++count[std::size_t(best)] <= capacity);
        }
    }
};

} // namespace hypermoe
