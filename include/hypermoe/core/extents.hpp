#pragma once
// Widths that are static (known at compile time) or dynamic (known at run time), after
// std::extents (P0009): only the dynamic values are stored, static -> dynamic converts
// implicitly, dynamic -> static explicitly and with a check.

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "hypermoe/core/error.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// Signed index type of every size and index in the library (as Eigen::Index).
using index_t = std::int64_t;

/// The extent value that means "known only at run time".
inline constexpr index_t dynamic = -1;

namespace detail {

/// True when a value of static extent `from` may be stored in static extent `to`.
[[nodiscard]] constexpr bool extent_compatible(index_t to, index_t from) noexcept {
    return to == dynamic || from == dynamic || to == from;
}

} // namespace detail

/// A rank-N shape whose entries are each static or `dynamic`. Stores only the dynamic entries.
template <index_t... Es>
class extents {
    static_assert(((Es == dynamic || Es >= 0) && ...),
                  "Every static extent must be non-negative or hypermoe::dynamic.");

public:
    [[nodiscard]] static constexpr std::size_t rank() noexcept { return sizeof...(Es); }
    [[nodiscard]] static constexpr std::size_t rank_dynamic() noexcept {
        return (std::size_t{Es == dynamic} + ... + 0);
    }
    /// The compile-time value of extent i, or `dynamic`.
    [[nodiscard]] static constexpr index_t static_extent(std::size_t i) noexcept {
        constexpr std::array<index_t, sizeof...(Es)> values{Es...};
        return values[i];
    }

    /// All-static extents need no arguments.
    constexpr extents() noexcept requires(rank_dynamic() == 0) = default;

    /// From the dynamic extents only, in order.
    template <std::convertible_to<index_t>... I>
        requires(sizeof...(I) == rank_dynamic() && rank_dynamic() > 0)
    constexpr explicit extents(I... dynamic_values) : dyn_{static_cast<index_t>(dynamic_values)...} {
        for (std::size_t i = 0; i < dyn_.size(); ++i) check_value(dynamic_index_to_rank(i), dyn_[i]);
    }

    /// From every extent; the static ones are checked against the argument.
    template <std::convertible_to<index_t>... I>
        requires(sizeof...(I) == rank() && rank() != rank_dynamic())
    constexpr explicit extents(I... all_values) {
        const std::array<index_t, rank()> values{static_cast<index_t>(all_values)...};
        assign_from(values);
    }

    /// From other extents of the same rank: implicit when no static extent of ours would have to
    /// be checked against a dynamic one of theirs, explicit (and checked) otherwise.
    template <index_t... Os>
        requires(sizeof...(Os) == sizeof...(Es) && (detail::extent_compatible(Es, Os) && ...))
    constexpr explicit(((Es != dynamic && Os == dynamic) || ...))
        extents(const extents<Os...>& other) {
        std::array<index_t, rank()> values{};
        for (std::size_t i = 0; i < rank(); ++i) values[i] = other.extent(i);
        assign_from(values);
    }

    /// Extent i, static or dynamic.
    [[nodiscard]] constexpr index_t extent(std::size_t i) const noexcept {
        if (static_extent(i) != dynamic) return static_extent(i);
        return dyn_[rank_to_dynamic_index(i)];
    }

    template <index_t... Os>
    [[nodiscard]] friend constexpr bool operator==(const extents& a, const extents<Os...>& b) noexcept {
        if constexpr (sizeof...(Os) != sizeof...(Es)) {
            return false;
        } else {
            for (std::size_t i = 0; i < rank(); ++i)
                if (a.extent(i) != b.extent(i)) return false;
            return true;
        }
    }

private:
    static constexpr std::size_t rank_to_dynamic_index(std::size_t i) noexcept {
        std::size_t d = 0;
        for (std::size_t j = 0; j < i; ++j) d += static_extent(j) == dynamic;
        return d;
    }
    static constexpr std::size_t dynamic_index_to_rank(std::size_t d) noexcept {
        for (std::size_t i = 0; i < rank(); ++i)
            if (static_extent(i) == dynamic && d-- == 0) return i;
        return rank();
    }
    static constexpr void check_value(std::size_t i, index_t v) {
        if (v < 0)
            throw shape_error(detail::concat("extents: extent ", i, " is ", v, ", expected >= 0"));
    }
    constexpr void assign_from(const std::array<index_t, rank()>& values) {
        for (std::size_t i = 0; i < rank(); ++i) {
            check_value(i, values[i]);
            if (static_extent(i) == dynamic) {
                dyn_[rank_to_dynamic_index(i)] = values[i];
            } else if (values[i] != static_extent(i)) {
                throw shape_error(detail::concat("extents: extent ", i, " is ", values[i],
                                                 ", expected the static extent ", static_extent(i)));
            }
        }
    }

    [[no_unique_address]] std::array<index_t, rank_dynamic()> dyn_{};
};

/// Checks a run-time width against a (possibly static) compile-time one: a static width that
/// disagrees with the value a config or weight gives is a shape_error naming both (as every width
/// mismatch); a negative value is a config_error.
inline void check_static_width(std::string_view who, std::string_view what, index_t static_value,
                               index_t run_time_value) {
    if (run_time_value < 0)
        throw config_error(detail::concat(who, ": ", what, " is ", run_time_value, ", expected >= 0"));
    if (static_value != dynamic && static_value != run_time_value)
        throw shape_error(detail::concat(who, ": ", what, " is ", run_time_value,
                                         " at run time, but the type fixes it to ", static_value));
}

} // namespace hypermoe
