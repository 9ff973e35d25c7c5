#pragma once
// Selection patterns: the set S of experts a token selected, named by its rank in the
// combinatorial number system (Knuth, TAOCP 7.2.1.3): for S = {s_0 < s_1 < ... < s_{k-1}},
// rank(S) = sum_i C(s_i, i + 1), a bijection onto 0 .. C(E, k) - 1.

#include <array>
#include <cstdint>
#include <span>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// C(n, k), or -1 when it exceeds 2^62.
[[nodiscard]] constexpr index_t binomial(index_t n, index_t k) noexcept {
    if (k < 0 || k > n) return 0;
    if (k > n - k) k = n - k;
    index_t r = 1;
    for (index_t i = 1; i <= k; ++i) {
        if (r > (index_t{1} << 62) / (n - k + i)) return -1;
        r = r * (n - k + i) / i;
    }
    return r;
}

/// The rank of a sorted, duplicate-free set of expert ids.
[[nodiscard]] constexpr index_t pattern_rank(std::span<const std::int32_t> sorted) noexcept {
    index_t r = 0;
    for (std::size_t i = 0; i < sorted.size(); ++i) r += binomial(sorted[i], index_t(i) + 1);
    return r;
}

static_assert(binomial(8, 2) == 28 && binomial(8, 1) == 8 && binomial(64, 8) == 4426165368);
static_assert(pattern_rank(std::array<std::int32_t, 2>{0, 1}) == 0 && pattern_rank(std::array<std::int32_t, 2>{6, 7}) == 27);

} // namespace hypermoe
