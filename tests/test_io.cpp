#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "gguf_writer.hpp"
#include "test_support.hpp"
#include "tinymoe_family.hpp"

using namespace hypermoe;
using test::TempDir;
using test::relative_error;
namespace fs = std::filesystem;

namespace {

struct Expected {
    SafeTensorsFile input, expected;
    explicit Expected(const std::string& dir)
        : input(dir + "/input.safetensors"), expected(dir + "/expected.safetensors") {}
    [[nodiscard]] Matrix<float> x() const { return input.view().to_f32(input.view().info("x")); }
    [[nodiscard]] Matrix<float> out(const char* name) const { return expected.view().to_f32(expected.view().info(name)); }
    [[nodiscard]] index_t layer() const { return std::stoll(input.view().metadata().at("layer")); }
    [[nodiscard]] std::string stack() const {
        const auto& m = input.view().metadata();
        return m.count("stack") ? m.at("stack") : "";
    }
    [[nodiscard]] index_t sequence_length() const { return input.view().info("x").shape.size() == 3 ? input.view().info("x").shape[1] : 0; }
};

/// y, expert ids, weights, kept (and hyper_out) of `block` against the fixture.
template <class B>
void check_block(const LoadedMoeBlock<B>& block, const Expected& e, const char* y_name = "y") {
    const Matrix<float> x = e.x();
    Matrix<float> y(x.rows(), x.cols());
    RoutingPlan plan;
    Workspace ws;
    block.forward(x.view(), y.view(), ws, plan, {.sequence_length = e.sequence_length()});
    CHECK(relative_error(y.view(), e.out(y_name).view()) <= 1e-5);
    const Matrix<float> ids = e.out("expert_ids"), w = e.out("expert_weights");
    REQUIRE(plan.slots() == ids.cols());
    for (index_t t = 0; t < ids.rows(); ++t)
        for (index_t j = 0; j < ids.cols(); ++j) {
            CHECK(plan.ids(t)[std::size_t(j)] == std::int32_t(ids(t, j)));
            CHECK(plan.weights(t)[std::size_t(j)] == doctest::Approx(w(t, j)).epsilon(1e-5));
        }
    if (e.expected.view().contains("kept")) {
        const Matrix<float> kept = e.out("kept");
        for (index_t t = 0; t < kept.cols(); ++t) CHECK(plan.kept(t) == (kept(0, t) != 0));
    }
    if (block.is_hyper()) {
        Matrix<float> h(x.rows(), x.cols());
        block.hyper_term(x.view(), plan, h.view(), ws);
        CHECK(relative_error(h.view(), e.out("hyper_out").view()) <= 1e-5);
    }
}

void write_file(const fs::path& p, const std::vector<std::byte>& bytes) {
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}
std::vector<std::byte> read_file(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> b(c.size());
    std::memcpy(b.data(), c.data(), c.size());
    return b;
}
/// An image with a hand-written header (for corruptions the writer would never produce).
std::vector<std::byte> image(const std::string& header, std::size_t data_bytes) {
    std::vector<std::byte> b(8 + header.size() + data_bytes);
    for (int i = 0; i < 8; ++i) b[std::size_t(i)] = std::byte((header.size() >> (8 * i)) & 0xFF);
    std::memcpy(b.data() + 8, header.data(), header.size());
    return b;
}
std::string open_error(const std::vector<std::byte>& bytes) {
    try {
        SafeTensorsView v(bytes, "f.safetensors");
    } catch (const weight_error& e) {
        return e.what();
    }
    return "no error";
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("every fixture through the checkpoint loader", B, loader_fixtures) {
    for (const auto& name : test::fixture_cases) {
        CAPTURE(name);
        const std::string dir = test::data_dir + "/" + name;
        const Checkpoint ck(dir);
        const Expected e(dir);
        for (const HyperMode mode : {HyperMode::cached, HyperMode::per_token}) {
            const auto block = load_moe_block<B>(ck, e.layer(), e.stack(), {.hyper = {.mode = mode}});
            check_block(block, e);
            if (!block.is_hyper()) break;
        }
        if (e.expected.view().contains("y_zero_drop"))
            check_block(load_moe_block<B>(ck, e.layer(), e.stack(), {.dropped = DroppedTokens::zero}), e, "y_zero_drop");
    }
}
TEST_CASE_TEMPLATE_APPLY(loader_fixtures, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("a loaded block is a Layer: in a stack, the context reaches its router", B, block_in_stack) {
    static_assert(Layer<LoadedMoeBlock<B>>);
    for (const auto& name : test::fixture_cases) {
        CAPTURE(name);
        const std::string dir = test::data_dir + "/" + name;
        const Expected e(dir);
        const Matrix<float> x = e.x();
        DynamicStack dynamic;
        dynamic.push_back(load_moe_block<B>(Checkpoint(dir), e.layer(), e.stack()));
        const Sequential fixed(load_moe_block<B>(Checkpoint(dir), e.layer(), e.stack()));
        for (const bool use_fixed : {false, true}) {
            CAPTURE(use_fixed);
            RoutingRecorder recorder;
            const Context ctx{.sequence_length = e.sequence_length(), .routing_sink = &recorder};
            Matrix<float> y(x.rows(), x.cols());
            Workspace ws(use_fixed ? fixed.workspace_bytes(x.rows()) : dynamic.workspace_bytes(x.rows()),
                         WorkspaceGrowth::fixed);
            if (use_fixed) fixed.forward(x.view(), y.view(), ws, ctx);
            else dynamic.forward(x.view(), y.view(), ws, ctx);
            // The fixture's output: per-sequence capacity (Switch) came through the stack.
            CHECK(relative_error(y.view(), e.out("y").view()) <= 1e-5);
            REQUIRE(recorder.plans().size() == 1);
            const Matrix<float> ids = e.out("expert_ids");
            for (index_t t = 0; t < ids.rows(); ++t) CHECK(recorder.plans()[0].ids(t)[0] == std::int32_t(ids(t, 0)));
            if (e.expected.view().contains("kept")) {
                const Matrix<float> kept = e.out("kept");
                for (index_t t = 0; t < kept.cols(); ++t) CHECK(recorder.plans()[0].kept(t) == (kept(0, t) != 0));
            }
        }
    }
    // Without the sequence layout the whole batch is one sequence: the capacity-limited fixture's
    // output changes (so the test above could fail).
    const std::string dir = test::data_dir + "/switch_transformers-drop";
    const Expected e(dir);
    const Matrix<float> x = e.x();
    const Sequential stack(load_moe_block<B>(Checkpoint(dir), e.layer(), e.stack()));
    Matrix<float> y(x.rows(), x.cols());
    Workspace ws;
    stack.forward(x.view(), y.view(), ws);
    CHECK(relative_error(y.view(), e.out("y").view()) > 1e-3);
}
TEST_CASE_TEMPLATE_APPLY(block_in_stack, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("load_model loads every MoE block once, one hypernetwork per stack", B, whole_model) {
    // Every fixture: the model's blocks are describe()'s, each the same as loading it alone.
    for (const auto& name : test::fixture_cases) {
        CAPTURE(name);
        const Checkpoint ck(test::data_dir + "/" + name);
        const LoadedModel<B> model = load_model<B>(ck);
        REQUIRE(model.size() == describe(ck).moe_blocks.size());
        const Expected e(ck.dir());
        const auto& block = model.block(e.layer(), e.stack());
        CHECK(block.block() == MoeBlockRef{e.layer(), e.stack()});
        const Matrix<float> x = e.x();
        Matrix<float> y(x.rows(), x.cols()), alone(x.rows(), x.cols());
        Workspace ws;
        const Context ctx{.sequence_length = e.sequence_length()};
        block.forward(x.view(), y.view(), ws, ctx);
        load_moe_block<B>(ck, e.layer(), e.stack()).forward(x.view(), alone.view(), ws, ctx);
        CHECK(relative_error(y.view(), alone.view()) == 0.0);
    }
    // Several HyperMoE blocks per stack: one hypernetwork per stack, shared by address.
    for (const Family hyper_family : {family("hypermoe_gpt2"), family("hypermoe_switch")}) {
        CAPTURE(to_string(hyper_family));
        const TempDir dir(std::string("model-") + std::string(to_string(hyper_family)));
        write_synthetic_checkpoint(dir.path.string(), {.family = hyper_family, .d_model = 16, .d_ff = 32, .experts = 4,
                                                       .top_k = hyper_family == family("hypermoe_gpt2") ? 2 : 1, .layers = 4});
        const LoadedModel<B> model = load_model<B>(Checkpoint(dir.path.string()));
        const bool two_stacks = hyper_family == family("hypermoe_switch");
        REQUIRE(model.size() == 4u); // gpt2: blocks 0-3; switch: blocks 1 and 3 of each stack
        for (const auto& b : model) {
            const auto& first = model.blocks()[b.block().stack == "decoder" ? 2 : 0];
            CHECK(b.shared_hypernetwork() == first.shared_hypernetwork());
        }
        if (two_stacks) CHECK(model.blocks()[0].shared_hypernetwork() != model.blocks()[2].shared_hypernetwork());
        CHECK_THROWS_WITH_AS((void)model.block(two_stacks ? 2 : 9),
                             doctest::Contains(two_stacks ? "block encoder 2 is not an MoE block; MoE blocks: encoder 1, "
                                                            "encoder 3, decoder 1, decoder 3"
                                                          : "block 9 is not an MoE block; MoE blocks: 0, 1, 2, 3"),
                             config_error);
    }
}
TEST_CASE_TEMPLATE_APPLY(whole_model, test::all_backends);

TEST_CASE("the family list: names, detection and layer types derived from FamilyList") {
    CHECK(supported_families == "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, switch_transformers, hypermoe_gpt2, hypermoe_switch");
    CHECK(all_families().size() == FamilyList::size);
    for (const Family f : all_families()) {
        CAPTURE(to_string(f));
        CHECK(find_family(to_string(f)) == f);
        CHECK(visit_family(f, []<class F>(std::type_identity<F>) { return F::name; }) == to_string(f));
    }
    CHECK(!find_family("llama").has_value());
    static_assert(family("olmoe") == family_of<families::Olmoe>);
    static_assert(to_string(family_of<families::HyperMoeSwitch>) == "hypermoe_switch");
    CHECK(has_two_stacks(family("switch_transformers")));
    CHECK(!has_two_stacks(family("mixtral")));
    // mixtral and olmoe (and qwen2_moe without a shared expert) share one layer type: the variant
    // holds each type once.
    // deepseek_v3: sigmoid and softmax scores; hypermoe_gpt2: clean and noisy gating; gpt_oss its own.
    static_assert(std::variant_size_v<LoadedMoeBlock<reference>::Layer> == 9);
}

TEST_CASE_TEMPLATE_DEFINE("every family loads the synthetic checkpoint it writes", B, family_round_trip) {
    for (const Family f : all_families()) {
        CAPTURE(to_string(f));
        const TempDir dir(std::string("round-trip-") + std::string(to_string(f)));
        write_synthetic_checkpoint(dir.path.string(), {.family = f, .d_model = 16, .d_ff = 32, .experts = 8, .top_k = 2,
                                                       .layers = 2, .capacity = 4});
        const Checkpoint ck(dir.path.string());
        const ModelInfo info = describe(ck);
        CHECK(info.family == f);
        CHECK(info.d_model == 16);
        const LoadedModel<B> model = load_model<B>(ck);
        REQUIRE(model.size() == info.moe_blocks.size());
        REQUIRE(model.size() > 0u);
        CHECK(model.blocks().front().is_hyper() == (info.adapter_rank > 0));
        CHECK(model.blocks().front().has_capacity() == has_two_stacks(f));
        const Matrix<float> x = test::random_matrix(5, 16, 3);
        Matrix<float> y(5, 16);
        Workspace ws;
        for (const auto& block : model) {
            block.forward(x.view(), y.view(), ws, Context{.sequence_length = 5});
            CHECK(std::all_of(y.data(), y.data() + 5 * 16, [](float v) { return std::isfinite(v); }));
            CHECK(relative_error(y.view(), x.view()) > 0.0);
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(family_round_trip, test::all_backends);

TEST_CASE("qwen2_moe without a shared expert (shared_expert_intermediate_size 0) is the routed experts alone") {
    // The same block twice: once with its shared expert's down_proj zeroed (so the shared term is
    // exactly 0), once with shared_expert_intermediate_size 0 and no shared tensors at all.
    TempDir zeroed("qwen2-zeroed-shared"), none("qwen2-no-shared");
    const fs::path src = test::data_dir + "/qwen2_moe-basic";
    fs::copy_file(src / "config.json", zeroed.path / "config.json");
    nlohmann::json config = nlohmann::json::parse(std::ifstream(src / "config.json"));
    config["shared_expert_intermediate_size"] = 0;
    std::ofstream(none.path / "config.json") << config.dump();
    SafeTensorsFile model((src / "model.safetensors").string());
    std::vector<TensorToWrite> with_zero, without;
    for (const auto& t : model.view().tensors()) {
        const auto data = model.view().data(t);
        TensorToWrite w{t.name, t.dtype, t.shape, {data.begin(), data.end()}};
        const bool shared = t.name.find(".shared_expert") != std::string::npos;
        if (t.name.ends_with("shared_expert.down_proj.weight")) std::fill(w.bytes.begin(), w.bytes.end(), std::byte{0});
        if (!shared) without.push_back(w);
        with_zero.push_back(std::move(w));
    }
    write_safetensors((zeroed.path / "model.safetensors").string(), with_zero);
    write_safetensors((none.path / "model.safetensors").string(), without);
    const Checkpoint a(zeroed.path.string()), b(none.path.string());
    CHECK(describe(b).shared_ff == 0);
    const Matrix<float> x = test::random_matrix(6, 32, 8);
    for (const index_t layer : {0, 1}) {
        const auto with_shared = load_moe_block<reference>(a, layer), routed = load_moe_block<reference>(b, layer);
        Matrix<float> ya(6, 32), yb(6, 32);
        Workspace ws;
        with_shared.forward(x.view(), ya.view(), ws);
        routed.forward(x.view(), yb.view(), ws);
        CHECK(relative_error(yb.view(), ya.view()) <= 1e-7);
        CHECK(relative_error(yb.view(), x.view()) > 0.0);
    }
}

TEST_CASE_TEMPLATE_DEFINE("qwen3_moe: the olmoe fixtures' blocks under Qwen3-MoE's config, and as a qwen3moe GGUF file, give their outputs",
                          B, qwen3_fixtures) {
    // Qwen3-MoE's block is OLMoE's (the same tensor names; softmax top-k, renormalised when
    // norm_topk_prob), its expert width under moe_intermediate_size: the fixtures' expected
    // outputs, computed by the reference implementation, are Qwen3-MoE's under that config.
    for (const char* name : {"olmoe-basic", "olmoe-norm"}) {
        CAPTURE(name);
        const fs::path src = test::data_dir + "/" + name;
        const nlohmann::json olmoe = nlohmann::json::parse(std::ifstream(src / "config.json"));
        const index_t ff = olmoe.at("intermediate_size").get<index_t>();
        const nlohmann::json config = {{"model_type", "qwen3_moe"},
                                       {"hidden_size", olmoe.at("hidden_size")},
                                       {"num_hidden_layers", olmoe.at("num_hidden_layers")},
                                       {"num_experts", olmoe.at("num_experts")},
                                       {"num_experts_per_tok", olmoe.at("num_experts_per_tok")},
                                       {"norm_topk_prob", olmoe.value("norm_topk_prob", false)},
                                       {"moe_intermediate_size", ff},
                                       {"intermediate_size", 3 * ff}, // the dense layers' width: not the experts'
                                       {"decoder_sparse_step", 1},
                                       {"mlp_only_layers", nlohmann::json::array()},
                                       {"hidden_act", "silu"}};
        const TempDir dir(std::string("qwen3-") + name);
        std::ofstream(dir.path / "config.json") << config.dump();
        fs::copy_file(src / "model.safetensors", dir.path / "model.safetensors");
        const Checkpoint ck(dir.path.string());
        const Expected e(src.string());
        const ModelInfo info = describe(ck);
        CHECK(info.family == family("qwen3_moe"));
        CHECK(info.d_ff == ff);
        CHECK(info.shared_ff == 0);
        CHECK(info.moe_blocks == std::vector<MoeBlockRef>{{0, ""}, {1, ""}});
        check_block(load_moe_block<B>(ck, e.layer()), e);
        // llama.cpp writes qwen3moe files without norm_topk_prob and renormalises, as the Qwen3-MoE
        // checkpoints do: the renormalised fixture's outputs.
        if (!config.at("norm_topk_prob").get<bool>()) continue;
        const std::string file = (dir.path / "q.gguf").string();
        test::gguf_from(ck).write(file);
        const Checkpoint g(file);
        CHECK(describe(g).family == family("qwen3_moe"));
        check_block(load_moe_block<B>(g, e.layer()), e);
    }
}
TEST_CASE_TEMPLATE_APPLY(qwen3_fixtures, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("docs/checkpoints.md's walk-through adapter loads what it writes", B, walkthrough) {
    // TinyMoe draws the same random weights as mixtral (same shapes, same order), under its own
    // names: its block equals mixtral's bitwise.
    using families::TinyMoe;
    const SyntheticModel m{.family = family("mixtral"), .d_model = 16, .d_ff = 32, .experts = 4, .top_k = 2, .layers = 2};
    const TempDir tiny("tinymoe"), mixtral("tinymoe-mixtral");
    detail::SyntheticWriter w(m.seed, m.weights);
    nlohmann::json config;
    TinyMoe::write_synthetic(m, w, config);
    write_file_bytes((tiny.path / "model.safetensors").string(), w.image());
    std::ofstream(tiny.path / "config.json") << config.dump();
    write_synthetic_checkpoint(mixtral.path.string(), m);

    const Checkpoint ck(tiny.path.string());
    const ConfigReader c(ck.config(), "config.json");
    REQUIRE(TinyMoe::matches(c));
    ModelInfo info;
    TinyMoe::describe(c, info);
    CHECK(info.moe_blocks == std::vector<MoeBlockRef>{{0, ""}, {1, ""}});
    const MoeBlockRef ref{1, ""};
    TensorBinder t(ck, "tinymoe block 1");
    const LoadOptions opt;
    BlockSource<B> source{c, info, ref, t, opt, nullptr};
    using Out = std::variant<SwiGluTopKLayer<B>>;
    const Out layer = TinyMoe::load<Out>(source);

    const Matrix<float> x = test::random_matrix(7, 16, 5);
    Matrix<float> y(7, 16), want(7, 16);
    Workspace ws;
    std::get<0>(layer).forward(x.view(), y.view(), ws);
    load_moe_block<B>(Checkpoint(mixtral.path.string()), 1).forward(x.view(), want.view(), ws);
    CHECK(relative_error(y.view(), want.view()) == 0.0);
    CHECK(relative_error(y.view(), x.view()) > 0.0);
}
TEST_CASE_TEMPLATE_APPLY(walkthrough, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("bf16 / q8_0 / q4_0 / mxfp4 / q4_k expert storage, exact and fast: each fixture's error against the f32 oracle", B,
                          block_storage_fixtures) {
    // Routing reads the (unquantised) router, so only the experts' outputs move: by about the
    // formats' step, relative to the weights (bf16: 2^-9, q8_0: 1/254 of a block's largest,
    // q4_0: 1/16, mxfp4: up to 1/6 of the power of two at or below it), and with `fast` also by the activations' step (bf16's, or 8 bits per block). The bounds are about
    // twice the worst measured (docs/checkpoints.md).
    struct Format {
        dtype storage;
        precision prec;
        double bound;
    };
    const std::array<Format, 10> formats{{{dtype::bf16, precision::exact, 1e-2},
                                         {dtype::bf16, precision::fast, 2e-2},
                                         {dtype::q8_0, precision::exact, 3e-2},
                                         {dtype::q8_0, precision::fast, 6e-2},
                                         {dtype::q4_0, precision::exact, 5e-1},
                                         {dtype::q4_0, precision::fast, 5e-1},
                                         {dtype::mxfp4, precision::exact, 5e-1},
                                         {dtype::mxfp4, precision::fast, 5e-1},
                                         {dtype::q4_k, precision::exact, 4e-1},
                                         {dtype::q4_k, precision::fast, 4e-1}}};
    for (const Format& f : formats) {
        const dtype format = f.storage;
        const double bound = f.bound;
        CAPTURE(to_string(format));
        CAPTURE(to_string(f.prec));
        std::vector<double> errors, rms_errors, kernel_errors{0.0};
        for (const auto& name : test::fixture_cases) {
            CAPTURE(name);
            const std::string dir = test::data_dir + "/" + name;
            const Expected e(dir);
            const Matrix<float> x = e.x();
            const auto block = load_moe_block<B>(Checkpoint(dir), e.layer(), e.stack(), {.storage = format, .prec = f.prec});
            Matrix<float> y(x.rows(), x.cols());
            RoutingPlan plan;
            Workspace ws;
            block.forward(x.view(), y.view(), ws, plan, Context{.sequence_length = e.sequence_length()});
            const double err = relative_error(y.view(), e.out("y").view());
            CHECK(err <= bound);
            errors.push_back(err);
            rms_errors.push_back(test::relative_rms_error(y.view(), e.out("y").view()));
            if (f.prec == precision::fast) { // the kernel's own error: fast against exact on the same blocks
                const auto exact = load_moe_block<B>(Checkpoint(dir), e.layer(), e.stack(), {.storage = format});
                Matrix<float> y_exact(x.rows(), x.cols());
                exact.forward(x.view(), y_exact.view(), ws, plan, Context{.sequence_length = e.sequence_length()});
                kernel_errors.push_back(test::relative_rms_error(y.view(), y_exact.view()));
            }
        }
        std::sort(errors.begin(), errors.end());
        std::sort(rms_errors.begin(), rms_errors.end());
        CHECK(errors.back() > 0.0);
        MESSAGE(B::name, " ", to_string(format), " ", to_string(f.prec), ": relative error over the fixtures: median ", errors[errors.size() / 2],
                ", worst ", errors.back(), "; relative RMS error: median ", rms_errors[rms_errors.size() / 2], ", worst ", rms_errors.back(),
                "; against exact on the same weights: worst ", *std::max_element(kernel_errors.begin(), kernel_errors.end()));
    }
}
TEST_CASE_TEMPLATE_APPLY(block_storage_fixtures, test::all_backends);

TEST_CASE("releasing a packed tensor's pages keeps its bytes, and leaves memory outside the mapping alone") {
    const std::string dir = test::data_dir + "/mixtral-basic";
    const Checkpoint ck(dir);
    TensorBinder t(ck, "test");
    const WeightView w = t.matrix("model.layers.1.block_sparse_moe.experts.0.w1.weight", 40, 32);
    REQUIRE(!w.extent().empty());
    std::vector<float> before;
    for (index_t r = 0; r < w.rows(); ++r)
        for (index_t c = 0; c < w.cols(); ++c) before.push_back(w.at(r, c));
    t.release(w); // a read-only private file mapping: the pages fault back in from the file
    std::size_t i = 0;
    for (index_t r = 0; r < w.rows(); ++r)
        for (index_t c = 0; c < w.cols(); ++c) CHECK(w.at(r, c) == before[i++]);
    // A view of the caller's own memory is not the checkpoint's: releasing it must not zero it.
    Matrix<float> own = test::random_matrix(64, 1024, 3); // 256 KiB: whole pages inside it
    const Matrix<float> copy = own;
    t.release(WeightView(ConstMatrixView<float>(own.view())));
    CHECK(relative_error(own.view(), copy.view()) == 0.0);
    // Loading releases each expert's pages as it goes; the loaded block still equals the fixture.
    const Expected e(dir);
    const auto block = load_moe_block<reference>(ck, e.layer());
    const Matrix<float> x = e.x();
    Matrix<float> y(x.rows(), x.cols());
    RoutingPlan plan;
    Workspace ws;
    block.forward(x.view(), y.view(), ws, plan);
    CHECK(relative_error(y.view(), e.out("y").view()) <= 1e-5);
}

TEST_CASE("bf16 storage of f32 weights stays within bf16 rounding") {
    const std::string dir = test::data_dir + "/mixtral-basic";
    const Checkpoint ck(dir);
    const Expected e(dir);
    const auto block = load_moe_block<reference>(ck, 1, "", {.storage = dtype::bf16});
    const Matrix<float> x = e.x();
    Matrix<float> y(x.rows(), x.cols());
    RoutingPlan plan;
    Workspace ws;
    block.forward(x.view(), y.view(), ws, plan);
    const double err = relative_error(y.view(), e.out("y").view());
    CHECK(err > 0);
    CHECK(err <= 2e-2);
}

TEST_CASE("describe lists the MoE blocks of each family") {
    const ModelInfo q = describe(Checkpoint(test::data_dir + "/qwen2_moe-norm"));
    CHECK(q.family == family("qwen2_moe"));
    CHECK(q.moe_blocks == std::vector<MoeBlockRef>{{1, ""}}); // layer 0 is in mlp_only_layers
    // Qwen3-MoE takes Qwen2-MoE's rule: not in mlp_only_layers, (l + 1) % decoder_sparse_step == 0.
    nlohmann::json q3 = {{"model_type", "qwen3_moe"}, {"hidden_size", 8},         {"num_hidden_layers", 6},
                         {"num_experts", 4},          {"num_experts_per_tok", 2}, {"moe_intermediate_size", 4},
                         {"decoder_sparse_step", 2},  {"mlp_only_layers", {3}}};
    CHECK(describe(q3, "q3.json").moe_blocks == std::vector<MoeBlockRef>{{1, ""}, {5, ""}});
    CHECK(describe(q3, "q3.json").routing == "softmax, top-k, not renormalised"); // Qwen3MoeConfig's default
    q3.erase("moe_intermediate_size");
    CHECK_THROWS_WITH_AS((void)describe(q3, "q3.json"), "q3.json: missing key 'moe_intermediate_size'", config_error);
    const ModelInfo d = describe(Checkpoint(test::data_dir + "/deepseek_v3-basic"));
    CHECK(d.moe_blocks == std::vector<MoeBlockRef>{{1, ""}, {2, ""}});
    CHECK(d.shared_ff == 8);
    const ModelInfo s = describe(Checkpoint(test::data_dir + "/switch_transformers-decoder"));
    CHECK(s.moe_blocks == std::vector<MoeBlockRef>{{1, "encoder"}, {1, "decoder"}});
    const ModelInfo h = describe(Checkpoint(test::data_dir + "/hypermoe_gpt2-k2"));
    CHECK(h.family == family("hypermoe_gpt2"));
    CHECK(h.adapter_rank == 8);
    CHECK(h.dtypes == std::set<std::string>{"F32"});
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(test::data_dir + "/deepseek_v3-basic"), 0),
                         doctest::Contains("block 0 is not an MoE block; MoE blocks: 1, 2"), config_error);
    // DeepSeek's moe_layer_freq: every freq-th layer from first_k_dense_replace on.
    nlohmann::json config = Checkpoint(test::data_dir + "/deepseek_v3-basic").config();
    config["num_hidden_layers"] = 7, config["first_k_dense_replace"] = 1, config["moe_layer_freq"] = 2;
    CHECK(describe(config, "c.json").moe_blocks == std::vector<MoeBlockRef>{{2, ""}, {4, ""}, {6, ""}});
    config["moe_layer_freq"] = 0;
    CHECK_THROWS_WITH_AS((void)describe(config, "c.json"), "c.json: 'moe_layer_freq' is 0, expected >= 1", config_error);
    // Switch's router_bias: the classifier's bias is not loaded, so a model with one is refused.
    nlohmann::json sw = Checkpoint(test::data_dir + "/switch_transformers-basic").config();
    sw["router_bias"] = true;
    CHECK_THROWS_WITH_AS((void)describe(sw, "s.json"),
                         "s.json: 'router_bias' is true, supported: false (the router classifier's bias is not loaded)",
                         config_error);
    // gpt-oss: every block MoE; its SwiGLU's clamp is SwiGluOai's 7.
    nlohmann::json oss = Checkpoint(test::data_dir + "/gpt_oss-basic").config();
    const ModelInfo o = describe(oss, "o.json");
    CHECK(o.moe_blocks == std::vector<MoeBlockRef>{{0, ""}, {1, ""}});
    CHECK(o.top_k == 4);
    oss["swiglu_limit"] = 10;
    CHECK_THROWS_WITH_AS((void)describe(oss, "o.json"),
                         "o.json: swiglu_limit is 10, expected 7 (the clamp of gpt-oss's SwiGLU, SwiGluOai, is fixed)", config_error);
}

TEST_CASE("malformed safetensors images give weight_errors naming the problem") {
    CHECK(open_error(std::vector<std::byte>(5)) == "f.safetensors: file has 5 bytes, expected at least 8 (the header length)");
    auto past = image("{}", 0);
    past[0] = std::byte(200);
    CHECK(open_error(past) == "f.safetensors: header length is 200 bytes, but only 2 bytes follow");
    CHECK(open_error(image("{not json", 0)).rfind("f.safetensors: header is not valid JSON", 0) == 0);
    CHECK(open_error(image("[1,2]", 0)) == "f.safetensors: header is not a JSON object");
    CHECK(open_error(image(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4)) ==
          "f.safetensors: tensor 'a': unknown dtype 'F33'");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4)) ==
          "f.safetensors: tensor 'a': holds 4 bytes, but F32 [2] needs 8");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}})", 4)) ==
          "f.safetensors: tensor 'a': data_offsets [0, 8] run past the 4 data bytes of the file");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4)) ==
          "f.safetensors: tensor 'a': data_offsets [4, 0] are reversed");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)) ==
          "f.safetensors: tensor 'a': shape [-1] has an entry that is not a non-negative integer");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)) ==
          "f.safetensors: tensors 'a' [0, 8) and 'b' [4, 8) overlap");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)) ==
          "f.safetensors: tensor name 'a' appears twice in the header");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1]}})", 4)) ==
          "f.safetensors: tensor 'a': entry needs dtype, shape and data_offsets");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8)) ==
          "f.safetensors: tensor 'a': data_offsets [0,4,8] is not a pair of non-negative integers");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4)) ==
          "f.safetensors: tensor 'a': data_offsets [-4,0] is not a pair of non-negative integers");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[4611686018427387904, 4611686018427387904],"data_offsets":[0,4]}})", 4)) ==
          "f.safetensors: tensor 'a': shape [4611686018427387904,4611686018427387904] has too many elements");
    CHECK(open_error(image(R"({"a":{"dtype":"F32","shape":[35184372088832, 8796093022208, 0],"data_offsets":[0,0]}})", 4)) ==
          "f.safetensors: tensor 'a': shape [35184372088832,8796093022208,0] has too many elements");
}

TEST_CASE("a truncated checkpoint file and broken checkpoints are reported, nothing crashes") {
    TempDir tmp("broken");
    const fs::path src = test::data_dir + "/mixtral-basic";
    fs::copy_file(src / "config.json", tmp.path / "config.json");
    auto bytes = read_file(src / "model.safetensors");
    bytes.resize(bytes.size() - 100);
    write_file(tmp.path / "model.safetensors", bytes);
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()), doctest::Contains("run past the"), weight_error);

    // Missing and mis-shaped tensors: every problem of the layer in one error.
    SafeTensorsFile model((src / "model.safetensors").string());
    std::vector<TensorToWrite> tensors;
    for (const auto& t : model.view().tensors()) {
        if (t.name == "model.layers.1.block_sparse_moe.experts.2.w3.weight" ||
            t.name == "model.layers.1.block_sparse_moe.experts.0.w1.weight")
            continue;
        const auto data = model.view().data(t);
        TensorToWrite w{t.name, t.dtype, t.shape, {data.begin(), data.end()}};
        if (t.name == "model.layers.1.block_sparse_moe.gate.weight") w.shape = {32, 4};
        tensors.push_back(std::move(w));
    }
    write_safetensors((tmp.path / "model.safetensors").string(), tensors);
    const Checkpoint ck(tmp.path.string());
    const std::string file = (tmp.path / "model.safetensors").string();
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 1),
                         (tmp.path.string() + ": mixtral block 1: 3 problems with its tensors:\n"
                          "  '" + "model.layers.1.block_sparse_moe.gate.weight' in " + file + " has shape [32, 4], expected [4, 32]\n"
                          "  missing tensor 'model.layers.1.block_sparse_moe.experts.0.w1.weight'\n"
                          "  missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'").c_str(),
                         weight_error);
    // Layer 0 is intact.
    CHECK_NOTHROW((void)load_moe_block<reference>(ck, 0));

    // Wrong dtype of a weight.
    for (auto& t : tensors)
        if (t.name == "model.layers.0.block_sparse_moe.gate.weight") t.dtype = tensor_dtype::i32;
    write_safetensors((tmp.path / "model.safetensors").string(), tensors);
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(tmp.path.string()), 0),
                         doctest::Contains(("'model.layers.0.block_sparse_moe.gate.weight' in " + file +
                                            " has dtype I32, expected F32, BF16, F16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4, "
                                            "Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or IQ4_XS").c_str()),
                         weight_error);

    // Bad config.json and unknown families.
    std::ofstream(tmp.path / "config.json") << "{\"model_type\": \"llama\"}";
    CHECK_THROWS_WITH_AS((void)describe(Checkpoint(tmp.path.string())),
                         (tmp.path.string() + "/config.json: model_type \"llama\" is not a supported family; supported: "
                          "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, switch_transformers, hypermoe_gpt2, hypermoe_switch").c_str(),
                         config_error);
    std::ofstream(tmp.path / "config.json") << "{\"model_type\": \"mixtral\", ";
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()), doctest::Contains("config.json: not valid JSON"), config_error);
    std::ofstream(tmp.path / "config.json") << R"({"model_type": "mixtral", "hidden_size": "32"})";
    CHECK_THROWS_WITH_AS((void)describe(Checkpoint(tmp.path.string())),
                         (tmp.path.string() + "/config.json: 'hidden_size' is \"32\", expected an integer").c_str(), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint((tmp.path / "nope").string()), doctest::Contains("nope: neither a checkpoint directory nor a GGUF file"), config_error);
}

TEST_CASE("config values out of the supported set, and a checkpoint's files missing, are named with the file") {
    TempDir tmp("config-values");
    const fs::path src = test::data_dir + "/mixtral-basic";
    const std::string config = tmp.path.string() + "/config.json";
    const auto write_config = [&](const char* key, const nlohmann::json& value) {
        nlohmann::json c = nlohmann::json::parse(std::ifstream(src / "config.json"));
        c[key] = value;
        std::ofstream(config) << c.dump();
    };
    fs::copy_file(src / "model.safetensors", tmp.path / "model.safetensors");
    write_config("hidden_act", "gelu");
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(tmp.path.string()), 0),
                         (config + ": 'hidden_act' is \"gelu\", supported: silu").c_str(), config_error);
    write_config("num_experts_per_tok", 5);
    CHECK_THROWS_WITH_AS((void)describe(Checkpoint(tmp.path.string())), (config + ": top-k is 5, expected at most the 4 experts").c_str(),
                         config_error);
    write_config("num_experts_per_tok", 2);
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(tmp.path.string()), 0, "decoder"),
                         (config + ": stack \"decoder\" given, but mixtral has a single stack").c_str(), config_error);
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(test::data_dir + "/switch_transformers-decoder"), 1, "middle"),
                         doctest::Contains("switch_transformers-decoder/config.json: stack \"middle\", expected encoder or decoder"),
                         config_error);
    // A dense (non-HyperMoE) block has no HyperExpert term.
    const auto block = load_moe_block<reference>(Checkpoint(tmp.path.string()), 0);
    const Matrix<float> x(2, 32);
    Matrix<float> h(2, 32);
    RoutingPlan plan;
    Workspace ws;
    CHECK_THROWS_WITH_AS(block.hyper_term(x.view(), plan, h.view(), ws), "LoadedMoeBlock::hyper_term: not a HyperMoE block",
                         config_error);

    // The index of a sharded checkpoint, and no weights at all.
    const std::string index = tmp.path.string() + "/model.safetensors.index.json";
    std::ofstream(index) << R"({"metadata": {}})";
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()), (index + ": no weight_map object").c_str(), weight_error);
    std::ofstream(index) << R"({"weight_map": {"model.embed_tokens.weight": "../model.safetensors"}})";
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()),
                         (index + ": shard '../model.safetensors' is not a file in the checkpoint directory").c_str(), weight_error);
    fs::remove(index);
    fs::remove(tmp.path / "model.safetensors");
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()),
                         (tmp.path.string() + ": neither model.safetensors nor model.safetensors.index.json").c_str(), weight_error);
}

TEST_CASE_TEMPLATE_DEFINE("a sharded checkpoint gives the same block", B, sharded) {
    TempDir tmp("sharded");
    const fs::path src = test::data_dir + "/olmoe-basic";
    fs::copy_file(src / "config.json", tmp.path / "config.json");
    SafeTensorsFile model((src / "model.safetensors").string());
    std::vector<TensorToWrite> shards[2];
    nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
    std::size_t i = 0;
    for (const auto& t : model.view().tensors()) {
        const auto data = model.view().data(t);
        shards[i % 2].push_back({t.name, t.dtype, t.shape, {data.begin(), data.end()}});
        index["weight_map"][t.name] = i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
        ++i;
    }
    write_safetensors((tmp.path / "model-00001-of-00002.safetensors").string(), shards[0]);
    write_safetensors((tmp.path / "model-00002-of-00002.safetensors").string(), shards[1]);
    std::ofstream(tmp.path / "model.safetensors.index.json") << index.dump();
    const Checkpoint ck(tmp.path.string());
    CHECK(ck.tensor_count() == model.view().tensors().size());
    check_block(load_moe_block<B>(ck, 1), Expected(src.string()));

    auto& entry = index["weight_map"]["model.layers.1.mlp.gate.weight"]; // point it at the other shard
    entry = entry == "model-00001-of-00002.safetensors" ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
    std::ofstream(tmp.path / "model.safetensors.index.json") << index.dump();
    CHECK_THROWS_WITH_AS(Checkpoint(tmp.path.string()), doctest::Contains("which has no such tensor"), weight_error);
}
TEST_CASE_TEMPLATE_APPLY(sharded, test::all_backends);

TEST_CASE("writer round trip, metadata, and every float dtype converts") {
    const std::vector<float> v{1.5f, -2.0f, 0.25f, 3.0f};
    const std::vector<std::int32_t> ids{1, 2, 3};
    auto bytes = safetensors_bytes({f32_tensor("x", {2, 2}, v), i32_tensor("ids", {3}, ids)}, {{"layer", "1"}});
    CHECK((bytes.size() - 8 - 28) % 8 == 0); // header padded to 8 bytes
    const SafeTensorsView r(bytes, "mem");
    CHECK(r.metadata().at("layer") == "1");
    CHECK(r.to_f32(r.info("x"))(1, 0) == 0.25f);
    CHECK(r.element(r.info("ids"), 2) == 3.0);
    CHECK(r.info("x").shape_string() == "[2, 2]");
    CHECK(f16_bits_to_f32(0x3C00) == 1.0f);
    CHECK(f16_bits_to_f32(0xC000) == -2.0f);
    CHECK(f16_bits_to_f32(0x0001) == 0x1.0p-24f);
    CHECK(f16_bits_to_f32(0x7C00) == std::numeric_limits<float>::infinity());
    std::vector<std::byte> f16{std::byte(0x00), std::byte(0x3C), std::byte(0x00), std::byte(0xB8)};
    std::vector<std::byte> f64(8);
    const double d = -0.75;
    std::memcpy(f64.data(), &d, 8);
    bytes = safetensors_bytes({{"h", tensor_dtype::f16, {2}, f16}, {"d", tensor_dtype::f64, {1}, f64}});
    const SafeTensorsView r2(bytes, "mem");
    CHECK(r2.to_f32(r2.info("h"))(0, 1) == -0.5f);
    CHECK(r2.to_f32(r2.info("d"))(0, 0) == -0.75f);
    CHECK_THROWS_WITH_AS((void)r2.info("zzz"), "mem: no tensor 'zzz'", weight_error);

    // The integer dtypes, element by element (as a non-float tensor reads for a trainer's copy).
    const auto raw = [](const auto& values) {
        const auto* p = reinterpret_cast<const std::byte*>(values.data());
        return std::vector<std::byte>(p, p + sizeof(values[0]) * values.size());
    };
    const std::vector<std::int64_t> i64{-(std::int64_t{1} << 40), 5};
    const std::vector<std::int16_t> i16{-30000, 7};
    const std::vector<std::int8_t> i8{-128, 127};
    const std::vector<std::uint8_t> u8{255, 0}, flags{0, 3};
    bytes = safetensors_bytes({{"i64", tensor_dtype::i64, {2}, raw(i64)},
                               {"i16", tensor_dtype::i16, {2}, raw(i16)},
                               {"i8", tensor_dtype::i8, {2}, raw(i8)},
                               {"u8", tensor_dtype::u8, {2}, raw(u8)},
                               {"flags", tensor_dtype::boolean, {2}, raw(flags)}});
    const SafeTensorsView r3(bytes, "mem");
    CHECK(r3.element(r3.info("i64"), 0) == -1099511627776.0);
    CHECK(r3.element(r3.info("i16"), 0) == -30000.0);
    CHECK(r3.element(r3.info("i8"), 0) == -128.0);
    CHECK(r3.element(r3.info("i8"), 1) == 127.0);
    CHECK(r3.element(r3.info("u8"), 0) == 255.0);
    CHECK(r3.element(r3.info("flags"), 0) == 0.0);
    CHECK(r3.element(r3.info("flags"), 1) == 1.0);
    // q8_0 blocks, element by element: each its block's value.
    std::vector<float> row(32);
    for (std::size_t i = 0; i < row.size(); ++i) row[i] = float(i) - 15.5f;
    // q8_0 and q4_0 blocks (as a GGUF file's table holds them), element by element: each the
    // value its block gives it. A safetensors file holds no block formats, so the writer refuses.
    const BlockQ8_0 q8 = quantize_q8_0(std::span<const float, 32>(row.data(), 32));
    const BlockQ4_0 q4 = quantize_q4_0(std::span<const float, 32>(row.data(), 32));
    std::vector<std::byte> blocks(sizeof q8 + sizeof q4);
    std::memcpy(blocks.data(), &q8, sizeof q8);
    std::memcpy(blocks.data() + sizeof q8, &q4, sizeof q4);
    const TensorTable table(blocks, "mem", {{"q8", tensor_dtype::q8_0, {1, 32}, 0, sizeof q8},
                                            {"q4", tensor_dtype::q4_0, {32}, sizeof q8, blocks.size()}});
    std::array<float, 32> want8{}, want4{};
    dequantize(q8, want8);
    dequantize(q4, want4);
    for (index_t i = 0; i < 32; ++i) {
        CHECK(table.element(table.info("q8"), i) == double(want8[std::size_t(i)]));
        CHECK(table.element(table.info("q4"), i) == double(want4[std::size_t(i)]));
    }
    CHECK_THROWS_WITH_AS((void)safetensors_bytes({{"q", tensor_dtype::q8_0, {1, 32}, std::vector<std::byte>(sizeof q8)}}),
                         "safetensors writer: tensor 'q' has dtype Q8_0, expected one a safetensors file holds (F64, F32, F16, "
                         "BF16, I64, I32, I16, I8, U8, BOOL)",
                         weight_error);

    CHECK_THROWS_WITH_AS((void)safetensors_bytes({{"x", tensor_dtype::f32, {2, 3}, std::vector<std::byte>(20)}}),
                         "safetensors writer: tensor 'x' has 20 bytes, expected 24", weight_error);
}

TEST_CASE("safetensors_layout: an image laid out, zeroed, filled in place, as safetensors_bytes writes it") {
    const std::vector<float> v{1.5f, -2.0f, 0.25f, 3.0f, 7.0f, -1.0f};
    const std::vector<std::int32_t> ids{1, 2, 3};
    SafetensorsImage image = safetensors_layout({{"ids", tensor_dtype::i32, {3}}, {"x", tensor_dtype::f32, {2, 3}}, {"e", tensor_dtype::bf16, {0}}},
                                                {{"format", "pt"}});
    REQUIRE(image.tensors.size() == 3);
    CHECK(image.tensors[0].begin == 0);
    CHECK(image.tensors[0].end == 12);
    CHECK(image.tensors[1].begin == 12);
    CHECK(image.tensors[1].end == 36);
    CHECK(image.tensors[2].begin == 36);
    CHECK(image.tensors[2].end == 36);
    CHECK(image.data_start % 8 == 0);
    CHECK(image.bytes.size() == image.data_start + 36);
    CHECK(image.data(1).size() == 24);
    CHECK(std::all_of(image.bytes.begin() + std::ptrdiff_t(image.data_start), image.bytes.end(), [](std::byte b) { return b == std::byte{0}; }));
    std::memcpy(image.data(0).data(), ids.data(), 12);
    std::memcpy(image.data(1).data(), v.data(), 24);
    // The same bytes as the writer's, and a reader sees the tensors where the layout put them.
    CHECK(image.bytes == safetensors_bytes({i32_tensor("ids", {3}, ids), f32_tensor("x", {2, 3}, v), {"e", tensor_dtype::bf16, {0}, {}}},
                                           {{"format", "pt"}}));
    const SafeTensorsView r(image.bytes, "mem");
    CHECK(r.to_f32(r.info("x"))(1, 2) == -1.0f);
    CHECK(r.element(r.info("ids"), 1) == 2.0);
    CHECK(r.info("e").numel() == 0);
    CHECK_THROWS_WITH_AS((void)safetensors_layout({{"x", tensor_dtype::f32, {2}}, {"q", tensor_dtype::q4_0, {1, 32}}}),
                         "safetensors writer: tensor 'q' has dtype Q4_0, expected one a safetensors file holds (F64, F32, F16, "
                         "BF16, I64, I32, I16, I8, U8, BOOL)",
                         weight_error);
}
