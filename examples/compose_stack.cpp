// Compose a small pre-norm feed-forward stack with static widths, run it on every backend this
// build has, and check that they agree with the reference backend.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <hypermoe/hypermoe.hpp>
#if HYPERMOE_HAS_EIGEN
#include <hypermoe/backend/eigen.hpp>
#endif
#if HYPERMOE_HAS_ONEDNN
#include <hypermoe/backend/onednn.hpp>
#endif

namespace hm = hypermoe;

constexpr hm::index_t d_model = 256, d_ff = 704, tokens = 64;

hm::Matrix<float> random_matrix(hm::index_t rows, hm::index_t cols, unsigned seed, float scale) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-scale, scale);
    hm::Matrix<float> m(rows, cols);
    for (hm::index_t i = 0; i < rows * cols; ++i) m.data()[i] = dist(rng);
    return m;
}

struct Weights {
    hm::Matrix<float> gate = random_matrix(d_ff, d_model, 1, 0.05f);
    hm::Matrix<float> up = random_matrix(d_ff, d_model, 2, 0.05f);
    hm::Matrix<float> down = random_matrix(d_model, d_ff, 3, 0.05f);
    std::vector<float> norm = std::vector<float>(d_model, 1.0f);
};

// x -> x + SwiGLU(RmsNorm(x)), widths fixed at compile time: a width mismatch between
// adjacent layers would not compile.
template <class Backend>
auto make_block(const Weights& w) {
    using Glu = hm::GluExpert<Backend, hm::Silu, d_model, d_ff>;
    const hm::GluWeights glu{.gate = hm::ConstMatrixView<float>(w.gate.view()),
                             .up = hm::ConstMatrixView<float>(w.up.view()),
                             .down = hm::ConstMatrixView<float>(w.down.view())};
    return hm::Residual(hm::Sequential(hm::RmsNorm<d_model>(w.norm, 1e-6f), hm::DenseFfn(Glu(glu))));
}

template <class Backend>
double run(const Weights& w, const hm::Matrix<float>& x, hm::Matrix<float>& y) {
    const auto block = make_block<Backend>(w);
    hm::Workspace ws;
    block.forward(x.view(), y.view(), ws); // warm-up: sizes the workspace
    const auto t0 = std::chrono::steady_clock::now();
    block.forward(x.view(), y.view(), ws);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double max_rel_diff(const hm::Matrix<float>& a, const hm::Matrix<float>& b) {
    double diff = 0, scale = 0;
    for (hm::index_t i = 0; i < a.rows() * a.cols(); ++i) {
        diff = std::fmax(diff, std::fabs(double(a.data()[i]) - b.data()[i]));
        scale = std::fmax(scale, std::fabs(double(b.data()[i])));
    }
    return diff / scale;
}

int main() {
    const Weights w;
    const auto x = random_matrix(tokens, d_model, 4, 1.0f);
    hm::Matrix<float> y_ref(tokens, d_model), y(tokens, d_model);
    std::printf("block: x + SwiGLU(RmsNorm(x)), d_model = %lld, d_ff = %lld, %lld tokens\n",
                static_cast<long long>(d_model), static_cast<long long>(d_ff), static_cast<long long>(tokens));
    std::printf("%-10s %10s %22s\n", "backend", "time (ms)", "max rel diff vs ref");
    std::printf("%-10s %10.3f %22s\n", "reference", run<hm::reference>(w, x, y_ref), "-");
    int status = 0;
    const auto report = [&](const char* name, double ms) {
        const double diff = max_rel_diff(y, y_ref);
        std::printf("%-10s %10.3f %22.2e\n", name, ms, diff);
        if (!(diff < 1e-5)) status = 1;
    };
#if HYPERMOE_HAS_EIGEN
    report("eigen", run<hm::eigen>(w, x, y));
#endif
#if HYPERMOE_HAS_ONEDNN
    report("onednn", run<hm::onednn>(w, x, y));
#endif
    std::printf("y[0][0..3] = %.6f %.6f %.6f %.6f\n", y_ref(0, 0), y_ref(0, 1), y_ref(0, 2), y_ref(0, 3));
    (void)report;
    return status;
}
