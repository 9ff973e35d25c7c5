// HyperMoE at the paper's sizes (d = 768, ff = 3072 GELU-tanh FFN experts with biases, E = 8,
// adapter rank r = 64, d_e = p = q = h = 128, d_l = 10) for k = 1, 2 and T in {1, 32, 512}, on
// the oneDNN backend: the plain MoE layer, HyperMoE with a warm per-pattern cache, and HyperMoE
// generating per token (the reference code's cost), in one run on one layer object (the plain
// variant is that layer's own MoeLayer), so all three read the same expert weights.
// BM_Paired_cached_vs_plain alternates the two in one loop and reports their ratio (x_plain),
// the figure the target is about. BM_HyperTerm times the HyperExpert term alone (cached, the
// plan given); BM_HyperColdPattern times generating and preparing one pattern's adapter (a
// cache miss). BM_HyperBackward times the backward (issue 12) against the forward and against
// the plain MoE's backward.
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <hypermoe/hypermoe.hpp>
#include <hypermoe/backend/onednn.hpp>

#include "../bench_support.hpp"

namespace hm = hypermoe;

namespace {

constexpr hm::index_t d = 768, ff = 3072, experts = 8, r = 64, de = 128, hid = 128, dl = 10, layers = 12;
using B = hm::onednn;
using Expert = hm::FfnExpert<B, hm::GeluTanh>;

hm::Matrix<float> mat(hm::index_t rows, hm::index_t cols, std::uint64_t seed, float scale) {
    return hm::bench::random_matrix(rows, cols, seed, scale);
}
std::vector<float> vec(hm::index_t n, std::uint64_t seed, float scale) { return hm::bench::random_vector(n, seed, scale); }
hm::WeightView view(const hm::Matrix<float>& m) { return hm::ConstMatrixView<float>(m.view()); }

using Layer = hm::HyperMoeLayer<Expert, hm::TopKRouter>;

std::unique_ptr<Layer> build(hm::index_t k) {
    const auto gate = mat(experts, d, 1, 0.5f);
    std::vector<Expert> ex;
    for (hm::index_t e = 0; e < experts; ++e) {
        const auto up = mat(ff, d, 10 + std::uint64_t(e), 0.03f), down = mat(d, ff, 20 + std::uint64_t(e), 0.02f);
        const auto bu = vec(ff, 30 + std::uint64_t(e), 0.01f), bd = vec(d, 40 + std::uint64_t(e), 0.01f);
        ex.emplace_back(hm::FfnWeights{.up = view(up), .down = view(down), .up_bias = bu, .down_bias = bd});
    }
    const hm::TopKRouter router(experts, hm::TopK{k}, {.weighting = {.renormalize = true}});
    const auto emb = mat(experts, de, 2, 1.0f), w0 = mat(de, de, 3, 0.1f), w2 = mat(de, de, 4, 0.1f);
    const auto b0 = vec(de, 5, 0.1f), b2 = vec(de, 6, 0.1f);
    const auto le = mat(layers, dl, 7, 1.0f), trunk = mat(hid, de + dl, 8, 0.1f), dw = mat(d * r, hid, 9, 0.05f),
               uw = mat(r * d, hid, 11, 0.05f), db = mat(r, hid, 12, 0.05f), ub = mat(d, hid, 13, 0.05f);
    const auto tb = vec(hid, 14, 0.1f), dwb = vec(d * r, 15, 0.01f), uwb = vec(r * d, 16, 0.01f), dbb = vec(r, 17, 0.01f),
               ubb = vec(d, 18, 0.01f);
    auto hyper = std::make_shared<hm::Hypernetwork<B>>(hm::HypernetworkWeights{
        view(le), view(trunk), tb, view(dw), dwb, view(uw), uwb, view(db), dbb, view(ub), ubb});
    return std::make_unique<Layer>(hm::MoeLayer<Expert, hm::TopKRouter>(view(gate), router, ex), 3,
                                   hm::ExpertEmbedding(view(emb)),
                                   hm::Projector<B>(hm::ProjectorWeights{view(w0), b0, view(w2), b2}), hyper);
}

/// The layer for k, built once and shared by every variant.
Layer& layer(hm::index_t k) {
    static std::unique_ptr<Layer> built[2];
    auto& l = built[k - 1];
    if (!l) {
        l = build(k);
        hm::Workspace ws;
        l->precompute(ws); // warm cache: every pattern
    }
    return *l;
}

/// Cached HyperMoE and its own plain MoE called alternately in one loop, so that drifts of this
/// shared machine hit both alike: the time is HyperMoE's, counter x_plain = HyperMoE / plain.
void BM_Paired(benchmark::State& state, hm::index_t k, hm::index_t tokens) {
    Layer& m = layer(k);
    m.set_mode(hm::HyperMode::cached);
    const auto x = mat(tokens, d, 99, 1.0f);
    hm::Matrix<float> y(tokens, d);
    hm::Workspace ws;
    hm::RoutingPlan plan;
    m.forward(x.view(), y.view(), ws, plan);
    const double plain_over_hyper = hm::bench::run_paired(
        state,
        [&] {
            m.forward(x.view(), y.view(), ws, plan);
            benchmark::DoNotOptimize(y.data());
        },
        [&] {
            m.moe().forward(x.view(), y.view(), ws, plan);
            benchmark::DoNotOptimize(y.data());
        });
    state.counters["x_plain"] = 1.0 / plain_over_hyper;
}

/// variant: 0 plain MoE, 1 HyperMoE cached (warm), 2 HyperMoE per token, 3 the cached term alone.
void BM_Layer(benchmark::State& state, hm::index_t k, hm::index_t tokens, int variant) {
    Layer& m = layer(k);
    m.set_mode(variant == 2 ? hm::HyperMode::per_token : hm::HyperMode::cached);
    const auto x = mat(tokens, d, 99, 1.0f);
    hm::Matrix<float> y(tokens, d);
    hm::Workspace ws;
    hm::RoutingPlan plan;
    m.moe().forward(x.view(), y.view(), ws, plan); // the plan for the term-alone variant
    const auto step = [&] {
        if (variant == 0) m.moe().forward(x.view(), y.view(), ws, plan);
        else if (variant == 3) m.hyper_term(x.view(), plan, y.view(), ws);
        else m.forward(x.view(), y.view(), ws, plan);
    };
    step();
    for (auto _ : state) {
        step();
        benchmark::DoNotOptimize(y.data());
    }
    state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_HyperColdPattern(benchmark::State& state) {
    static const std::unique_ptr<Layer> m = build(2); // its own: the shared layers keep a warm cache
    const auto x = mat(1, d, 99, 1.0f);
    hm::Matrix<float> y(1, d);
    hm::Workspace ws;
    hm::RoutingPlan plan;
    m->forward(x.view(), y.view(), ws, plan);
    for (auto _ : state) {
        m->cache().clear(); // every iteration misses: one generation + preparation
        m->forward(x.view(), y.view(), ws, plan);
    }
}

/// HyperMoE's backward (issue 12) with the cached forward and the MoE part's own backward
/// timed in the same loop: the reported time is the HyperMoE backward's; counters
/// backward_per_forward (HyperMoE backward / its forward) and x_moe_backward (HyperMoE
/// backward / the plain MoE backward: what the HyperExpert's gradient adds).
void BM_HyperBackward(benchmark::State& state, hm::index_t k, hm::index_t tokens) {
    Layer& m = layer(k);
    m.set_mode(hm::HyperMode::cached);
    const auto x = mat(tokens, d, 99, 1.0f), dy = mat(tokens, d, 98, 1.0f);
    hm::Matrix<float> y(tokens, d), dx(tokens, d);
    hm::Workspace ws;
    auto g = m.make_gradients();
    auto gm = m.moe().make_gradients();
    m.forward(x.view(), y.view(), ws);
    m.backward(x.view(), dy.view(), dx.view(), g, ws);
    m.moe().backward(x.view(), dy.view(), dx.view(), gm, ws);
    double forward = 0, backward = 0, moe_backward = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        m.forward(x.view(), y.view(), ws);
        const auto t1 = std::chrono::steady_clock::now();
        m.backward(x.view(), dy.view(), dx.view(), g, ws);
        const auto t2 = std::chrono::steady_clock::now();
        m.moe().backward(x.view(), dy.view(), dx.view(), gm, ws);
        const auto t3 = std::chrono::steady_clock::now();
        forward += std::chrono::duration<double>(t1 - t0).count();
        backward += std::chrono::duration<double>(t2 - t1).count();
        moe_backward += std::chrono::duration<double>(t3 - t2).count();
        state.SetIterationTime(std::chrono::duration<double>(t2 - t1).count());
        benchmark::DoNotOptimize(dx.data());
    }
    state.counters["backward_per_forward"] = backward / forward;
    state.counters["x_moe_backward"] = backward / moe_backward;
}

} // namespace

int main(int argc, char** argv) {
    const char* names[4] = {"BM_PlainMoe", "BM_HyperMoe_cached", "BM_HyperMoe_per_token", "BM_HyperTerm"};
    for (const hm::index_t k : {1, 2})
        for (const hm::index_t t : {1, 32, 512})
            for (int v = 0; v < 4; ++v)
                benchmark::RegisterBenchmark((std::string(names[v]) + "/k:" + std::to_string(k) + "/T:" + std::to_string(t)).c_str(),
                                             BM_Layer, k, t, v)
                    ->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const hm::index_t k : {1, 2})
        for (const hm::index_t t : {1, 32, 512})
            benchmark::RegisterBenchmark(("BM_Paired_cached_vs_plain/k:" + std::to_string(k) + "/T:" + std::to_string(t)).c_str(),
                                         BM_Paired, k, t)
                ->UseManualTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("BM_HyperColdPattern", BM_HyperColdPattern)->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const hm::index_t t : {32, 512})
        benchmark::RegisterBenchmark(("BM_HyperBackward/k:2/T:" + std::to_string(t)).c_str(), BM_HyperBackward, 2, t)
            ->UseManualTime()->Unit(benchmark::kMillisecond);
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
}
