#pragma once
// Dynamic top-p routing (Huang et al., arXiv 2403.07652): per token, the smallest set of
// experts, best first (ties: lower index), whose score mass reaches p, capped at k_max. Each
// is weighted by its score.

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct TopP {
    static constexpr std::string_view name = "top_p";
    static constexpr bool fixed_selection = false;
    /// Each selected expert's combine weight is its score (ScoredRouter::backward relies on it).
    static constexpr bool weights_are_scores = true;
    double p = 0.5;
    index_t k_max = 4;

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return k_max; }
    [[nodiscard]] std::size_t workspace_bytes(index_t, index_t) const noexcept { return 0; }
    void validate(index_t experts) const {
        if (!(p > 0 && p <= 1)) throw config_error(detail::concat("TopP: p is ", p, ", expected 0 < p <= 1"));
        if (k_max < 1 || k_max > experts)
            throw config_error(detail::concat("TopP: k_max is ", k_max, ", expected 1 <= k_max <= experts = ", experts));
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& /*ws*/) const {
        // Tokens are independent and each writes only its own slots: parallel, bitwise as serial.
        detail::parallel_for(in.scores.rows(), in.scores.rows() * in.scores.cols() * (k_max + 2), [&](index_t t) {
            const auto ids = plan.ids(t);
            const auto w = plan.weights(t);
            double mass = 0;
            // Every pick is written; the scan stops being allowed to pick once the mass is reached.
            detail::ordered_top_k(
                in.scores.cols(), k_max, [&](index_t i) { return in.selection_scores(t, i); },
                [&](index_t) { return mass < p; },
                [&](index_t j, index_t i) {
                    ids[std::size_t(j)] = std::int32_t(i);
                    w[std::size_t(j)] = in.scores(t, i);
                    mass += in.selection_scores(t, i);
                });
        });
    }
};

} // namespace hypermoe
