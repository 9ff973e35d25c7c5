#include <doctest/doctest.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "fixture_reader.hpp"
#include "test_support.hpp"

using namespace hypermoe;
using test::FixtureCase;
using test::relative_error;

namespace {

/// A weight from a fixture tensor, kept in its dtype (BF16 stays BF16).
struct HeldWeight {
    Matrix<float> f32;
    Matrix<bf16> b16;
    bool is_bf16 = false;
    explicit HeldWeight(const test::Tensor& t) : is_bf16(t.dtype == "BF16") {
        if (is_bf16) b16 = t.bf16_matrix();
        else f32 = t.f32();
    }
    [[nodiscard]] WeightView view() const {
        return is_bf16 ? WeightView(ConstMatrixView<bf16>(b16.view())) : WeightView(ConstMatrixView<float>(f32.view()));
    }
};

template <class B>
GluExpert<B, Silu> glu(const FixtureCase& c, const std::string& p, const char* gate, const char* up, const char* down) {
    const HeldWeight g(c.model[p + gate]), u(c.model[p + up]), d(c.model[p + down]);
    return GluExpert<B, Silu>(GluWeights{.gate = g.view(), .up = u.view(), .down = d.view()});
}

template <class B>
std::vector<GluExpert<B, Silu>> glu_experts(const FixtureCase& c, const std::string& prefix, index_t n, const char* gate,
                                            const char* up, const char* down) {
    std::vector<GluExpert<B, Silu>> experts;
    for (index_t e = 0; e < n; ++e) experts.push_back(glu<B>(c, prefix + std::to_string(e) + ".", gate, up, down));
    return experts;
}

struct Run {
    Matrix<float> y;
    RoutingPlan plan;
};

template <class Layer>
Run run_layer(const Layer& layer, const FixtureCase& c, const RouterContext& context = {}) {
    const Matrix<float> x = c.input["x"].f32();
    Run r{Matrix<float>(x.rows(), x.cols()), {}};
    Workspace ws;
    layer.forward(x.view(), r.y.view(), ws, r.plan, context);
    return r;
}

/// y within 1e-5 of the reference implementation; ids equal (exact ties follow the lower-index
/// rule, which the fixtures define), weights within 1e-5; kept flags where the fixture has them.
void check_against_fixture(const Run& r, const FixtureCase& c, const char* y_name = "y") {
    CAPTURE(c.name);
    const Matrix<float> y_ref = c.expected[y_name].f32();
    CHECK(relative_error(r.y.view(), y_ref.view()) <= 1e-5);
    const auto& ids = c.expected["expert_ids"];
    const auto& weights = c.expected["expert_weights"];
    const index_t k = ids.shape[1];
    REQUIRE(r.plan.slots() == k);
    index_t id_mismatches = 0;
    double weight_err = 0, weight_scale = 0;
    for (index_t t = 0; t < r.plan.tokens(); ++t)
        for (index_t j = 0; j < k; ++j) {
            id_mismatches += r.plan.ids(t)[std::size_t(j)] != std::int32_t(ids.at(t * k + j));
            weight_err = std::max(weight_err, std::abs(r.plan.weights(t)[std::size_t(j)] - weights.at(t * k + j)));
            weight_scale = std::max(weight_scale, std::abs(weights.at(t * k + j)));
        }
    CHECK(id_mismatches == 0);
    CHECK(weight_err <= 1e-5 * weight_scale);
    if (c.expected.has("kept"))
        for (index_t t = 0; t < r.plan.tokens(); ++t) CHECK(r.plan.kept(t) == (c.expected["kept"].at(t) != 0));
}

template <class B>
void check_mixtral(const std::string& name) {
    const FixtureCase c = test::load_case(name);
    const index_t e = c.config["num_local_experts"], k = c.config["num_experts_per_tok"];
    const std::string p = "model.layers." + std::to_string(c.layer()) + ".block_sparse_moe.";
    const HeldWeight gate(c.model[p + "gate.weight"]);
    const MoeLayer layer(gate.view(), TopKRouter(e, TopK{k}, {.weighting = {.renormalize = true}}),
                         glu_experts<B>(c, p + "experts.", e, "w1.weight", "w3.weight", "w2.weight"));
    check_against_fixture(run_layer(layer, c), c);
}

/// qwen2_moe (shared expert gated by sigmoid) and olmoe (none): the same tensor names otherwise.
template <class B>
void check_qwen_olmoe(const std::string& name) {
    const FixtureCase c = test::load_case(name);
    const index_t e = c.config["num_experts"], k = c.config["num_experts_per_tok"];
    const bool norm = c.config.value("norm_topk_prob", false);
    const std::string p = "model.layers." + std::to_string(c.layer()) + ".mlp.";
    const HeldWeight gate(c.model[p + "gate.weight"]);
    const TopKRouter router(e, TopK{k}, {.weighting = {.renormalize = norm}});
    auto experts = glu_experts<B>(c, p + "experts.", e, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
    if (c.model.has(p + "shared_expert_gate.weight")) {
        const HeldWeight shared_gate(c.model[p + "shared_expert_gate.weight"]);
        SharedExpert shared(glu<B>(c, p + "shared_expert.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                            shared_gate.view());
        const MoeLayer layer(gate.view(), router, std::move(experts), std::move(shared));
        check_against_fixture(run_layer(layer, c), c);
    } else {
        const MoeLayer layer(gate.view(), router, std::move(experts));
        check_against_fixture(run_layer(layer, c), c);
    }
}

template <class B>
void check_deepseek(const std::string& name) {
    const FixtureCase c = test::load_case(name);
    const auto& cfg = c.config;
    const index_t e = cfg["n_routed_experts"], k = cfg["num_experts_per_tok"];
    const std::string p = "model.layers." + std::to_string(c.layer()) + ".mlp.";
    const HeldWeight gate(c.model[p + "gate.weight"]);
    const DeepSeekRouter router(
        e, GroupLimitedTopK{.k = k, .n_group = cfg["n_group"], .topk_group = cfg["topk_group"]},
        {.weighting = {.renormalize = cfg["norm_topk_prob"].get<bool>(), .epsilon = 1e-20,
                       .scale = cfg["routed_scaling_factor"].get<float>()},
         .selection_bias = c.model[p + "gate.e_score_correction_bias"].vec()});
    SharedExpert shared(glu<B>(c, p + "shared_experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"));
    const MoeLayer layer(gate.view(), router,
                         glu_experts<B>(c, p + "experts.", e, "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                         std::move(shared));
    check_against_fixture(run_layer(layer, c), c);
}

template <class B>
void check_switch(const std::string& name) {
    const FixtureCase c = test::load_case(name);
    const index_t e = c.config["num_experts"];
    const bool decoder = c.input.metadata.at("stack") == "decoder";
    const std::string p = std::string(decoder ? "decoder" : "encoder") + ".block." + std::to_string(c.layer()) +
                          (decoder ? ".layer.2.mlp." : ".layer.1.mlp.");
    const HeldWeight gate(c.model[p + "router.classifier.weight"]);
    const SwitchRouter router(e, Top1Capacity{.capacity = c.config["expert_capacity"]});
    std::vector<FfnExpert<B, Relu>> experts;
    for (index_t x = 0; x < e; ++x) {
        const std::string q = p + "experts.expert_" + std::to_string(x) + ".";
        const HeldWeight wi(c.model[q + "wi.weight"]), wo(c.model[q + "wo.weight"]);
        experts.emplace_back(FfnWeights{.up = wi.view(), .down = wo.view()});
    }
    const RouterContext context{.sequence_length = c.input["x"].shape[1]};
    const MoeLayer layer(gate.view(), router, experts);
    check_against_fixture(run_layer(layer, c, context), c);
    const MoeLayer zero_drop(gate.view(), router, experts, NoSharedExpert{}, {.dropped = DroppedTokens::zero});
    check_against_fixture(run_layer(zero_drop, c, context), c, "y_zero_drop");
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("MoeLayer reproduces the model families' fixtures", B, fixtures) {
    for (const char* name : {"mixtral-basic", "mixtral-decode", "mixtral-tie", "mixtral-bf16"}) check_mixtral<B>(name);
    for (const char* name : {"qwen2_moe-basic", "qwen2_moe-norm", "qwen2_moe-bf16", "olmoe-basic", "olmoe-norm", "olmoe-bf16"})
        check_qwen_olmoe<B>(name);
    for (const char* name : {"deepseek_v3-basic", "deepseek_v3-nonorm", "deepseek_v3-decode", "deepseek_v3-bf16"})
        check_deepseek<B>(name);
    for (const char* name : {"switch_transformers-basic", "switch_transformers-drop", "switch_transformers-tie",
                             "switch_transformers-decoder"})
        check_switch<B>(name);
}
TEST_CASE_TEMPLATE_APPLY(fixtures, test::all_backends);
