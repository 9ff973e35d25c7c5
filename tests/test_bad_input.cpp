// Bad input gets a typed error naming the argument and both sides, never undefined behaviour:
// loss shapes, in-place forward, size overflows, renormalising a zero sum, malformed metadata
// and config integers (issue 9, point 6).
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <unistd.h>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;
using test::TempDir;
using test::random_matrix;

TEST_CASE("the load-balancing loss checks the logits' shape against the plan") {
    const TopKRouter router(4, TopK{2});
    const Matrix<float> logits = random_matrix(5, 4, 1);
    RoutingPlan plan;
    Workspace ws;
    router.route(logits.view(), {}, plan, ws);
    CHECK(load_balancing_loss(plan, logits.view()) > 0);
    const Matrix<float> narrow = random_matrix(5, 3, 1), short_rows = random_matrix(4, 4, 1);
    CHECK_THROWS_WITH_AS((void)load_balancing_loss(plan, narrow.view()),
                         "load_balancing_loss: logits has shape (5, 3), expected (5, 4)", shape_error);
    CHECK_THROWS_WITH_AS((void)load_balancing_loss(plan, short_rows.view()),
                         "load_balancing_loss: logits has shape (4, 4), expected (5, 4)", shape_error);
}

TEST_CASE("forward with y overlapping x is a shape_error") {
    const Matrix<float> up = random_matrix(8, 4, 1), down = random_matrix(4, 8, 2);
    const DenseFfn layer(FfnExpert<reference, Relu>(
        FfnWeights{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())}));
    Matrix<float> x = random_matrix(6, 4, 3);
    Workspace ws;
    CHECK_THROWS_WITH_AS(layer.forward(x.view(), x.view(), ws),
                         "DenseFfn::forward: output y overlaps input x; in-place forward is not supported, expected "
                         "separate buffers",
                         shape_error);
    // Rows 2..5 as output of rows 0..3: still an overlap.
    CHECK_THROWS_AS(layer.forward(x.view().row_block(0, 4), x.view().row_block(2, 4), ws), shape_error);
    // Disjoint parts of one buffer are fine.
    Matrix<float> both(12, 4);
    both.copy_from(random_matrix(12, 4, 4).view());
    CHECK_NOTHROW(layer.forward(both.view().row_block(0, 6), both.view().row_block(6, 6), ws));
}

TEST_CASE("backward with dx overlapping x or dy is a shape_error") {
    const RmsNorm<> norm(std::vector<float>{1.0f, 0.5f, 2.0f, -1.0f}, 1e-6f);
    Matrix<float> x = random_matrix(6, 4, 3), dy = random_matrix(6, 4, 4), dx(6, 4);
    Workspace ws;
    auto g = norm.make_gradients();
    CHECK_THROWS_WITH_AS(norm.backward(x.view(), dy.view(), x.view(), g, ws),
                         "RmsNorm::backward: dx overlaps x or dy; expected separate buffers", shape_error);
    CHECK_THROWS_WITH_AS(norm.backward(x.view(), dy.view(), dy.view(), g, ws),
                         "RmsNorm::backward: dx overlaps x or dy; expected separate buffers", shape_error);
    CHECK_NOTHROW(norm.backward(x.view(), dy.view(), dx.view(), g, ws));
}

TEST_CASE("sizes that overflow are typed errors, not wrapped products") {
    constexpr index_t huge = index_t{1} << 40;
    CHECK_THROWS_WITH_AS(Matrix<float>(huge, huge), doctest::Contains("Matrix: shape (1099511627776, 1099511627776)"),
                         shape_error);
    CHECK_THROWS_WITH_AS(Matrix<float>(-1, 2), "Matrix: shape (-1, 2), expected non-negative sizes", shape_error);
    Workspace ws;
    CHECK_THROWS_WITH_AS((void)ws.take_matrix<float>(huge, huge),
                         doctest::Contains("Workspace::take_matrix: shape (1099511627776, 1099511627776)"), shape_error);
    CHECK_THROWS_WITH_AS((void)ws.take<float>(-3), "Workspace::take: -3 elements, expected >= 0", shape_error);
    CHECK(detail::padded_bytes<float>(std::numeric_limits<index_t>::max()) == detail::unreal_bytes);
    CHECK_THROWS_WITH_AS(Workspace::Scope(ws, detail::unreal_bytes),
                         doctest::Contains("more than any machine holds (a size overflowed)"), error);
    // A layer asked for the workspace of an absurd token count reports a saturated size, and a
    // workspace of it is refused rather than wrapped.
    const Matrix<float> up = random_matrix(8, 4, 1), down = random_matrix(4, 8, 2);
    const FfnExpert<reference, Relu> e(FfnWeights{.up = ConstMatrixView<float>(up.view()),
                                                  .down = ConstMatrixView<float>(down.view())});
    CHECK(e.workspace_bytes(std::numeric_limits<index_t>::max() / 2) >= detail::unreal_bytes);
    CHECK(detail::saturating_mul(std::numeric_limits<index_t>::max() / 2, 3) == index_t(detail::unreal_bytes));
    CHECK(detail::saturating_mul(-1, 3) == index_t(detail::unreal_bytes));
    CHECK(detail::saturating_mul(0, 3) == 0);
    CHECK(detail::saturating_bytes(1000, detail::unreal_bytes / 2) == detail::unreal_bytes);
}

TEST_CASE_TEMPLATE_DEFINE("every layer asked for an absurd token count saturates instead of overflowing", B,
                          absurd_rows) {
    // UBSan (the CI's sanitizer stage) fails this on any signed overflow along the way.
    constexpr index_t absurd = std::numeric_limits<index_t>::max() / 2;
    CHECK(test::make_layer<B>(TopKRouter(6, TopK{2})).workspace_bytes(absurd) >= detail::unreal_bytes);
    const auto choice = test::make_layer<B>(ExpertChoiceRouter(6, ExpertChoice{1.5}));
    CHECK(choice.workspace_bytes(absurd) >= detail::unreal_bytes);
    CHECK(choice.max_assignments(absurd) <= index_t(detail::unreal_bytes));
    // Loaded blocks (HyperMoE too): tests/test_workspace.cpp, which loads every family.
}
TEST_CASE_TEMPLATE_APPLY(absurd_rows, test::all_backends);

TEST_CASE("renormalising selected scores that sum to zero is a numeric_error naming the token") {
    // Sigmoid scores of -1000 are exactly 0: renormalising them would divide by zero.
    const ScoredRouter<Sigmoid, TopK> router(4, TopK{2}, {.weighting = {.renormalize = true}});
    Matrix<float> logits = random_matrix(3, 4, 1);
    for (index_t e = 0; e < 4; ++e) logits(2, e) = -1000.0f;
    RoutingPlan plan;
    Workspace ws;
    CHECK_THROWS_WITH_AS(router.route(logits.view(), {}, plan, ws),
                         "Router: token 2's selected scores sum to 0 (+ epsilon 0); cannot renormalise, expected a sum > 0",
                         numeric_error);
    // With DeepSeek's epsilon the weights are 0, not NaN.
    const ScoredRouter<Sigmoid, TopK> eps(4, TopK{2}, {.weighting = {.renormalize = true, .epsilon = 1e-20}});
    eps.route(logits.view(), {}, plan, ws);
    CHECK(plan.weights(2)[0] == 0.0f);
}

TEST_CASE("malformed metadata and config integers are config_errors naming the key") {
    TempDir tmp("meta");
    const std::string file = (tmp.path / "x.safetensors").string();
    const std::vector<float> xv(8, 1.0f);
    for (const std::string bad : {"abc", "1x", "", "-1", "99999999999999999999999"}) {
        CAPTURE(bad);
        write_safetensors(file, {f32_tensor("x", {2, 4}, xv)}, {{"layer", bad}});
        const SafeTensorsFile f(file);
        const std::string want = "safetensors: metadata 'layer' is \"" + bad + "\", expected an integer in [0, 1000]";
        CHECK_THROWS_WITH_AS((void)f.view().metadata_integer("layer", 0, 1000), want.c_str(), config_error);
    }
    write_safetensors(file, {f32_tensor("x", {2, 4}, xv)}, {{"layer", "7"}});
    CHECK(SafeTensorsFile(file).view().metadata_integer("layer", 0, 1000) == 7);
    CHECK_THROWS_WITH_AS((void)SafeTensorsFile(file).view().metadata_integer("stack", 0, 1),
                         "safetensors: no metadata 'stack'", config_error);

    // A config width beyond 2^31 is refused before any size is multiplied out.
    write_synthetic_checkpoint(tmp.path.string(), {.family = family("mixtral")});
    nlohmann::json c;
    std::ifstream(tmp.path / "config.json") >> c;
    c["hidden_size"] = std::uint64_t(1) << 62;
    std::ofstream(tmp.path / "config.json") << c.dump();
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(tmp.path.string()), 0),
                         doctest::Contains("'hidden_size' is 4611686018427387904, expected <= 2147483648"), config_error);
}
