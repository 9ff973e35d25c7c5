#pragma once
// What a selection policy sees and must provide. A policy fills a RoutingPlan's ids, weights
// and kept flags from the scores; ScoredRouter then applies the Weighting and builds the CSR.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>

#include "hypermoe/core/context.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/router/routing_plan.hpp"

namespace hypermoe {

/// What a router is given besides the logits: the forward call's Context (core/context.hpp).
/// The older name stays as an alias; it is the same type.
using RouterContext = Context;

/// The inputs of a selection policy, all (T, E).
struct SelectionInput {
    ConstMatrixView<float> logits;           ///< raw router logits: the experts' E, then any the policy reads beside them
    ConstMatrixView<float> scores;           ///< Score(logits): what selected experts are weighted by
    ConstMatrixView<float> selection_scores; ///< scores + selection-only bias: what selects
    const RouterContext& context;
};

template <class P>
concept SelectionPolicy = requires(const P& p, const SelectionInput& in, RoutingPlan& plan, Workspace& ws, index_t n) {
    { P::name } -> std::convertible_to<std::string_view>;
    { P::fixed_selection } -> std::convertible_to<bool>; // every token gets exactly slots() experts
    { p.slots(n) } -> std::same_as<index_t>;               // entries per token for E = n experts
    { p.workspace_bytes(n, n) } -> std::same_as<std::size_t>; // (tokens, experts)
    p.validate(n);                                           // config_error unless usable with E = n
    p.select(in, plan, ws);
};

namespace detail {

/// The k best of n values by (value descending, index ascending), written in that order through
/// out(j, i). O(k n) with no scratch: each pick is the best value strictly after the previous
/// pick in that order. Values must not be NaN. Returns how many were picked (< k when fewer
/// than k values pass `allowed`).
template <class Value, class Allowed, class Out>
index_t ordered_top_k(index_t n, index_t k, Value value, Allowed allowed, Out out) {
    float last_v = std::numeric_limits<float>::infinity();
    index_t last_i = -1;
    index_t picked = 0;
    for (; picked < k; ++picked) {
        index_t best = -1;
        float best_v = 0;
        for (index_t i = 0; i < n; ++i) {
            if (!allowed(i)) continue;
            const float v = value(i);
            const bool after_last = v < last_v || (v == last_v && i > last_i);
            if (after_last && (best < 0 || v > best_v)) best = i, best_v = v;
        }
        if (best < 0) break;
        out(picked, best);
        last_v = best_v;
        last_i = best;
    }
    return picked;
}

inline constexpr auto all_allowed = [](index_t) { return true; };

} // namespace detail
} // namespace hypermoe
