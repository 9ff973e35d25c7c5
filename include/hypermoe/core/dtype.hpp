#pragma once
// Storage types of weights: f32 and bf16 elements, the q8_0, q4_0 and mxfp4 blocks of 32
// weights and q4_k's super-blocks of 256 (core/quant.hpp). bf16 is stored as its 16 bits; the conversion from float rounds to nearest,
// ties to even, bit-exact with PyTorch's `.to(torch.bfloat16)` (c10::BFloat16
// round_to_nearest_even), including NaN -> 0x7FC0.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace hypermoe {

/// Storage type of a weight: an element type (f32, bf16) or a block format (q8_0, q4_0, mxfp4,
/// q4_k).
enum class dtype : std::uint8_t { f32, bf16, q8_0, q4_0, mxfp4, q4_k };

[[nodiscard]] constexpr std::string_view to_string(dtype t) noexcept {
    constexpr std::string_view names[] = {"f32", "bf16", "q8_0", "q4_0", "mxfp4", "q4_k"};
    return names[static_cast<int>(t)];
}

/// Whether weights of this type are stored in blocks along the input dimension (of 32; q4_k's
/// super-blocks of 256 hold 8 sub-blocks of 32).
[[nodiscard]] constexpr bool is_block_format(dtype t) noexcept {
    return t == dtype::q8_0 || t == dtype::q4_0 || t == dtype::mxfp4 || t == dtype::q4_k;
}

/// Weights per block of a block format as ggml stores it: 256 for q4_k, 32 for the others.
[[nodiscard]] constexpr std::size_t block_width(dtype t) noexcept { return t == dtype::q4_k ? 256 : 32; }

/// Bytes of one element of an element type (f32, bf16).
[[nodiscard]] constexpr std::size_t size_of(dtype t) noexcept { return t == dtype::f32 ? 4 : 2; }

/// Bytes of an (n, k) weight stored as `t` in ggml's layout, with the scales of the block formats
/// (rows padded to whole blocks: block_width).
[[nodiscard]] constexpr std::size_t weight_bytes(dtype t, std::size_t n, std::size_t k) noexcept {
    const std::size_t blocks = (k + block_width(t) - 1) / block_width(t);
    switch (t) {
    case dtype::q8_0: return n * blocks * 34;
    case dtype::q4_0: return n * blocks * 18;
    case dtype::mxfp4: return n * blocks * 17;
    case dtype::q4_k: return n * blocks * 144;
    default: return n * k * size_of(t);
    }
}

/// How a linear map over bf16 or block-format weights computes.
/// - `exact`: f32 arithmetic on the weights' exact values (bf16 widened, blocks dequantised).
/// - `fast`: for q8_0 / q4_0 / mxfp4 / q4_k weights, the activations are quantised to 8 bits per block of 32
///   (an f32 scale, integers rounded to nearest even) and each block's dot product is an integer
///   one (AVX-512 VNNI where the CPU has it), accumulated in f32. For bf16 weights the activations
///   are rounded to bf16 (to nearest even) and pairs of bf16 products are summed in f32
///   (AVX-512 BF16 where the CPU has it). f32 weights compute as with `exact`.
enum class precision : std::uint8_t { exact, fast };

[[nodiscard]] constexpr std::string_view to_string(precision p) noexcept {
    return p == precision::exact ? "exact" : "fast";
}

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
