// What holding a GGUF file's K-quant experts in another storage (`--weights bf16|q8_0|q4_0`) adds
// to the file's own quantisation error: docs/checkpoints.md's requantisation table.
//
// For weights drawn from three distributions (normal; Laplace; Student's t with 4 degrees of
// freedom, whose rare large weights set q4_0's block scales as a trained matrix's outliers do),
// it quantises them as llama.cpp writes Q4_K and Q6_K without an importance matrix (ggml's
// quantize_row_q4_K_ref: per sub-block of 32 a weighted least-squares scale and min over 21 trial
// scales, the eight pairs then quantised to 6 bits against the super-block's half d and dmin;
// quantize_row_q6_K_ref: per group of 16 the best of 19 trial scales, quantised to int8 against
// the super-block's half d), reads the bytes back through the library's GGUF decoder
// (GgmlQuantBlock), converts those exact values as the loader does (detail::store_row: bf16
// rounding, quantize_row into q8_0 / q4_0), and prints each result's relative RMS error
// sqrt(sum (w' - w)^2 / sum w^2) against the original weights; the rows "none" convert the
// original weights straight.
// Usage: requant_error [ROWS COLS]   (default 512 x 4096; COLS a multiple of 256)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <hypermoe/core/core.hpp>
#include <hypermoe/core/quant.hpp>
#include <hypermoe/backend/linear_spec.hpp>

namespace hm = hypermoe;

namespace {

// ggml's make_qkx2_quants for one sub-block: levels 0..nmax for w ~ scale * l - min (min >= 0
// returned in the_min), the scale chosen among nstep + 1 trials by the weighted squared error.
float make_qkx2_quants(std::span<const float, 32> x, std::span<const float, 32> weights, std::span<std::uint8_t, 32> levels,
                       float& the_min) {
    constexpr int nmax = 15, nstep = 20;
    constexpr float rmin = -1.0f, rdelta = 0.1f;
    float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
    for (std::size_t i = 1; i < 32; ++i) {
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
    const auto level = [&](float iscale, float v) { return std::uint8_t(std::clamp(int(std::nearbyint(iscale * (v - min))), 0, nmax)); };
    float iscale = nmax / (max - min), scale = 1 / iscale, best = 0;
    for (std::size_t i = 0; i < 32; ++i) {
        levels[i] = level(iscale, x[i]);
        const float diff = scale * levels[i] + min - x[i];
        best += weights[i] * diff * diff;
    }
    std::array<std::uint8_t, 32> trial;
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * float(is) + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (std::size_t i = 0; i < 32; ++i) {
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
        for (std::size_t i = 0; i < 32; ++i) {
            const float diff = this_scale * trial[i] + this_min - x[i];
            err += weights[i] * diff * diff;
        }
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

// One Q4_K super-block (144 bytes, core/quant.hpp's layout) of 256 weights, as
// quantize_row_q4_K_ref writes it.
std::array<unsigned char, 144> quantize_q4_k(std::span<const float, 256> x) {
    std::array<std::uint8_t, 256> levels;
    std::array<float, 8> scales, mins;
    float max_scale = 0, max_min = 0;
    for (std::size_t s = 0; s < 8; ++s) {
        const std::span<const float, 32> sub = x.subspan(32 * s).first<32>();
        float sum_x2 = 0;
        for (float v : sub) sum_x2 += v * v;
        const float av_x = std::sqrt(sum_x2 / 32);
        std::array<float, 32> weights;
        for (std::size_t i = 0; i < 32; ++i) weights[i] = av_x + std::fabs(sub[i]);
        scales[s] = make_qkx2_quants(sub, weights, std::span<std::uint8_t, 32>(levels.data() + 32 * s, 32), mins[s]);
        max_scale = std::max(max_scale, scales[s]);
        max_min = std::max(max_min, mins[s]);
    }
    std::array<unsigned char, 144> out{};
    const float inv_scale = max_scale > 0 ? 63 / max_scale : 0, inv_min = max_min > 0 ? 63 / max_min : 0;
    unsigned char* sc = out.data() + 4;
    for (std::size_t s = 0; s < 8; ++s) {
        const auto ls = std::uint8_t(std::min(63, int(std::nearbyint(inv_scale * scales[s]))));
        const auto lm = std::uint8_t(std::min(63, int(std::nearbyint(inv_min * mins[s]))));
        if (s < 4) {
            sc[s] = ls;
            sc[s + 4] = lm;
        } else {
            sc[s + 4] = std::uint8_t((ls & 0x0F) | (lm & 0x0F) << 4);
            sc[s - 4] |= std::uint8_t((ls >> 4) << 6);
            sc[s] |= std::uint8_t((lm >> 4) << 6);
        }
    }
    const std::uint16_t d = hm::f32_to_f16_bits(max_scale / 63), dmin = hm::f32_to_f16_bits(max_min / 63);
    out[0] = std::uint8_t(d & 0xFF), out[1] = std::uint8_t(d >> 8), out[2] = std::uint8_t(dmin & 0xFF), out[3] = std::uint8_t(dmin >> 8);
    // The levels again against the 6-bit scales and mins as stored.
    for (std::size_t s = 0; s < 8; ++s) {
        const auto [ls, lm] = hm::k_scale_min(sc, hm::index_t(s));
        const float step = hm::f16_bits_to_f32(d) * float(ls);
        if (step == 0) continue;
        const float offset = hm::f16_bits_to_f32(dmin) * float(lm);
        for (std::size_t i = 0; i < 32; ++i)
            levels[32 * s + i] = std::uint8_t(std::clamp(int(std::nearbyint((x[32 * s + i] + offset) / step)), 0, 15));
    }
    for (std::size_t j = 0; j < 256; j += 64)
        for (std::size_t l = 0; l < 32; ++l) out[16 + j / 2 + l] = std::uint8_t(levels[j + l] | levels[j + l + 32] << 4);
    return out;
}

// ggml's make_qx_quants with rmse_type 1 for one group of 16: signed levels -nmax..nmax - 1 for
// w ~ scale * l, the scale the best of 19 trials by the x^2-weighted squared error.
float make_qx_quants(std::span<const float, 16> x, int nmax) {
    float max = 0, amax = 0;
    for (float v : x)
        if (std::fabs(v) > amax) amax = std::fabs(v), max = v;
    if (amax < 1e-15f) return 0.0f; // ggml's GROUP_MAX_EPS
    const auto fit = [&](float iscale, float& sumlx, float& suml2) {
        sumlx = suml2 = 0;
        for (float v : x) {
            const float l = float(std::clamp(int(std::nearbyint(iscale * v)), -nmax, nmax - 1)), w = v * v;
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

// One Q6_K super-block (210 bytes, core/quant.hpp's layout) of 256 weights, as
// quantize_row_q6_K_ref writes it.
std::array<unsigned char, 210> quantize_q6_k(std::span<const float, 256> x) {
    std::array<float, 16> scales;
    float max_scale = 0, max_abs_scale = 0;
    for (std::size_t g = 0; g < 16; ++g) {
        scales[g] = make_qx_quants(x.subspan(16 * g).first<16>(), 32);
        if (std::fabs(scales[g]) > max_abs_scale) max_abs_scale = std::fabs(scales[g]), max_scale = scales[g];
    }
    std::array<unsigned char, 210> out{};
    if (max_abs_scale < 1e-15f) return out;
    const float iscale = -128.0f / max_scale;
    const std::uint16_t d = hm::f32_to_f16_bits(1 / iscale);
    out[208] = std::uint8_t(d & 0xFF), out[209] = std::uint8_t(d >> 8);
    for (std::size_t g = 0; g < 16; ++g) out[192 + g] = std::uint8_t(std::int8_t(std::min(127, int(std::nearbyint(iscale * scales[g])))));
    for (std::size_t j = 0; j < 256; ++j) {
        const float step = hm::f16_bits_to_f32(d) * float(std::int8_t(out[192 + j / 16]));
        const unsigned q = step == 0 ? 32u : unsigned(std::clamp(int(std::nearbyint(x[j] / step)), -32, 31) + 32);
        const std::size_t n = j / 128, u = j % 128 / 32, l = j % 32;
        out[64 * n + 32 * (u % 2) + l] |= std::uint8_t(u >= 2 ? (q & 0x0F) << 4 : q & 0x0F);
        out[128 + 32 * n + l] |= std::uint8_t((q >> 4) << (2 * u));
    }
    return out;
}

// A row's values as the loader holds them in `storage`: TensorBinder's conversion
// (detail::store_row), read back through the view an expert gets of it (WeightView::packed).
std::vector<float> held_as(std::span<const float> row, hm::dtype storage) {
    std::vector<std::byte> bytes(hm::weight_bytes(storage, 1, row.size()));
    hm::detail::store_row(row, storage, bytes.data(), "row", 0);
    const hm::WeightView held = hm::WeightView::packed(bytes.data(), storage, 1, hm::index_t(row.size()));
    std::vector<float> out(row.size());
    for (std::size_t i = 0; i < row.size(); ++i) out[i] = held.at(0, hm::index_t(i));
    return out;
}

struct Error {
    double diff = 0, ref = 0;
    void add(std::span<const float> approx, std::span<const float> exact) {
        for (std::size_t i = 0; i < exact.size(); ++i) {
            const double e = double(approx[i]) - exact[i];
            diff += e * e, ref += double(exact[i]) * exact[i];
        }
    }
    [[nodiscard]] double relative() const { return std::sqrt(diff / ref); }
};

} // namespace

int main(int argc, char** argv) {
    if (argc != 1 && argc != 3) {
        std::fputs("usage: requant_error [ROWS COLS]\n", stderr);
        return 2;
    }
    const std::size_t rows = argc == 3 ? std::stoul(argv[1]) : 512, cols = argc == 3 ? std::stoul(argv[2]) : 4096;
    if (cols % 256 != 0) {
        std::fputs("requant_error: COLS must be a multiple of 256\n", stderr);
        return 2;
    }
    const hm::dtype storages[] = {hm::dtype::bf16, hm::dtype::q8_0, hm::dtype::q4_0};
    std::printf("| weights | file | file's error | -> bf16 | -> q8_0 | -> q4_0 |\n|---|---|---|---|---|---|\n");
    for (const char* dist : {"normal", "Laplace", "Student's t, 4 dof"}) {
        // The weights themselves (no file: straight into each storage), then as Q4_K and Q6_K.
        for (const char* file : {"none", "Q4_K", "Q6_K"}) {
            std::mt19937_64 rng(7);
            std::normal_distribution<float> normal(0.0f, 0.02f);
            std::exponential_distribution<float> exponential(1 / 0.014f);
            std::student_t_distribution<float> student(4.0f);
            Error own, held[3];
            std::vector<float> w(cols), k(cols);
            for (std::size_t r = 0; r < rows; ++r) {
                for (float& v : w)
                    v = dist[0] == 'n' ? normal(rng) : dist[0] == 'L' ? (rng() & 1 ? 1.0f : -1.0f) * exponential(rng) : 0.014f * student(rng);
                for (std::size_t b = 0; b < cols; b += 256) {
                    const std::span<const float, 256> x(w.data() + b, 256);
                    const auto widen = [&](const auto& bytes, hm::ggml_quant type) { // the GGUF reader's values
                        const hm::GgmlQuantBlock block(bytes.data(), type);
                        for (std::size_t j = 0; j < 256; ++j) k[b + j] = block[hm::index_t(j)];
                    };
                    if (file[1] == '4') widen(quantize_q4_k(x), hm::ggml_quant::q4_k);
                    else if (file[1] == '6') widen(quantize_q6_k(x), hm::ggml_quant::q6_k);
                    else std::copy(x.begin(), x.end(), k.begin() + std::ptrdiff_t(b));
                }
                own.add(k, w);
                for (int s = 0; s < 3; ++s) held[s].add(held_as(k, storages[s]), w);
            }
            std::printf("| %s | %s | %.2f%% | %.2f%% | %.2f%% | %.2f%% |\n", dist, file, 100 * own.relative(), 100 * held[0].relative(),
                        100 * held[1].relative(), 100 * held[2].relative());
        }
    }
}
