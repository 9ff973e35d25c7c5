// Backward of whole MoE blocks loaded from the fixtures' checkpoints (every family, HyperMoE
// included), through the loader's own tensor names (LoadedMoeBlock::gradients), against the float64
// autograd gradients in each case's grads.safetensors (tests/data/README.md, "Backward"):
// dx and d/<tensor> for every tensor the block reads, per tensor within 1e-5 of its largest
// entry, exact zeros for the experts no token reaches; on every backend.

#include <doctest/doctest.h>

#include <set>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;
using test::relative_error;

namespace {

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
        : dir(test::data_dir + "/" + name), input(dir + "/input.safetensors"), grads_file(dir + "/grads.safetensors"),
          layer(std::stoll(input.view().metadata().at("layer"))), family(input.view().metadata().at("family")),
          stack(input.view().metadata().count("stack") ? input.view().metadata().at("stack") : ""),
          x(input.view().to_f32(input.view().info("x"))), dy(grads().to_f32(grads().info("dy"))),
          sequence_length(input.view().info("x").shape.size() == 3 ? input.view().info("x").shape[1] : 0) {}
    [[nodiscard]] const SafeTensorsView& grads() const { return grads_file.view(); }
};

TEST_CASE_TEMPLATE_DEFINE("backward of every fixture block matches float64 autograd, named as the loader bound each tensor", B,
                          fixture_gradients) {
    Workspace ws;
    for (const auto& name : test::fixture_cases) {
        CAPTURE(name);
        const GradCase c(name);
        // bf16 checkpoints: the gradients are those of the stored values widened (exact in f32).
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, c.stack, {.storage = dtype::f32});
        Matrix<float> dx(c.x.rows(), c.x.cols());
        const std::vector<TensorToWrite> got = block.gradients(c.x.view(), c.dy.view(), dx.view(), ws, {.sequence_length = c.sequence_length});
        check_gradient(dx.view(), c.grads(), "dx");
        // The same set of names as the reference: every tensor the block reads, no other.
        std::set<std::string> want, have;
        for (const TensorInfo& t : c.grads().tensors())
            if (t.name.starts_with("d/")) want.insert(t.name);
        for (const TensorToWrite& t : got) {
            have.insert(t.name);
            // folded as to_f32 folds the reference: the last dimension is the columns
            index_t numel = 1;
            for (const index_t n : t.shape) numel *= n;
            const index_t cols = t.shape.back(), rows = numel / cols;
            check_gradient(ConstMatrixView<float>(reinterpret_cast<const float*>(t.bytes.data()), rows, cols), c.grads(), t.name);
        }
        CHECK(have == want);
    }
}
TEST_CASE_TEMPLATE_APPLY(fixture_gradients, test::all_backends);

namespace {

/// The MoE part of a loaded block's layer: the layer itself, or a HyperMoE layer's moe().
template <class L>
const auto& moe_part(const L& l) {
    if constexpr (requires { l.moe(); }) return l.moe();
    else return l;
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("auxiliary losses and their router gradients match every fixture's float64 values", B, aux_fixtures) {
    Workspace ws;
    for (const auto& name : test::fixture_cases) {
        CAPTURE(name);
        const GradCase c(name);
        if (c.family == "deepseek_v3") continue; // no auxiliary loss (noaux_tc)
        const bool switch_family = c.family == "switch_transformers" || c.family == "hypermoe_switch";
        const auto block = load_moe_block<B>(Checkpoint(c.dir), c.layer, c.stack, {.storage = dtype::f32});
        const TensorName& router = block.parameter_names().router;
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
                    // In the checkpoint's layout, as the loader named it ("d/" + name).
                    Matrix<float> gate(router.transposed ? g.gate.cols() : g.gate.rows(), router.transposed ? g.gate.rows() : g.gate.cols());
                    for (index_t r = 0; r < g.gate.rows(); ++r)
                        for (index_t col = 0; col < g.gate.cols(); ++col) (router.transposed ? gate(col, r) : gate(r, col)) = g.gate(r, col);
                    check_gradient(gate.view(), c.grads(), a.gradient + router.name);
                }
            },
            block.layer());
    }
}
TEST_CASE_TEMPLATE_APPLY(aux_fixtures, test::all_backends);
