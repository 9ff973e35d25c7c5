#pragma once
// Shared test helpers: the backends this build has, seeded random data, and the error measure
// every comparison uses (max |got - ref| / max |ref|, relative to the largest reference value).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <unistd.h>
#include <random>
#include <tuple>
#include <vector>

#include <hypermoe/hypermoe.hpp>
#if HYPERMOE_HAS_EIGEN
#include <hypermoe/backend/eigen.hpp>
#endif
#if HYPERMOE_HAS_ONEDNN
#include <hypermoe/backend/onednn.hpp>
#endif

namespace hypermoe::test {

/// A fresh directory under the system temp dir (named by `tag` and the process), removed at
/// scope exit.
struct TempDir {
    std::filesystem::path path;
    explicit TempDir(const std::string& tag)
        : path(std::filesystem::temp_directory_path() / ("hypermoe-test-" + tag + "-" + std::to_string(::getpid()))) {
        std::filesystem::remove_all(path);
        std::filesystem::create_directories(path);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() { std::filesystem::remove_all(path); }
};

/// True in a sanitizer build (meson's b_sanitize): the sweeps that only add more of the same
/// inputs (extra token counts, repeated rounds, extra thread counts) take a subset there, where
/// every call is ~10x slower; every code path and every case still runs.
#ifdef HYPERMOE_TEST_SANITIZED
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif

/// Every backend of this build; the reference is always first (it is the oracle).
using all_backends = std::tuple<reference
#if HYPERMOE_HAS_EIGEN
                                ,
                                eigen
#endif
#if HYPERMOE_HAS_ONEDNN
                                ,
                                onednn
#endif
                                >;

inline std::vector<float> random_vector(index_t n, std::uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-scale, scale);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = dist(rng);
    return v;
}

inline Matrix<float> random_matrix(index_t rows, index_t cols, std::uint32_t seed, float scale = 1.0f) {
    Matrix<float> m(rows, cols);
    const auto v = random_vector(rows * cols, seed, scale);
    std::copy(v.begin(), v.end(), m.data());
    return m;
}

inline Matrix<bf16> to_bf16(ConstMatrixView<float> m) {
    Matrix<bf16> out(m.rows(), m.cols());
    for (index_t r = 0; r < m.rows(); ++r)
        for (index_t c = 0; c < m.cols(); ++c) out(r, c) = bf16::from_float(m(r, c));
    return out;
}

/// sqrt(sum (got - ref)^2 / sum ref^2): the relative RMS error.
inline double relative_rms_error(ConstMatrixView<float> got, ConstMatrixView<float> ref) {
    double diff = 0, scale = 0;
    for (index_t r = 0; r < ref.rows(); ++r)
        for (index_t c = 0; c < ref.cols(); ++c) {
            const double d = double(got(r, c)) - double(ref(r, c));
            diff += d * d;
            scale += double(ref(r, c)) * double(ref(r, c));
        }
    return scale == 0 ? std::sqrt(diff) : std::sqrt(diff / scale);
}

/// max |got - ref| / max |ref| (0 when both are empty or all zero).
inline double relative_error(ConstMatrixView<float> got, ConstMatrixView<float> ref) {
    double diff = 0, scale = 0;
    for (index_t r = 0; r < ref.rows(); ++r)
        for (index_t c = 0; c < ref.cols(); ++c) {
            diff = std::max(diff, std::abs(double(got(r, c)) - double(ref(r, c))));
            scale = std::max(scale, std::abs(double(ref(r, c))));
        }
    return scale == 0 ? diff : diff / scale;
}

/// A small SwiGLU MoE layer with any router, on backend B, fixed random weights.
template <class B, class R>
MoeLayer<GluExpert<B, Silu>, R> make_layer(R router, index_t d = 24, index_t ff = 20) {
    const index_t e = router.experts();
    const Matrix<float> gate = random_matrix(e, d, 100, 0.5f);
    std::vector<GluExpert<B, Silu>> experts;
    for (index_t x = 0; x < e; ++x) {
        const Matrix<float> g = random_matrix(ff, d, std::uint32_t(3 * x + 1), 0.3f),
                            u = random_matrix(ff, d, std::uint32_t(3 * x + 2), 0.3f),
                            dn = random_matrix(d, ff, std::uint32_t(3 * x + 3), 0.3f);
        experts.emplace_back(GluWeights{.gate = ConstMatrixView<float>(g.view()), .up = ConstMatrixView<float>(u.view()),
                                        .down = ConstMatrixView<float>(dn.view())});
    }
    return MoeLayer(WeightView(ConstMatrixView<float>(gate.view())), std::move(router), std::move(experts));
}

/// Float32 tolerance for a chain of GEMMs whose reduction lengths add up to `k_total`: the
/// worst-case rounding grows linearly with K; activations add ~2e-7.
inline double tolerance(index_t k_total) { return 1e-6 + 2.4e-7 * double(k_total); }

/// A weight storage type and precision, as LoadOptions takes them.
struct StorageCase {
    dtype storage;
    precision prec;
    /// The two the layer-level sweeps run with every HyperMoE mode; the others with the cached one.
    [[nodiscard]] bool every_mode() const noexcept { return prec == precision::exact && !is_block_format(storage); }
    /// Whether the layer-level sweeps run it in this build: the sanitizer build leaves out the
    /// block formats' `exact` (no workspace, no shared state; the backend tests run it there).
    [[nodiscard]] bool swept() const noexcept { return !sanitized || prec == precision::fast || !is_block_format(storage); }
};

/// Every storage type, with each precision where the two differ.
inline constexpr std::array<StorageCase, 11> storage_cases{{{dtype::f32, precision::exact},
                                                            {dtype::bf16, precision::exact},
                                                            {dtype::bf16, precision::fast},
                                                            {dtype::q8_0, precision::exact},
                                                            {dtype::q8_0, precision::fast},
                                                            {dtype::q4_0, precision::exact},
                                                            {dtype::q4_0, precision::fast},
                                                            {dtype::mxfp4, precision::exact},
                                                            {dtype::mxfp4, precision::fast},
                                                            {dtype::q4_k, precision::exact},
                                                            {dtype::q4_k, precision::fast}}};

/// The block formats.
inline constexpr std::array<dtype, 4> block_formats{dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k};

/// A row quantised in `format` (zero-padded to whole blocks: 32, q4_k 256) and dequantised: the
/// values a linear map stored in that format computes with, as many as the row has.
inline std::vector<float> requantized(dtype format, std::span<const float> row) {
    std::vector<float> out;
    detail::with_block(format, [&]<class Block>() {
        using Stored = detail::ggml_block_t<Block>;
        constexpr auto width = std::size_t(detail::block_width_of<Stored>);
        std::vector<Stored> q((row.size() + width - 1) / width);
        quantize_row<Stored>(row, q, "row");
        out.resize(q.size() * width);
        for (std::size_t b = 0; b < q.size(); ++b) dequantize(q[b], std::span<float, width>(out.data() + b * width, width));
    });
    out.resize(row.size());
    return out;
}

/// sum(y * dy), in double.
inline double dot(ConstMatrixView<float> y, ConstMatrixView<float> dy) {
    double s = 0;
    for (index_t r = 0; r < y.rows(); ++r)
        for (index_t c = 0; c < y.cols(); ++c) s += double(y(r, c)) * dy(r, c);
    return s;
}

/// The largest gap between analytic gradients and central differences, and the largest
/// central difference: a check passes when worst <= tolerance * scale.
struct GradientGap {
    double worst = 0, scale = 0;
    void operator()(double analytic, double fd) {
        worst = std::max(worst, std::abs(analytic - fd));
        scale = std::max(scale, std::abs(fd));
    }
    [[nodiscard]] bool within(double tolerance) const { return worst <= tolerance * scale; }
};

/// Central difference of L(v) = loss() with respect to element `v`, in double.
inline double central_difference(float& v, const std::function<double()>& loss, float h) {
    const float saved = v;
    v = saved + h;
    const double up = loss();
    v = saved - h;
    const double down = loss();
    v = saved;
    return (up - down) / (2.0 * double(h));
}

#ifdef HYPERMOE_TEST_DATA
/// The fixtures copied into the project (tests/data/README.md states their conventions).
inline const std::string data_dir = HYPERMOE_TEST_DATA;

/// Every case of the fixtures: a directory under data_dir each.
inline const std::vector<std::string> fixture_cases = {
    "mixtral-basic",       "mixtral-decode",       "mixtral-tie",        "mixtral-bf16",
    "qwen2_moe-basic",     "qwen2_moe-norm",       "qwen2_moe-bf16",     "olmoe-basic",
    "olmoe-norm",          "olmoe-bf16",           "deepseek_v3-basic",  "deepseek_v3-nonorm",
    "deepseek_v3-decode",  "deepseek_v3-bf16",     "switch_transformers-basic", "switch_transformers-drop",
    "switch_transformers-tie", "switch_transformers-decoder", "hypermoe_gpt2-k1", "hypermoe_gpt2-k2",
    "hypermoe_switch-basic", "hypermoe_switch-drop", "gpt_oss-basic"};
#endif

} // namespace hypermoe::test
