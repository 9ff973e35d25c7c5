#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::random_vector;
using test::relative_error;

TEST_CASE("RmsNorm and LayerNorm on hand-computed rows") {
    const std::vector<float> w{1.f, 2.f, 0.5f, 1.f}, b{0.f, 1.f, 0.f, -1.f};
    const RmsNorm<4> rms(w, 1e-6f);
    const LayerNorm<> ln(w, b, 1e-5f);
    static_assert(Layer<RmsNorm<4>> && Layer<LayerNorm<>>);
    Matrix<float> x(2, 4), y(2, 4);
    const float row0[4] = {1.f, -1.f, 1.f, -1.f}, row1[4] = {2.f, 4.f, 6.f, 8.f};
    for (int j = 0; j < 4; ++j) x(0, j) = row0[j], x(1, j) = row1[j];
    Workspace ws;
    rms.forward(x.view(), y.view(), ws);
    // row 0: mean(x^2) = 1; row 1: mean(x^2) = 30.
    CHECK(y(0, 1) == doctest::Approx(-2.0 / std::sqrt(1.0 + 1e-6)));
    CHECK(y(1, 3) == doctest::Approx(8.0 / std::sqrt(30.0 + 1e-6)));
    ln.forward(x.view(), y.view(), ws);
    // row 1: mean 5, biased variance 5.
    const double inv = 1.0 / std::sqrt(5.0 + 1e-5);
    CHECK(y(1, 0) == doctest::Approx(-3.0 * inv * 1.0 + 0.0));
    CHECK(y(1, 1) == doctest::Approx(-1.0 * inv * 2.0 + 1.0));
    CHECK(y(1, 3) == doctest::Approx(3.0 * inv * 1.0 - 1.0));
}

TEST_CASE("norms reject bad parameters and inputs") {
    const std::vector<float> w(4, 1.f), b3(3, 0.f);
    CHECK_THROWS_WITH_AS(RmsNorm<>(w, 0.0f), "RmsNorm: eps is 0, expected a finite value > 0", config_error);
    CHECK_THROWS_WITH_AS(RmsNorm<>(w, std::numeric_limits<float>::infinity()),
                         "RmsNorm: eps is inf, expected a finite value > 0", config_error);
    CHECK_THROWS_WITH_AS(RmsNorm<8>(w, 1e-6f), "RmsNorm: weight has 4 elements, but the type fixes d = 8",
                         shape_error);
    CHECK_THROWS_WITH_AS(LayerNorm<>(w, b3, 1e-5f), "LayerNorm: bias has 3 elements, expected 4 (the weight's)",
                         shape_error);
    std::vector<float> wn = w;
    wn[2] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(RmsNorm<>(wn, 1e-6f), "RmsNorm: weight element 2 is nan, expected a finite value",
                         weight_error);
    const std::vector<float> b_inf = {0.0f, -std::numeric_limits<float>::infinity(), 0.0f, 0.0f};
    CHECK_THROWS_WITH_AS(LayerNorm<>(w, b_inf, 1e-5f), "LayerNorm: bias element 1 is -inf, expected a finite value", weight_error);
    const RmsNorm<> rms(w, 1e-6f);
    Matrix<float> x(2, 4), y(2, 4), y_bad(2, 5);
    Workspace ws;
    CHECK_THROWS_WITH_AS(rms.forward(x.view(), y_bad.view(), ws),
                         "RmsNorm::forward: output y has shape (2, 5), expected (2, 4)", shape_error);
    x(1, 3) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(rms.forward(x.view(), y.view(), ws),
                         "RmsNorm::forward: input x: element (1, 3) is inf, expected a finite value", numeric_error);
}

namespace {

/// A pre-norm transformer FFN sub-block and a second, narrower one, on backend B:
/// x -> x + Glu(RmsNorm(x)) -> Ffn (d -> d) with static widths where S is true.
template <class B, index_t D, index_t FF>
struct Blocks {
    static constexpr index_t d = 24, ff = 40;
    Matrix<float> gate = random_matrix(ff, d, 1, 0.3f), up = random_matrix(ff, d, 2, 0.3f),
                  down = random_matrix(d, ff, 3, 0.3f), up2 = random_matrix(ff, d, 4, 0.3f),
                  down2 = random_matrix(d, ff, 5, 0.3f);
    std::vector<float> norm_w = random_vector(d, 6), bias2 = random_vector(ff, 7);

    using Glu = GluExpert<B, Silu, D, FF>;
    using Ffn = FfnExpert<B, Relu, D, FF>;
    using Stack = Sequential<Residual<Sequential<RmsNorm<D>, DenseFfn<Glu>>>, DenseFfn<Ffn>>;

    [[nodiscard]] GluWeights glu_weights() const {
        return {.gate = ConstMatrixView<float>(gate.view()), .up = ConstMatrixView<float>(up.view()),
                .down = ConstMatrixView<float>(down.view())};
    }
    [[nodiscard]] FfnWeights ffn_weights() const {
        return {.up = ConstMatrixView<float>(up2.view()), .down = ConstMatrixView<float>(down2.view()),
                .up_bias = bias2};
    }
    [[nodiscard]] Stack stack() const {
        return Stack(Residual(Sequential(RmsNorm<D>(norm_w, 1e-6f), DenseFfn(Glu(glu_weights())))),
                     DenseFfn(Ffn(ffn_weights())));
    }
    [[nodiscard]] DynamicStack dynamic_stack() const {
        DynamicStack s;
        s.push_back(Residual(Sequential(RmsNorm<D>(norm_w, 1e-6f), DenseFfn(Glu(glu_weights())))));
        s.push_back(DenseFfn(Ffn(ffn_weights())));
        return s;
    }
};

template <class B, index_t D, index_t FF>
struct StackConfig {
    using backend = B;
    static constexpr index_t d = D, ff = FF;
};
template <class B>
using stack_configs_of = std::tuple<StackConfig<B, dynamic, dynamic>, StackConfig<B, 24, 40>>;
using all_stack_configs = decltype(std::apply(
    [](auto... b) { return std::tuple_cat(stack_configs_of<decltype(b)>{}...); }, test::all_backends{}));

} // namespace

TEST_CASE_TEMPLATE_DEFINE("stacks on every backend match the reference", C, layer_stacks) {
    const Blocks<typename C::backend, C::d, C::ff> blocks;
    const Blocks<reference, dynamic, dynamic> oracle_blocks;
    const auto stack = blocks.stack();
    const auto oracle = oracle_blocks.stack();
    const auto dyn = blocks.dynamic_stack();
    static_assert(Layer<decltype(stack)>);
    CHECK(stack.in_width() == 24);
    CHECK(dyn.size() == 2);
    Workspace ws;
    for (const index_t m : {0, 1, 9}) {
        CAPTURE(m);
        const Matrix<float> x = random_matrix(m, 24, 8);
        Matrix<float> y(m, 24), y_ref(m, 24), y_dyn(m, 24);
        stack.forward(x.view(), y.view(), ws);
        oracle.forward(x.view(), y_ref.view(), ws);
        dyn.forward(x.view(), y_dyn.view(), ws);
        CHECK(relative_error(y.view(), y_ref.view()) <= test::tolerance(4 * (24 + 40)));
        CHECK(relative_error(y_dyn.view(), y.view()) == 0.0); // same layers, same arithmetic

        // The residual really adds x: against the stack's parts run one by one.
        Matrix<float> normed(m, 24), h(m, 24), y_parts(m, 24);
        stack.template layer<0>().inner().template layer<0>().forward(x.view(), normed.view(), ws);
        stack.template layer<0>().inner().template layer<1>().forward(normed.view(), h.view(), ws);
        for (index_t r = 0; r < m; ++r)
            for (index_t j = 0; j < 24; ++j) h(r, j) += x(r, j);
        stack.template layer<1>().forward(h.view(), y_parts.view(), ws);
        CHECK(relative_error(y_parts.view(), y.view()) == 0.0);
    }
}
TEST_CASE_TEMPLATE_APPLY(layer_stacks, all_stack_configs);

TEST_CASE("run-time width mismatches name the layer") {
    const std::vector<float> w8(8, 1.f), w6(6, 1.f);
    CHECK_THROWS_WITH_AS((Sequential<RmsNorm<>, RmsNorm<>>(RmsNorm<>(w8, 1e-6f), RmsNorm<>(w6, 1e-6f))),
                         "Sequential: layer 0 outputs 8 columns, but layer 1 expects 6", shape_error);
    DynamicStack s;
    s.push_back(RmsNorm<>(w8, 1e-6f)).push_back(RmsNorm<8>(w8, 1e-6f));
    CHECK_THROWS_WITH_AS(s.push_back(RmsNorm<>(w6, 1e-6f)),
                         "DynamicStack: layer 2 expects 6 columns, but layer 1 outputs 8", shape_error);
    CHECK(s.size() == 2);
    Workspace ws;
    Matrix<float> x(1, 8), y(1, 8);
    CHECK_THROWS_WITH_AS(DynamicStack().forward(x.view(), y.view(), ws), "DynamicStack::forward: the stack has no layers",
                         shape_error);
    Matrix<float> x6(1, 6);
    CHECK_THROWS_WITH_AS(s.forward(x6.view(), y.view(), ws), "DynamicStack::forward: input x has 6 columns, expected 8",
                         shape_error);
}

/// A user's layer of run-time widths: the first `out` columns of its input.
struct FirstColumns {
    static constexpr index_t static_in_width = dynamic, static_out_width = dynamic;
    index_t in = 0, out = 0;
    [[nodiscard]] index_t in_width() const noexcept { return in; }
    [[nodiscard]] index_t out_width() const noexcept { return out; }
    [[nodiscard]] std::size_t workspace_bytes(index_t /*rows*/) const noexcept { return 0; }
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& /*ws*/, const Context& /*ctx*/ = {}) const {
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t c = 0; c < out; ++c) y(r, c) = x(r, c);
    }
};
static_assert(Layer<FirstColumns>);

TEST_CASE("Residual checks at run time that a layer of run-time widths maps d to d") {
    CHECK_THROWS_WITH_AS(Residual(FirstColumns{4, 3}), "Residual: the inner layer maps 4 to 3 columns, expected equal widths",
                         shape_error);
    const Residual square(FirstColumns{4, 4});
    const Matrix<float> x = random_matrix(2, 4, 1);
    Matrix<float> y(2, 4);
    Workspace ws;
    square.forward(x.view(), y.view(), ws);
    CHECK(y(1, 3) == 2 * x(1, 3));
}

TEST_CASE("DenseFfn rejects non-finite input rows") {
    const Matrix<float> up = random_matrix(6, 4, 1), down = random_matrix(4, 6, 2);
    const DenseFfn ffn(FfnExpert<reference, Relu>(
        FfnWeights{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())}));
    Matrix<float> x(2, 4), y(2, 4);
    x(1, 0) = std::numeric_limits<float>::quiet_NaN();
    Workspace ws;
    CHECK_THROWS_WITH_AS(ffn.forward(x.view(), y.view(), ws),
                         "DenseFfn::forward: input x: element (1, 0) is nan, expected a finite value", numeric_error);
}

TEST_CASE("a hash-routed layer inside a stack gets its token ids through the context") {
    const auto hash = test::make_layer<reference>(HashRouter(6, HashRouting{}));
    const std::vector<float> norm_w = random_vector(24, 7);
    const auto stack = Sequential(RmsNorm<>(norm_w, 1e-6f), Residual(hash));
    const Matrix<float> x = random_matrix(9, 24, 3);
    std::vector<std::int32_t> ids(9);
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(i * 7919 % 1000);
    Workspace ws;
    Matrix<float> y(9, 24), normed(9, 24), want(9, 24);
    stack.forward(x.view(), y.view(), ws, {.token_ids = ids});
    // The same by hand: norm, then the layer with the ids, then the residual.
    stack.layer<0>().forward(x.view(), normed.view(), ws);
    RoutingPlan plan;
    hash.forward(normed.view(), want.view(), ws, plan, {.token_ids = ids});
    for (index_t t = 0; t < 9; ++t) {
        CHECK(plan.ids(t)[0] == HashRouting{}.expert_of(ids[std::size_t(t)], 6));
        for (index_t c = 0; c < 24; ++c) want(t, c) += normed(t, c);
    }
    CHECK(relative_error(y.view(), want.view()) == 0.0);
    // Without ids the router says what it needs, from inside the stack.
    CHECK_THROWS_WITH_AS(stack.forward(x.view(), y.view(), ws),
                         "HashRouting: 0 token ids for 9 tokens, expected one id per token", shape_error);
}

TEST_CASE("the routing sink sees every MoE block of a stack, in order; hash routing skips the gate") {
    DynamicStack stack;
    stack.push_back(Residual(test::make_layer<reference>(TopKRouter(6, TopK{2}))));
    stack.push_back(Residual(test::make_layer<reference>(SwitchRouter(6, Top1Capacity{4}))));
    stack.push_back(Residual(test::make_layer<reference>(HashRouter(6, HashRouting{}))));
    const Matrix<float> x = random_matrix(12, 24, 5);
    std::vector<std::int32_t> ids(12, 3);
    RoutingRecorder plans;
    RoutingStatsRecorder stats;
    Matrix<float> y(12, 24);
    Workspace ws;
    stack.forward(x.view(), y.view(), ws, {.token_ids = ids, .routing_sink = &plans});
    REQUIRE(plans.plans().size() == 3);
    CHECK(plans.plans()[0].slots() == 2);
    CHECK(plans.plans()[1].slots() == 1);
    for (index_t t = 0; t < 12; ++t) CHECK(plans.plans()[2].ids(t)[0] == HashRouting{}.expert_of(3, 6));
    // The first block's plan is what a direct call makes.
    RoutingPlan direct;
    test::make_layer<reference>(TopKRouter(6, TopK{2})).route(x.view(), {}, direct, ws);
    CHECK(std::equal(direct.all_ids().begin(), direct.all_ids().end(), plans.plans()[0].all_ids().begin()));
    stack.forward(x.view(), y.view(), ws, {.token_ids = ids, .routing_sink = &stats});
    REQUIRE(stats.stats().size() == 3);
    CHECK(stats.stats()[0].entropy.has_value());
    // Hash routing is given zero logits (no gate GEMM): their softmax entropy is exactly log E.
    CHECK(*stats.stats()[2].entropy == doctest::Approx(std::log(6.0)).epsilon(1e-6));
    CHECK(*stats.stats()[0].entropy < std::log(6.0) - 1e-3);
}
