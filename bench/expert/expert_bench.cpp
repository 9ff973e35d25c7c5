// FfnExpert and GluExpert on every fast backend, f32, bf16, q8_0, q4_0, mxfp4 and q4_k weights (the block
// formats in both precisions), against the ceiling: the
// same GEMM chain as raw oneDNN matmul primitives created for the exact M (brgemm), no epilogue.
// The reference backend is the tests' oracle, not a fast path, and is not timed here.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <vector>

#include <hypermoe/hypermoe.hpp>

#include "../bench_support.hpp"
#if HYPERMOE_HAS_EIGEN
#include <hypermoe/backend/eigen.hpp>
#endif
#if HYPERMOE_HAS_ONEDNN
#include <hypermoe/backend/onednn.hpp>
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace hm = hypermoe;

namespace {

hm::Matrix<float> random_matrix(hm::index_t rows, hm::index_t cols, std::uint64_t seed) {
    return hm::bench::random_matrix(rows, cols, seed, 0.05f);
}

struct Shape {
    hm::index_t d, ff, m;
    hm::dtype storage;
    hm::precision prec = hm::precision::exact;
};

/// Multiply-adds x 2 of one forward: FFN has two GEMMs, GLU three.
double flops(const Shape& s, int gemms) { return 2.0 * double(s.m) * double(s.d) * double(s.ff) * gemms; }

template <class Expert, class Weights>
void run_expert(benchmark::State& state, const Shape& s, const Weights& w, int gemms) {
    const Expert expert(w, hm::ExpertOptions{.storage = s.storage, .prec = s.prec});
    const auto x = random_matrix(s.m, s.d, 9);
    hm::Matrix<float> y(s.m, s.d);
    hm::Workspace ws;
    expert.forward(x.view(), y.view(), ws);
    for (auto _ : state) {
        expert.forward(x.view(), y.view(), ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.counters["GFLOP/s"] = benchmark::Counter(flops(s, gemms) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["tokens/s"] = benchmark::Counter(double(s.m), benchmark::Counter::kIsIterationInvariantRate);
}

template <class B>
void BM_FfnExpert(benchmark::State& state, Shape s) {
    const auto up = random_matrix(s.ff, s.d, 1), down = random_matrix(s.d, s.ff, 2);
    const hm::FfnWeights w{.up = hm::ConstMatrixView<float>(up.view()), .down = hm::ConstMatrixView<float>(down.view())};
    run_expert<hm::FfnExpert<B, hm::Gelu>>(state, s, w, 2);
}

template <class B>
void BM_GluExpert(benchmark::State& state, Shape s) {
    const auto gate = random_matrix(s.ff, s.d, 1), up = random_matrix(s.ff, s.d, 2), down = random_matrix(s.d, s.ff, 3);
    const hm::GluWeights w{.gate = hm::ConstMatrixView<float>(gate.view()), .up = hm::ConstMatrixView<float>(up.view()),
                           .down = hm::ConstMatrixView<float>(down.view())};
    run_expert<hm::GluExpert<B, hm::Silu>>(state, s, w, 3);
}

/// Bytes of one GLU expert's three matrices stored as `t` (scales included).
std::size_t glu_bytes(const Shape& s) {
    return 2 * hm::weight_bytes(s.storage, std::size_t(s.ff), std::size_t(s.d)) + hm::weight_bytes(s.storage, std::size_t(s.d), std::size_t(s.ff));
}

/// Decode as a model runs it: every call a different expert, and enough of them (512 MiB of
/// weights, 2 to 64 experts) that their weights come from memory, not from the caches. "GB/s" is
/// the expert's weight bytes over the time: compare it with BM_ReadBandwidth of the same run.
template <class B>
void BM_GluRotating(benchmark::State& state, Shape s) {
    const auto gate = random_matrix(s.ff, s.d, 1), up = random_matrix(s.ff, s.d, 2), down = random_matrix(s.d, s.ff, 3);
    const hm::GluWeights w{.gate = hm::ConstMatrixView<float>(gate.view()), .up = hm::ConstMatrixView<float>(up.view()),
                           .down = hm::ConstMatrixView<float>(down.view())};
    const std::size_t bytes = glu_bytes(s);
    const auto count = std::clamp<std::size_t>((std::size_t(512) << 20) / bytes, 2, 64);
    std::vector<hm::GluExpert<B, hm::Silu>> experts;
    experts.reserve(count);
    for (std::size_t i = 0; i < count; ++i) experts.emplace_back(w, hm::ExpertOptions{.storage = s.storage, .prec = s.prec});
    const auto x = random_matrix(s.m, s.d, 9);
    hm::Matrix<float> y(s.m, s.d);
    hm::Workspace ws;
    for (const auto& e : experts) e.forward(x.view(), y.view(), ws);
    std::size_t i = 0;
    for (auto _ : state) {
        experts[i++ % count].forward(x.view(), y.view(), ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.counters["experts"] = double(count);
    state.counters["MB"] = double(bytes) / 1e6;
    state.counters["GB/s"] = benchmark::Counter(double(bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

#if HYPERMOE_HAS_ONEDNN
/// The ceiling: `gemms` raw f32 matmuls with fixed M (oneDNN picks brgemm), (M, K) x (K, N)
/// alternating K = d, N = gemms_ff and K = ff, N = d, as the expert's chain.
void BM_RawMatmul(benchmark::State& state, Shape s, int gemms) {
    using namespace dnnl;
    using dt = memory::data_type;
    const engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    // GLU's fused gate|up is one GEMM with N = 2 ff; FFN's up has N = ff.
    const memory::dim n_up = gemms == 3 ? 2 * s.ff : s.ff;
    const auto make = [&](memory::dim k, memory::dim n) {
        matmul::primitive_desc pd(matmul::desc(memory::desc({s.m, k}, dt::f32, {k, 1}),
                                               memory::desc({k, n}, dt::f32, memory::format_tag::any),
                                               memory::desc({s.m, n}, dt::f32, {n, 1})),
                                  eng);
        return pd;
    };
    const auto pd_up = make(s.d, n_up), pd_down = make(s.ff, s.d);
    const matmul up(pd_up), down(pd_down);
    memory x(pd_up.src_desc(), eng), h(pd_up.dst_desc(), eng), w_up(pd_up.weights_desc(), eng),
        w_down(pd_down.weights_desc(), eng), y(pd_down.dst_desc(), eng);
    memory h_in({{s.m, s.ff}, dt::f32, {n_up, 1}}, eng, h.get_data_handle());
    // Fill every buffer: pages never written all map to the kernel's zero page, which would
    // make the weights look cache-resident (a 4 KiB page read over and over).
    std::uint64_t seed = 7;
    for (const memory* m : {&x, &h, &w_up, &w_down, &y})
        hm::bench::fill(static_cast<float*>(m->get_data_handle()), m->get_desc().get_size() / sizeof(float), seed++, 0.05f);
    const auto step = [&] {
        up.execute(strm, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w_up}, {DNNL_ARG_DST, h}});
        down.execute(strm, {{DNNL_ARG_SRC, h_in}, {DNNL_ARG_WEIGHTS, w_down}, {DNNL_ARG_DST, y}});
        strm.wait();
    };
    step();
    for (auto _ : state) step();
    state.SetLabel(pd_up.impl_info_str());
    state.counters["GFLOP/s"] = benchmark::Counter(flops(s, gemms) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// What a oneDNN linear's backward costs beside its products where its weights live in
/// oneDNN's layout (brgemm, AVX-512): one reorder of the (K, N) weight from the layout oneDNN's
/// f32 matmul chooses into the f32 panels `dz W` reads. GB/s counts the bytes read and written.
void BM_WeightsToPanels(benchmark::State& state, hm::index_t k, hm::index_t n) {
    namespace d = hm::detail;
    const auto layout = d::onednn_plan(d::onednn_row_buckets.back(), k, n).weights_desc();
    dnnl::memory held(layout, d::onednn_engine());
    hm::bench::fill(static_cast<float*>(held.get_data_handle()), layout.get_size() / sizeof(float), 3, 0.05f);
    const auto* reorders = d::onednn_panel_reorders(k, n, layout);
    std::vector<float> panels(static_cast<std::size_t>(d::f32_panel_floats(n, k)));
    hm::Workspace ws;
    for (auto _ : state) {
        d::onednn_reorder_into_panels(*reorders, held, k, n, d::OnednnRole::panels_of_w, panels.data(), ws, "bench");
        benchmark::DoNotOptimize(panels.data());
        benchmark::ClobberMemory();
    }
    state.SetLabel(d::onednn_f32_brgemm() ? "from brgemm's blocked layout" : "from gemm:jit's plain layout");
    const double bytes = double(layout.get_size()) + double(panels.size() * sizeof(float));
    state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
#endif

std::string name(const char* what, const Shape& s) {
    return std::string(what) + "/d:" + std::to_string(s.d) + "/ff:" + std::to_string(s.ff) + "/M:" +
           std::to_string(s.m) + "/" + std::string(hm::to_string(s.storage)) +
           (s.storage != hm::dtype::f32 ? "/" + std::string(hm::to_string(s.prec)) : std::string());
}

} // namespace

int main(int argc, char** argv) {
    benchmark::RegisterBenchmark("BM_ReadBandwidth", hm::bench::BM_ReadBandwidth)->UseRealTime()->Unit(benchmark::kMillisecond);
#if HYPERMOE_HAS_ONEDNN
    for (const auto& [k, n] : {std::pair<hm::index_t, hm::index_t>{1024, 2816}, {2816, 1024}})
        benchmark::RegisterBenchmark(("BM_WeightsToPanels/K:" + std::to_string(k) + "/N:" + std::to_string(n)).c_str(), BM_WeightsToPanels, k, n)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
#endif
    // Every storage, with each precision where the two differ.
    constexpr std::pair<hm::dtype, hm::precision> formats[] = {
        {hm::dtype::f32, hm::precision::exact},  {hm::dtype::bf16, hm::precision::exact},  {hm::dtype::bf16, hm::precision::fast},
        {hm::dtype::q8_0, hm::precision::exact}, {hm::dtype::q8_0, hm::precision::fast},   {hm::dtype::q4_0, hm::precision::exact},
        {hm::dtype::q4_0, hm::precision::fast},  {hm::dtype::mxfp4, hm::precision::exact}, {hm::dtype::mxfp4, hm::precision::fast},
        {hm::dtype::q4_k, hm::precision::exact}, {hm::dtype::q4_k, hm::precision::fast}};
    for (const auto& [d, ff] : {std::pair<hm::index_t, hm::index_t>{1024, 2816}, {768, 3072}})
        for (const hm::index_t m : {1, 8, 64, 512}) {
#if HYPERMOE_HAS_ONEDNN
            const Shape f32{d, ff, m, hm::dtype::f32};
            benchmark::RegisterBenchmark(name("BM_RawMatmul_Ffn", f32).c_str(), BM_RawMatmul, f32, 2)->UseRealTime();
            benchmark::RegisterBenchmark(name("BM_RawMatmul_Glu", f32).c_str(), BM_RawMatmul, f32, 3)->UseRealTime();
#endif
            for (const auto& [storage, prec] : formats) {
                const Shape s{d, ff, m, storage, prec};
#if HYPERMOE_HAS_ONEDNN
                benchmark::RegisterBenchmark(name("BM_FfnExpert_onednn", s).c_str(), BM_FfnExpert<hm::onednn>, s)->UseRealTime();
                benchmark::RegisterBenchmark(name("BM_GluExpert_onednn", s).c_str(), BM_GluExpert<hm::onednn>, s)->UseRealTime();
#endif
#if HYPERMOE_HAS_EIGEN
                benchmark::RegisterBenchmark(name("BM_FfnExpert_eigen", s).c_str(), BM_FfnExpert<hm::eigen>, s)->UseRealTime();
                benchmark::RegisterBenchmark(name("BM_GluExpert_eigen", s).c_str(), BM_GluExpert<hm::eigen>, s)->UseRealTime();
#endif
                (void)s;
            }
        }
    // Decode and T = 32 with the weights streamed from memory (onednn: the default backend).
    for (const hm::index_t m : {1, 32})
        for (const auto& [storage, prec] : formats) {
            const Shape s{1024, 2816, m, storage, prec};
#if HYPERMOE_HAS_ONEDNN
            benchmark::RegisterBenchmark(name("BM_GluRotating_onednn", s).c_str(), BM_GluRotating<hm::onednn>, s)->UseRealTime();
#endif
            (void)s;
        }
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
}
