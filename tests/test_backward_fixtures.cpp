// Backward of whole MoE blocks loaded from the fixtures' checkpoints (the gated-expert families,
// Switch Transformers and both HyperMoE variants), against the float64
// autograd gradients in each case's grads.safetensors (tests/data/README.md, "Backward"):
// dx and d/<tensor> for every tensor the block reads, per tensor within 1e-5 of its largest
// entry, exact zeros for the experts no token reaches; on every backend.

#include <doctest/doctest.h>

#include <string>
#include <type_traits>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;
using test::relative_error;

namespace {

/// Whether layer type L is an MoE layer whose experts have gradients of type G.
template <class L, class G>
constexpr bool experts_with = [] {
    if constexpr (requires { typename L::expert_type::gradients_type; })
        return std::is_same_v<typename L::expert_type::gradients_type, G>;
    else
        return false;
}();

const std::string data_dir = HYPERMOE_TEST_DATA;

/// The tensor names of a gated-expert family's block: router, experts (gate, up, down) and
/// the shared expert(s) with their gate, as the checkpoint names them.
struct GluBlockNames {
    std::string router, experts, gate, up, down, shared, shared_gate;
    [[nodiscard]] std::string expert(index_t e, const std::string& which) const { return experts + std::to_string(e) + "." + which; }
};

GluBlockNames names_of(const std::string& family, index_t layer) {
    const std::string l = std::to_string(layer);
    if (family == "mixtral") {
        const std::string p = "model.layers." + l + ".block_sparse_moe.";
        return {p + "gate.weight", p + "experts.", "w1.weight", "w3.weight", "w2.weight", "", ""};
    }
    const std::string p = "model.layers." + l + ".mlp.";
    GluBlockNames n{p + "gate.weight", p + "experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "", ""};
    if (family == "qwen2_moe") n.shared = p + "shared_expert.", n.shared_gate = p + "shared_expert_gate.weight";
    if (family == "deepseek_v3") n.shared = p + "shared_experts.";
    return n;
}

/// max |got - ref| <= 1e-5 max |ref|, and exact zeros where the reference is all zeros.
void check_gradient(ConstMatrixView<float> got, const SafeTensorsView& grads, const std::string& name) {
    CAPTURE(name);
    REQUIRE(grads.contains(name));
    const Matrix<float> ref = grads.to_f32(grads.info(name));
    REQUIRE(got.rows() == ref.rows());
    REQUIRE(got.cols() == ref.cols());
    bool zero = true;
    for (index_t r = 0; r < ref.rows(); ++r)
        for (index_t c = 0; c < ref.cols(); ++c) zero = zero && ref(r, c) == 0.0f;
    if (zero) {
        for (index_t r = 0; r < got.rows(); ++r)
            for (index_t c = 0; c < got.cols(); ++c) CHECK(got(r, c) == 0.0f);
        return;
    }
    CHECK(relative_error(got, ref.view()) <= 1e-5);
}

/// A gradient against a reference stored transposed (GPT-2's Conv1D weights are [in, out]).
void check_transposed(ConstMatrixView<float> got, const SafeTensorsView& grads, const std::string& name) {
    Matrix<float> t(got.cols(), got.rows());
    for (index_t r = 0; r < got.rows(); ++r)
        for (index_t c = 0; c < got.cols(); ++c) t(c, r) = got(r, c);
    check_gradient(t.view(), grads, name);
}

void check_vector(const std::vector<float>& got, const SafeTensorsView& grads, const std::string& name) {
    check_gradient(ConstMatrixView<float>(got.data(), 1, index_t(got.size())), grads, name);
}

template <class G>
void check_glu(G& g, const SafeTensorsView& grads, const std::string& prefix, const GluBlockNames& n) {
    check_gradient(g.gate(), grads, "d/" + prefix + n.gate);
    check_gradient(g.up(), grads, "d/" + prefix + n.up);
    check_gradient(g.down.view(), grads, "d/" + prefix + n.down);
}

} // namespace

/// One fixture case: its input, upstream gradient and reference gradients.
struct GradCase {
    std::string dir;
    SafeTensorsFile input, grads_file;
    index_t layer;
    std::string family, stack;
    Matrix<float> x, dy;
    index_t sequence_length; // Switch: capacity is per sequence of L ([B, L, d] inputs)
    explicit GradCase(const std::string& name)
        : dir(data_dir + "/" + name), input(dir + "/input.safetensors"), grads_file(dir + "/grads.safetensors"),
          layer(std::stoll(input.view().metadata().at("layer"))), family(input.view().metadata().at("family")),
          stack(input.view().metadata().count("stack") ? input.view().metadata().at("stack") : ""),
          x(input.view().to_f32(input.view().info("x"))), dy(grads().to_f32(grads().info("dy"))),
          sequence_length(input.view().info("x").shape.size() == 3 ? input.view().info("x").shape[1] : 0) {}
    [[nodiscard]] const SafeTensorsView& grads() const { return grads_file.view(); }
};

/// Runs the backward of `block`'s layer (an MoE layer whose experts have gradients G) on the
/// case, checks dx, and hands the layer and its gradients to `check`; fails if the block's
/// layer is not of that kind.
template <class G, class Block, class Check>
void run_backward(const Block& block, const GradCase& c, Workspace& ws, Check&& check) {
    bool ran = false;
    std::visit(
        [&](const auto& l) {
            if constexpr (experts_with<std::decay_t<decltype(l)>, G>) {
                auto g = l.make_gradients();
                Matrix<float> dx(c.x.rows(), c.x.cols());
                l.backward(c.x.view(), c.dy.view(), dx.view(), g, ws, {.sequence_length = c.sequence_length});
                check_gradient(dx.view(), c.grads(), "dx");
                check(l, g);
                ran = true;
            }
        },
        block.layer());
    CHECK(ran);
}

TEST_CASE_TEMPLATE_DEFINE("backward of every gated-expert fixture matches float64 autograd", B, glu_fixtures) {
    const std::vector<std::string> cases = {"mixtral-basic", "mixtral-decode",   "mixtral-tie",       "mixtral-bf16",
                                            "qwen2_moe-basic", "qwen2_moe-norm", "qwen2_moe-bf16",    "olmoe-basic",
                                            "olmoe-norm",     "olmoe-bf16",      "deepseek_v3-basic", "deepseek_v3-nonorm",
                                            "deepseek_v3-decode", "deepseek_v3-bf16"};
    Workspace ws;
    for (const auto& name : cases) {
        CAPTURE(name);
        const GradCase c(name);
        // bf16 checkpoints: the gradients are those of the stored values widened (exact in f32).
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, "", {.storage = dtype::f32});
        const GluBlockNames n = names_of(c.family, c.layer);
        run_backward<GluGradients>(block, c, ws, [&](const auto& l, auto& g) {
            check_gradient(g.gate.view(), c.grads(), "d/" + n.router);
            for (index_t e = 0; e < l.num_experts(); ++e)
                check_glu(g.experts[std::size_t(e)], c.grads(), n.experts + std::to_string(e) + ".", n);
            if constexpr (requires { g.shared.expert; }) {
                check_glu(g.shared.expert, c.grads(), n.shared, n);
                if (!n.shared_gate.empty()) check_gradient(g.shared.gate.view(), c.grads(), "d/" + n.shared_gate);
                else CHECK(g.shared.gate.rows() == 0);
            }
        });
    }
}
TEST_CASE_TEMPLATE_APPLY(glu_fixtures, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("backward of every Switch Transformers fixture matches float64 autograd (capacity drops included)", B,
                          switch_fixtures) {
    Workspace ws;
    for (const std::string name : {"switch_transformers-basic", "switch_transformers-drop", "switch_transformers-tie",
                                   "switch_transformers-decoder"}) {
        CAPTURE(name);
        const GradCase c(name);
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, c.stack);
        const std::string p = c.stack + ".block." + std::to_string(c.layer) + ".layer." + (c.stack == "encoder" ? "1" : "2") + ".mlp.";
        run_backward<FfnGradients>(block, c, ws, [&](const auto& l, auto& g) {
            check_gradient(g.gate.view(), c.grads(), "d/" + p + "router.classifier.weight");
            for (index_t e = 0; e < l.num_experts(); ++e) {
                const std::string q = "d/" + p + "experts.expert_" + std::to_string(e) + ".";
                check_gradient(g.experts[std::size_t(e)].up.view(), c.grads(), q + "wi.weight");
                check_gradient(g.experts[std::size_t(e)].down.view(), c.grads(), q + "wo.weight");
            }
        });
    }
}
TEST_CASE_TEMPLATE_APPLY(switch_fixtures, test::all_backends);

/// The HyperMoE parts' gradients: expert embeddings, projector, and the stack's whole
/// hypernetwork (layer_embed's other rows must stay zero, as in the reference).
template <class G>
void check_hyper_parts(const G& g, const SafeTensorsView& grads, const std::string& mlp, const std::string& gen) {
    check_gradient(g.embedding.view(), grads, "d/" + mlp + "n_experts_embedding.weight");
    check_gradient(g.projector.first.view(), grads, "d/" + mlp + "embedding_process.0.weight");
    check_vector(g.projector.first_bias, grads, "d/" + mlp + "embedding_process.0.bias");
    check_gradient(g.projector.second.view(), grads, "d/" + mlp + "embedding_process.2.weight");
    check_vector(g.projector.second_bias, grads, "d/" + mlp + "embedding_process.2.bias");
    const HypernetworkGradients& h = *g.hypernetwork;
    check_gradient(h.layer_embed.view(), grads, "d/" + gen + "layer_embed.weight");
    const std::string dec = "d/" + gen + "decoder.";
    check_gradient(h.trunk.view(), grads, dec + "linear1.weight");
    check_vector(h.trunk_bias, grads, dec + "linear1.bias");
    check_gradient(h.down_weight.view(), grads, dec + "weight_down.weight");
    check_vector(h.down_weight_bias, grads, dec + "weight_down.bias");
    check_gradient(h.up_weight.view(), grads, dec + "weight_up.weight");
    check_vector(h.up_weight_bias, grads, dec + "weight_up.bias");
    check_gradient(h.down_bias.view(), grads, dec + "bias_down.weight");
    check_vector(h.down_bias_bias, grads, dec + "bias_down.bias");
    check_gradient(h.up_bias.view(), grads, dec + "bias_up.weight");
    check_vector(h.up_bias_bias, grads, dec + "bias_up.bias");
}

/// Runs the backward of a HyperMoE block on the case, checks dx, and hands the layer and its
/// gradients to `check`; fails if the block's layer is not a HyperMoE layer.
template <class Block, class Check>
void run_hyper_backward(const Block& block, const GradCase& c, Workspace& ws, Check&& check) {
    bool ran = false;
    std::visit(
        [&](const auto& l) {
            if constexpr (requires { typename std::decay_t<decltype(l)>::hypernetwork_type; }) {
                auto g = l.make_gradients();
                Matrix<float> dx(c.x.rows(), c.x.cols());
                l.backward(c.x.view(), c.dy.view(), dx.view(), g, ws, {.sequence_length = c.sequence_length});
                check_gradient(dx.view(), c.grads(), "dx");
                check(l, g);
                ran = true;
            }
        },
        block.layer());
    CHECK(ran);
}

TEST_CASE_TEMPLATE_DEFINE("backward of every HyperMoE fixture matches float64 autograd (adapter, projector, embeddings, hypernetwork)",
                          B, hyper_fixtures) {
    Workspace ws;
    for (const std::string name : {"hypermoe_gpt2-k1", "hypermoe_gpt2-k2"}) {
        CAPTURE(name);
        const GradCase c(name);
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, "");
        const std::string p = "transformer.h." + std::to_string(c.layer) + ".mlp.";
        run_hyper_backward(block, c, ws, [&](const auto& l, auto& g) {
            check_transposed(g.moe.gate.view(), c.grads(), "d/" + p + "w_gate");
            for (index_t e = 0; e < l.moe().num_experts(); ++e) {
                const std::string q = "d/" + p + "experts.expert_" + std::to_string(e) + ".";
                const FfnGradients& x = g.moe.experts[std::size_t(e)];
                check_transposed(x.up.view(), c.grads(), q + "c_fc.weight");
                check_vector(x.up_bias, c.grads(), q + "c_fc.bias");
                check_transposed(x.down.view(), c.grads(), q + "c_proj.weight");
                check_vector(x.down_bias, c.grads(), q + "c_proj.bias");
            }
            check_hyper_parts(g, c.grads(), p, "transformer.param_gen.");
        });
    }
    for (const std::string name : {"hypermoe_switch-basic", "hypermoe_switch-drop"}) {
        CAPTURE(name);
        const GradCase c(name);
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, c.stack);
        const std::string p = c.stack + ".block." + std::to_string(c.layer) + ".layer." + (c.stack == "encoder" ? "1" : "2") + ".mlp.";
        run_hyper_backward(block, c, ws, [&](const auto& l, auto& g) {
            check_gradient(g.moe.gate.view(), c.grads(), "d/" + p + "router.classifier.weight");
            for (index_t e = 0; e < l.moe().num_experts(); ++e) {
                const std::string q = "d/" + p + "experts.expert_" + std::to_string(e) + ".";
                check_gradient(g.moe.experts[std::size_t(e)].up.view(), c.grads(), q + "wi.weight");
                check_gradient(g.moe.experts[std::size_t(e)].down.view(), c.grads(), q + "wo.weight");
            }
            check_hyper_parts(g, c.grads(), p, c.stack + ".param_gen.");
        });
    }
}
TEST_CASE_TEMPLATE_APPLY(hyper_fixtures, test::all_backends);

namespace {

/// The MoE part of a loaded block's layer: the layer itself, or a HyperMoE layer's moe().
template <class L>
const auto& moe_part(const L& l) {
    if constexpr (requires { l.moe(); }) return l.moe();
    else return l;
}

/// The router tensor the case's auxiliary-loss gradients are for (from its d_aux_z/ entry).
std::string aux_router(const SafeTensorsView& grads) {
    for (const TensorInfo& t : grads.tensors())
        if (t.name.starts_with("d_aux_z/")) return t.name.substr(8);
    return "";
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("auxiliary losses and their router gradients match every fixture's float64 values", B, aux_fixtures) {
    const std::vector<std::string> cases = {
        "mixtral-basic",   "mixtral-decode",   "mixtral-tie",       "mixtral-bf16",          "qwen2_moe-basic",
        "qwen2_moe-norm",  "qwen2_moe-bf16",   "olmoe-basic",       "olmoe-norm",            "olmoe-bf16",
        "hypermoe_gpt2-k1", "hypermoe_gpt2-k2", "switch_transformers-basic", "switch_transformers-drop",
        "switch_transformers-tie", "switch_transformers-decoder", "hypermoe_switch-basic", "hypermoe_switch-drop"};
    Workspace ws;
    for (const auto& name : cases) {
        CAPTURE(name);
        const GradCase c(name);
        const std::string router = aux_router(c.grads());
        REQUIRE(!router.empty());
        const bool switch_family = c.family == "switch_transformers" || c.family == "hypermoe_switch";
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, c.stack, {.storage = dtype::f32});
        std::visit(
            [&](const auto& l) {
                const auto& moe = moe_part(l);
                const Matrix<float> zero_dy(c.x.rows(), c.x.cols());
                // name in the fixture, the weights that switch on that loss alone
                struct Aux {
                    std::string value, gradient;
                    AuxLossWeights weights;
                };
                std::vector<Aux> losses = {{"aux/switch_lb", "d_aux_lb/", {.load_balancing = 1, .per_sequence = switch_family}},
                                           {"aux/z_loss", "d_aux_z/", {.z_loss = 1}}};
                if (switch_family)
                    losses.push_back({"aux/switch_lb_hf", "d_aux_lb_hf/",
                                      {.load_balancing = 1, .per_sequence = true, .dropped_as_first_expert = true}});
                for (const Aux& a : losses) {
                    CAPTURE(a.value);
                    const Context ctx{.sequence_length = c.sequence_length, .aux_losses = a.weights};
                    // The value, from the plan and logits of a forward call.
                    RoutingPlan plan;
                    Matrix<float> y(c.x.rows(), c.x.cols()), logits(c.x.rows(), moe.num_experts());
                    moe.forward(c.x.view(), y.view(), ws, plan, ctx);
                    moe.router_logits(c.x.view(), logits.view(), ws);
                    const double want = c.grads().to_f32(c.grads().info(a.value))(0, 0);
                    const double got = a.weights.z_loss != 0 ? router_z_loss(logits.view())
                                                             : load_balancing_loss(plan, logits.view(), load_balancing_options(ctx));
                    CHECK(got == doctest::Approx(want).epsilon(1e-5));
                    // The gradient: the layer's backward with dy = 0 and only this loss on.
                    auto g = moe.make_gradients();
                    Matrix<float> dx(c.x.rows(), c.x.cols());
                    moe.backward(c.x.view(), zero_dy.view(), dx.view(), g, ws, ctx);
                    if (c.family == "hypermoe_gpt2") check_transposed(g.gate.view(), c.grads(), a.gradient + router);
                    else check_gradient(g.gate.view(), c.grads(), a.gradient + router);
                }
            },
            block.layer());
    }
}
TEST_CASE_TEMPLATE_APPLY(aux_fixtures, test::all_backends);
