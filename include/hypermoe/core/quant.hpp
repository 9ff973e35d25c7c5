#pragma once
// The 8- and 4-bit block formats of weights, bit-compatible with ggml's Q8_0, Q4_0, MXFP4 and
// Q4_K (so GGUF files can be used without re-quantising, and results compared with llama.cpp):
//
//   q8_0:  blocks of 32 consecutive weights along the input dimension, 34 bytes each:
//          d = amax / 127 stored as IEEE half; q = roundf(x * (1/d)) as int8; value = q * d.
//   q4_0:  blocks of 32, 18 bytes each: max = the element of largest magnitude (signed, the first
//          one on ties); d = max / -8 stored as half; q = min(15, (int8_t)(x * (1/d) + 8.5f));
//          value = (q - 8) * d; element j and j + 16 share byte j (low nibble = element j).
//   mxfp4: blocks of 32, 17 bytes each (the OCP microscaling FP4): a scale byte e (E8M0), then
//          16 bytes of nibbles as q4_0's; value = mxfp4_values[nibble] * 2^(e - 128), the FP4
//          (E2M1) values doubled to integers times half of E8M0's 2^(e - 127), as ggml's
//          kvalues_mxfp4 and GGML_E8M0_TO_FP32_HALF take them (every e, 0 and 255 included).
//          Quantising (ggml's quantize_row_mxfp4_ref): e = floor(log2(amax)) - 2 + 127 (0 for a
//          zero block, and for amax below 2^-125, where ggml's conversion to a byte is
//          undefined), each weight the nearest value, the first of the 16 on ties.
//   q4_k:  super-blocks of 256, 144 bytes each (ggml's Q4_K, BlockQ4_K below): per sub-block of
//          32, a 6-bit scale sc and min m; per super-block the halves d and dmin; value =
//          (d sc) q - dmin m, q a 4-bit code. Quantising follows ggml's quantize_row_q4_K_ref
//          (no importance matrix): each sub-block's scale and min fitted by a weighted search
//          (detail::fit_scale_min), then rounded to 6 bits under d and dmin, then each code. Its
//          float operations are ggml's, in ggml's order; a compiler that contracts them into
//          FMAs (ggml's own builds with -march=native may) can round a rare value differently.
//          A row that is not whole super-blocks is zero-padded.
//
// In q8_0 and q4_0, 1/d is computed in f32 from the unrounded d (as ggml's reference quantiser
// does), and dequantising uses the stored, half-rounded d. A zero block has d = 0 and all q = 0 (q4_0:
// d = 0 / -8 = -0, half bits 0x8000, and every nibble 8). IEEE half conversion rounds to nearest, ties to even, bit-exact with F16C's
// _cvtss_sh(x, 0) and ggml's GGML_FP32_TO_FP16 (tested against F16C where the CPU has it).

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>

#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// IEEE-754 binary16 bits from a float: round to nearest, ties to even; overflow -> inf; NaN ->
/// a quiet NaN of the same sign.
[[nodiscard]] inline std::uint16_t f32_to_f16_bits(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u);     // NaN
    if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);    // >= 65520: inf
    if (a < 0x38800000u) {                                                      // below 2^-14: subnormal or zero
        // Adding 0.5 puts the value's bits 2^-24 and up into the float's mantissa, and the
        // FPU's own rounding (to nearest even) does the rest.
        const float shifted = std::bit_cast<float>(a) + 0.5f;
        return static_cast<std::uint16_t>(sign | (std::bit_cast<std::uint32_t>(shifted) - 0x3F000000u));
    }
    const std::uint32_t odd = (a >> 13) & 1u;
    return static_cast<std::uint16_t>(sign | ((a + 0xC8000FFFu + odd) >> 13)); // rebias 127 -> 15, round
}

/// The float value of IEEE half bits (exact).
[[nodiscard]] inline float f16_bits_to_f32(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0) { // zero or subnormal: mant * 2^-24
        const float v = float(mant) * 0x1.0p-24f;
        return std::bit_cast<float>(std::bit_cast<std::uint32_t>(v) | sign);
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// Weights per block of both formats.
inline constexpr index_t quant_block = 32;

/// ggml's block_q8_0: the scale's half bits, then 32 signed bytes.
struct BlockQ8_0 {
    std::uint16_t d = 0;
    std::array<std::int8_t, 32> qs{};
};
/// ggml's block_q4_0: the scale's half bits, then 16 bytes of two 4-bit values.
struct BlockQ4_0 {
    std::uint16_t d = 0;
    std::array<std::uint8_t, 16> qs{};
};
/// ggml's block_mxfp4: the scale byte e, then 16 bytes of two 4-bit indices into mxfp4_values.
struct BlockMXFP4 {
    std::uint8_t e = 0;
    std::array<std::uint8_t, 16> qs{};
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockMXFP4) == 17, "the blocks are ggml's, byte for byte");

/// The 16 values MXFP4's nibbles stand for, in units of its scale 2^(e - 128) (ggml's
/// kvalues_mxfp4: E2M1's values doubled; nibble 8 is E2M1's -0).
inline constexpr std::array<std::int8_t, 16> mxfp4_values = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/// MXFP4's scale for its byte e (0-255): 2^(e - 128), exactly, built from its bits: a normal
/// float of exponent field e - 1 for e >= 2, the subnormals 2^-127 and 2^-128 for e = 1 and 0
/// (std::ldexp took a third of the time of loading an MXFP4 checkpoint).
[[nodiscard]] inline float mxfp4_scale(unsigned e) noexcept {
    return std::bit_cast<float>(e >= 2 ? std::uint32_t(e - 1) << 23 : std::uint32_t{0x00200000} << e);
}

/// A q8_0 block of 32 finite floats.
[[nodiscard]] inline BlockQ8_0 quantize_q8_0(std::span<const float, 32> x) noexcept {
    float amax = 0.0f;
    for (const float v : x) amax = std::max(amax, std::fabs(v));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0 b;
    b.d = f32_to_f16_bits(d);
    for (std::size_t j = 0; j < 32; ++j) b.qs[j] = static_cast<std::int8_t>(std::roundf(x[j] * id));
    return b;
}

/// A q4_0 block of 32 finite floats.
[[nodiscard]] inline BlockQ4_0 quantize_q4_0(std::span<const float, 32> x) noexcept {
    float amax = 0.0f, max = 0.0f;
    for (const float v : x)
        if (amax < std::fabs(v)) amax = std::fabs(v), max = v;
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ4_0 b;
    b.d = f32_to_f16_bits(d);
    for (std::size_t j = 0; j < 16; ++j) {
        const auto q0 = std::min<std::uint8_t>(15, static_cast<std::uint8_t>(static_cast<std::int8_t>(x[j] * id + 8.5f)));
        const auto q1 = std::min<std::uint8_t>(15, static_cast<std::uint8_t>(static_cast<std::int8_t>(x[j + 16] * id + 8.5f)));
        b.qs[j] = static_cast<std::uint8_t>(q0 | (q1 << 4));
    }
    return b;
}

/// An mxfp4 block of 32 finite floats.
[[nodiscard]] inline BlockMXFP4 quantize_mxfp4(std::span<const float, 32> x) noexcept {
    float amax = 0.0f;
    for (const float v : x) amax = std::max(amax, std::fabs(v));
    BlockMXFP4 b;
    b.e = amax > 0.0f ? static_cast<std::uint8_t>(std::max(0.0f, std::floor(std::log2(amax)) - 2 + 127)) : 0;
    const float d = mxfp4_scale(b.e);
    // The nearest of mxfp4_values x d, the first on ties, as ggml's linear search over the 16
    // (best_index_mxfp4) picks it: |v| against the 7 midpoints between the magnitudes, which are
    // exact multiples of the power of two d. Where the search's choice is made its differences
    // are exact (Sterbenz: neighbouring magnitudes are at most a factor 2 apart), so the two
    // agree on every finite input, ties included (the smaller magnitude, and 0 before -0);
    // tests/test_quant.cpp compares them. 7 compares where the search took 30 differences.
    // A value past the largest float (8 d and 12 d at e = 253, where log2 of an amax near the
    // largest float rounds to 128) is never the search's choice: its midpoint is never passed.
    constexpr std::array<float, 7> halfway = {0.5f, 1.5f, 2.5f, 3.5f, 5.0f, 7.0f, 10.0f};
    std::array<float, 7> midpoints{};
    for (std::size_t i = 0; i < 7; ++i) {
        const float above = float(mxfp4_values[i + 1]) * d;
        midpoints[i] = is_finite(above) ? halfway[i] * d : std::numeric_limits<float>::max();
    }
    const auto nearest = [&midpoints](float v) {
        const float a = std::fabs(v);
        unsigned i = 0;
        for (const float m : midpoints) i += a > m ? 1u : 0u;
        return static_cast<std::uint8_t>(v < 0.0f && i != 0 ? i + 8 : i);
    };
    for (std::size_t j = 0; j < 16; ++j) b.qs[j] = static_cast<std::uint8_t>(nearest(x[j]) | (nearest(x[j + 16]) << 4));
    return b;
}

/// A block's scale (exact): its half d, or mxfp4's 2^(e - 128).
[[nodiscard]] inline float block_scale(const BlockQ8_0& b) noexcept { return f16_bits_to_f32(b.d); }
[[nodiscard]] inline float block_scale(const BlockQ4_0& b) noexcept { return f16_bits_to_f32(b.d); }
[[nodiscard]] inline float block_scale(const BlockMXFP4& b) noexcept { return mxfp4_scale(b.e); }

/// The 32 values a block stands for.
inline void dequantize(const BlockQ8_0& b, std::span<float, 32> out) noexcept {
    const float d = block_scale(b);
    for (std::size_t j = 0; j < 32; ++j) out[j] = float(b.qs[j]) * d;
}
inline void dequantize(const BlockQ4_0& b, std::span<float, 32> out) noexcept {
    const float d = block_scale(b);
    for (std::size_t j = 0; j < 16; ++j) {
        out[j] = float(int(b.qs[j] & 0x0F) - 8) * d;
        out[j + 16] = float(int(b.qs[j] >> 4) - 8) * d;
    }
}
inline void dequantize(const BlockMXFP4& b, std::span<float, 32> out) noexcept {
    const float d = block_scale(b);
    for (std::size_t j = 0; j < 16; ++j) {
        out[j] = float(mxfp4_values[b.qs[j] & 0x0F]) * d;
        out[j + 16] = float(mxfp4_values[b.qs[j] >> 4]) * d;
    }
}

/// ggml's quant types, which the library reads by widening them to f32 (io/: held in this form
/// only when they are q8_0, q4_0, mxfp4 or q4_k above, which are held as stored). Their bytes are ggml's (half values
/// little-endian). Two kinds:
///
/// Blocks of 32, like Q4_0 and Q8_0: what older files hold throughout, and what llama.cpp writes
/// for a matrix whose rows are not whole super-blocks of 256 (Qwen1.5-MoE's and DeepSeek-V2-Lite's
/// 1408-wide expert down projections: Q5_0 in a Q4_K_M file, Q5_1 in Q5_K_M, IQ4_NL in Q2_K,
/// Q3_K and IQ4_XS files). Element j < 16 is the low nibble of qs[j], element j + 16 its high one:
///   Q4_1, 20 bytes: half d, half m, 16 bytes qs; value = d * q + m.
///   Q5_0, 22 bytes: half d, 4 bytes qh, 16 bytes qs; q = nibble + 16 * (bit j of qh as a
///         little-endian u32), for element j (0-31); value = d * (q - 16).
///   Q5_1, 24 bytes: half d, half m, qh, qs; q as Q5_0's; value = d * q + m.
///   IQ4_NL, 18 bytes: half d, 16 bytes qs; value = d * iq4nl_values[nibble].
///   MXFP4, 17 bytes: a byte e (the OCP microscaling format's E8M0 scale), 16 bytes qs; value =
///         mxfp4_values[nibble] * 2^(e - 128): the FP4 (E2M1) values 0, 0.5, 1, 1.5, 2, 3, 4, 6
///         and their negatives, doubled to integers, times half of E8M0's 2^(e - 127), as ggml's
///         kvalues_mxfp4 and GGML_E8M0_TO_FP32_HALF take them (every e, 0 and 255 included).
///         llama.cpp's MXFP4_MOE files hold MoE experts in it, gpt-oss's GGUF files too. (Also a
///         held format: BlockMXFP4 above; here for widening into the other storages.)
///
/// K-quant super-blocks of 256, in the files of llama.cpp's Q2_K, Q3_K_*, Q4_K_*, Q5_K_* and Q6_K
/// kinds, and the non-linear IQ4_XS of its IQ4_XS files:
///   Q2_K, 84 bytes: 16 scale bytes (a sub-block of 16 each: scale sc in the low nibble, min m in
///         the high one), 64 bytes qs, half d, half dmin. Per half n = j / 128, with g = j % 128
///         / 32 and b = j % 32: q = bits 2g, 2g + 1 of qs[32 n + b]; sub-block s = 8 n + 2 g +
///         b / 16; value = (d * sc) * q - dmin * m.
///   Q3_K, 110 bytes: 32 bytes hmask, 64 bytes qs, 12 bytes of sixteen 6-bit scales (k3_scale),
///         half d. n, g, b and s as Q2_K's; q = bits 2g, 2g + 1 of qs[32 n + b], minus 4 unless
///         bit 4 n + g of hmask[b] is set; value = (d * (sc - 32)) * q.
///   Q4_K, 144 bytes: half d, half dmin, 12 bytes of eight 6-bit scales sc and mins m (one pair a
///         sub-block of 32: k_scale_min), 128 bytes of nibbles. Element j is in byte
///         32 (j / 64) + j % 32, in its low nibble when j % 64 < 32, else its high one.
///         value = (d * sc) * q - dmin * m, for sub-block s = j / 32.
///   Q5_K, 176 bytes: d, dmin, the 12 scale bytes, 32 bytes qh, 128 bytes of nibbles (as Q4_K's);
///         q = nibble + 16 * (bit s of qh[j % 32]); value as Q4_K's.
///   Q6_K, 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales, half d. Per half n = j / 128 and
///         quarter u = j % 128 / 32, with l = j % 32: the low 4 bits are byte 64 n + 32 (u % 2) + l
///         of ql (its high nibble when u >= 2), the high 2 bits are bits 2u, 2u + 1 of qh[32 n + l];
///         q = that 6-bit value - 32; value = (d * sc) * q with sc = scales[8 n + 2 u + l / 16].
///   IQ4_XS, 136 bytes: half d, 16-bit scales_h, 4 bytes scales_l, 128 bytes of nibbles. Sub-block
///         s = j / 32 has the 6-bit scale ls = (nibble s % 2 of scales_l[s / 2]) | (bits 2s, 2s + 1
///         of scales_h) << 4; with l = j % 32, the nibble is byte 16 s + l % 16 (the low one when
///         l < 16); value = (d * (ls - 32)) * iq4nl_values[nibble].
///
/// Every product is exact in f32 (at most 24 significant bits), so each value is exactly ggml's
/// (dequantize_row_q4_1, dequantize_row_q4_K & co.): Q4_1, Q5_1, Q2_K, Q4_K and Q5_K round once,
/// in the addition of the min, as ggml does. MXFP4's values (at most 4 significant bits times a
/// power of two) are exact too, subnormal ones included; e above 252 can give infinities, which
/// the loaders reject as they reject any non-finite weight.
enum class ggml_quant { q4_1, q5_0, q5_1, iq4_nl, mxfp4, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs };

/// The elements in one block of a type: 32 for the blocks of 32, 256 for the super-blocks.
[[nodiscard]] constexpr index_t block_elements(ggml_quant t) noexcept { return t <= ggml_quant::mxfp4 ? 32 : 256; }

/// The 16 values IQ4_NL's and IQ4_XS's nibbles stand for (ggml's kvalues_iq4nl).
inline constexpr std::array<std::int8_t, 16> iq4nl_values = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                              1,    13,   25,  38,  53,  69,  89,  113};

/// Sub-block s's (0-7) 6-bit scale and min from a Q4_K / Q5_K super-block's 12 scale bytes: s < 4
/// in the low 6 bits of bytes s and s + 4; else the low (scale) and high (min) nibbles of byte
/// s + 4 with the top 2 bits of bytes s - 4 (scale) and s (min) above them.
[[nodiscard]] inline std::pair<unsigned, unsigned> k_scale_min(const unsigned char* scales, index_t s) noexcept {
    if (s < 4) return {scales[s] & 63u, scales[s + 4] & 63u};
    return {(scales[s + 4] & 0x0Fu) | ((scales[s - 4] >> 6) << 4), (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4)};
}

/// Sub-block s's (0-15) 6-bit scale from a Q3_K super-block's 12 scale bytes: its low 4 bits are
/// the low nibble of byte s (s < 8) or the high nibble of byte s - 8, its top 2 bits are bits
/// 2 (s / 4) and 2 (s / 4) + 1 of byte 8 + s % 4 (what ggml's kmask1 / kmask2 shuffle unpacks).
[[nodiscard]] inline unsigned k3_scale(const unsigned char* scales, index_t s) noexcept {
    const unsigned low = s < 8 ? scales[s] & 0x0Fu : scales[s - 8] >> 4;
    return low | ((scales[8 + s % 4] >> (2 * (s / 4))) & 3u) << 4;
}

/// ggml's block_q4_K, a super-block of 256 weights in 144 bytes: the half scales d and dmin, the
/// eight sub-blocks' 6-bit scales sc and mins m packed in 12 bytes (k_scale_min), and 128 bytes
/// of 4-bit codes q (0-15): element j is in byte 32 (j / 64) + j % 32, in its low nibble when
/// j % 64 < 32, else its high one. value = (d * sc) * q - dmin * m, for sub-block s = j / 32.
struct BlockQ4_K {
    std::uint16_t d = 0, dmin = 0;
    std::array<std::uint8_t, 12> scales{};
    std::array<std::uint8_t, 128> qs{};
};
static_assert(sizeof(BlockQ4_K) == 144, "the super-block is ggml's, byte for byte");

/// Sub-blocks of 32 in a q4_k super-block.
inline constexpr index_t q4_k_sub_blocks = 8;

/// One sub-block of 32 of a Q4_K super-block as the library holds it: the super-block's d and
/// dmin, the sub-block's sc and m unpacked, and its 32 codes as q4_0 lays out its nibbles (byte j
/// holds element j in its low nibble and j + 16 in its high one).
struct SubBlockQ4_K {
    std::uint16_t d = 0, dmin = 0;
    std::uint8_t sc = 0, m = 0;
    std::array<std::uint8_t, 16> qs{};
};

/// A q4_k sub-block's scale d * sc and min dmin * m: exact in f32 (11 by 6 significant bits).
[[nodiscard]] inline float block_scale(const SubBlockQ4_K& b) noexcept { return f16_bits_to_f32(b.d) * float(b.sc); }
[[nodiscard]] inline float block_min(const SubBlockQ4_K& b) noexcept { return f16_bits_to_f32(b.dmin) * float(b.m); }

/// The 32 values a q4_k sub-block stands for, as ggml's dequantize_row_q4_K computes them.
inline void dequantize(const SubBlockQ4_K& b, std::span<float, 32> out) noexcept {
    const float d = block_scale(b), m = block_min(b);
    for (std::size_t j = 0; j < 16; ++j) {
        out[j] = d * float(b.qs[j] & 0x0F) - m;
        out[j + 16] = d * float(b.qs[j] >> 4) - m;
    }
}

/// Sub-block s (0-7) of a super-block.
[[nodiscard]] inline SubBlockQ4_K sub_block(const BlockQ4_K& b, index_t s) noexcept {
    SubBlockQ4_K out;
    out.d = b.d, out.dmin = b.dmin;
    const auto [sc, m] = k_scale_min(b.scales.data(), s);
    out.sc = static_cast<std::uint8_t>(sc), out.m = static_cast<std::uint8_t>(m);
    const auto code = [&](index_t l) { // element l (0-31) of the sub-block
        const unsigned byte = b.qs[std::size_t(32 * (s / 2) + l)];
        return s % 2 == 0 ? byte & 0x0Fu : byte >> 4;
    };
    for (index_t j = 0; j < 16; ++j) out.qs[std::size_t(j)] = static_cast<std::uint8_t>(code(j) | code(j + 16) << 4);
    return out;
}

/// The 256 values a super-block stands for.
inline void dequantize(const BlockQ4_K& b, std::span<float, 256> out) noexcept {
    for (index_t s = 0; s < q4_k_sub_blocks; ++s) dequantize(sub_block(b, s), std::span<float, 32>(out.data() + 32 * s, 32));
}

namespace detail {

// The q4_k quantiser's products and sums are rounded one at a time, as ggml's C source writes
// them: contracting them into FMAs (what GCC does by default for C++ where the target has FMA,
// and clang within an expression) moves a few percent of super-blocks by a code or a scale step,
// so that the bits would depend on the compiler's flags (the tests compare a -march=native build
// with a plain one).
#if defined(__clang__)
#define HYPERMOE_NO_FP_CONTRACT_ATTR
#define HYPERMOE_NO_FP_CONTRACT _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define HYPERMOE_NO_FP_CONTRACT_ATTR [[gnu::optimize("fp-contract=off")]]
#define HYPERMOE_NO_FP_CONTRACT
#else
#define HYPERMOE_NO_FP_CONTRACT_ATTR
#define HYPERMOE_NO_FP_CONTRACT
#endif

/// ggml's nearest_int: round to nearest, ties to even, by adding 1.5 x 2^23 (for |x| < 2^22).
HYPERMOE_NO_FP_CONTRACT_ATTR [[nodiscard]] inline int nearest_int(float x) noexcept {
    HYPERMOE_NO_FP_CONTRACT // inlined into a product's caller, the add could take the product unrounded
    const float shifted = x + 12582912.0f;
    return int(std::bit_cast<std::uint32_t>(shifted) & 0x007FFFFFu) - 0x00400000;
}

/// ggml's make_qkx2_quants for Q4_K (32 values, codes 0-15, the search from (15 - 1) / range to
/// (15 + 1) / range in 20 steps, squared error weighted by `w`): the scale and the min
/// (returned negated, so >= 0) whose codes L fit x = scale * L - min best.
HYPERMOE_NO_FP_CONTRACT_ATTR [[nodiscard]] inline float fit_scale_min(std::span<const float, 32> x, std::span<const float, 32> w,
                                                                      std::span<std::uint8_t, 32> L, float& the_min) noexcept {
    HYPERMOE_NO_FP_CONTRACT
    constexpr int n = 32, nmax = 15, nstep = 20;
    constexpr float rmin = -1.0f, rdelta = 0.1f;
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        std::fill(L.begin(), L.end(), std::uint8_t(0));
        the_min = -min;
        return 0.0f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        L[i] = static_cast<std::uint8_t>(std::clamp(nearest_int(iscale * (x[i] - min)), 0, nmax));
        const float diff = scale * L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    std::array<std::uint8_t, 32> trial;
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * float(is) + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = std::clamp(nearest_int(iscale * (x[i] - min)), 0, nmax);
            trial[std::size_t(i)] = static_cast<std::uint8_t>(l);
            sum_l += w[i] * float(l);
            sum_l2 += w[i] * float(l) * float(l);
            sum_xl += w[i] * float(l) * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * float(trial[std::size_t(i)]) + this_min - x[i];
                error += w[i] * (diff * diff);
            }
            if (error < best_error) {
                std::copy(trial.begin(), trial.end(), L.begin());
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    the_min = -min;
    return scale;
}

} // namespace detail

/// A q4_k super-block of 256 finite floats, as ggml's quantize_row_q4_K_ref makes it (no
/// importance matrix): per sub-block of 32, a scale and a min fitted to the values weighted by
/// rms + |x| (detail::fit_scale_min); the 8 scales and 8 mins as 6-bit multiples of d =
/// max scale / 63 and dmin = max min / 63 (halves); then each value's code 0-15 from them.
HYPERMOE_NO_FP_CONTRACT_ATTR [[nodiscard]] inline BlockQ4_K quantize_q4_k(std::span<const float, 256> x) noexcept {
    HYPERMOE_NO_FP_CONTRACT
    std::array<std::uint8_t, 256> L{};
    std::array<float, q4_k_sub_blocks> scales{}, mins{};
    float max_scale = 0, max_min = 0;
    for (index_t j = 0; j < q4_k_sub_blocks; ++j) {
        const std::span<const float, 32> xj(x.data() + 32 * j, 32);
        float sum_x2 = 0;
        for (const float v : xj) sum_x2 += v * v;
        const float av_x = std::sqrt(sum_x2 / 32);
        std::array<float, 32> weights;
        for (std::size_t l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xj[l]);
        scales[std::size_t(j)] = detail::fit_scale_min(xj, weights, std::span<std::uint8_t, 32>(L.data() + 32 * j, 32), mins[std::size_t(j)]);
        if (scales[std::size_t(j)] > max_scale) max_scale = scales[std::size_t(j)];
        if (mins[std::size_t(j)] > max_min) max_min = mins[std::size_t(j)];
    }
    BlockQ4_K b;
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    for (index_t j = 0; j < q4_k_sub_blocks; ++j) {
        const auto ls = static_cast<std::uint8_t>(std::min(63, detail::nearest_int(inv_scale * scales[std::size_t(j)])));
        const auto lm = static_cast<std::uint8_t>(std::min(63, detail::nearest_int(inv_min * mins[std::size_t(j)])));
        if (j < 4) {
            b.scales[std::size_t(j)] = ls;
            b.scales[std::size_t(j + 4)] = lm;
        } else {
            b.scales[std::size_t(j + 4)] = static_cast<std::uint8_t>((ls & 0x0F) | (lm & 0x0F) << 4);
            b.scales[std::size_t(j - 4)] |= static_cast<std::uint8_t>((ls >> 4) << 6);
            b.scales[std::size_t(j)] |= static_cast<std::uint8_t>((lm >> 4) << 6);
        }
    }
    b.d = f32_to_f16_bits(max_scale / 63.0f);
    b.dmin = f32_to_f16_bits(max_min / 63.0f);
    for (index_t j = 0; j < q4_k_sub_blocks; ++j) {
        const auto [sc, m] = k_scale_min(b.scales.data(), j);
        const float d = f16_bits_to_f32(b.d) * float(sc);
        if (d == 0.0f) continue; // the fit's codes stay
        const float dm = f16_bits_to_f32(b.dmin) * float(m);
        for (index_t i = 0; i < 32; ++i)
            L[std::size_t(32 * j + i)] = static_cast<std::uint8_t>(std::clamp(detail::nearest_int((x[std::size_t(32 * j + i)] + dm) / d), 0, 15));
    }
    for (std::size_t j = 0; j < 256; j += 64)
        for (std::size_t l = 0; l < 32; ++l) b.qs[j / 2 + l] = static_cast<std::uint8_t>(L[j + l] | L[j + l + 32] << 4);
    return b;
}

/// One block of a ggml_quant type stored as ggml's bytes (any alignment), its half scales read
/// once: block[j] is element j (0 to block_elements(type) - 1).
class GgmlQuantBlock {
public:
    GgmlQuantBlock(const void* block, ggml_quant type) noexcept
        : p_(static_cast<const unsigned char*>(block)), type_(type),
          d_(type == ggml_quant::mxfp4 ? mxfp4_scale(p_[0]) : half(d_offset(type))),
          dmin_(has_min(type) ? half(d_offset(type) + 2) : 0.0f) {}

    [[nodiscard]] float operator[](index_t j) const noexcept {
        const index_t l = j % 32;
        switch (type_) {
        case ggml_quant::q4_1: case ggml_quant::q5_0: case ggml_quant::q5_1: case ggml_quant::iq4_nl: case ggml_quant::mxfp4: {
            const bool five = type_ == ggml_quant::q5_0 || type_ == ggml_quant::q5_1;
            const index_t qs = type_ == ggml_quant::q4_1 ? 4 : type_ == ggml_quant::q5_0 ? 6 : type_ == ggml_quant::q5_1 ? 8
                               : type_ == ggml_quant::mxfp4 ? 1 : 2;
            const unsigned byte = p_[qs + l % 16];
            unsigned q = l < 16 ? byte & 0x0Fu : byte >> 4;
            if (type_ == ggml_quant::iq4_nl) return d_ * float(iq4nl_values[q]);
            if (type_ == ggml_quant::mxfp4) return d_ * float(mxfp4_values[q]);
            if (five) q |= ((p_[qs - 4 + l / 8] >> (l % 8)) & 1u) << 4;
            if (type_ == ggml_quant::q5_0) return d_ * float(int(q) - 16);
            return d_ * float(q) + dmin_;
        }
        case ggml_quant::q2_k: case ggml_quant::q3_k: {
            const index_t n = j / 128, g = j % 128 / 32, s = 8 * n + 2 * g + l / 16;
            const unsigned q = (p_[(type_ == ggml_quant::q2_k ? 16 : 32) + 32 * n + l] >> (2 * g)) & 3u;
            if (type_ == ggml_quant::q2_k) return d_ * float(p_[s] & 0x0Fu) * float(q) - dmin_ * float(p_[s] >> 4);
            const bool high = ((p_[l] >> (4 * n + g)) & 1u) != 0;
            return d_ * float(int(k3_scale(p_ + 96, s)) - 32) * float(int(q) - (high ? 0 : 4));
        }
        case ggml_quant::iq4_xs: {
            const index_t s = j / 32;
            const unsigned high = (unsigned(p_[2]) | unsigned(p_[3]) << 8) >> (2 * s) & 3u;
            const unsigned ls = ((p_[4 + s / 2] >> (4 * (s % 2))) & 0x0Fu) | high << 4;
            const unsigned byte = p_[8 + 16 * s + l % 16];
            return d_ * float(int(ls) - 32) * float(iq4nl_values[l < 16 ? byte & 0x0Fu : byte >> 4]);
        }
        case ggml_quant::q6_k: {
            const index_t n = j / 128, u = j % 128 / 32;
            const unsigned low = p_[64 * n + 32 * (u % 2) + l], high = p_[128 + 32 * n + l];
            const int q = int(((u >= 2 ? low >> 4 : low & 0x0Fu) | (((high >> (2 * u)) & 3u) << 4))) - 32;
            const auto sc = static_cast<std::int8_t>(p_[192 + 8 * n + 2 * u + l / 16]);
            return d_ * float(sc) * float(q);
        }
        case ggml_quant::q4_k: case ggml_quant::q5_k: break;
        }
        const index_t s = j / 32;
        const auto [sc, m] = k_scale_min(p_ + 4, s);
        const index_t nibbles = type_ == ggml_quant::q5_k ? 48 : 16;
        const unsigned byte = p_[nibbles + 32 * (j / 64) + l];
        unsigned q = j % 64 < 32 ? byte & 0x0Fu : byte >> 4;
        if (type_ == ggml_quant::q5_k) q += ((p_[16 + l] >> s) & 1u) * 16;
        return d_ * float(sc) * float(q) - dmin_ * float(m);
    }

private:
    /// Where a block's half d is (its min follows it in the types that have one); MXFP4 has none.
    static constexpr std::size_t d_offset(ggml_quant t) noexcept {
        return t == ggml_quant::q2_k ? 80 : t == ggml_quant::q3_k ? 108 : t == ggml_quant::q6_k ? 208 : 0;
    }
    static constexpr bool has_min(ggml_quant t) noexcept {
        return t == ggml_quant::q4_1 || t == ggml_quant::q5_1 || t == ggml_quant::q2_k || t == ggml_quant::q4_k || t == ggml_quant::q5_k;
    }

    [[nodiscard]] float half(std::size_t at) const noexcept {
        return f16_bits_to_f32(static_cast<std::uint16_t>(p_[at] | (p_[at + 1] << 8)));
    }

    const unsigned char* p_;
    ggml_quant type_;
    float d_, dmin_; ///< dmin_: the min m of Q4_1 / Q5_1, dmin of Q2_K / Q4_K / Q5_K; else 0
};

/// Element j of a block of `format` (0-31; q4_k: 0-255) stored as ggml's bytes at `block` (any
/// alignment).
[[nodiscard]] inline float stored_block_element(const void* block, dtype format, index_t j) noexcept {
    const auto* p = static_cast<const unsigned char*>(block);
    if (format == dtype::q4_k) return GgmlQuantBlock(block, ggml_quant::q4_k)[j];
    if (format == dtype::mxfp4) {
        const unsigned byte = p[1 + (j & 15)];
        return float(mxfp4_values[j < 16 ? byte & 0x0Fu : byte >> 4]) * mxfp4_scale(p[0]);
    }
    const float d = f16_bits_to_f32(static_cast<std::uint16_t>(p[0] | (p[1] << 8)));
    if (format == dtype::q8_0) return float(static_cast<std::int8_t>(p[2 + j])) * d;
    const unsigned byte = p[2 + (j & 15)];
    return float(int(j < 16 ? byte & 0x0Fu : byte >> 4) - 8) * d;
}

/// The first of a row's n weights (n a multiple of 32, in blocks of `format` in ggml's layout at
/// `row`; q4_k's last super-block may be partial) that is not finite, or -1. Only a block whose
/// scale can make one so is read element by element: an f16 scale (q4_k: d or dmin) that is inf
/// or NaN (a finite one times at most 127, or q4_k's 63 x 15, is finite), or an mxfp4 scale byte
/// from 253 (8 x 2^125 is 2^128, past FLT_MAX).
[[nodiscard]] inline index_t first_non_finite_in_blocks(const void* row, dtype format, index_t n) noexcept {
    const auto width = index_t(block_width(format));
    const std::size_t size = weight_bytes(format, 1, std::size_t(width));
    const auto special = [](unsigned char high) { return (high & 0x7C) == 0x7C; }; // a half's high byte: exponent all ones
    for (index_t b = 0; b * width < n; ++b) {
        const auto* p = static_cast<const unsigned char*>(row) + std::size_t(b) * size;
        if (format == dtype::mxfp4 ? p[0] < 253 : !special(p[1]) && !(format == dtype::q4_k && special(p[3]))) continue;
        for (index_t j = 0; j < std::min(width, n - b * width); ++j)
            if (!std::isfinite(stored_block_element(p, format, j))) return b * width + j;
    }
    return -1;
}

namespace detail {

/// The largest magnitude a block may hold so that its scale is finite (half for q8_0 and q4_0;
/// mxfp4's E8M0 scale takes every finite value). q4_k's dmin is about the largest |min| / 63,
/// and its fitted mins can pass the block's smallest value: half of 63 x the largest half
/// leaves room for that.
template <class Block>
inline constexpr float max_quantizable = std::is_same_v<Block, BlockQ8_0>   ? 65504.0f * 127.0f
                                         : std::is_same_v<Block, BlockQ4_0> ? 65504.0f * 8.0f
                                         : std::is_same_v<Block, BlockQ4_K> ? 65504.0f * 32.0f
                                                                            : std::numeric_limits<float>::max();

/// Weights per block of a format's ggml block type: 256 for BlockQ4_K, 32 for the others.
template <class Block>
inline constexpr index_t block_width_of = std::is_same_v<Block, BlockQ4_K> ? 256 : quant_block;

} // namespace detail

/// A row of n finite floats as ceil(n / w) blocks of w = 32 weights (q4_k: 256), the last
/// zero-padded. `what` names the tensor in the weight_error raised for a non-finite value or
/// one too large for a half scale.
template <class Block>
void quantize_row(std::span<const float> x, std::span<Block> out, std::string_view what) {
    constexpr index_t width = detail::block_width_of<Block>;
    const auto n = index_t(x.size());
    const index_t blocks = (n + width - 1) / width;
    if (index_t(out.size()) != blocks)
        throw shape_error(detail::concat(what, ": ", out.size(), " blocks for a row of ", n, " values, expected ", blocks));
    for (index_t i = 0; i < n; ++i) {
        const float v = x[std::size_t(i)];
        if (!std::isfinite(v) || std::fabs(v) > detail::max_quantizable<Block>)
            throw weight_error(detail::concat(what, ": element ", i, " is ", v, ", expected a finite value of magnitude at most ",
                                              detail::max_quantizable<Block>, " to quantise"));
    }
    for (index_t b = 0; b < blocks; ++b) {
        std::array<float, std::size_t(width)> block{};
        const index_t first = b * width, count = std::min(width, n - first);
        std::copy_n(x.begin() + first, count, block.begin());
        if constexpr (std::is_same_v<Block, BlockQ8_0>) out[std::size_t(b)] = quantize_q8_0(block);
        else if constexpr (std::is_same_v<Block, BlockQ4_0>) out[std::size_t(b)] = quantize_q4_0(block);
        else if constexpr (std::is_same_v<Block, BlockQ4_K>) out[std::size_t(b)] = quantize_q4_k(block);
        else out[std::size_t(b)] = quantize_mxfp4(block);
    }
}

} // namespace hypermoe
