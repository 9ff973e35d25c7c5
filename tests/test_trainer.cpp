// The trainer (issue 12, point 6): the losses and their gradients, the parameter store, the
// chained blocks' gradients against central differences of the loss (a HyperMoE stack's shared
// hypernetwork included), training that lowers the loss, save and bitwise reload, and the
// typed errors.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "hypermoe/io/synthetic.hpp"
#include "hypermoe/train/multitask.hpp"
#include "hypermoe/train/trainer.hpp"
#include "gguf_writer.hpp"
#include "test_support.hpp"

using namespace hypermoe;

namespace {

/// A small synthetic model of `family` (2 MoE blocks), in memory.
SyntheticImage small_model(std::string_view family, dtype weights = dtype::f32) {
    SyntheticModel m{.family = *find_family(family), .d_model = 32, .d_ff = 48, .experts = 4, .top_k = 2, .layers = 2};
    m.capacity = 64;
    m.weights = weights;
    return synthetic_image(m);
}

Matrix<float> random_rows(index_t rows, index_t cols, std::uint64_t seed, double scale = 1.0) {
    Matrix<float> m(rows, cols);
    for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < cols; ++c)
            m(r, c) = float(scale * (double(detail::splitmix64(seed + std::uint64_t(r * cols + c)) >> 11) * 0x1.0p-53 * 2 - 1));
    return m;
}

} // namespace

TEST_CASE("mse_loss and cross_entropy_loss: values and gradients against central differences") {
    const Matrix<float> y = random_rows(5, 6, 11), target = random_rows(5, 6, 12);
    Matrix<float> dy(5, 6);
    const double loss = mse_loss(y.view(), target.view(), dy.view());
    double want = 0;
    for (index_t r = 0; r < 5; ++r)
        for (index_t c = 0; c < 6; ++c) want += std::pow(double(y(r, c)) - target(r, c), 2) / 30.0;
    CHECK(loss == doctest::Approx(want).epsilon(1e-12));
    CHECK(dy(2, 3) == doctest::Approx(2.0 * (double(y(2, 3)) - target(2, 3)) / 30.0).epsilon(1e-6));

    const std::vector<std::int32_t> labels = {0, 3, 1, 3, 2};
    const CrossEntropy ce = cross_entropy_loss(y.view(), labels, 4, dy.view());
    double ce_want = 0;
    index_t correct = 0;
    for (index_t r = 0; r < 5; ++r) {
        double sum = 0;
        index_t best = 0;
        for (index_t c = 0; c < 4; ++c) {
            sum += std::exp(double(y(r, c)));
            if (y(r, c) > y(r, best)) best = c;
        }
        ce_want += (std::log(sum) - y(r, labels[std::size_t(r)])) / 5.0;
        correct += best == labels[std::size_t(r)];
    }
    CHECK(ce.loss == doctest::Approx(ce_want).epsilon(1e-9));
    CHECK(ce.correct == correct);
    // The gradient against central differences of the loss; columns past the classes get 0.
    for (index_t r = 0; r < 5; ++r)
        for (index_t c = 0; c < 6; ++c) {
            Matrix<float> yp = y, ym = y;
            const float h = 1e-2f;
            yp(r, c) += h;
            ym(r, c) -= h;
            const double fd = (cross_entropy_loss(yp.view(), labels, 4).loss - cross_entropy_loss(ym.view(), labels, 4).loss) / (2.0 * h);
            CAPTURE(r);
            CAPTURE(c);
            CHECK(dy(r, c) == doctest::Approx(fd).epsilon(1e-3).scale(1e-3));
            if (c >= 4) CHECK(dy(r, c) == 0.0f);
        }

    Matrix<float> narrow(5, 5);
    CHECK_THROWS_WITH_AS(mse_loss(y.view(), narrow.view()), "mse_loss: target has shape (5, 5), expected (5, 6)", shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy_loss(y.view(), labels, 7), "cross_entropy_loss: classes is 7, expected 2 <= classes <= 6 (the output's width)",
                         config_error);
    CHECK_THROWS_WITH_AS(cross_entropy_loss(y.view(), std::vector<std::int32_t>{0, 1}, 4), "cross_entropy_loss: 2 labels for 5 rows of logits",
                         shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy_loss(y.view(), std::vector<std::int32_t>{0, 1, 4, 0, 0}, 4),
                         "cross_entropy_loss: label of row 2 is 4, expected 0 <= label < 4", config_error);
    Matrix<float> bad = target;
    bad(1, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(mse_loss(y.view(), bad.view()), "mse_loss: target: element (1, 1) is nan, expected a finite value", numeric_error);
}

TEST_CASE("ParameterStore: F32 copies of a checkpoint's tensors that load into the same blocks, saved as a checkpoint") {
    const SyntheticImage image = small_model("qwen2_moe", dtype::bf16);
    const Checkpoint source(image.config, image.safetensors, "qwen2 bf16");
    const ParameterStore store(source);
    CHECK(store.checkpoint().tensor_names() == source.tensor_names());
    const std::string name = source.tensor_names().front();
    const Checkpoint::Ref r = source.tensor(name);
    const std::span<const float> v = store.values(name);
    REQUIRE(index_t(v.size()) == r.info->numel());
    for (index_t i = 0; i < r.info->numel(); ++i) REQUIRE(double(v[std::size_t(i)]) == r.file->element(*r.info, i));

    // The same blocks, bit for bit, from the store as from the bf16 source widened at load.
    const auto a = load_model<reference>(source), b = load_model<reference>(store.checkpoint());
    const Matrix<float> x = random_rows(9, 32, 3);
    Matrix<float> ya(9, 32), yb(9, 32);
    Workspace ws;
    a.blocks()[0].forward(x.view(), ya.view(), ws);
    b.blocks()[0].forward(x.view(), yb.view(), ws);
    CHECK(std::equal(ya.data(), ya.data() + 9 * 32, yb.data()));

    const std::string dir = (std::filesystem::temp_directory_path() / "hypermoe_test_store").string();
    store.save(dir);
    const Checkpoint saved(dir);
    CHECK(saved.tensor_names() == source.tensor_names());
    CHECK(saved.dtypes() == std::set<std::string>{"F32"});
    CHECK_THROWS_WITH_AS((void)store.values("no.such.tensor"), "qwen2 bf16: missing tensor 'no.such.tensor'", weight_error);
    std::filesystem::remove_all(dir);

    // An integer tensor beside the weights (position ids, a token map): held and saved as it is,
    // never offered as values to update.
    SyntheticImage with_ids = small_model("qwen2_moe");
    const SafeTensorsView original(with_ids.safetensors, "mem");
    std::vector<TensorToWrite> tensors;
    for (const TensorInfo& t : original.tensors()) {
        const auto bytes = original.data(t);
        tensors.push_back({t.name, t.dtype, t.shape, {bytes.begin(), bytes.end()}});
    }
    const std::int64_t ids[3] = {7, -1, std::int64_t{1} << 40};
    const auto* id_bytes = reinterpret_cast<const std::byte*>(ids);
    tensors.push_back({"model.position_ids", tensor_dtype::i64, {3}, {id_bytes, id_bytes + sizeof ids}});
    with_ids.safetensors = safetensors_bytes(tensors);
    ParameterStore mixed(Checkpoint(with_ids.config, with_ids.safetensors, "with ids"));
    CHECK_THROWS_WITH_AS((void)mixed.values("model.position_ids"), "with ids: tensor 'model.position_ids' is I64, not F32", weight_error);
    mixed.save(dir);
    const Checkpoint reloaded(dir);
    const Checkpoint::Ref r_ids = reloaded.tensor("model.position_ids");
    CHECK(r_ids.info->dtype == tensor_dtype::i64);
    for (index_t i = 0; i < 3; ++i) CHECK(r_ids.file->element(*r_ids.info, i) == double(ids[i]));
    std::filesystem::remove_all(dir);
}

TEST_CASE("ParameterStore::place_adjacent: each pair's up right after its gate, values kept; the loader views such a [gate; up] in place") {
    const SyntheticImage image = small_model("mixtral");
    const Checkpoint source(image.config, image.safetensors, "mixtral");
    ParameterStore store(source);
    const std::string e0 = "model.layers.0.block_sparse_moe.experts.0.", e1 = "model.layers.1.block_sparse_moe.experts.3.";
    const auto adjacent = [&](const std::string& a, const std::string& b) {
        return store.values(b).data() == store.values(a).data() + store.values(a).size();
    };
    REQUIRE_FALSE(adjacent(e0 + "w1.weight", e0 + "w3.weight")); // sorted by name: w1, w2, w3
    const auto values = [&] {
        std::vector<std::vector<float>> v;
        for (const std::string& n : store.checkpoint().tensor_names()) v.emplace_back(store.values(n).begin(), store.values(n).end());
        return v;
    };
    const auto before = values();
    const std::vector<std::pair<std::string, std::string>> pairs{{e0 + "w1.weight", e0 + "w3.weight"}, {e1 + "w1.weight", e1 + "w3.weight"}};
    CHECK(store.place_adjacent(pairs));
    CHECK(adjacent(e0 + "w1.weight", e0 + "w3.weight"));
    CHECK(adjacent(e1 + "w1.weight", e1 + "w3.weight"));
    CHECK_FALSE(store.place_adjacent(pairs)); // already laid out so: nothing moves
    CHECK(store.checkpoint().tensor_names() == source.tensor_names());
    CHECK(values() == before);

    // The loader's [gate; up] of such a pair is the store's own bytes; of any other, a copy.
    TensorBinder binder(store.checkpoint(), "stack");
    const auto placed = binder.deferred_stack(e0 + "w1.weight", e0 + "w3.weight", 48, 32, dtype::f32);
    const auto apart = binder.deferred_stack(e0 + "w1.weight", e1 + "w3.weight", 48, 32, dtype::f32);
    binder.finish();
    CHECK(placed.first.row_bytes(0) == reinterpret_cast<const std::byte*>(store.values(e0 + "w1.weight").data()));
    CHECK(placed.second.row_bytes(0) == reinterpret_cast<const std::byte*>(store.values(e0 + "w3.weight").data()));
    CHECK(apart.first.row_bytes(0) != reinterpret_cast<const std::byte*>(store.values(e0 + "w1.weight").data()));

    // The same blocks, bit for bit, as from the source.
    const auto a = load_model<reference>(source), b = load_model<reference>(store.checkpoint());
    const Matrix<float> x = random_rows(9, 32, 3);
    Matrix<float> ya(9, 32), yb(9, 32);
    Workspace ws;
    for (std::size_t i = 0; i < 2; ++i) {
        a.blocks()[i].forward(x.view(), ya.view(), ws);
        b.blocks()[i].forward(x.view(), yb.view(), ws);
        CHECK(std::equal(ya.data(), ya.data() + 9 * 32, yb.data()));
    }
    // A trainer lays out every expert's pair so.
    const Trainer<reference> trainer(source, {});
    for (index_t e = 0; e < 4; ++e) {
        const std::string p = "model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".";
        CHECK(trainer.parameters().values(p + "w3.weight").data() == trainer.parameters().values(p + "w1.weight").data() + 48 * 32);
    }

    CHECK_THROWS_WITH_AS(store.place_adjacent({{e0 + "w1.weight", e0 + "w1.weight"}}),
                         "ParameterStore::place_adjacent: tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' is in two pairs "
                         "(or paired with itself), expected each tensor in one pair",
                         config_error);
    CHECK_THROWS_WITH_AS(store.place_adjacent({{e0 + "w1.weight", "no.such.tensor"}}), "mixtral: missing tensor 'no.such.tensor'", weight_error);
}

TEST_CASE_TEMPLATE_DEFINE("Trainer: every parameter's gradient against central differences of the loss through the chained blocks", B,
                          trainer_gradients) {
    // HyperMoE, HyperMoE trained without its HyperExpert (the plain MoE of the paper's
    // comparison), a plain family, GPT-2 HyperMoE (its Conv1D weights stored transposed), and
    // gpt-oss (a router bias, biased experts and the clamped SwiGLU).
    for (const auto& config : {std::pair<std::string_view, bool>{"hypermoe_switch", true}, {"hypermoe_switch", false}, {"mixtral", true},
                               {"hypermoe_gpt2", true}, {"gpt_oss", true}}) {
        const std::string_view family = config.first;
        const bool with_hyper = config.second;
        CAPTURE(family);
        CAPTURE(with_hyper);
        const SyntheticImage image = small_model(family);
        const Checkpoint ck(image.config, image.safetensors, std::string(family));
        Trainer<B> trainer(ck, TrainOptions{.with_hyper = with_hyper});
        const Matrix<float> x = random_rows(24, 32, 5), target = random_rows(24, 32, 6, 0.5);
        const Targets t{target.view(), {}};
        trainer.gradients(x.view(), t);
        const auto names = trainer.parameter_names();
        CHECK(names.size() >= 4);
        const bool has_hyper_tensor = std::any_of(names.begin(), names.end(), [](const std::string& n) {
            return n.find("param_gen") != std::string::npos || n.find("n_experts_embedding") != std::string::npos ||
                   n.find("embedding_process") != std::string::npos;
        });
        CHECK(has_hyper_tensor == (with_hyper && family.starts_with("hypermoe")));
        int checked = 0, kinks = 0;
        for (const std::string& name : names) {
            const std::vector<float> g(trainer.gradient(name).begin(), trainer.gradient(name).end());
            double largest = 0;
            std::size_t at = 0;
            for (std::size_t j = 0; j < g.size(); ++j)
                if (std::abs(g[j]) > largest) largest = std::abs(g[j]), at = j;
            CAPTURE(name);
            REQUIRE(largest > 0);
            // The largest entry and one more, by central differences of the evaluated loss at two
            // step sizes; where they disagree a token's selection flipped inside the step (routing
            // is piecewise constant), and that entry is not a test of the gradient. The steps are
            // small because a fresh HyperExpert's ReLU inputs all lie within about 0.02 of zero:
            // at h = 4e-3 the adapter's down bias crosses enough kinks to move the quotient by 8%.
            for (const std::size_t j : {at, g.size() / 2}) {
                const auto central = [&](float h) {
                    const float v = trainer.values(name)[j];
                    trainer.values(name)[j] = v + h;
                    trainer.refresh();
                    const double up = trainer.evaluate(x.view(), t).loss;
                    trainer.values(name)[j] = v - h;
                    trainer.refresh();
                    const double down = trainer.evaluate(x.view(), t).loss;
                    trainer.values(name)[j] = v;
                    trainer.refresh();
                    return (up - down) / (2.0 * double(h));
                };
                const double fd = central(1e-3f), fd_half = central(5e-4f);
                const double tolerance = 0.02 * largest + 0.03 * std::abs(fd);
                CAPTURE(j);
                CAPTURE(fd_half);
                if (std::abs(fd - fd_half) > tolerance) {
                    ++kinks;
                    continue;
                }
                ++checked;
                CHECK(std::abs(double(g[j]) - fd) <= tolerance);
            }
        }
        const std::string summary = detail::concat(family, ": ", checked, " entries checked, ", kinks, " skipped at a selection change");
        MESSAGE(summary);
        CHECK(kinks * 4 <= checked);
    }
}

TEST_CASE_TEMPLATE_DEFINE("Trainer: training lowers the multi-task loss, and a saved model reloads into bitwise the same outputs", B,
                          trainer_learns) {
    const MultiTaskGenerator gen(MultiTaskProblem{.tasks = 4, .width = 32, .classes = 4, .task_dims = 4, .seed = 3});
    const MultiTaskBatch eval = gen.sample(256, 1000);
    const SyntheticImage image = small_model("hypermoe_gpt2");
    const Checkpoint ck(image.config, image.safetensors, "hypermoe_gpt2");
    TrainOptions opt{.loss = LossKind::cross_entropy, .classes = 4};
    opt.matrices.lr = 3e-3;
    Trainer<B> trainer(ck, opt);
    const TrainMetrics before = trainer.evaluate(eval.x.view(), {{}, eval.labels});
    for (int s = 0; s < 40; ++s) {
        const MultiTaskBatch b = gen.sample(64, std::uint64_t(s));
        const TrainMetrics m = trainer.step(b.x.view(), {{}, b.labels});
        CHECK(std::isfinite(m.loss));
        CHECK(m.tokens == 64);
    }
    const TrainMetrics after = trainer.evaluate(eval.x.view(), {{}, eval.labels});
    const std::string progress = detail::concat("eval loss ", before.loss, " -> ", after.loss, ", accuracy ", before.accuracy, " -> ", after.accuracy);
    MESSAGE(progress);
    CHECK(after.loss < 0.8 * before.loss);
    CHECK(after.accuracy > before.accuracy + 0.1);
    CHECK(trainer.optimizer().steps() == 40);

    const std::string dir = (std::filesystem::temp_directory_path() / ("hypermoe_test_trained_" + std::string(B::name))).string();
    trainer.save(dir);
    Trainer<B> reloaded(Checkpoint(dir), opt);
    Matrix<float> y1(256, 32), y2(256, 32);
    trainer.forward(eval.x.view(), y1.view());
    reloaded.forward(eval.x.view(), y2.view());
    CHECK(std::equal(y1.data(), y1.data() + 256 * 32, y2.data()));
    CHECK(reloaded.evaluate(eval.x.view(), {{}, eval.labels}).loss == after.loss);
    std::filesystem::remove_all(dir);
}

TEST_CASE_TEMPLATE_APPLY(trainer_gradients, test::all_backends);
TEST_CASE_TEMPLATE_APPLY(trainer_learns, test::all_backends);

TEST_CASE("Trainer without the HyperExpert: the chained MoE parts, as LoadedMoeBlock::forward(..., with_hyper = false) runs them") {
    const SyntheticImage image = small_model("hypermoe_gpt2");
    const Checkpoint ck(image.config, image.safetensors, "hypermoe_gpt2");
    Trainer<reference> plain(ck, TrainOptions{.with_hyper = false}), hyper(ck, TrainOptions{});
    const Matrix<float> x = random_rows(16, 32, 8);
    Matrix<float> y_plain(16, 32), y_hyper(16, 32), h = x, y_block(16, 32);
    plain.forward(x.view(), y_plain.view());
    hyper.forward(x.view(), y_hyper.view());
    Workspace ws;
    RoutingPlan plan;
    for (const auto& block : plain.model().blocks()) {
        block.forward(h.view(), y_block.view(), ws, plan, {}, false);
        for (index_t j = 0; j < 16 * 32; ++j) h.data()[j] += y_block.data()[j];
    }
    CHECK(std::equal(h.data(), h.data() + 16 * 32, y_plain.data()));
    CHECK_FALSE(std::equal(y_hyper.data(), y_hyper.data() + 16 * 32, y_plain.data()));
    CHECK(plain.parameter_names().size() < hyper.parameter_names().size());
}

TEST_CASE("GradientBuffers: gradients into reused buffers equal fresh ones call after call, and a block of another layer type replaces them") {
    const auto collect = [](std::vector<std::vector<float>>& into) {
        return [&into](const TensorName&, ConstMatrixView<float> g, bool) {
            auto& v = into.emplace_back();
            for (index_t r = 0; r < g.rows(); ++r) v.insert(v.end(), g.row(r).begin(), g.row(r).end());
        };
    };
    GradientBuffers buffers; // one for all the blocks below: each new layer type replaces what it holds
    // mixtral: GLU experts; switch_transformers: FFN experts; qwen2_moe: a gated shared expert;
    // hypermoe_switch with its HyperExpert: the projector, embeddings and hypernetwork too.
    for (const auto& config : {std::pair<std::string_view, bool>{"mixtral", false}, {"switch_transformers", false},
                               {"qwen2_moe", false}, {"hypermoe_switch", true}, {"hypermoe_switch", false}}) {
        CAPTURE(config.first);
        CAPTURE(config.second);
        const SyntheticImage image = small_model(config.first);
        const Checkpoint ck(image.config, image.safetensors, std::string(config.first));
        const auto model = load_model<reference>(ck, LoadOptions{.storage = dtype::f32});
        const auto& block = model.blocks().front();
        Workspace ws;
        for (std::uint64_t call = 0; call < 3; ++call) { // the 2nd and 3rd reuse (and must zero) the 1st's buffers
            const Matrix<float> x = random_rows(16, 32, 10 + call), dy = random_rows(16, 32, 20 + call);
            Matrix<float> dx(16, 32), dx_reused(16, 32);
            std::vector<std::vector<float>> fresh, reused;
            block.for_each_gradient(x.view(), dy.view(), dx.view(), ws, {}, config.second, collect(fresh));
            block.for_each_gradient(x.view(), dy.view(), dx_reused.view(), ws, {}, config.second, buffers, collect(reused));
            CHECK(fresh.size() >= 3);
            CHECK(reused == fresh);
            CHECK(std::equal(dx.data(), dx.data() + 16 * 32, dx_reused.data()));
        }
    }
}

TEST_CASE("LoadedMoeBlock: gradients from a forward's kept activations equal the recomputing backward's; a block with its HyperExpert keeps none") {
    for (const auto& config : {std::pair<std::string_view, bool>{"mixtral", true}, {"hypermoe_switch", false}}) {
        CAPTURE(config.first);
        const SyntheticImage image = small_model(config.first);
        const Checkpoint ck(image.config, image.safetensors, std::string(config.first));
        const auto model = load_model<reference>(ck, LoadOptions{.storage = dtype::f32});
        const auto& block = model.blocks().front();
        const bool with_hyper = config.second;
        REQUIRE(block.keeps_activations(with_hyper));
        const Matrix<float> x = random_rows(16, 32, 3), dy = random_rows(16, 32, 4);
        Matrix<float> y(16, 32), y_kept(16, 32), dx(16, 32), dx_kept(16, 32);
        Workspace ws;
        RoutingPlan plan;
        MoeActivations kept;
        block.forward(x.view(), y.view(), ws, plan, {}, with_hyper);
        block.forward(x.view(), y_kept.view(), ws, kept, {}, with_hyper);
        CHECK(std::equal(y.data(), y.data() + 16 * 32, y_kept.data()));
        std::vector<std::vector<float>> recomputed, from_kept;
        const auto collect = [](std::vector<std::vector<float>>& into) {
            return [&into](const TensorName&, ConstMatrixView<float> g, bool) {
                auto& v = into.emplace_back();
                for (index_t r = 0; r < g.rows(); ++r) v.insert(v.end(), g.row(r).begin(), g.row(r).end());
            };
        };
        block.for_each_gradient(x.view(), dy.view(), dx.view(), ws, {}, with_hyper, collect(recomputed));
        block.for_each_gradient(kept, x.view(), dy.view(), dx_kept.view(), ws, {}, with_hyper, collect(from_kept));
        CHECK(recomputed.size() >= 3);
        CHECK(recomputed == from_kept);
        CHECK(std::equal(dx.data(), dx.data() + 16 * 32, dx_kept.data()));
    }
    const SyntheticImage image = small_model("hypermoe_switch");
    const Checkpoint ck(image.config, image.safetensors, "hypermoe_switch");
    const auto model = load_model<reference>(ck, LoadOptions{.storage = dtype::f32});
    const auto& block = model.blocks().front();
    CHECK_FALSE(block.keeps_activations(true));
    const Matrix<float> x = random_rows(4, 32, 3);
    Matrix<float> y(4, 32);
    Workspace ws;
    MoeActivations kept;
    CHECK_THROWS_AS(block.forward(x.view(), y.view(), ws, kept), config_error);
    // Activations kept without the HyperExpert do not make its gradients.
    block.forward(x.view(), y.view(), ws, kept, {}, false);
    Matrix<float> dx(4, 32);
    CHECK_THROWS_WITH_AS(block.for_each_gradient(kept, x.view(), x.view(), dx.view(), ws, {}, true, [](const TensorName&, ConstMatrixView<float>, bool) {}),
                         doctest::Contains("hypermoe_switch block 1: a HyperMoE block with its HyperExpert keeps no activations"), config_error);
}

TEST_CASE("Trainer with auxiliary-loss-free balancing: a lower load CV than the same run without, no auxiliary loss, and a saved bias") {
    // Training runs (400 steps in all), on Eigen where the build has it (the cheapest rebuild
    // per step): balancing does not depend on the backend.
#if HYPERMOE_HAS_EIGEN
    using B = eigen;
#else
    using B = reference;
#endif
    const MultiTaskGenerator gen(MultiTaskProblem{.tasks = 8, .width = 64, .classes = 4, .seed = 5});
    const MultiTaskBatch eval = gen.sample(2048, 999);
    for (const std::string_view family : {"mixtral", "deepseek_v3"}) {
        CAPTURE(family);
        SyntheticModel m{.family = *find_family(family), .d_model = 64, .d_ff = 32, .experts = 8, .top_k = 2, .layers = 2};
        const SyntheticImage image = synthetic_image(m);
        const Checkpoint ck(image.config, image.safetensors, std::string(family));
        // 100 steps of 256 rows; the load CV of the held-out rows after.
        const auto trained_load_cv = [&](Trainer<B>& t) {
            for (int s = 0; s < 100; ++s) {
                const MultiTaskBatch b = gen.sample(256, std::uint64_t(s));
                t.step(b.x.view(), {{}, b.labels});
            }
            return t.evaluate(eval.x.view(), {{}, eval.labels}).load_cv;
        };
        TrainOptions opt{.loss = LossKind::cross_entropy, .classes = 4};
        opt.matrices.lr = 3e-3;
        Trainer<B> plain(ck, opt);
        opt.balance_gamma = 0.01;
        Trainer<B> balanced(ck, opt);
        const double cv_plain = trained_load_cv(plain), cv_balanced = trained_load_cv(balanced);
        const std::string summary =
            detail::concat(family, ": held-out load CV after 100 steps ", cv_plain, " without balancing, ", cv_balanced, " with gamma = 0.01");
        MESSAGE(summary);
        CHECK(cv_balanced < 0.6 * cv_plain);
        CHECK(plain.selection_bias(0).empty());
        REQUIRE(balanced.selection_bias(0).size() == 8);
        if (family == "deepseek_v3") {
            // The checkpoint's e_score_correction_bias is where the bias lives: saved and reloaded.
            const std::string dir = (std::filesystem::temp_directory_path() / "hypermoe_test_balanced").string();
            balanced.save(dir);
            const Checkpoint saved(dir);
            const auto& names = balanced.model().blocks()[0].parameter_names();
            REQUIRE_FALSE(names.selection_bias.empty());
            const Checkpoint::Ref r = saved.tensor(names.selection_bias.name);
            for (index_t e = 0; e < 8; ++e) CHECK(float(r.file->element(*r.info, e)) == balanced.selection_bias(0)[std::size_t(e)]);
            std::filesystem::remove_all(dir);
        }
    }
}

TEST_CASE("hypermoe_gpt2 with noisy gating (the reference code's training routing): w_noise's gradient against central differences, no noise in evaluation") {
    const SyntheticImage image = small_model("hypermoe_gpt2");
    const Checkpoint ck(image.config, image.safetensors, "hypermoe_gpt2");
    ParameterStore store(ck);
    const LoadOptions noisy{.noisy_gating = true};
    const index_t rows = 16, d = 32, experts = 4;
    const Matrix<float> x = random_rows(rows, d, 7), dy = random_rows(rows, d, 8);
    const Context ctx{.noise_seed = 5};
    Workspace ws;
    const std::string w_noise = "transformer.h.0.mlp.w_noise", w_gate = "transformer.h.0.mlp.w_gate";
    {
        const LoadedModel<reference> model = load_model<reference>(store.checkpoint(), noisy);
        CHECK(model.blocks()[0].parameter_names().router_noise.name == w_noise);
        CHECK(model.blocks()[0].visit_moe([](const auto& m) { return m.logit_columns(); }) == 2 * experts);
        // Without noise it routes as the clean model: the same outputs to float rounding.
        const LoadedModel<reference> clean = load_model<reference>(ck);
        Matrix<float> y_noisy(rows, d), y_clean(rows, d), y_drawn(rows, d);
        RoutingPlan plan;
        model.blocks()[0].forward(x.view(), y_noisy.view(), ws, plan, Context{.router_noise = false});
        clean.blocks()[0].forward(x.view(), y_clean.view(), ws, plan);
        CHECK(test::relative_error(y_noisy, y_clean) <= 1e-5);
        model.blocks()[0].forward(x.view(), y_drawn.view(), ws, plan, ctx);
        CHECK(test::relative_error(y_drawn, y_clean) > 1e-3);
    }
    // The gradients of sum(y * dy) by checkpoint name, w_noise in its [d, E] layout.
    Matrix<float> dx(rows, d);
    const std::vector<TensorToWrite> grads = load_model<reference>(store.checkpoint(), noisy).blocks()[0].gradients(x.view(), dy.view(), dx.view(), ws, ctx);
    const auto find = [&](const std::string& name) -> const TensorToWrite& {
        const auto it = std::find_if(grads.begin(), grads.end(), [&](const TensorToWrite& t) { return t.name == "d/" + name; });
        REQUIRE(it != grads.end());
        return *it;
    };
    const auto loss = [&] {
        const LoadedModel<reference> model = load_model<reference>(store.checkpoint(), noisy);
        Matrix<float> y(rows, d);
        RoutingPlan plan;
        model.blocks()[0].forward(x.view(), y.view(), ws, plan, ctx);
        return test::dot(y, dy);
    };
    int checked = 0, kinks = 0;
    for (const std::string& name : {w_noise, w_gate}) {
        const TensorToWrite& g = find(name);
        CHECK(g.shape == std::vector<index_t>{d, experts});
        const auto* gv = reinterpret_cast<const float*>(g.bytes.data());
        double largest = 0;
        for (index_t j = 0; j < d * experts; ++j) largest = std::max(largest, double(std::abs(gv[j])));
        CAPTURE(name);
        REQUIRE(largest > 0);
        for (index_t j = 0; j < d * experts; j += 3) {
            float& v = store.values(name)[std::size_t(j)];
            const double fd = test::central_difference(v, loss, 1e-3f), fd_half = test::central_difference(v, loss, 5e-4f);
            const double tolerance = 0.01 * largest + 0.02 * std::abs(fd);
            if (std::abs(fd - fd_half) > tolerance) { // a selection flipped inside the step
                ++kinks;
                continue;
            }
            ++checked;
            CAPTURE(j);
            CHECK(std::abs(double(gv[j]) - fd) <= tolerance);
        }
    }
    MESSAGE(detail::concat("noisy gating: ", checked, " entries of w_noise and w_gate checked, ", kinks, " skipped at a selection change"));
    CHECK(kinks * 4 <= checked);
    // The trainer trains w_noise, and evaluates without noise (as the clean model does).
    Trainer<reference> trainer(ck, TrainOptions{.load = noisy}), clean(ck, TrainOptions{});
    const auto names = trainer.parameter_names();
    CHECK(std::find(names.begin(), names.end(), w_noise) != names.end());
    const Matrix<float> target = random_rows(rows, d, 9, 0.5);
    CHECK(trainer.evaluate(x.view(), {target.view(), {}}).loss == doctest::Approx(clean.evaluate(x.view(), {target.view(), {}}).loss).epsilon(1e-6));
    const std::vector<float> before(trainer.values(w_noise).begin(), trainer.values(w_noise).end());
    trainer.step(x.view(), {target.view(), {}});
    CHECK_FALSE(std::equal(before.begin(), before.end(), trainer.values(w_noise).begin()));
    // Only hypermoe_gpt2 checkpoints hold a noise weight.
    const SyntheticImage mixtral = small_model("mixtral");
    CHECK_THROWS_WITH_AS((void)load_model<reference>(Checkpoint(mixtral.config, mixtral.safetensors, "mixtral"), noisy),
                         "LoadOptions::noisy_gating is set, but mixtral checkpoints hold no noise weight (the HyperMoE reference "
                         "code's w_noise; hypermoe_gpt2's do)",
                         config_error);
}

TEST_CASE("Trainer on gpt-oss's fused expert tensors: the gradients and steps of the same model with each expert's own tensors") {
    // The fixture holds Hugging Face's fused layout; the split copy is what llama.cpp's converter
    // makes of it. Each fused gradient's slices are the split one's, and AdamW (biases without
    // weight decay, though the fused biases are 2-D) moves both alike.
    const Checkpoint fused(test::data_dir + "/gpt_oss-basic");
    const std::vector<std::byte> split_image = safetensors_bytes(test::gpt_oss_split(fused));
    const Checkpoint split(fused.config(), split_image, "split gpt_oss");
    Trainer<reference> a(fused, TrainOptions{}), b(split, TrainOptions{});
    const std::vector<std::string> names = a.parameter_names();
    const std::string p = "model.layers.0.mlp.experts.";
    CHECK(std::count(names.begin(), names.end(), p + "gate_up_proj") == 1);
    CHECK(std::count(names.begin(), names.end(), p + "gate_up_proj_bias") == 1);
    CHECK(names.size() == 12); // router weight and bias, four fused expert tensors, two blocks
    const Matrix<float> x = random_rows(16, 32, 3, 2.0), target = random_rows(16, 32, 4, 0.5);
    const Targets t{target.view(), {}};
    for (int step = 0; step < 2; ++step) {
        CAPTURE(step);
        a.step(x.view(), t);
        b.step(x.view(), t);
        const index_t e = 8, d = 32, ff = 64;
        double worst = 0, scale = 0;
        const auto compare = [&](float got, float want) { worst = std::max(worst, double(std::abs(got - want))), scale = std::max(scale, double(std::abs(want))); };
        for (index_t x_ = 0; x_ < e; ++x_) {
            const std::string own = p + std::to_string(x_) + ".";
            for (index_t o = 0; o < ff; ++o) {
                for (index_t i = 0; i < d; ++i) {
                    compare(a.gradient(p + "gate_up_proj")[std::size_t((x_ * d + i) * 2 * ff + 2 * o)], b.gradient(own + "gate_proj.weight")[std::size_t(o * d + i)]);
                    compare(a.values(p + "gate_up_proj")[std::size_t((x_ * d + i) * 2 * ff + 2 * o + 1)], b.values(own + "up_proj.weight")[std::size_t(o * d + i)]);
                    compare(a.values(p + "down_proj")[std::size_t((x_ * ff + o) * d + i)], b.values(own + "down_proj.weight")[std::size_t(i * ff + o)]);
                }
                compare(a.values(p + "gate_up_proj_bias")[std::size_t(x_ * 2 * ff + 2 * o + 1)], b.values(own + "up_proj.bias")[std::size_t(o)]);
            }
            for (index_t i = 0; i < d; ++i)
                compare(a.gradient(p + "down_proj_bias")[std::size_t(x_ * d + i)], b.gradient(own + "down_proj.bias")[std::size_t(i)]);
        }
        CHECK(worst <= 1e-6 * scale);
        CHECK(scale > 0);
    }
}

TEST_CASE("Trainer: typed errors name the argument and both sides") {
    const SyntheticImage image = small_model("mixtral");
    const Checkpoint ck(image.config, image.safetensors, "mixtral");
    TrainOptions bf16_storage;
    bf16_storage.load.storage = dtype::bf16;
    CHECK_THROWS_WITH_AS(Trainer<reference>(ck, bf16_storage),
                         "Trainer: LoadOptions::storage is bf16, expected f32 (a backward computes with the weights as trained)", config_error);
    CHECK_THROWS_WITH_AS(Trainer<reference>(ck, TrainOptions{.loss = LossKind::cross_entropy, .classes = 40}),
                         "Trainer: classes is 40, expected 2 <= classes <= 32 (the blocks' width)", config_error);
    Trainer<reference> trainer(ck, TrainOptions{});
    const Matrix<float> x = random_rows(4, 31, 1), target = random_rows(4, 32, 2);
    CHECK_THROWS_WITH_AS(trainer.step(x.view(), {target.view(), {}}), "Trainer::gradients: x has shape (4, 31), expected (4, 32)", shape_error);
    const Matrix<float> x2 = random_rows(4, 32, 1), short_target = random_rows(3, 32, 2);
    CHECK_THROWS_WITH_AS(trainer.step(x2.view(), {short_target.view(), {}}), "mse_loss: target has shape (3, 32), expected (4, 32)",
                         shape_error);
    Matrix<float> inf_x = random_rows(4, 32, 1);
    inf_x(0, 3) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(trainer.step(inf_x.view(), {target.view(), {}}), "Trainer: x: element (0, 3) is inf, expected a finite value", numeric_error);
    CHECK_THROWS_WITH_AS(Checkpoint(nlohmann::json::array(), image.safetensors, "mixtral"), "mixtral (in memory): the config is not a JSON object",
                         config_error);
    CHECK_THROWS_WITH_AS((void)trainer.gradient("model.norm.weight"), "Trainer: 'model.norm.weight' is not a trained parameter", config_error);
    // A tensor that no longer loads: the rebuild's error, then no blocks until a refresh loads.
    const std::string name = trainer.parameter_names().back();
    const float kept = trainer.values(name)[0];
    trainer.values(name)[0] = std::numeric_limits<float>::quiet_NaN();
    std::string load_error;
    try {
        trainer.refresh();
    } catch (const error& e) {
        load_error = e.what();
    }
    CAPTURE(load_error);
    CHECK(load_error.find("nan") != std::string::npos);
    CHECK(trainer.width() == 32);
    const std::string no_blocks = "Trainer: no blocks, since rebuilding them from the updated tensors failed: " + load_error;
    CHECK_THROWS_WITH_AS(trainer.step(x2.view(), {target.view(), {}}), no_blocks.c_str(), config_error);
    Matrix<float> y(4, 32);
    CHECK_THROWS_WITH_AS(trainer.forward(x2.view(), y.view()), no_blocks.c_str(), config_error);
    CHECK_THROWS_WITH_AS((void)trainer.model(), no_blocks.c_str(), config_error);
    trainer.values(name)[0] = kept;
    trainer.refresh();
    CHECK_NOTHROW(trainer.step(x2.view(), {target.view(), {}}));
    CHECK_THROWS_WITH_AS(MultiTaskGenerator(MultiTaskProblem{.width = 12, .classes = 4, .task_dims = 8}),
                         "MultiTaskProblem: tasks 8, classes 4, task_dims 8, task_rank 2 and width 12, expected tasks >= 1, classes >= 2, "
                         "task_dims >= 1, task_rank >= 1 and width > classes + task_dims",
                         config_error);
}
