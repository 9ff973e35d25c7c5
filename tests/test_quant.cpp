// The q8_0 / q4_0 / mxfp4 / q4_k block formats and IEEE half conversion (core/quant.hpp): bits
// worked out by hand (zero blocks, ties in magnitude, values at the rounding edges, padding),
// every half value round-tripped, and the software half conversion against the CPU's F16C where
// it has it.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <hypermoe/core/quant.hpp>

#include "../bench/load/ggml_reference_quants.hpp"

using namespace hypermoe;

namespace {

std::array<float, 32> block_of(std::initializer_list<std::pair<int, float>> values) {
    std::array<float, 32> x{};
    for (const auto& [i, v] : values) x[std::size_t(i)] = v;
    return x;
}

std::array<float, 32> values_of(const auto& block) {
    std::array<float, 32> out{};
    dequantize(block, out);
    return out;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("f16c"))) std::uint16_t f16c_convert(float f) {
    return static_cast<std::uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0));
}

/// F16C, with AVX enabled by the OS (CPUID leaf 1: ECX bits 29, 28 and 27).
bool cpu_has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) == 0) return false;
    return (c >> 29 & 1u) != 0 && (c >> 28 & 1u) != 0 && (c >> 27 & 1u) != 0;
}
#endif

} // namespace

TEST_CASE("f32 -> f16 rounds to nearest even, by hand") {
    CHECK(f32_to_f16_bits(1.0f) == 0x3C00);
    CHECK(f32_to_f16_bits(-2.0f) == 0xC000);
    CHECK(f32_to_f16_bits(-0.0f) == 0x8000);
    CHECK(f32_to_f16_bits(0.1f) == 0x2E66);
    CHECK(f32_to_f16_bits(1.0f / 3.0f) == 0x3555);
    CHECK(f32_to_f16_bits(65504.0f) == 0x7BFF);                            // largest half
    CHECK(f32_to_f16_bits(std::nextafter(65520.0f, 0.0f)) == 0x7BFF);
    CHECK(f32_to_f16_bits(65520.0f) == 0x7C00);                            // halfway to 65536: to even = inf
    CHECK(f32_to_f16_bits(1e10f) == 0x7C00);
    CHECK(f32_to_f16_bits(-std::numeric_limits<float>::infinity()) == 0xFC00);
    CHECK((f32_to_f16_bits(std::numeric_limits<float>::quiet_NaN()) & 0x7E00) == 0x7E00);
    CHECK(f32_to_f16_bits(1.0f + 0x1.0p-11f) == 0x3C00);                   // tie: to even (down)
    CHECK(f32_to_f16_bits(1.0f + 3 * 0x1.0p-11f) == 0x3C02);               // tie: to even (up)
    CHECK(f32_to_f16_bits(0x1.0p-14f) == 0x0400);                          // smallest normal
    CHECK(f32_to_f16_bits(0x1.0p-24f) == 0x0001);                          // smallest subnormal
    CHECK(f32_to_f16_bits(0x1.0p-25f) == 0x0000);                          // tie: to even (zero)
    CHECK(f32_to_f16_bits(3 * 0x1.0p-25f) == 0x0002);                      // tie: to even (up)
    CHECK(f32_to_f16_bits(std::nextafter(0x1.0p-14f, 0.0f)) == 0x0400);   // rounds up into the normals
    CHECK(f16_bits_to_f32(0x2008) == 0.00787353515625f);
    CHECK(f16_bits_to_f32(0x0001) == 0x1.0p-24f);
    CHECK(f16_bits_to_f32(0xFC00) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("every finite half survives f16 -> f32 -> f16") {
    for (std::uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) continue; // NaN
        const float f = f16_bits_to_f32(std::uint16_t(h));
        if (f32_to_f16_bits(f) != h) FAIL_CHECK("half ", h, " -> ", f, " -> ", f32_to_f16_bits(f));
    }
}

TEST_CASE("f32 -> f16 equals the CPU's F16C conversion") {
#if defined(__x86_64__) || defined(__i386__)
    if (!cpu_has_f16c()) {
        MESSAGE("this CPU has no F16C: compared by hand only");
        return;
    }
    std::mt19937 rng(7);
    std::uniform_int_distribution<std::uint32_t> bits;
    int differ = 0;
    for (int i = 0; i < 2000000; ++i) {
        // Every exponent, with the subnormal and overflow edges drawn often.
        std::uint32_t u = bits(rng);
        if (i % 4 == 1) u = (u & 0x807FFFFFu) | ((100u + (u >> 24) % 45u) << 23);
        const float f = std::bit_cast<float>(u);
        if (std::isnan(f)) continue;
        differ += f32_to_f16_bits(f) != f16c_convert(f);
    }
    CHECK(differ == 0);
#else
    MESSAGE("not an x86 CPU: compared by hand only");
#endif
}

TEST_CASE("q8_0 bits, by hand") {
    // amax 127: d = 1 exactly, 1/d = 1; roundf rounds halves away from zero.
    const BlockQ8_0 a = quantize_q8_0(block_of({{0, 127.0f}, {1, 2.5f}, {2, -2.5f}, {3, 0.5f},
                                                {4, std::nextafter(-0.5f, 0.0f)}, {5, -127.0f}, {31, 1.0f}}));
    CHECK(a.d == 0x3C00);
    const std::array<std::int8_t, 32> qa{127, 3, -3, 1, 0, -127, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0,   0, 0,  0, 0, 0,    0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    CHECK(a.qs == qa);
    CHECK(values_of(a)[1] == 3.0f);

    // A zero block: d = 0 and every q = 0.
    const BlockQ8_0 z = quantize_q8_0(block_of({}));
    CHECK(z.d == 0);
    CHECK(z.qs == std::array<std::int8_t, 32>{});
    CHECK(values_of(z) == std::array<float, 32>{});

    // amax 1: d = 1/127 = 0.0078740157 is stored as the half 0x2008 = 0.00787353515625; values
    // dequantise with the stored d, so 1 comes back as 127 * 0.00787353515625.
    const BlockQ8_0 c = quantize_q8_0(block_of({{0, 1.0f}, {1, -1.0f}, {2, 0.25f}}));
    CHECK(c.d == 0x2008);
    CHECK(c.qs[0] == 127);
    CHECK(c.qs[1] == -127);
    CHECK(c.qs[2] == 32); // 0.25 * 127 = 31.75
    CHECK(values_of(c)[0] == 0.99993896484375f);
    CHECK(values_of(c)[2] == 32 * 0.00787353515625f);
}

TEST_CASE("q4_0 bits, by hand") {
    // Ties in magnitude: the first wins, so max = 8, d = 8 / -8 = -1, 1/d = -1, and
    // q = min(15, (int8_t)(-x + 8.5)): 8 -> 0, -8 -> 16 -> 15 (clipped), 0.5 -> 8, -0.5 -> 9,
    // 0 -> 8, 4 -> 4, -3 -> 11. Element j and j + 16 share byte j, j in the low nibble.
    const BlockQ4_0 d = quantize_q4_0(block_of({{0, 8.0f}, {1, -8.0f}, {2, 0.5f}, {3, -0.5f}, {16, 4.0f}, {17, -3.0f}}));
    CHECK(d.d == 0xBC00);
    std::array<std::uint8_t, 16> qd;
    qd.fill(0x88);
    qd[0] = 0x40, qd[1] = 0xBF, qd[2] = 0x88, qd[3] = 0x89;
    CHECK(d.qs == qd);
    const auto vd = values_of(d);
    CHECK(vd[0] == 8.0f);
    CHECK(vd[1] == -7.0f); // -8 is not representable on this side of a negative scale
    CHECK(vd[2] == 0.0f);
    CHECK(vd[3] == -1.0f);
    CHECK(vd[16] == 4.0f);
    CHECK(vd[17] == -3.0f);

    // The same tie, the negative one first: max = -8, d = 1.
    const BlockQ4_0 e = quantize_q4_0(block_of({{0, -8.0f}, {1, 8.0f}}));
    CHECK(e.d == 0x3C00);
    CHECK(e.qs[0] == 0x80);
    CHECK(e.qs[1] == 0x8F);
    CHECK(values_of(e)[1] == 7.0f);

    // A zero block: d = 0 / -8 = -0 (half bits 0x8000, as ggml stores it), every nibble
    // (int8_t)(0 + 8.5) = 8.
    const BlockQ4_0 z = quantize_q4_0(block_of({}));
    CHECK(z.d == 0x8000);
    std::array<std::uint8_t, 16> q8;
    q8.fill(0x88);
    CHECK(z.qs == q8);
    CHECK(values_of(z) == std::array<float, 32>{});

    // Rounding edges with d = 1 (max = -8): x + 8.5 truncated, so 0.4999 -> 8, 0.5 -> 9,
    // -0.5 -> 8 (exactly 8.0), -0.5001 -> 7.
    const BlockQ4_0 g = quantize_q4_0(block_of({{0, -8.0f}, {1, 0.4999f}, {2, 0.5f}, {3, -0.5f}, {4, -0.5001f}}));
    CHECK(g.d == 0x3C00);
    CHECK((g.qs[1] & 0x0F) == 8);
    CHECK((g.qs[2] & 0x0F) == 9);
    CHECK((g.qs[3] & 0x0F) == 8);
    CHECK((g.qs[4] & 0x0F) == 7);
}

TEST_CASE("mxfp4 bits, by hand") {
    // amax 6: e = floor(log2 6) - 2 + 127 = 127, scale 2^(127 - 128) = 0.5, so the values are
    // 0, 0.5, 1, 1.5, 2, 3, 4, 6 (indices 0-7) and their negatives (8-15, 8 being -0). The
    // nearest value, the first index on ties: 6 -> 7, -6 -> 15, 0.75 (0.5 or 1) -> 1, 1.25 (1 or
    // 1.5) -> 2, -2.5 (-2 or -3) -> 12, 5 (4 or 6) -> 6, 3 -> 5, -0.25 (0, -0 or -0.5) -> 0.
    // Element j and j + 16 share byte j, j in the low nibble.
    const BlockMXFP4 a = quantize_mxfp4(block_of({{0, 6.0f}, {1, -6.0f}, {2, 0.75f}, {3, 1.25f}, {4, -2.5f}, {5, 5.0f},
                                                  {16, 3.0f}, {17, -0.25f}, {18, 0.2f}}));
    CHECK(a.e == 127);
    const std::array<std::uint8_t, 16> qa{0x57, 0x0F, 0x01, 0x02, 0x0C, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK(a.qs == qa);
    const auto va = values_of(a);
    CHECK(va[0] == 6.0f);
    CHECK(va[1] == -6.0f);
    CHECK(va[2] == 0.5f);
    CHECK(va[3] == 1.0f);
    CHECK(va[4] == -2.0f);
    CHECK(va[5] == 4.0f);
    CHECK(va[16] == 3.0f);
    CHECK(va[17] == 0.0f);

    // A zero block: e = 0 and every nibble 0.
    const BlockMXFP4 z = quantize_mxfp4(block_of({}));
    CHECK(z.e == 0);
    CHECK(z.qs == std::array<std::uint8_t, 16>{});
    CHECK(values_of(z) == std::array<float, 32>{});

    // amax 0.99: floor(log2) = -1, e = 124, scale 1/16, so the largest value is 12 / 16 = 0.75:
    // ggml's scale clips a block's largest magnitudes above 1.5 x their power of two. 0.3 -> 0.25
    // (index 4).
    const BlockMXFP4 c = quantize_mxfp4(block_of({{0, 0.99f}, {1, 0.3f}}));
    CHECK(c.e == 124);
    CHECK(c.qs[0] == 0x07);
    CHECK(c.qs[1] == 0x04);
    CHECK(values_of(c)[0] == 0.75f);
    CHECK(values_of(c)[1] == 0.25f);

    // amax 2^-126: floor(log2) - 2 + 127 = -1, below the byte's range: e = 0 (scale 2^-128), and
    // 2^-126 is 4 of those (index 6: 8 x 2^-128 = 2^-125 is farther).
    const BlockMXFP4 t = quantize_mxfp4(block_of({{0, std::ldexp(1.0f, -126)}}));
    CHECK(t.e == 0);
    CHECK(t.qs[0] == 0x04);
    CHECK(values_of(t)[0] == std::ldexp(1.0f, -126));
}

TEST_CASE("mxfp4's scale is 2^(e - 128) for every byte, and a row's first non-finite block element is found by its scale") {
    for (unsigned e = 0; e < 256; ++e) {
        CAPTURE(e);
        CHECK(mxfp4_scale(e) == std::ldexp(1.0f, int(e) - 128));
    }
    // A row of three blocks of each format, finite, then with one value made infinite.
    std::array<BlockMXFP4, 3> mx{};
    for (auto& b : mx) b.e = 252, b.qs.fill(0x77); // 12 x 2^124: finite, the largest an e of 252 holds
    CHECK(first_non_finite_in_blocks(mx.data(), dtype::mxfp4, 96) == -1);
    mx[1].e = 253; // 6 x 2^125 is finite, 8 x 2^125 = 2^128 is not
    mx[1].qs.fill(0x55);
    CHECK(first_non_finite_in_blocks(mx.data(), dtype::mxfp4, 96) == -1);
    mx[1].qs[3] = 0x65; // element 3 + 32: nibble 5 (6), element 19 + 32: nibble 6 (8)
    CHECK(first_non_finite_in_blocks(mx.data(), dtype::mxfp4, 96) == 32 + 19);
    std::array<BlockQ8_0, 3> q8{};
    for (auto& b : q8) b.d = f32_to_f16_bits(65504.0f), b.qs.fill(-127); // -127 x 65504: finite in f32
    CHECK(first_non_finite_in_blocks(q8.data(), dtype::q8_0, 96) == -1);
    q8[2].d = 0x7C00; // inf
    q8[2].qs[0] = 0;  // inf x 0 is nan: not finite either
    CHECK(first_non_finite_in_blocks(q8.data(), dtype::q8_0, 96) == 64);
    std::array<BlockQ4_0, 2> q4{};
    q4[1].d = 0xFE00; // nan
    CHECK(first_non_finite_in_blocks(q4.data(), dtype::q4_0, 64) == 32);
}

TEST_CASE("a row is quantised in blocks of 32, the last zero-padded") {
    std::vector<float> x(40);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i) - 20) * 0.25f;
    std::vector<BlockQ8_0> q(2);
    quantize_row<BlockQ8_0>(x, q, "w");
    std::array<float, 32> first{}, padded{};
    std::copy_n(x.begin(), 32, first.begin());
    std::copy_n(x.begin() + 32, 8, padded.begin());
    CHECK(q[0].d == quantize_q8_0(first).d);
    CHECK(q[0].qs == quantize_q8_0(first).qs);
    CHECK(q[1].d == quantize_q8_0(padded).d);
    CHECK(q[1].qs == quantize_q8_0(padded).qs);
    const auto tail = values_of(q[1]);
    for (std::size_t j = 8; j < 32; ++j) CHECK(tail[j] == 0.0f);

    std::vector<BlockQ4_0> q4(2);
    quantize_row<BlockQ4_0>(x, q4, "w");
    CHECK(q4[1].qs == quantize_q4_0(padded).qs);
    std::vector<BlockMXFP4> mx(2);
    quantize_row<BlockMXFP4>(x, mx, "w");
    CHECK(mx[1].e == quantize_mxfp4(padded).e);
    CHECK(mx[1].qs == quantize_mxfp4(padded).qs);
}

TEST_CASE("quantising keeps each value within half a step (q8_0) or a step (q4_0)") {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    for (int trial = 0; trial < 200; ++trial) {
        std::array<float, 32> x{};
        for (float& v : x) v = normal(rng);
        const BlockQ8_0 a = quantize_q8_0(x);
        const BlockQ4_0 b = quantize_q4_0(x);
        const auto va = values_of(a), vb = values_of(b);
        const float da = std::fabs(f16_bits_to_f32(a.d)), db = std::fabs(f16_bits_to_f32(b.d));
        for (std::size_t j = 0; j < 32; ++j) {
            CHECK(std::fabs(va[j] - x[j]) <= 0.5f * da + 1e-3f * da + 127 * da * 1e-3f);
            CHECK(std::fabs(vb[j] - x[j]) <= db * 1.001f);
        }
    }
}

TEST_CASE("mxfp4 keeps each value within a quarter of its block's power of two, below 1.5 times it") {
    // amax in [2^k, 2^(k + 1)): the scale is 2^(k - 3), the values' steps at most 2^(k - 1) apart
    // up to 1.5 x 2^k (half a step: 2^(k - 2)); above that they clip to 1.5 x 2^k.
    std::mt19937 rng(4);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    for (int trial = 0; trial < 200; ++trial) {
        std::array<float, 32> x{};
        for (float& v : x) v = normal(rng);
        float amax = 0;
        for (const float v : x) amax = std::max(amax, std::fabs(v));
        const float p = std::ldexp(1.0f, std::ilogb(amax));
        const auto v = values_of(quantize_mxfp4(x));
        for (std::size_t j = 0; j < 32; ++j) {
            if (std::fabs(x[j]) <= 1.5f * p) CHECK(std::fabs(v[j] - x[j]) <= 0.25f * p);
            else CHECK(v[j] == std::copysign(1.5f * p, x[j]));
        }
    }
}

namespace {
/// ggml's best_index_mxfp4: the first index of least |kvalues_mxfp4[i] x d - x|, each product
/// rounded on its own as ggml's C source writes it (contracted into an FMA, 8 x 2^125 would stay
/// finite inside it: clang's -march=native build, and GCC for AArch64, where FMA is always there,
/// picked it for FLT_MAX). A function, not a lambda: GCC's no-contraction attribute needs one.
HYPERMOE_NO_FP_CONTRACT_ATTR int mxfp4_search(float x, float d) {
    HYPERMOE_NO_FP_CONTRACT
    int best = 0;
    float best_err = std::fabs(float(mxfp4_values[0]) * d - x);
    for (int i = 1; i < 16; ++i) {
        const float err = std::fabs(float(mxfp4_values[std::size_t(i)]) * d - x);
        if (err < best_err) best = i, best_err = err;
    }
    return best;
}
} // namespace

TEST_CASE("mxfp4 picks each value's nibble as ggml's linear search over the 16 values does") {
    const auto search = mxfp4_search;
    const auto check_block = [&](const std::array<float, 32>& x) {
        const BlockMXFP4 b = quantize_mxfp4(x);
        const float d = mxfp4_scale(b.e);
        for (std::size_t j = 0; j < 32; ++j) {
            const int got = j < 16 ? b.qs[j] & 0x0F : b.qs[j - 16] >> 4;
            CAPTURE(x[j]);
            CAPTURE(b.e);
            CHECK(got == search(x[j], d));
        }
    };
    std::mt19937 rng(12);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::size_t checked = 0;
    for (const int scale : {-140, -128, -126, -40, -8, 0, 7, 60, 120, 124}) {
        for (int trial = 0; trial < 50; ++trial, ++checked) {
            std::array<float, 32> x{};
            for (float& v : x) v = std::ldexp(normal(rng), scale);
            check_block(x);
        }
        // Every midpoint between two values, a float either side of it, and the values
        // themselves, of both signs: x[0] fixes amax at 12 x d (so the scale is d).
        std::array<float, 32> x{};
        std::array<float, 32> y{};
        const float d = std::ldexp(1.0f, scale);
        const float amax = 12.0f * d;
        if (!std::isfinite(amax) || amax == 0.0f) continue;
        std::size_t n = 1;
        x[0] = amax;
        for (const float m : {0.5f, 1.5f, 2.5f, 3.5f, 5.0f, 7.0f, 10.0f, 0.0f, 1.0f, 4.0f, 11.5f})
            for (const float sign : {1.0f, -1.0f})
                for (const float v : {m * d, std::nextafter(m * d, 0.0f), std::nextafter(m * d, 24.0f * d)}) {
                    if (n == 32) check_block(x), n = 1, x = y, x[0] = amax, ++checked;
                    x[n++] = sign * v;
                }
        check_block(x), ++checked;
    }
    CHECK(checked > 500);
    // -0 takes nibble 0 (value 0, first), as the search does; the largest float clips to 12 x d.
    std::array<float, 32> z{};
    z[0] = -0.0f, z[1] = std::numeric_limits<float>::max(), z[2] = -std::numeric_limits<float>::max();
    check_block(z);
}

TEST_CASE("q4_k bits, by hand") {
    // A zero super-block: every byte 0 (d = dmin = 0, every sc, m and code 0).
    const std::array<float, 256> zero{};
    const BlockQ4_K z = quantize_q4_k(zero);
    CHECK(z.d == 0);
    CHECK(z.dmin == 0);
    for (const auto b : z.scales) CHECK(b == 0);
    for (const auto b : z.qs) CHECK(b == 0);
    // Sub-block j holds 0 and c = j + 2, alternating: its fit is exact with codes 0 and 15, scale
    // c / 15 and min 0 (the search's other steps fit as well, never better). So the largest scale
    // is 9 / 15, d = that / 63, sc = 63 c / 9 = 7 c (14 to 63: no ties), dmin = 0 and every m = 0;
    // each c / (d sc) is within 0.1 of 15.
    std::array<float, 256> x{};
    for (std::size_t i = 0; i < 256; ++i) x[i] = i % 2 == 0 ? 0.0f : float(i / 32 + 2);
    const BlockQ4_K b = quantize_q4_k(x);
    CHECK(b.d == f32_to_f16_bits(1.0f / (15.0f / 9.0f) / 63.0f));
    CHECK(b.dmin == 0);
    for (index_t j = 0; j < 8; ++j) {
        CAPTURE(j);
        const auto [sc, m] = k_scale_min(b.scales.data(), j);
        CHECK(sc == 7u * unsigned(j + 2));
        CHECK(m == 0u);
    }
    // Sub-blocks 4-7 keep their scales' top 2 bits in bytes 0-3: 42 = 0b101010, 49, 56, 63.
    CHECK(b.scales[0] == (14 | (42 >> 4) << 6));
    CHECK(b.scales[11] == ((63 & 15) | 0 << 4));
    for (std::size_t i = 0; i < 256; ++i) { // element i in byte 32 (i / 64) + i % 32, high nibble when i % 64 >= 32
        const unsigned byte = b.qs[32 * (i / 64) + i % 32], q = i % 64 < 32 ? byte & 15u : byte >> 4;
        CHECK(q == (i % 2 == 0 ? 0u : 15u));
    }
}

TEST_CASE("q4_k: each code is the nearest to its value under the stored scale and min, the largest of each is 63, and the error is below q4_0's") {
    // Checks of quantize_q4_k that do not restate its search: the last step (each code from the
    // stored d sc and dmin m, rounded to nearest even and clamped to 0-15), the 6-bit scales
    // spanning 0-63, the bytes decoding as GgmlQuantBlock reads a GGUF file's, and q4_k's
    // purpose: on Gaussian rows, centred or not, less RMS error than q4_0 in fewer bits than
    // 5 a weight.
    std::mt19937 rng(7);
    double err_k = 0, err_0 = 0;
    for (int trial = 0; trial < 200; ++trial) {
        CAPTURE(trial);
        const float mean = trial % 3 == 0 ? 0.0f : trial % 3 == 1 ? 0.02f : -0.05f;
        std::normal_distribution<float> normal(mean, 0.05f);
        std::array<float, 256> x{};
        for (float& v : x) v = normal(rng);
        if (trial % 10 == 0) std::fill_n(x.begin() + 64, 32, 0.0f); // a zero sub-block
        const BlockQ4_K b = quantize_q4_k(x);
        std::array<float, 256> v{};
        dequantize(b, v);
        unsigned max_sc = 0, max_m = 0;
        for (index_t j = 0; j < 8; ++j) {
            const auto [sc, m] = k_scale_min(b.scales.data(), j);
            max_sc = std::max(max_sc, sc), max_m = std::max(max_m, m);
            const float d = f16_bits_to_f32(b.d) * float(sc), dm = f16_bits_to_f32(b.dmin) * float(m);
            for (index_t i = 0; i < 32; ++i) {
                const std::size_t e = std::size_t(32 * j + i);
                const unsigned byte = b.qs[32 * (e / 64) + e % 32], q = e % 64 < 32 ? byte & 15u : byte >> 4;
                if (d != 0.0f) CHECK(q == unsigned(std::clamp(std::nearbyint((x[e] + dm) / d), 0.0f, 15.0f)));
                CHECK(v[e] == d * float(q) - dm);
                CHECK(v[e] == GgmlQuantBlock(&b, ggml_quant::q4_k)[index_t(e)]);
            }
        }
        CHECK(max_sc == 63u);
        CHECK(max_m == (f16_bits_to_f32(b.dmin) > 0.0f ? 63u : 0u));
        for (std::size_t i = 0; i < 256; i += 32) {
            std::array<float, 32> part{};
            std::copy_n(x.begin() + std::ptrdiff_t(i), 32, part.begin());
            const auto v0 = values_of(quantize_q4_0(part));
            for (std::size_t j = 0; j < 32; ++j) {
                err_k += double(v[i + j] - x[i + j]) * double(v[i + j] - x[i + j]);
                err_0 += double(v0[j] - x[i + j]) * double(v0[j] - x[i + j]);
            }
        }
    }
    MESSAGE("RMS error, q4_k / q4_0: ", std::sqrt(err_k / err_0));
    CHECK(err_k < 0.8 * err_0);
}

TEST_CASE("q4_k: quantize_q4_k gives the bits of bench/load's transcription of ggml's quantize_row_q4_K_ref, written apart from it") {
    // Two transcriptions of ggml's algorithm (the library's, and the one requant_error uses for
    // Q4_K and Q5_K files), each rounding every product and sum on its own as ggml's C source
    // does: on centred, offset, tiny, heavy-tailed and integer-valued super-blocks, every byte
    // equal. Inputs come from integers, so no library maths a compiler could contract moves them.
    std::mt19937 rng(11);
    int differ = 0;
    for (int trial = 0; trial < 4000; ++trial) {
        std::array<float, 256> x{};
        const int kind = trial % 5;
        for (float& v : x) {
            const int a = int(rng() % 20001) - 10000;
            v = kind == 0   ? float(a) * 1e-5f
                : kind == 1 ? float(a) * 1e-5f + 0.04f
                : kind == 2 ? float(a) * 1e-9f
                : kind == 3 ? float(a) * float(a) * float(a) * 1e-13f
                            : float(a % 16);
        }
        const BlockQ4_K mine = quantize_q4_k(x);
        const auto theirs = ggml_ref::quantize_k<4>(x);
        differ += std::memcmp(&mine, theirs.data(), sizeof mine) != 0;
    }
    CHECK(differ == 0);
}

TEST_CASE("q4_k: a row is quantised in super-blocks of 256, the last zero-padded, and a non-finite d or dmin is found") {
    std::vector<float> x(300);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 41) - 20) * 0.25f;
    std::vector<BlockQ4_K> q(2);
    quantize_row<BlockQ4_K>(x, q, "w");
    std::array<float, 256> first{}, padded{};
    std::copy_n(x.begin(), 256, first.begin());
    std::copy_n(x.begin() + 256, 44, padded.begin());
    const BlockQ4_K a = quantize_q4_k(first), b = quantize_q4_k(padded);
    CHECK(std::memcmp(&q[0], &a, sizeof a) == 0);
    CHECK(std::memcmp(&q[1], &b, sizeof b) == 0);
    std::vector<BlockQ4_K> one(1);
    CHECK_THROWS_WITH_AS(quantize_row<BlockQ4_K>(x, one, "w"), "w: 1 blocks for a row of 300 values, expected 2", shape_error);
    x[7] = 3e6f; // past 32 x 65504: dmin (about the largest |min| / 63) could overflow a half
    CHECK_THROWS_WITH_AS(quantize_row<BlockQ4_K>(x, q, "w"),
                         "w: element 7 is 3e+06, expected a finite value of magnitude at most 2.09613e+06 to quantise", weight_error);
    // ggml's 144 bytes a super-block; a non-finite element found by its d or dmin.
    CHECK(weight_bytes(dtype::q4_k, 3, 512) == 3u * 2u * 144u);
    CHECK(weight_bytes(dtype::q4_k, 1, 300) == 2u * 144u);
    CHECK(first_non_finite_in_blocks(q.data(), dtype::q4_k, 512) == -1);
    q[1].dmin = 0x7C00; // inf: every element with m != 0 is -inf or nan
    const index_t found = first_non_finite_in_blocks(q.data(), dtype::q4_k, 512);
    CHECK(found >= 256);
    CHECK_FALSE(std::isfinite(GgmlQuantBlock(&q[1], ggml_quant::q4_k)[found - 256]));
    for (index_t i = 256; i < found; ++i) CHECK(std::isfinite(GgmlQuantBlock(&q[1], ggml_quant::q4_k)[i - 256]));
    q[1].dmin = b.dmin, q[0].d = 0xFE00; // nan: element 0 is nan
    CHECK(first_non_finite_in_blocks(q.data(), dtype::q4_k, 512) == 0);
}

TEST_CASE("quantize_row refuses what a half scale cannot hold, non-finite values and a wrong block count") {
    std::vector<float> x(32, 1.0f);
    std::vector<BlockQ8_0> q(1);
    x[5] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(quantize_row<BlockQ8_0>(x, q, "experts.0.w1"),
                         "experts.0.w1: element 5 is nan, expected a finite value of magnitude at most 8.31901e+06 to quantise", weight_error);
    x[5] = 1e7f; // 1e7 / 127 > 65504
    CHECK_THROWS_WITH_AS(quantize_row<BlockQ8_0>(x, q, "w"), doctest::Contains("element 5 is 1e+07"), weight_error);
    x[5] = 1e6f; // fits q8_0 (d = 7874), not q4_0 (d = 125000)
    CHECK_NOTHROW(quantize_row<BlockQ8_0>(x, q, "w"));
    std::vector<BlockQ4_0> q4(1);
    CHECK_THROWS_AS(quantize_row<BlockQ4_0>(x, q4, "w"), weight_error);
    std::vector<BlockMXFP4> mx(1); // E8M0 scales hold every finite value; not NaN
    x[5] = std::numeric_limits<float>::max();
    CHECK_NOTHROW(quantize_row<BlockMXFP4>(x, mx, "w"));
    x[5] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(quantize_row<BlockMXFP4>(x, mx, "w"), doctest::Contains("element 5 is inf"), weight_error);
    x[5] = 1e6f;
    std::vector<BlockQ8_0> two(2);
    CHECK_THROWS_WITH_AS(quantize_row<BlockQ8_0>(x, two, "w"),
                         "w: 2 blocks for a row of 32 values, expected 1", shape_error);
}
