// The Mixtral-like MoE layer (d = 1024, ff = 2816 SwiGLU, E = 8, k = 2) at T in {1, 32, 512}:
//  - BM_MoeLayer_<backend>/T/<dtype>/layers:1  one layer repeated (weights stay in cache as far
//    as they fit: this flatters decode),
//  - .../layers:4                               a rotation over 4 layers' weights (1.1 GB f32),
//    so weights come from memory as in real inference,
//  - BM_DenseCeiling/T                           one SwiGLU GEMM chain on T * k rows with fixed-M
//    oneDNN primitives: the same multiply-adds as the layer's experts, no routing,
//  - BM_MoeVsCeiling_onednn/T/f32/layers:4      the layer (4-layer rotation) and the ceiling
//    alternating in one loop: counter of_ceiling = ceiling / layer, robust to machine drift,
//  - BM_ReadBandwidth                            streaming read of 1 GiB: the machine's limit
//    for reading weights (the T = 1 target is 1.2x the time to read 2 experts once),
//  - BM_MoeBackward_<backend>/T/f32[/kept]      the layer's backward, with its forward timed in
//    the same loop (counter backward_per_forward); /kept: the forward keeps its activations
//    (MoeActivations) and the backward starts from them,
//  - BM_TrainStep_<backend>/T:512/f32            a training step through Trainer (forward,
//    backward, AdamW, rebuild), with each phase's ms as counters,
//  - BM_MoeSkewed_onednn/T/<dtype>              the layer on a plan whose experts do not balance
//    across 2 threads (three tokens in four to one expert): the experts' forward pool.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <hypermoe/hypermoe.hpp>
#include <hypermoe/io/io.hpp>
#include <hypermoe/train/trainer.hpp>

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

constexpr hm::index_t d_model = 1024, d_ff = 2816, experts = 8, top_k = 2;

using hm::bench::fill;
using hm::bench::random_matrix;

template <class B>
using Layer = hm::MoeLayer<hm::GluExpert<B, hm::Silu>, hm::TopKRouter>;

template <class B>
std::unique_ptr<Layer<B>> make_layer(std::uint64_t seed, hm::dtype storage, hm::precision prec = hm::precision::exact) {
    const auto gate = random_matrix(experts, d_model, seed, 0.5f);
    std::vector<hm::GluExpert<B, hm::Silu>> ex;
    for (hm::index_t e = 0; e < experts; ++e) {
        const auto g = random_matrix(d_ff, d_model, seed * 100 + 3 * std::uint64_t(e), 0.03f);
        const auto u = random_matrix(d_ff, d_model, seed * 100 + 3 * std::uint64_t(e) + 1, 0.03f);
        const auto dn = random_matrix(d_model, d_ff, seed * 100 + 3 * std::uint64_t(e) + 2, 0.02f);
        ex.emplace_back(hm::GluWeights{.gate = hm::ConstMatrixView<float>(g.view()),
                                       .up = hm::ConstMatrixView<float>(u.view()),
                                       .down = hm::ConstMatrixView<float>(dn.view())},
                        hm::ExpertOptions{.storage = storage, .prec = prec});
    }
    return std::make_unique<Layer<B>>(hm::WeightView(hm::ConstMatrixView<float>(gate.view())),
                                      hm::TopKRouter(experts, hm::TopK{top_k}, {.weighting = {.renormalize = true}}),
                                      std::move(ex));
}

/// Multiply-adds x 2 of the routed experts for T tokens (the router GEMM is < 0.1% of it).
double flops(hm::index_t t) { return 2.0 * double(t * top_k) * 3.0 * double(d_model) * double(d_ff); }

/// The layer with f32 or bf16 weights (bf16 `exact` or `fast`: activations rounded to bf16, the
/// CPU's bf16 instructions where it has them), one layer repeated or a rotation over 4 layers.
template <class B>
void BM_MoeLayer(benchmark::State& state, hm::index_t tokens, hm::dtype storage, hm::precision prec, int layers) {
    static std::vector<std::unique_ptr<Layer<B>>> cache[3];
    auto& built = cache[storage == hm::dtype::f32 ? 0 : prec == hm::precision::exact ? 1 : 2];
    while (int(built.size()) < layers) built.push_back(make_layer<B>(built.size() + 1, storage, prec));
    const auto x = random_matrix(tokens, d_model, 99, 1.0f);
    hm::Matrix<float> y(tokens, d_model);
    hm::Workspace ws;
    hm::RoutingPlan plan;
    for (int l = 0; l < layers; ++l) built[std::size_t(l)]->forward(x.view(), y.view(), ws, plan);
    int next = 0;
    for (auto _ : state) {
        built[std::size_t(next)]->forward(x.view(), y.view(), ws, plan);
        next = (next + 1) % layers;
        benchmark::DoNotOptimize(y.data());
    }
    const auto stats = hm::routing_stats(plan);
    state.counters["GFLOP/s"] = benchmark::Counter(flops(tokens) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["experts_used"] = double(stats.experts_used);
    state.counters["load_cv"] = stats.load_cv;
}

/// The layer on a plan whose experts do not balance across 2 threads (MoeLayer::apply): top-1,
/// three tokens in four to expert 0 and the others spread over experts 1-7 (storage f32, or
/// q4_0 / bf16 `fast`). The experts' forward then runs as the pool of (expert, tile) items,
/// where whole experts as tasks would leave a thread idle behind expert 0.
template <class B>
void BM_MoeSkewed(benchmark::State& state, hm::index_t tokens, hm::dtype storage) {
    const auto gate = random_matrix(experts, d_model, 1, 0.5f);
    std::vector<hm::GluExpert<B, hm::Silu>> ex;
    for (hm::index_t e = 0; e < experts; ++e) {
        const auto g = random_matrix(d_ff, d_model, 100 + 3 * std::uint64_t(e), 0.03f);
        const auto u = random_matrix(d_ff, d_model, 101 + 3 * std::uint64_t(e), 0.03f);
        const auto dn = random_matrix(d_model, d_ff, 102 + 3 * std::uint64_t(e), 0.02f);
        const hm::precision prec = storage == hm::dtype::f32 ? hm::precision::exact : hm::precision::fast;
        ex.emplace_back(hm::GluWeights{.gate = hm::ConstMatrixView<float>(g.view()), .up = hm::ConstMatrixView<float>(u.view()),
                                       .down = hm::ConstMatrixView<float>(dn.view())},
                        hm::ExpertOptions{.storage = storage, .prec = prec});
    }
    const Layer<B> layer(hm::WeightView(hm::ConstMatrixView<float>(gate.view())), hm::TopKRouter(experts, hm::TopK{1}), std::move(ex));
    hm::RoutingPlan plan;
    plan.reset(tokens, experts, 1);
    for (hm::index_t t = 0; t < tokens; ++t) {
        plan.ids(t)[0] = t % 4 != 3 ? 0 : std::int32_t(1 + (t / 4) % (experts - 1));
        plan.weights(t)[0] = 1.0f;
    }
    plan.build_index();
    const auto x = random_matrix(tokens, d_model, 99, 1.0f);
    hm::Matrix<float> y(tokens, d_model);
    hm::Workspace ws;
    layer.apply(x.view(), plan, y.view(), ws);
    for (auto _ : state) {
        layer.apply(x.view(), plan, y.view(), ws);
        benchmark::DoNotOptimize(y.data());
    }
    state.counters["GFLOP/s"] = benchmark::Counter(flops(tokens) / top_k / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Backward of the layer (issue 12), timed against its forward in the same loop: the reported
/// time is the backward's; counter backward_per_forward = backward / forward (target <= 2.2).
/// Without `kept` the backward routes again and recomputes the experts' hidden activations;
/// with it the forward keeps them (MoeActivations) and the backward starts from them.
template <class B>
void BM_MoeBackward(benchmark::State& state, hm::index_t tokens, bool kept) {
    const auto layer = make_layer<B>(1, hm::dtype::f32);
    const auto x = random_matrix(tokens, d_model, 99, 1.0f), dy = random_matrix(tokens, d_model, 98, 1.0f);
    hm::Matrix<float> y(tokens, d_model), dx(tokens, d_model);
    hm::Workspace ws;
    hm::MoeActivations activations;
    auto g = layer->make_gradients();
    const auto forward_call = [&] {
        if (kept) layer->forward(x.view(), y.view(), ws, activations);
        else layer->forward(x.view(), y.view(), ws);
    };
    const auto backward_call = [&] {
        if (kept) layer->backward(activations, x.view(), dy.view(), dx.view(), g, ws);
        else layer->backward(x.view(), dy.view(), dx.view(), g, ws);
    };
    forward_call();
    backward_call();
    double forward = 0, backward = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        forward_call();
        const auto t1 = std::chrono::steady_clock::now();
        backward_call();
        const auto t2 = std::chrono::steady_clock::now();
        forward += std::chrono::duration<double>(t1 - t0).count();
        backward += std::chrono::duration<double>(t2 - t1).count();
        state.SetIterationTime(std::chrono::duration<double>(t2 - t1).count());
        benchmark::DoNotOptimize(dx.data());
    }
    state.counters["forward_ms"] = 1e3 * forward / double(state.iterations());
    state.counters["backward_per_forward"] = backward / forward;
}

/// A training step of the layer (issue 12, point 8): forward, loss, backward, clipping, AdamW and
/// the rebuild of the block from the updated tensors, through Trainer on a fixed-seed Mixtral
/// checkpoint of the same sizes (one block, no residual, mean squared error against a target).
/// Counters: each phase's share in ms. bench/peers/pytorch_moe.py --train times PyTorch's step.
template <class B>
void BM_TrainStep(benchmark::State& state, hm::index_t tokens) {
    const hm::SyntheticImage image = hm::synthetic_image(
        {.family = hm::family("mixtral"), .d_model = d_model, .d_ff = d_ff, .experts = experts, .top_k = top_k, .layers = 1, .seed = 1});
    const hm::Checkpoint start(image.config, image.safetensors, "mixtral-like");
    hm::TrainOptions opt{.residual = false, .clip_norm = 1.0};
    opt.matrices.lr = opt.vectors.lr = 1e-5;
    hm::Trainer<B> trainer(start, opt);
    const auto x = random_matrix(tokens, d_model, 99, 1.0f), target = random_matrix(tokens, d_model, 98, 0.1f);
    trainer.step(x.view(), {.values = target.view()});
    double grad = 0, update = 0, rebuild = 0;
    for (auto _ : state) {
        const hm::TrainMetrics m = trainer.step(x.view(), {.values = target.view()});
        grad += m.gradient_seconds, update += m.optimizer_seconds, rebuild += m.rebuild_seconds;
        state.SetIterationTime(m.seconds);
    }
    const double n = double(state.iterations());
    state.counters["gradients_ms"] = 1e3 * grad / n;
    state.counters["optimizer_ms"] = 1e3 * update / n;
    state.counters["rebuild_ms"] = 1e3 * rebuild / n;
}

#if HYPERMOE_HAS_ONEDNN
/// One SwiGLU GEMM chain on T * k rows with fixed-M oneDNN primitives (the ceiling).
class DenseChain {
public:
    explicit DenseChain(hm::index_t tokens) {
        using namespace dnnl;
        using dt = memory::data_type;
        const memory::dim m = tokens * top_k;
        const auto make = [&](memory::dim k, memory::dim n) {
            return matmul::primitive_desc(matmul::desc(memory::desc({m, k}, dt::f32, {k, 1}),
                                                       memory::desc({k, n}, dt::f32, memory::format_tag::any),
                                                       memory::desc({m, n}, dt::f32, {n, 1})),
                                          eng_);
        };
        const auto pd_up = make(d_model, 2 * d_ff), pd_down = make(d_ff, d_model);
        up_ = matmul(pd_up);
        down_ = matmul(pd_down);
        x_ = memory(pd_up.src_desc(), eng_);
        h_ = memory(pd_up.dst_desc(), eng_);
        w_up_ = memory(pd_up.weights_desc(), eng_);
        w_down_ = memory(pd_down.weights_desc(), eng_);
        y_ = memory(pd_down.dst_desc(), eng_);
        h_in_ = memory({{m, d_ff}, dt::f32, {2 * d_ff, 1}}, eng_, h_.get_data_handle());
        // Every buffer written: never-written pages map to the zero page and look cache-resident.
        std::uint64_t seed = 1;
        for (const memory* mem : {&x_, &h_, &w_up_, &w_down_, &y_})
            fill(static_cast<float*>(mem->get_data_handle()), mem->get_desc().get_size() / sizeof(float), seed++, 0.05f);
        step();
    }

    void step() {
        up_.execute(strm_, {{DNNL_ARG_SRC, x_}, {DNNL_ARG_WEIGHTS, w_up_}, {DNNL_ARG_DST, h_}});
        down_.execute(strm_, {{DNNL_ARG_SRC, h_in_}, {DNNL_ARG_WEIGHTS, w_down_}, {DNNL_ARG_DST, y_}});
        strm_.wait();
    }

private:
    dnnl::engine eng_{dnnl::engine::kind::cpu, 0};
    dnnl::stream strm_{eng_};
    dnnl::matmul up_, down_;
    dnnl::memory x_, h_, w_up_, w_down_, y_, h_in_;
};

void BM_DenseCeiling(benchmark::State& state, hm::index_t tokens) {
    DenseChain chain(tokens);
    for (auto _ : state) chain.step();
    state.counters["GFLOP/s"] = benchmark::Counter(flops(tokens) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// The oneDNN f32 layer (rotating over 4 layers' weights) and the dense ceiling called alternately
/// in one loop, so that the drifts of this shared machine hit both alike. The time is the
/// layer's; counter of_ceiling = ceiling time / layer time (the "% of the dense ceiling").
void BM_MoeVsCeiling(benchmark::State& state, hm::index_t tokens) {
    static std::vector<std::unique_ptr<Layer<hm::onednn>>> built;
    while (built.size() < 4) built.push_back(make_layer<hm::onednn>(built.size() + 1, hm::dtype::f32));
    DenseChain chain(tokens);
    const auto x = random_matrix(tokens, d_model, 99, 1.0f);
    hm::Matrix<float> y(tokens, d_model);
    hm::Workspace ws;
    hm::RoutingPlan plan;
    for (const auto& l : built) l->forward(x.view(), y.view(), ws, plan);
    std::size_t next = 0;
    state.counters["of_ceiling"] = hm::bench::run_paired(
        state,
        [&] {
            built[next]->forward(x.view(), y.view(), ws, plan);
            benchmark::DoNotOptimize(y.data());
            next = (next + 1) % built.size();
        },
        [&] { chain.step(); });
}
#endif

} // namespace

int main(int argc, char** argv) {
    benchmark::RegisterBenchmark("BM_ReadBandwidth", hypermoe::bench::BM_ReadBandwidth)->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const hm::index_t t : {1, 32, 512}) {
        const std::string suffix = "/T:" + std::to_string(t);
#if HYPERMOE_HAS_ONEDNN
        benchmark::RegisterBenchmark(("BM_DenseCeiling" + suffix).c_str(), BM_DenseCeiling, t)
            ->UseRealTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("BM_MoeVsCeiling_onednn" + suffix + "/f32/layers:4").c_str(), BM_MoeVsCeiling, t)
            ->UseManualTime()->Unit(benchmark::kMillisecond);
#endif
        for (const int layers : {1, 4})
            for (const auto& [storage, prec] : {std::pair{hm::dtype::f32, hm::precision::exact}, std::pair{hm::dtype::bf16, hm::precision::exact},
                                                std::pair{hm::dtype::bf16, hm::precision::fast}}) {
                const std::string name = suffix + "/" + std::string(hm::to_string(storage)) + (prec == hm::precision::fast ? "_fast" : "") +
                                         "/layers:" + std::to_string(layers);
#if HYPERMOE_HAS_ONEDNN
                benchmark::RegisterBenchmark(("BM_MoeLayer_onednn" + name).c_str(), BM_MoeLayer<hm::onednn>, t, storage, prec, layers)
                    ->UseRealTime()->Unit(benchmark::kMillisecond);
#endif
#if HYPERMOE_HAS_EIGEN
                if (storage == hm::dtype::f32)
                    benchmark::RegisterBenchmark(("BM_MoeLayer_eigen" + name).c_str(), BM_MoeLayer<hm::eigen>, t, storage, prec, layers)
                        ->UseRealTime()->Unit(benchmark::kMillisecond);
#endif
            }
    }
#if HYPERMOE_HAS_ONEDNN
    for (const hm::index_t t : {32, 512})
        for (const hm::dtype storage : {hm::dtype::f32, hm::dtype::bf16, hm::dtype::q4_0})
            benchmark::RegisterBenchmark(("BM_MoeSkewed_onednn/T:" + std::to_string(t) + "/" + std::string(hm::to_string(storage))).c_str(),
                                         BM_MoeSkewed<hm::onednn>, t, storage)
                ->UseRealTime()->Unit(benchmark::kMillisecond);
#endif
    for (const hm::index_t t : {32, 512}) {
        const std::string suffix = "/T:" + std::to_string(t) + "/f32";
        for (const bool kept : {false, true}) {
            const std::string name = suffix + (kept ? "/kept" : "");
#if HYPERMOE_HAS_ONEDNN
            benchmark::RegisterBenchmark(("BM_MoeBackward_onednn" + name).c_str(), BM_MoeBackward<hm::onednn>, t, kept)
                ->UseManualTime()->Unit(benchmark::kMillisecond);
#endif
#if HYPERMOE_HAS_EIGEN
            benchmark::RegisterBenchmark(("BM_MoeBackward_eigen" + name).c_str(), BM_MoeBackward<hm::eigen>, t, kept)
                ->UseManualTime()->Unit(benchmark::kMillisecond);
#endif
        }
    }
#if HYPERMOE_HAS_ONEDNN
    benchmark::RegisterBenchmark("BM_TrainStep_onednn/T:512/f32", BM_TrainStep<hm::onednn>, 512)->UseManualTime()->Unit(benchmark::kMillisecond);
#endif
#if HYPERMOE_HAS_EIGEN
    benchmark::RegisterBenchmark("BM_TrainStep_eigen/T:512/f32", BM_TrainStep<hm::eigen>, 512)->UseManualTime()->Unit(benchmark::kMillisecond);
#endif
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
}
