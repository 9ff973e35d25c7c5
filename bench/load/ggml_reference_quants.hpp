// Weights quantised as llama.cpp writes its files without an importance matrix: this project's
// implementations of the algorithms of ggml's quantize_row_*_ref (ggml-quants.c), for the ggml
// quant types the library reads (core/quant.hpp's ggml_quant). Each function takes one block's
// weights (32 or 256) and returns the block's bytes in ggml's layout, which the library's
// GgmlQuantBlock decodes. Used by requant_error to measure what holding such a file in another
// storage adds to the file's own error; not by the library, which writes none of these types
// (MXFP4 and Q4_K aside: it quantises into its own mxfp4, which this file calls, and q4_k, which
// tests/test_quant.cpp holds to quantize_k<4> here, written apart from it).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <span>
#include <utility>

#include <hypermoe/core/quant.hpp>

namespace ggml_ref {

namespace hm = hypermoe;

template <std::size_t Bytes>
using Block = std::array<unsigned char, Bytes>;

/// ggml's nearest_int: round to nearest, ties to even.
inline int nearest_int(float v) { return int(std::nearbyint(v)); }

/// A half's two bytes, little-endian, at out[at].
template <std::size_t Bytes>
void put_half(Block<Bytes>& out, std::size_t at, float v) {
    const std::uint16_t h = hm::f32_to_f16_bits(v);
    out[at] = std::uint8_t(h & 0xFF), out[at + 1] = std::uint8_t(h >> 8);
}

/// The half at out[at] (little-endian), as a float.
template <std::size_t Bytes>
float get_half(const Block<Bytes>& out, std::size_t at) {
    return hm::f16_bits_to_f32(std::uint16_t(out[at] | out[at + 1] << 8));
}

/// ggml's make_qkx2_quants for one sub-block of N: levels 0..nmax for w ~ scale * l - min (min >= 0
/// returned in the_min), the scale and min chosen among nstep + 1 trial scales by the weighted
/// squared (or, with use_mad, absolute) error of a least-squares fit.
/// Its products and sums are rounded one at a time, as ggml's C source writes them (no FMA
/// contraction: HYPERMOE_NO_FP_CONTRACT, core/quant.hpp), so that tests/test_quant.cpp can compare
/// the library's quantize_q4_k with quantize_k<4> bit for bit in a -march=native build.
template <std::size_t N>
HYPERMOE_NO_FP_CONTRACT_ATTR float make_qkx2_quants(std::span<const float, N> x, std::span<const float, N> weights,
                                                    std::span<std::uint8_t, N> levels, float& the_min, int nmax, float rmin,
                                                    float rdelta, int nstep, bool use_mad) {
    HYPERMOE_NO_FP_CONTRACT
    float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
    for (std::size_t i = 1; i < N; ++i) {
        min = std::min(min, x[i]);
        max = std::max(max, x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    min = std::min(min, 0.0f);
    if (max == min) {
        std::fill(levels.begin(), levels.end(), std::uint8_t{0});
        the_min = -min;
        return 0.0f;
    }
    const auto level = [&](float iscale, float v) { return std::uint8_t(std::clamp(nearest_int(iscale * (v - min)), 0, nmax)); };
    const auto cost = [use_mad](float diff) { return use_mad ? std::fabs(diff) : diff * diff; };
    float iscale = float(nmax) / (max - min), scale = 1 / iscale, best = 0;
    for (std::size_t i = 0; i < N; ++i) {
        levels[i] = level(iscale, x[i]);
        best += weights[i] * cost(scale * levels[i] + min - x[i]);
    }
    std::array<std::uint8_t, N> trial;
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * float(is) + float(nmax)) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (std::size_t i = 0; i < N; ++i) {
            trial[i] = level(iscale, x[i]);
            const float l = trial[i], w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det <= 0) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det, this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float err = 0;
        for (std::size_t i = 0; i < N; ++i) err += weights[i] * cost(this_scale * trial[i] + this_min - x[i]);
        if (err < best) {
            std::copy(trial.begin(), trial.end(), levels.begin());
            best = err;
            scale = this_scale;
            min = this_min;
        }
    }
    the_min = -min;
    return scale;
}

/// ggml's make_qx_quants with rmse_type 1 for one group of 16: signed levels -nmax..nmax - 1 for
/// w ~ scale * l, the scale the best of 19 trials by the x^2-weighted squared error.
inline float make_qx_quants(std::span<const float, 16> x, int nmax) {
    float max = 0, amax = 0;
    for (float v : x)
        if (std::fabs(v) > amax) amax = std::fabs(v), max = v;
    if (amax < 1e-15f) return 0.0f; // ggml's GROUP_MAX_EPS
    const auto fit = [&](float iscale, float& sumlx, float& suml2) {
        sumlx = suml2 = 0;
        for (float v : x) {
            const float l = float(std::clamp(nearest_int(iscale * v), -nmax, nmax - 1)), w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
    };
    float sumlx, suml2;
    fit(-float(nmax) / max, sumlx, suml2);
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        fit(-(float(nmax) + 0.1f * float(is)) / max, sumlx, suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) scale = sumlx / suml2, best = scale * sumlx;
    }
    return scale;
}

/// ggml's make_q3_quants with do_rmse for one group of 16: signed levels -nmax..nmax - 1 for
/// w ~ scale * l, refined by up to 5 passes that move single levels while the x^2-weighted fit
/// improves. Returns the scale (the levels are recomputed against the stored scale).
inline float make_q3_quants(std::span<const float, 16> x, int nmax) {
    float max = 0, amax = 0;
    for (float v : x)
        if (std::fabs(v) > amax) amax = std::fabs(v), max = v;
    if (amax < 1e-15f) return 0.0f;
    const float iscale = -float(nmax) / max;
    std::array<int, 16> l;
    float sumlx = 0, suml2 = 0;
    for (std::size_t i = 0; i < 16; ++i) {
        l[i] = std::clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * float(l[i]);
        suml2 += w * float(l[i] * l[i]);
    }
    for (int pass = 0; pass < 5; ++pass) {
        int changed = 0;
        for (std::size_t i = 0; i < 16; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * float(l[i]);
            if (slx <= 0) continue;
            float sl2 = suml2 - w * float(l[i] * l[i]);
            const int candidate = std::clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
            if (candidate == l[i]) continue;
            slx += w * x[i] * float(candidate);
            sl2 += w * float(candidate * candidate);
            if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                l[i] = candidate, sumlx = slx, suml2 = sl2;
                ++changed;
            }
        }
        if (changed == 0) break;
    }
    return sumlx / suml2;
}

/// The scale `fit` gives each group of 16 of a super-block (Q3_K, Q6_K), and the one of largest
/// magnitude, its sign kept (the first on ties).
template <class Fit>
std::pair<std::array<float, 16>, float> group_scales(std::span<const float, 256> x, Fit fit) {
    std::array<float, 16> scales;
    float max_scale = 0, amax = 0;
    for (std::size_t g = 0; g < 16; ++g) {
        scales[g] = fit(x.subspan(16 * g).first<16>());
        if (std::fabs(scales[g]) > amax) amax = std::fabs(scales[g]), max_scale = scales[g];
    }
    return {scales, max_scale};
}

/// Eight 6-bit scales and mins packed into a Q4_K / Q5_K super-block's 12 bytes (k_scale_min).
inline void pack_k_scales(unsigned char* sc, const std::array<int, 8>& ls, const std::array<int, 8>& lm) {
    for (std::size_t s = 0; s < 8; ++s) {
        if (s < 4) {
            sc[s] = std::uint8_t(ls[s]);
            sc[s + 4] = std::uint8_t(lm[s]);
        } else {
            sc[s + 4] = std::uint8_t((ls[s] & 0x0F) | (lm[s] & 0x0F) << 4);
            sc[s - 4] |= std::uint8_t((ls[s] >> 4) << 6);
            sc[s] |= std::uint8_t((lm[s] >> 4) << 6);
        }
    }
}

/// The levels (0..nmax) of a Q4_K / Q5_K super-block against its scales and mins as stored
/// (sc at out + 4, d and dmin at out + 0 and out + 2), into `levels`; a sub-block whose d x sc is
/// 0 keeps the fit's levels, as ggml's loop leaves them (they do not change its values).
template <std::size_t Bytes>
HYPERMOE_NO_FP_CONTRACT_ATTR void k_levels(std::span<const float, 256> x, const Block<Bytes>& out, int nmax,
                                           std::array<std::uint8_t, 256>& levels) {
    HYPERMOE_NO_FP_CONTRACT
    const float d = get_half(out, 0), dmin = get_half(out, 2);
    for (std::size_t s = 0; s < 8; ++s) {
        const auto [ls, lm] = hm::k_scale_min(out.data() + 4, hm::index_t(s));
        const float step = d * float(ls);
        if (step == 0) continue;
        const float offset = dmin * float(lm);
        for (std::size_t i = 0; i < 32; ++i) levels[32 * s + i] = std::uint8_t(std::clamp(nearest_int((x[32 * s + i] + offset) / step), 0, nmax));
    }
}

/// Q4_K (144 bytes) or Q5_K (176 bytes): per sub-block of 32 a weighted least-squares scale and
/// min (Q4_K: levels 0..15, 21 trials; Q5_K: 0..31, 16 trials), the eight pairs quantised to 6
/// bits against the super-block's half d and dmin, then the levels against those.
template <int Bits>
HYPERMOE_NO_FP_CONTRACT_ATTR Block<Bits == 4 ? 144 : 176> quantize_k(std::span<const float, 256> x) {
    HYPERMOE_NO_FP_CONTRACT
    constexpr int nmax = (1 << Bits) - 1;
    std::array<std::uint8_t, 256> levels;
    std::array<float, 8> scales, mins;
    float max_scale = 0, max_min = 0;
    for (std::size_t s = 0; s < 8; ++s) {
        const std::span<const float, 32> sub = x.subspan(32 * s).template first<32>();
        float sum_x2 = 0;
        for (float v : sub) sum_x2 += v * v;
        const float av_x = std::sqrt(sum_x2 / 32);
        std::array<float, 32> weights;
        for (std::size_t i = 0; i < 32; ++i) weights[i] = av_x + std::fabs(sub[i]);
        const std::span<std::uint8_t, 32> l(levels.data() + 32 * s, 32);
        scales[s] = Bits == 4 ? make_qkx2_quants<32>(sub, weights, l, mins[s], nmax, -1.0f, 0.1f, 20, false)
                              : make_qkx2_quants<32>(sub, weights, l, mins[s], nmax, -0.5f, 0.1f, 15, false);
        max_scale = std::max(max_scale, scales[s]);
        max_min = std::max(max_min, mins[s]);
    }
    Block<Bits == 4 ? 144 : 176> out{};
    const float inv_scale = max_scale > 0 ? 63 / max_scale : 0, inv_min = max_min > 0 ? 63 / max_min : 0;
    std::array<int, 8> ls, lm;
    for (std::size_t s = 0; s < 8; ++s) {
        ls[s] = std::min(63, nearest_int(inv_scale * scales[s]));
        lm[s] = std::min(63, nearest_int(inv_min * mins[s]));
    }
    pack_k_scales(out.data() + 4, ls, lm);
    put_half(out, 0, max_scale / 63);
    put_half(out, 2, max_min / 63);
    k_levels(x, out, nmax, levels);
    if constexpr (Bits == 4) {
        for (std::size_t j = 0; j < 256; j += 64)
            for (std::size_t l = 0; l < 32; ++l) out[16 + j / 2 + l] = std::uint8_t(levels[j + l] | levels[j + l + 32] << 4);
    } else { // the fifth bit of sub-block s in bit s of qh[l]
        for (std::size_t j = 0; j < 256; j += 64)
            for (std::size_t l = 0; l < 32; ++l) {
                const unsigned a = levels[j + l], b = levels[j + l + 32];
                out[48 + j / 2 + l] = std::uint8_t((a & 0x0F) | (b & 0x0F) << 4);
                out[16 + l] |= std::uint8_t((a >> 4) << (j / 32) | (b >> 4) << (j / 32 + 1));
            }
    }
    return out;
}

/// Q6_K (210 bytes): per group of 16 the best of 19 trial scales, quantised to int8 against the
/// super-block's half d, then the levels -32..31 against those.
inline Block<210> quantize_q6_k(std::span<const float, 256> x) {
    const auto [scales, max_scale] = group_scales(x, [](std::span<const float, 16> g) { return make_qx_quants(g, 32); });
    Block<210> out{};
    if (std::fabs(max_scale) < 1e-15f) return out;
    const float iscale = -128.0f / max_scale;
    put_half(out, 208, 1 / iscale);
    const float d = get_half(out, 208);
    for (std::size_t g = 0; g < 16; ++g) out[192 + g] = std::uint8_t(std::int8_t(std::min(127, nearest_int(iscale * scales[g]))));
    for (std::size_t j = 0; j < 256; ++j) {
        const float step = d * float(std::int8_t(out[192 + j / 16]));
        const unsigned q = step == 0 ? 32u : unsigned(std::clamp(nearest_int(x[j] / step), -32, 31) + 32);
        const std::size_t n = j / 128, u = j % 128 / 32, l = j % 32;
        out[64 * n + 32 * (u % 2) + l] |= std::uint8_t(u >= 2 ? (q & 0x0F) << 4 : q & 0x0F);
        out[128 + 32 * n + l] |= std::uint8_t((q >> 4) << (2 * u));
    }
    return out;
}

/// The 2-bit levels of Q2_K and Q3_K: element j's in bits 2g, 2g + 1 of qs[32 n + l] (n = j / 128,
/// g = j % 128 / 32, l = j % 32).
inline void pack_2bit(unsigned char* qs, const std::array<std::uint8_t, 256>& levels) {
    for (std::size_t j = 0; j < 256; j += 128)
        for (std::size_t l = 0; l < 32; ++l)
            qs[j / 4 + l] = std::uint8_t(levels[j + l] | levels[j + l + 32] << 2 | levels[j + l + 64] << 4 | levels[j + l + 96] << 6);
}

/// Q2_K (84 bytes): per sub-block of 16 a scale and min for levels 0..3 (16 trials, weighted by
/// |w|, absolute error), both quantised to 4 bits against the half d and dmin.
inline Block<84> quantize_q2_k(std::span<const float, 256> x) {
    std::array<std::uint8_t, 256> levels;
    std::array<float, 16> scales, mins;
    float max_scale = 0, max_min = 0;
    for (std::size_t s = 0; s < 16; ++s) {
        const std::span<const float, 16> sub = x.subspan(16 * s).first<16>();
        std::array<float, 16> weights;
        for (std::size_t i = 0; i < 16; ++i) weights[i] = std::fabs(sub[i]);
        scales[s] = make_qkx2_quants<16>(sub, weights, std::span<std::uint8_t, 16>(levels.data() + 16 * s, 16), mins[s], 3, -0.5f, 0.1f,
                                         15, true);
        max_scale = std::max(max_scale, scales[s]);
        max_min = std::max(max_min, mins[s]);
    }
    Block<84> out{};
    if (max_scale > 0) {
        for (std::size_t s = 0; s < 16; ++s) out[s] = std::uint8_t(nearest_int(15 / max_scale * scales[s]));
        put_half(out, 80, max_scale / 15);
    }
    if (max_min > 0) {
        for (std::size_t s = 0; s < 16; ++s) out[s] |= std::uint8_t(nearest_int(15 / max_min * mins[s]) << 4);
        put_half(out, 82, max_min / 15);
    }
    const float d = get_half(out, 80), dmin = get_half(out, 82);
    for (std::size_t s = 0; s < 16; ++s) {
        const float step = d * float(out[s] & 0x0F);
        if (step == 0) continue;
        const float offset = dmin * float(out[s] >> 4);
        for (std::size_t i = 0; i < 16; ++i) levels[16 * s + i] = std::uint8_t(std::clamp(nearest_int((x[16 * s + i] + offset) / step), 0, 3));
    }
    pack_2bit(out.data() + 16, levels);
    return out;
}

/// Q3_K (110 bytes): per sub-block of 16 a scale for levels -4..3 (make_q3_quants), quantised to
/// 6 bits against the half d; the levels' third bits in hmask (element j: bit j / 32 of
/// hmask[j % 32]).
inline Block<110> quantize_q3_k(std::span<const float, 256> x) {
    const auto [scales, max_scale] = group_scales(x, [](std::span<const float, 16> g) { return make_q3_quants(g, 4); });
    Block<110> out{};
    unsigned char* sc = out.data() + 96;
    if (max_scale != 0) {
        const float iscale = -32.0f / max_scale;
        for (std::size_t s = 0; s < 16; ++s) {
            const int l = std::clamp(nearest_int(iscale * scales[s]), -32, 31) + 32;
            if (s < 8) sc[s] = std::uint8_t(l & 0x0F);
            else sc[s - 8] |= std::uint8_t((l & 0x0F) << 4);
            sc[8 + s % 4] |= std::uint8_t((l >> 4) << (2 * (s / 4)));
        }
        put_half(out, 108, 1 / iscale);
    }
    const float d = get_half(out, 108);
    std::array<std::uint8_t, 256> levels;
    levels.fill(4); // a zero sub-block's levels: value 0 either way
    for (std::size_t s = 0; s < 16; ++s) {
        const float step = d * float(int(hm::k3_scale(sc, hm::index_t(s))) - 32);
        if (step == 0) continue;
        for (std::size_t i = 0; i < 16; ++i) levels[16 * s + i] = std::uint8_t(std::clamp(nearest_int(x[16 * s + i] / step), -4, 3) + 4);
    }
    for (std::size_t j = 0; j < 256; ++j)
        if (levels[j] > 3) {
            out[j % 32] |= std::uint8_t(1u << (j / 32));
            levels[j] -= 4;
        }
    pack_2bit(out.data() + 32, levels);
    return out;
}

/// The nearest of IQ4_NL's 16 values to v (ggml's best_index_int8).
inline std::uint8_t best_index_iq4nl(float v) {
    const auto& values = hm::iq4nl_values;
    if (v <= values[0]) return 0;
    if (v >= values[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        (v < values[std::size_t(mid)] ? hi : lo) = mid;
    }
    return std::uint8_t(v - float(values[std::size_t(hi - 1)]) < float(values[std::size_t(hi)]) - v ? hi - 1 : hi);
}

/// ggml's quantize_row_iq4_nl_impl without an importance matrix, for one block of 32: the scale
/// (d ~ w / value) of the best x^2-weighted fit among the first guess and 2 ntry + 1 trials;
/// the nibbles chosen against that scale go to `levels`.
inline float iq4_scale(std::span<const float, 32> x, int ntry, std::span<std::uint8_t, 32> levels) {
    const auto& values = hm::iq4nl_values;
    float amax = 0, max = 0;
    for (float v : x)
        if (std::fabs(v) > amax) amax = std::fabs(v), max = v;
    if (amax < 1e-15f) {
        std::fill(levels.begin(), levels.end(), std::uint8_t{0});
        return 0.0f;
    }
    const auto fit = [&](float id, float& sumqx, float& sumq2, bool keep) {
        sumqx = sumq2 = 0;
        for (std::size_t j = 0; j < 32; ++j) {
            const std::uint8_t l = best_index_iq4nl(id * x[j]);
            if (keep) levels[j] = l;
            const float q = values[l], w = x[j] * x[j];
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
    };
    float sumqx, sumq2;
    fit(1 / (ntry > 0 ? -max / values[0] : max / values[0]), sumqx, sumq2, true);
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.0f, best = d * sumqx;
    for (int t = -ntry; t <= ntry; ++t) {
        fit((float(t) + values[0]) / max, sumqx, sumq2, false);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) d = sumqx / sumq2, best = d * sumqx;
    }
    return d;
}

/// Nibbles of one block of 32 at qs: element j < 16 low in qs[j], j + 16 high.
inline void pack_nibbles(unsigned char* qs, std::span<const std::uint8_t, 32> levels) {
    for (std::size_t j = 0; j < 16; ++j) qs[j] = std::uint8_t(levels[j] | levels[j + 16] << 4);
}

/// IQ4_XS (136 bytes): per sub-block of 32 an IQ4_NL scale (7 trials each way), the eight
/// quantised to 6 bits against the half d = -max / 32, then the nibbles against those.
inline Block<136> quantize_iq4_xs(std::span<const float, 256> x) {
    std::array<std::uint8_t, 256> levels;
    std::array<float, 8> scales;
    float max_scale = 0, amax_scale = 0;
    for (std::size_t s = 0; s < 8; ++s) {
        scales[s] = iq4_scale(x.subspan(32 * s).first<32>(), 7, std::span<std::uint8_t, 32>(levels.data() + 32 * s, 32));
        if (std::fabs(scales[s]) > amax_scale) amax_scale = std::fabs(scales[s]), max_scale = scales[s];
    }
    Block<136> out{};
    const float d = -max_scale / 32, id = d != 0 ? 1 / d : 0.0f;
    put_half(out, 0, d);
    std::uint16_t high = 0;
    for (std::size_t s = 0; s < 8; ++s) {
        const int l = std::clamp(nearest_int(id * scales[s]), -32, 31);
        const float dl = d * float(l), idl = dl != 0 ? 1 / dl : 0.0f;
        for (std::size_t j = 0; j < 32; ++j) levels[32 * s + j] = best_index_iq4nl(idl * x[32 * s + j]);
        const auto u = unsigned(l + 32);
        out[4 + s / 2] |= std::uint8_t((u & 0x0F) << (4 * (s % 2)));
        high = std::uint16_t(high | (u >> 4) << (2 * s));
        pack_nibbles(out.data() + 8 + 16 * s, std::span<const std::uint8_t, 32>(levels.data() + 32 * s, 32));
    }
    out[2] = std::uint8_t(high & 0xFF), out[3] = std::uint8_t(high >> 8);
    return out;
}

/// IQ4_NL (18 bytes), as llama.cpp's quantize_iq4_nl writes a file's: the block's scale (7 trials
/// each way) as a half, the nibbles against the f32 scale.
inline Block<18> quantize_iq4_nl(std::span<const float, 32> x) {
    std::array<std::uint8_t, 32> levels;
    const float d = iq4_scale(x, 7, levels);
    Block<18> out{};
    put_half(out, 0, d);
    const float id = d != 0 ? 1 / d : 0.0f;
    for (std::size_t j = 0; j < 32; ++j) levels[j] = best_index_iq4nl(id * x[j]);
    pack_nibbles(out.data() + 2, levels);
    return out;
}

/// MXFP4 (17 bytes), as ggml's quantize_row_mxfp4_ref, which llama.cpp's quantize_mxfp4 writes a
/// file's with (it takes no importance matrix): the library's own quantiser, hm::quantize_mxfp4
/// (core/quant.hpp), since mxfp4 is also a format the library holds.
inline Block<17> quantize_mxfp4(std::span<const float, 32> x) {
    const hm::BlockMXFP4 b = hm::quantize_mxfp4(x);
    Block<17> out{};
    std::memcpy(out.data(), &b, sizeof b);
    return out;
}

/// Q4_1 (20 bytes), Q5_0 (22) or Q5_1 (24): a block of 32 against its range (with a min: d =
/// (max - min) / (2^bits - 1), q = (w - min) / d + 0.5 truncated) or its largest magnitude (Q5_0:
/// d = max / -16, q = w / d + 16.5 truncated, at most 31).
template <hm::ggml_quant Type>
Block<Type == hm::ggml_quant::q4_1 ? 20 : Type == hm::ggml_quant::q5_0 ? 22 : 24> quantize_32(std::span<const float, 32> x) {
    constexpr bool with_min = Type != hm::ggml_quant::q5_0, five = Type != hm::ggml_quant::q4_1;
    constexpr std::size_t qs = Type == hm::ggml_quant::q4_1 ? 4 : Type == hm::ggml_quant::q5_0 ? 6 : 8;
    Block<qs + 16> out{};
    std::array<std::uint8_t, 32> levels;
    if constexpr (with_min) {
        const auto [lo, hi] = std::minmax_element(x.begin(), x.end());
        const float min = *lo, d = (*hi - min) / float(five ? 31 : 15), id = d != 0 ? 1 / d : 0.0f;
        put_half(out, 0, d);
        put_half(out, 2, min);
        for (std::size_t j = 0; j < 32; ++j) {
            const float v = (x[j] - min) * id + 0.5f;
            levels[j] = five ? std::uint8_t(v) : std::uint8_t(std::min(15, int(std::int8_t(v))));
        }
    } else {
        float amax = 0, max = 0;
        for (float v : x)
            if (amax < std::fabs(v)) amax = std::fabs(v), max = v;
        const float d = max / -16, id = d != 0 ? 1 / d : 0.0f;
        put_half(out, 0, d);
        for (std::size_t j = 0; j < 32; ++j) levels[j] = std::uint8_t(std::min(31, int(std::int8_t(x[j] * id + 16.5f))));
    }
    if constexpr (five) {
        std::uint32_t qh = 0;
        for (std::size_t j = 0; j < 32; ++j) qh |= std::uint32_t(levels[j] >> 4) << j;
        for (std::size_t b = 0; b < 4; ++b) out[qs - 4 + b] = std::uint8_t(qh >> (8 * b));
        for (auto& l : levels) l &= 0x0F;
    }
    pack_nibbles(out.data() + qs, levels);
    return out;
}

} // namespace ggml_ref
