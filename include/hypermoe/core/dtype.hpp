#pragma once
// Element types of weights: f32 and bf16. bf16 is stored as its 16 bits; the conversion from
// float rounds to nearest, ties to even, bit-exact with PyTorch's `.to(torch.bfloat16)`
// (c10::BFloat16 round_to_nearest_even), including NaN -> 0x7FC0.

#include <bit>
#include <cstdint>
#include <string_view>

namespace hypermoe {

/// Element type of a tensor.
enum class dtype : std::uint8_t { f32, bf16 };

[[nodiscard]] constexpr std::string_view to_string(dtype t) noexcept {
    return t == dtype::f32 ? "f32" : "bf16";
}

[[nodiscard]] constexpr std::size_t size_of(dtype t) noexcept { return t == dtype::f32 ? 4 : 2; }

/// bfloat16: the upper 16 bits of an IEEE-754 binary32.
struct bf16 {
    std::uint16_t bits = 0;

    /// Round-to-nearest-even from float; every NaN becomes the quiet NaN 0x7FC0.
    [[nodiscard]] static constexpr bf16 from_float(float f) noexcept {
        const auto u = std::bit_cast<std::uint32_t>(f);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{0x7FC0};
        const std::uint32_t rounding_bias = ((u >> 16) & 1u) + 0x7FFFu;
        return bf16{static_cast<std::uint16_t>((u + rounding_bias) >> 16)};
    }

    /// Exact widening to float.
    [[nodiscard]] constexpr float to_float() const noexcept {
        return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
    }

    friend constexpr bool operator==(bf16, bf16) noexcept = default;
};

static_assert(sizeof(bf16) == 2);

/// The dtype tag of an element type.
template <class T>
inline constexpr dtype dtype_of = dtype::f32;
template <>
inline constexpr dtype dtype_of<bf16> = dtype::bf16;
template <>
inline constexpr dtype dtype_of<const bf16> = dtype::bf16;

} // namespace hypermoe
