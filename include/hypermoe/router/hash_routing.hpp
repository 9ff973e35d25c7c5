#pragma once
// Hash routing (Roller et al., arXiv 2106.04426): a fixed map from token id to expert, with
// weight 1. The map is a table (token id -> expert) when given, otherwise a fixed hash
// (splitmix64 of the id, modulo the expert count), so it needs no parameters and never changes.

#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

namespace detail {
/// splitmix64 (Steele et al. 2014): a bijective 64-bit mix, good enough to spread ids.
[[nodiscard]] constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
} // namespace detail

struct HashRouting {
    static constexpr std::string_view name = "hash";
    static constexpr bool fixed_selection = true;
    static constexpr bool uses_logits = false; // MoeLayer skips the gate GEMM
    /// Every weight is 1 whatever the scores: the router gets no gradient.
    static constexpr bool constant_weights = true;
    /// table[token id] = expert; empty = use splitmix64(id) % experts.
    std::vector<std::int32_t> table = {};

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return 1; }
    [[nodiscard]] std::size_t workspace_bytes(index_t, index_t) const noexcept { return 0; }
    void validate(index_t experts) const {
        for (std::size_t i = 0; i < table.size(); ++i)
            if (table[i] < 0 || table[i] >= experts)
                throw config_error(detail::concat("HashRouting: table[", i, "] is ", table[i], ", expected an expert in [0, ",
                                                  experts, ")"));
    }
    [[nodiscard]] std::int32_t expert_of(std::int32_t token_id, index_t experts) const {
        if (table.empty()) return std::int32_t(detail::splitmix64(std::uint64_t(std::uint32_t(token_id))) % std::uint64_t(experts));
        if (token_id < 0 || std::size_t(token_id) >= table.size())
            throw shape_error(detail::concat("HashRouting: token id ", token_id, " is outside the table of ", table.size(),
                                             " entries"));
        return table[std::size_t(token_id)];
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& /*ws*/) const {
        const index_t tokens = in.scores.rows();
        if (static_cast<index_t>(in.context.token_ids.size()) != tokens)
            throw shape_error(detail::concat("HashRouting: ", in.context.token_ids.size(), " token ids for ", tokens,
                                             " tokens, expected one id per token"));
        // Ids are checked first, in order, so a bad one is reported as the first bad one; then the
        // tokens are mapped in parallel (each writes its own slot).
        if (!table.empty())
            for (index_t t = 0; t < tokens; ++t) (void)expert_of(in.context.token_ids[std::size_t(t)], in.scores.cols());
        detail::parallel_for(tokens, tokens * 16, [&](index_t t) {
            plan.ids(t)[0] = expert_of(in.context.token_ids[std::size_t(t)], in.scores.cols());
            plan.weights(t)[0] = 1.0f;
        });
    }
};

} // namespace hypermoe
