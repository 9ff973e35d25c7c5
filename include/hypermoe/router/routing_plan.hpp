#pragma once
// RoutingPlan: the contract between routing and computation (DESIGN.md section 2). Every router
// produces one; dispatch, combine, statistics (and HyperMoE) read only the plan.
//
// Per token t: `slots` entries of (expert id, combine weight), in descending selection score
// (ties: lower expert index first); an unused slot has id -1 and weight 0. `kept[t]` is 0 when
// capacity dropped the token (its ids and weights still say what it was routed to).
// Per expert e: a CSR over the kept assignments, rows [offsets[e], offsets[e+1]) naming
// (token, slot), built by a stable counting sort, so each expert sees its tokens in order.
//
// The vectors keep their capacity across calls: after the first call with the largest token
// count, resetting and rebuilding allocates nothing.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

class RoutingPlan {
public:
    /// Clears the plan for `tokens` tokens, `experts` experts and `slots` entries per token.
    void reset(index_t tokens, index_t experts, index_t slots) {
        if (tokens < 0 || experts <= 0 || slots <= 0)
            throw config_error(detail::concat("RoutingPlan::reset: tokens = ", tokens, ", experts = ", experts,
                                              ", slots = ", slots, ", expected tokens >= 0 and the others > 0"));
        tokens_ = tokens;
        experts_ = experts;
        slots_ = slots;
        const auto n = static_cast<std::size_t>(tokens * slots);
        ids_.assign(n, -1);
        weights_.assign(n, 0.0f);
        kept_.assign(static_cast<std::size_t>(tokens), 1);
        offsets_.assign(static_cast<std::size_t>(experts + 1), 0);
        row_token_.clear();
        row_slot_.clear();
        position_.assign(n, -1);
    }

    [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
    [[nodiscard]] index_t experts() const noexcept { return experts_; }
    [[nodiscard]] index_t slots() const noexcept { return slots_; }

    /// Expert ids of token t (slots entries, -1 when unused).
    [[nodiscard]] std::span<std::int32_t> ids(index_t t) noexcept { return {ids_.data() + t * slots_, std::size_t(slots_)}; }
    [[nodiscard]] std::span<const std::int32_t> ids(index_t t) const noexcept {
        return {ids_.data() + t * slots_, std::size_t(slots_)};
    }
    /// Combine weights of token t.
    [[nodiscard]] std::span<float> weights(index_t t) noexcept { return {weights_.data() + t * slots_, std::size_t(slots_)}; }
    [[nodiscard]] std::span<const float> weights(index_t t) const noexcept {
        return {weights_.data() + t * slots_, std::size_t(slots_)};
    }
    [[nodiscard]] bool kept(index_t t) const noexcept { return kept_[std::size_t(t)] != 0; }
    void set_kept(index_t t, bool k) noexcept { kept_[std::size_t(t)] = k ? 1 : 0; }

    /// All ids, (tokens, slots) row-major; all weights likewise.
    [[nodiscard]] std::span<const std::int32_t> all_ids() const noexcept { return ids_; }
    [[nodiscard]] std::span<const float> all_weights() const noexcept { return weights_; }

    /// Builds the per-expert CSR from the ids of kept tokens (stable: token order, then slot).
    void build_index() {
        std::fill(offsets_.begin(), offsets_.end(), 0);
        for (index_t t = 0; t < tokens_; ++t) {
            if (!kept(t)) continue;
            for (const std::int32_t e : ids(t)) {
                if (e < 0) continue;
                if (e >= experts_)
                    throw error(detail::concat("RoutingPlan: token ", t, " names expert ", e, ", expected < ", experts_));
                ++offsets_[std::size_t(e) + 1];
            }
        }
        for (index_t e = 0; e < experts_; ++e) offsets_[std::size_t(e + 1)] += offsets_[std::size_t(e)];
        const auto rows = static_cast<std::size_t>(offsets_.back());
        row_token_.resize(rows);
        row_slot_.resize(rows);
        std::fill(position_.begin(), position_.end(), -1);
        // Counting sort: a cursor per expert, starting at its offset. The cursors live in
        // offsets_ shifted by one, restored afterwards, so no scratch is needed.
        for (index_t t = 0; t < tokens_; ++t) {
            if (!kept(t)) continue;
            const auto id = ids(t);
            for (index_t j = 0; j < slots_; ++j) {
                if (id[std::size_t(j)] < 0) continue;
                const auto r = offsets_[std::size_t(id[std::size_t(j)])]++;
                row_token_[std::size_t(r)] = static_cast<std::int32_t>(t);
                row_slot_[std::size_t(r)] = static_cast<std::int32_t>(j);
                position_[std::size_t(t * slots_ + j)] = r;
            }
        }
        for (index_t e = experts_; e > 0; --e) offsets_[std::size_t(e)] = offsets_[std::size_t(e - 1)];
        offsets_[0] = 0;
    }

    /// CSR offsets (experts + 1): expert e owns rows [offsets[e], offsets[e+1]).
    [[nodiscard]] std::span<const index_t> offsets() const noexcept { return offsets_; }
    [[nodiscard]] index_t rows() const noexcept { return offsets_.empty() ? 0 : offsets_.back(); }
    [[nodiscard]] index_t rows_of(index_t e) const noexcept {
        return offsets_[std::size_t(e + 1)] - offsets_[std::size_t(e)];
    }
    /// Token and slot of CSR row r.
    [[nodiscard]] std::span<const std::int32_t> row_tokens() const noexcept { return row_token_; }
    [[nodiscard]] std::span<const std::int32_t> row_slots() const noexcept { return row_slot_; }
    /// CSR row of (token t, slot j), or -1 (unused slot or dropped token).
    [[nodiscard]] index_t position(index_t t, index_t j) const noexcept { return position_[std::size_t(t * slots_ + j)]; }

private:
    index_t tokens_ = 0, experts_ = 0, slots_ = 0;
    std::vector<std::int32_t> ids_;
    std::vector<float> weights_;
    std::vector<std::uint8_t> kept_;
    std::vector<index_t> offsets_;
    std::vector<std::int32_t> row_token_, row_slot_;
    std::vector<index_t> position_;
};

} // namespace hypermoe
