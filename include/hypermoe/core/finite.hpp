#pragma once
// Finite checks that read the bits (std::bit_cast), so they survive -ffast-math, where
// std::isfinite may be folded to `true`.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <string_view>

#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

[[nodiscard]] constexpr bool is_finite(float f) noexcept {
    return (std::bit_cast<std::uint32_t>(f) & 0x7F800000u) != 0x7F800000u;
}

/// Whether every element of `values` is finite: no early exit, so that compilers vectorise it
/// (the checks of large arrays, such as an optimiser's gradients, then run at memory speed).
[[nodiscard]] inline bool all_finite(std::span<const float> values) noexcept {
    std::uint32_t exponents = 0; // ones where some element has an all-ones exponent
    for (const float f : values) {
        const std::uint32_t e = std::bit_cast<std::uint32_t>(f) & 0x7F800000u;
        exponents |= e == 0x7F800000u ? 1u : 0u;
    }
    return exponents == 0;
}

/// Index of the first NaN or Inf in `values`, or -1 when all are finite. Scanned in blocks by
/// all_finite (vectorised); only a block that holds a bad element is searched one by one.
[[nodiscard]] inline index_t find_non_finite(std::span<const float> values) noexcept {
    constexpr std::size_t block = 256;
    for (std::size_t b = 0; b < values.size(); b += block) {
        const auto part = values.subspan(b, std::min(block, values.size() - b));
        if (all_finite(part)) continue;
        for (std::size_t i = 0; i < part.size(); ++i)
            if (!is_finite(part[i])) return static_cast<index_t>(b + i);
    }
    return -1;
}

/// Index of the first NaN or Inf among bf16 values (an all-ones exponent), or -1 when all are
/// finite: as the f32 one, in blocks that compilers vectorise, a bad block searched one by one.
[[nodiscard]] inline index_t find_non_finite(std::span<const bf16> values) noexcept {
    constexpr std::size_t block = 256;
    const auto bad = [](bf16 v) { return (v.bits & 0x7F80u) == 0x7F80u; };
    for (std::size_t b = 0; b < values.size(); b += block) {
        const auto part = values.subspan(b, std::min(block, values.size() - b));
        unsigned any = 0;
        for (const bf16 v : part) any |= bad(v) ? 1u : 0u;
        if (any == 0) continue;
        for (std::size_t i = 0; i < part.size(); ++i)
            if (bad(part[i])) return static_cast<index_t>(b + i);
    }
    return -1;
}

/// Throws numeric_error naming `what` and the first non-finite element.
inline void check_finite(std::span<const float> values, std::string_view what) {
    if (const index_t i = find_non_finite(values); i >= 0)
        throw numeric_error(detail::concat(what, ": element ", i, " is ", values[static_cast<std::size_t>(i)],
                                           ", expected a finite value"));
}

/// Throws numeric_error naming `what` and the row and column of the first NaN or Inf.
inline void check_finite(ConstMatrixView<float> m, std::string_view what) {
    for (index_t r = 0; r < m.rows(); ++r)
        if (const index_t c = find_non_finite(m.row(r)); c >= 0)
            throw numeric_error(detail::concat(what, ": element (", r, ", ", c, ") is ", m(r, c),
                                               ", expected a finite value"));
}

} // namespace hypermoe
