// workspace_bytes(T) is an upper bound: every layer, loaded block, stack, backend, storage dtype
// and router runs in a fixed Workspace of exactly workspace_bytes(T) bytes (one that never
// grows), for T from 1 to 600, densely around the oneDNN row buckets and 256-row pieces.
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;

namespace {

/// T = 1 .. 600: every bucket boundary of the oneDNN backend and its neighbours (the buckets
/// are listed here so the test does not depend on that backend), the 256-row piece boundaries,
/// and every 7th value between (every 29th in a sanitizer build). The reference backend, whose
/// scratch does not depend on T's buckets, takes every 23rd value (every 97th) and the piece
/// boundaries (it is 20x slower).
template <class B>
std::vector<index_t> token_counts() {
    if constexpr (std::is_same_v<B, reference>) {
        std::vector<index_t> t{1, 2, 255, 256, 257, 511, 512, 513, 600};
        for (index_t n = 3; n < 600; n += test::sanitized ? 97 : 23) t.push_back(n);
        return t;
    }
    std::set<index_t> t;
    for (const index_t b : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192,
                            208, 224, 240, 256, 512})
        for (const index_t n : {b - 1, b, b + 1, b + 256 - 1, b + 256, b + 256 + 1})
            if (n >= 1 && n <= 600) t.insert(n);
    for (index_t n = 1; n <= 600; n += test::sanitized ? 29 : 7) t.insert(n);
    t.insert(600);
    return {t.begin(), t.end()};
}

/// Runs `forward(x, y, ws)` for each T in a fixed Workspace of `bytes(T)`; counts failures.
template <class B>
void check_exact(index_t d, const std::function<std::size_t(index_t)>& bytes,
                 const std::function<void(ConstMatrixView<float>, MatrixView<float>, Workspace&)>& forward) {
    static const Matrix<float> x = random_matrix(600, 64, 11);
    Matrix<float> y(600, d);
    int failures = 0;
    for (const index_t t : token_counts<B>()) {
        Workspace ws(bytes(t), WorkspaceGrowth::fixed);
        try {
            forward(x.view().row_block(0, t).col_block(0, d), y.view().row_block(0, t), ws);
        } catch (const error& e) {
            if (++failures <= 3) MESSAGE("T = ", t, ": ", std::string(e.what()));
        }
    }
    CHECK(failures == 0);
}

template <class B, class R>
void check_router(R router, const RouterContext& ctx = {}) {
    CAPTURE(R::selection_type::name);
    const auto layer = test::make_layer<B>(std::move(router));
    std::vector<std::int32_t> ids(600);
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(i * 7919 % 1000);
    check_exact<B>(24, [&](index_t t) { return layer.workspace_bytes(t); },
                [&](ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws) {
                    RoutingPlan plan;
                    RouterContext c = ctx;
                    if (!c.token_ids.empty()) c.token_ids = std::span(ids).first(std::size_t(x.rows()));
                    layer.forward(x, y, ws, plan, c);
                });
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("every router: workspace_bytes(T) is enough", B, routers) {
    const std::vector<std::int32_t> some_ids(1, 0);
    check_router<B>(TopKRouter(6, TopK{2}, {.weighting = {.renormalize = true}}));
    check_router<B>(DeepSeekRouter(6, GroupLimitedTopK{.k = 2, .n_group = 3, .topk_group = 2},
                                   {.weighting = {.renormalize = true, .epsilon = 1e-20, .scale = 2.5f}}));
    check_router<B>(ExpertChoiceRouter(6, ExpertChoice{1.5}));
    check_router<B>(TopPRouter(6, TopP{.p = 0.6, .k_max = 3}));
    check_router<B>(SinkhornRouter(6, SinkhornBalanced{5}));
    check_router<B>(NoisyTopKRouter(6, NoisyTopK{.k = 2, .noise_std = 0.5f, .seed = 1}));
    check_router<B>(HashRouter(6, HashRouting{}), {.token_ids = some_ids});
    check_router<B>(SwitchRouter(6, Top1Capacity{3}));
}
TEST_CASE_TEMPLATE_APPLY(routers, test::all_backends);

TEST_CASE("expert choice reserves what it can assign, not tokens x experts") {
    const auto layer = test::make_layer<reference>(ExpertChoiceRouter(6, ExpertChoice{1.5}));
    const auto top2 = test::make_layer<reference>(TopKRouter(6, TopK{2}));
    CHECK(layer.max_assignments(100) == 6 * 25); // c = round(100 * 1.5 / 6) = 25 tokens per expert
    CHECK(layer.workspace_bytes(600) < 2 * top2.workspace_bytes(600));
}

TEST_CASE_TEMPLATE_DEFINE("every family, storage and HyperMoE mode: workspace_bytes(T) is enough", B, families) {
    for (const std::string name : {"mixtral-basic", "qwen2_moe-basic", "olmoe-basic", "deepseek_v3-basic",
                                   "switch_transformers-basic", "switch_transformers-decoder", "hypermoe_gpt2-k2",
                                   "hypermoe_switch-basic", "hypermoe_switch-drop"}) {
        const std::string dir = test::data_dir + "/" + name;
        const Checkpoint ck(dir);
        const SafeTensorsFile input(dir + "/input.safetensors");
        const auto& meta = input.view().metadata();
        const index_t layer = std::stoll(meta.at("layer"));
        const std::string stack = meta.count("stack") ? meta.at("stack") : "";
        for (const test::StorageCase& sc : test::storage_cases)
            for (const HyperMode mode : {HyperMode::cached, HyperMode::per_token}) {
                if (!sc.swept()) continue;
                CAPTURE(name);
                CAPTURE(to_string(sc.storage));
                CAPTURE(to_string(sc.prec));
                CAPTURE(int(mode));
                if (mode == HyperMode::per_token && !sc.every_mode()) continue;
                const auto block = load_moe_block<B>(ck, layer, stack, {.storage = sc.storage, .prec = sc.prec, .hyper = {.mode = mode}});
                if (mode == HyperMode::per_token && !block.is_hyper()) continue;
                // An absurd token count saturates (UBSan fails any signed overflow on the way).
                CHECK(block.workspace_bytes(std::numeric_limits<index_t>::max() / 2) >= detail::unreal_bytes);
                check_exact<B>(block.d_model(), [&](index_t t) { return block.workspace_bytes(t); },
                            [&](ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws) {
                                RoutingPlan plan;
                                block.forward(x, y, ws, plan);
                            });
            }
    }
}
TEST_CASE_TEMPLATE_APPLY(families, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("stacks: workspace_bytes(T) is enough", B, workspace_stacks) {
    constexpr index_t d = 24, ff = 40;
    const Matrix<float> gate = random_matrix(ff, d, 1), up = random_matrix(ff, d, 2), down = random_matrix(d, ff, 3);
    const auto norm_w = test::random_vector(d, 4);
    const GluWeights gw{.gate = ConstMatrixView<float>(gate.view()), .up = ConstMatrixView<float>(up.view()),
                        .down = ConstMatrixView<float>(down.view())};
    const FfnWeights fw{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())};
    using Glu = GluExpert<B, Silu>;
    using Ffn = FfnExpert<B, Gelu>;
    const auto stack = Sequential(RmsNorm<>(norm_w, 1e-6f), Residual(DenseFfn(Glu(gw))),
                                  Residual(test::make_layer<B>(TopKRouter(6, TopK{2}), d, ff)), DenseFfn(Ffn(fw)));
    check_exact<B>(d, [&](index_t t) { return stack.workspace_bytes(t); },
                [&](ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws) { stack.forward(x, y, ws); });
    DynamicStack dyn;
    dyn.push_back(Residual(Sequential(RmsNorm<>(norm_w, 1e-6f), DenseFfn(Glu(gw)))));
    dyn.push_back(Residual(test::make_layer<B>(TopKRouter(6, TopK{2}), d, ff)));
    dyn.push_back(DenseFfn(Ffn(fw)));
    check_exact<B>(d, [&](index_t t) { return dyn.workspace_bytes(t); },
                [&](ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws) { dyn.forward(x, y, ws); });
}
TEST_CASE_TEMPLATE_APPLY(workspace_stacks, test::all_backends);

TEST_CASE("a fixed workspace never grows; a thread budget applies to the call only") {
    Workspace fixed(128, WorkspaceGrowth::fixed);
    CHECK_THROWS_WITH_AS(fixed.reserve(256), "Workspace::reserve: 256 bytes needed, but this fixed workspace holds 128",
                         error);
    CHECK_THROWS_WITH_AS(Workspace::Scope(fixed, 200),
                         "Workspace::reserve: 200 bytes needed, but this fixed workspace holds 128", error);
    CHECK(fixed.capacity() == 128);
    CHECK_THROWS_AS(fixed.set_threads(-1), config_error);
}
