#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::random_vector;
using test::relative_error;

namespace {

/// The expert formulas written out in double, independent of every backend.
template <class Act>
Matrix<float> naive_ffn(ConstMatrixView<float> x, ConstMatrixView<float> up, const std::vector<float>& bu,
                        ConstMatrixView<float> down, const std::vector<float>& bd) {
    Matrix<float> y(x.rows(), down.rows());
    std::vector<double> h(static_cast<std::size_t>(up.rows()));
    for (index_t m = 0; m < x.rows(); ++m) {
        for (index_t f = 0; f < up.rows(); ++f) {
            double acc = bu.empty() ? 0.0 : bu[std::size_t(f)];
            for (index_t k = 0; k < x.cols(); ++k) acc += double(x(m, k)) * up(f, k);
            h[std::size_t(f)] = Act::apply(acc);
        }
        for (index_t o = 0; o < down.rows(); ++o) {
            double acc = bd.empty() ? 0.0 : bd[std::size_t(o)];
            for (index_t f = 0; f < up.rows(); ++f) acc += h[std::size_t(f)] * down(o, f);
            y(m, o) = float(acc);
        }
    }
    return y;
}

template <class Act>
Matrix<float> naive_glu(ConstMatrixView<float> x, ConstMatrixView<float> gate, ConstMatrixView<float> up,
                        ConstMatrixView<float> down) {
    Matrix<float> y(x.rows(), down.rows());
    std::vector<double> h(static_cast<std::size_t>(up.rows()));
    for (index_t m = 0; m < x.rows(); ++m) {
        for (index_t f = 0; f < up.rows(); ++f) {
            double g = 0, u = 0;
            for (index_t k = 0; k < x.cols(); ++k) {
                g += double(x(m, k)) * gate(f, k);
                u += double(x(m, k)) * up(f, k);
            }
            h[std::size_t(f)] = Act::apply(g) * u;
        }
        for (index_t o = 0; o < down.rows(); ++o) {
            double acc = 0;
            for (index_t f = 0; f < up.rows(); ++f) acc += h[std::size_t(f)] * down(o, f);
            y(m, o) = float(acc);
        }
    }
    return y;
}

/// Static and dynamic widths of the same (d, ff): the tests run both.
template <class B, index_t D, index_t FF>
struct Config {
    using backend = B;
    static constexpr index_t d = D == dynamic ? 37 : D;
    static constexpr index_t ff = FF == dynamic ? 53 : FF;
    static constexpr index_t static_d = D;
    static constexpr index_t static_ff = FF;
};

template <class B>
using configs_of = std::tuple<Config<B, dynamic, dynamic>, Config<B, 37, 53>, Config<B, 37, dynamic>>;

using all_configs = decltype(std::apply([](auto... b) { return std::tuple_cat(configs_of<decltype(b)>{}...); },
                                        test::all_backends{}));

} // namespace

TEST_CASE_TEMPLATE_DEFINE("FfnExpert matches the formula and the reference backend", C, ffn_expert) {
    using B = typename C::backend;
    constexpr index_t d = C::d, ff = C::ff;
    const Matrix<float> up = random_matrix(ff, d, 1, 0.3f), down = random_matrix(d, ff, 2, 0.3f);
    const auto bu = random_vector(ff, 3), bd = random_vector(d, 4);
    const FfnWeights w{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view()),
                       .up_bias = bu, .down_bias = bd};
    const FfnExpert<B, GeluTanh, C::static_d, C::static_ff> expert(w);
    const FfnExpert<reference, GeluTanh> oracle(w);
    CHECK(expert.d_model() == d);
    CHECK(expert.d_ff() == ff);
    static_assert(Expert<FfnExpert<B, GeluTanh, C::static_d, C::static_ff>>);
    Workspace ws;
    for (const index_t m : {0, 1, 5, 64}) {
        CAPTURE(m);
        const Matrix<float> x = random_matrix(m, d, 5);
        Matrix<float> y(m, d), y_ref(m, d);
        expert.forward(x.view(), y.view(), ws);
        oracle.forward(x.view(), y_ref.view(), ws);
        const Matrix<float> y_naive = naive_ffn<GeluTanh>(x.view(), up.view(), bu, down.view(), bd);
        CHECK(relative_error(y_ref.view(), y_naive.view()) <= 1e-6);
        CHECK(relative_error(y.view(), y_ref.view()) <= test::tolerance(d + ff));
    }
}
TEST_CASE_TEMPLATE_APPLY(ffn_expert, all_configs);

TEST_CASE_TEMPLATE_DEFINE("GluExpert matches the formula and the reference backend", C, glu_expert) {
    using B = typename C::backend;
    constexpr index_t d = C::d, ff = C::ff;
    const Matrix<float> gate = random_matrix(ff, d, 1, 0.3f), up = random_matrix(ff, d, 2, 0.3f),
                        down = random_matrix(d, ff, 3, 0.3f);
    for (const dtype storage : {dtype::f32, dtype::bf16}) {
        CAPTURE(to_string(storage));
        // bf16 weights are given as bf16 tensors, as a checkpoint would.
        const Matrix<bf16> gb = test::to_bf16(gate.view()), ub = test::to_bf16(up.view()),
                           db = test::to_bf16(down.view());
        const GluWeights w = storage == dtype::f32
            ? GluWeights{.gate = ConstMatrixView<float>(gate.view()), .up = ConstMatrixView<float>(up.view()),
                         .down = ConstMatrixView<float>(down.view())}
            : GluWeights{.gate = ConstMatrixView<bf16>(gb.view()), .up = ConstMatrixView<bf16>(ub.view()),
                         .down = ConstMatrixView<bf16>(db.view())};
        const GluExpert<B, Silu, C::static_d, C::static_ff> expert(w);
        const GluExpert<reference, Silu> oracle(w);
        Workspace ws;
        for (const index_t m : {0, 1, 5, 64}) {
            CAPTURE(m);
            const Matrix<float> x = random_matrix(m, d, 5);
            Matrix<float> y(m, d), y_ref(m, d);
            expert.forward(x.view(), y.view(), ws);
            oracle.forward(x.view(), y_ref.view(), ws);
            if (storage == dtype::f32) {
                const Matrix<float> y_naive = naive_glu<Silu>(x.view(), gate.view(), up.view(), down.view());
                CHECK(relative_error(y_ref.view(), y_naive.view()) <= 1e-6);
            }
            CHECK(relative_error(y.view(), y_ref.view()) <= test::tolerance(d + ff));
        }
    }
    // gate and up of different types (one of them given as bf16): [gate; up] is held widened to
    // f32, so the expert is the f32 one on those values.
    const Matrix<bf16> gb = test::to_bf16(gate.view());
    Matrix<float> gate_widened(ff, d);
    for (index_t r = 0; r < ff; ++r)
        for (index_t c = 0; c < d; ++c) gate_widened(r, c) = gb(r, c).to_float();
    const GluExpert<B, Silu, C::static_d, C::static_ff> mixed(GluWeights{
        .gate = ConstMatrixView<bf16>(gb.view()), .up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())});
    const Matrix<float> x = random_matrix(7, d, 6);
    Matrix<float> y(7, d);
    Workspace ws;
    mixed.forward(x.view(), y.view(), ws);
    const Matrix<float> y_naive = naive_glu<Silu>(x.view(), gate_widened.view(), up.view(), down.view());
    CHECK(relative_error(y.view(), y_naive.view()) <= test::tolerance(d + ff));
}
TEST_CASE_TEMPLATE_APPLY(glu_expert, all_configs);

TEST_CASE_TEMPLATE_DEFINE("GluExpert with gpt-oss's clamped SwiGLU matches the formula and the reference backend, clamps active", B,
                          glu_swiglu_oai) {
    const index_t d = 48, ff = 40;
    const Matrix<float> gate = random_matrix(ff, d, 1, 0.6f), up = random_matrix(ff, d, 2, 0.6f), down = random_matrix(d, ff, 3, 0.3f);
    const auto bg = random_vector(ff, 4), bu = random_vector(ff, 5), bd = random_vector(d, 6);
    const GluWeights w{ConstMatrixView<float>(gate.view()), ConstMatrixView<float>(up.view()), ConstMatrixView<float>(down.view()), bg, bu, bd};
    const GluExpert<B, SwiGluOai> expert(w);
    const GluExpert<reference, SwiGluOai> oracle(w);
    const Matrix<float> x = random_matrix(9, d, 7, 4.0f);
    // The formula in double, written out: g' = min(g, 7), u' = clamp(u, -7, 7), h = g' sigmoid(1.702 g') (u' + 1).
    Matrix<float> y_naive(x.rows(), d);
    index_t gate_clamped = 0, up_clamped = 0;
    for (index_t m = 0; m < x.rows(); ++m) {
        std::vector<double> h(static_cast<std::size_t>(ff));
        for (index_t f = 0; f < ff; ++f) {
            double g = bg[std::size_t(f)], u = bu[std::size_t(f)];
            for (index_t k = 0; k < d; ++k) g += double(x(m, k)) * gate(f, k), u += double(x(m, k)) * up(f, k);
            gate_clamped += g > 7, up_clamped += std::abs(u) > 7;
            g = std::min(g, 7.0), u = std::max(-7.0, std::min(u, 7.0));
            h[std::size_t(f)] = g / (1 + std::exp(-1.702 * g)) * (u + 1);
        }
        for (index_t o = 0; o < d; ++o) {
            double acc = bd[std::size_t(o)];
            for (index_t f = 0; f < ff; ++f) acc += h[std::size_t(f)] * down(o, f);
            y_naive(m, o) = float(acc);
        }
    }
    CHECK(gate_clamped > 10); // the clamps are exercised, on both sides for up
    CHECK(up_clamped > 10);
    Matrix<float> y(x.rows(), d), y_ref(x.rows(), d);
    Workspace ws;
    expert.forward(x.view(), y.view(), ws);
    oracle.forward(x.view(), y_ref.view(), ws);
    CHECK(relative_error(y_ref.view(), y_naive.view()) <= 1e-6);
    CHECK(relative_error(y.view(), y_naive.view()) <= test::tolerance(d + ff));
}
TEST_CASE_TEMPLATE_APPLY(glu_swiglu_oai, test::all_backends);

namespace {

/// Matrix m's rows quantised to Blocks, in ggml's layout (a block view's bytes).
template <class Block>
std::vector<Block> quantised(ConstMatrixView<float> m) {
    const index_t per_row = (m.cols() + quant_block - 1) / quant_block;
    std::vector<Block> out(std::size_t(m.rows() * per_row));
    for (index_t r = 0; r < m.rows(); ++r)
        quantize_row(m.row(r), std::span(out).subspan(std::size_t(r * per_row), std::size_t(per_row)), "test");
    return out;
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("GluExpert holds [gate; up] in its storage type: rows already in it as they are, others converted as its linear map would",
                          B, glu_stacked_storage) {
    const index_t d = 64, ff = 96;
    const Matrix<float> gate = random_matrix(ff, d, 1), up = random_matrix(ff, d, 2), down = random_matrix(d, ff, 3);
    const Matrix<float> x = random_matrix(9, d, 4);
    Workspace ws;
    const auto run = [&](const GluWeights& w, const ExpertOptions& opt) {
        const GluExpert<B, Silu> e(w, opt);
        Matrix<float> y(x.rows(), d);
        e.forward(x.view(), y.view(), ws);
        return y;
    };
    const auto same = [](const Matrix<float>& a, const Matrix<float>& b) {
        return std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.rows() * a.cols())) == 0;
    };
    const GluWeights f32{gate.view(), up.view(), down.view()};
    // From f32 into each storage: the expert given its weights already in that type.
    const Matrix<bf16> gb = test::to_bf16(gate.view()), ub = test::to_bf16(up.view()), db = test::to_bf16(down.view());
    CHECK(same(run(f32, {dtype::bf16}), run({ConstMatrixView<bf16>(gb.view()), ConstMatrixView<bf16>(ub.view()), ConstMatrixView<bf16>(db.view())}, {})));
    const auto g8 = quantised<BlockQ8_0>(gate.view()), u8 = quantised<BlockQ8_0>(up.view()), d8 = quantised<BlockQ8_0>(down.view());
    const auto g4 = quantised<BlockQ4_0>(gate.view()), u4 = quantised<BlockQ4_0>(up.view()), d4 = quantised<BlockQ4_0>(down.view());
    const auto q8 = [&](const auto& b, index_t n, index_t k) { return WeightView::blocks(b.data(), dtype::q8_0, n, k); };
    const auto q4 = [&](const auto& b, index_t n, index_t k) { return WeightView::blocks(b.data(), dtype::q4_0, n, k); };
    CHECK(same(run(f32, {dtype::q8_0}), run({q8(g8, ff, d), q8(u8, ff, d), q8(d8, d, ff)}, {})));
    CHECK(same(run(f32, {dtype::q4_0}), run({q4(g4, ff, d), q4(u4, ff, d), q4(d4, d, ff)}, {})));
    const auto gm = quantised<BlockMXFP4>(gate.view()), um = quantised<BlockMXFP4>(up.view()), dm = quantised<BlockMXFP4>(down.view());
    const auto mx = [&](const auto& b, index_t n, index_t k) { return WeightView::blocks(b.data(), dtype::mxfp4, n, k); };
    CHECK(same(run(f32, {dtype::mxfp4}), run({mx(gm, ff, d), mx(um, ff, d), mx(dm, d, ff)}, {})));
    // keep_stored: weights in bf16 or blocks stay as they are, f32 ones go to the storage; gate
    // and up together (the fused map holds one type): as stored only when they share it.
    {
        const ExpertOptions keep{.storage = dtype::q8_0, .keep_stored = true};
        const GluExpert<B, Silu> mixed({q4(g4, ff, d), q4(u4, ff, d), down.view()}, keep);
        CHECK(mixed.gate_up().storage() == dtype::q4_0);
        CHECK(mixed.down().storage() == dtype::q8_0);
        CHECK(same(run({q4(g4, ff, d), q4(u4, ff, d), down.view()}, keep), run({q4(g4, ff, d), q4(u4, ff, d), q8(d8, d, ff)}, {})));
        const GluExpert<B, Silu> apart({q4(g4, ff, d), q8(u8, ff, d), ConstMatrixView<bf16>(db.view())}, keep);
        CHECK(apart.gate_up().storage() == dtype::q8_0);
        CHECK(apart.down().storage() == dtype::bf16);
        const FfnExpert<B, Gelu> ffn({q4(u4, ff, d), down.view()}, keep);
        CHECK(ffn.up().storage() == dtype::q4_0);
        CHECK(ffn.down().storage() == dtype::q8_0);
    }
    // gate as q4_0 blocks no quantiser of their values gives (requantising would change them),
    // up as f32: gate's blocks are kept, up's rows quantised.
    std::vector<BlockQ4_0> odd = g4;
    for (std::size_t i = 0; i < odd.size(); ++i) {
        odd[i].d = f32_to_f16_bits(-0.01f * float(i % 7 + 1));
        for (auto& q : odd[i].qs) q = std::uint8_t(0x9a + i % 5); // nibbles 9..14 and 10: no -8
    }
    CHECK(same(run({q4(odd, ff, d), up.view(), q4(d4, d, ff)}, {dtype::q4_0}), run({q4(odd, ff, d), q4(u4, ff, d), q4(d4, d, ff)}, {})));
    CHECK_FALSE(same(run({q4(odd, ff, d), up.view(), q4(d4, d, ff)}, {dtype::q4_0}), run(f32, {dtype::q4_0})));
    // Errors are the linear map's, whatever the storage: a NaN in up's row 3 is row ff + 3 of [gate; up].
    Matrix<float> nan = up;
    nan(3, 5) = std::numeric_limits<float>::quiet_NaN();
    for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k}) {
        CAPTURE(to_string(storage));
        CHECK_THROWS_WITH_AS((GluExpert<B, Silu>(GluWeights{gate.view(), std::as_const(nan).view(), down.view()}, ExpertOptions{storage})),
                             "GluExpert weight 'gate|up': weight element (99, 5) is nan, expected a finite value", weight_error);
    }
    // Gate and up in one buffer, up's rows right after gate's (as the loader converts a routed
    // expert's, TensorBinder::deferred_stack): viewed as the stack, not copied; the same outputs
    // and errors.
    Matrix<float> both(2 * ff, d);
    for (index_t r = 0; r < 2 * ff; ++r)
        for (index_t c = 0; c < d; ++c) both(r, c) = r < ff ? gate(r, c) : up(r - ff, c);
    const Matrix<bf16> both_b = test::to_bf16(both.view());
    std::vector<BlockQ4_0> both4 = g4;
    both4.insert(both4.end(), u4.begin(), u4.end());
    const auto half = [&]<class T>(const Matrix<T>& m, index_t first) { return ConstMatrixView<T>(m.data() + first * d, ff, d); };
    CHECK(same(run({half(both, 0), half(both, ff), down.view()}, {}), run(f32, {})));
    CHECK(same(run({half(both_b, 0), half(both_b, ff), ConstMatrixView<bf16>(db.view())}, {}), run(f32, {dtype::bf16})));
    CHECK(same(run({q4(both4, ff, d), WeightView::blocks(both4.data() + g4.size(), dtype::q4_0, ff, d), q4(d4, d, ff)}, {}),
               run(f32, {dtype::q4_0})));
    both(ff + 3, 5) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS((GluExpert<B, Silu>(GluWeights{half(both, 0), half(both, ff), down.view()})),
                         "GluExpert weight 'gate|up': weight element (99, 5) is nan, expected a finite value", weight_error);
    Matrix<float> big = gate;
    big(2, 1) = 1e9f;
    CHECK_THROWS_WITH_AS((GluExpert<B, Silu>(GluWeights{std::as_const(big).view(), up.view(), down.view()}, ExpertOptions{dtype::q4_0})),
                         "GluExpert weight 'gate|up' row 2: element 1 is 1e+09, expected a finite value of magnitude at most 524032 to quantise",
                         weight_error);
}
TEST_CASE_TEMPLATE_APPLY(glu_stacked_storage, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("experts reject mis-shaped weights and inputs", B, expert_errors) {
    const Matrix<float> up = random_matrix(16, 8, 1), down = random_matrix(8, 16, 2), bad = random_matrix(8, 15, 3);
    const ConstMatrixView<float> u = up.view(), dn = down.view(), bd = bad.view();
    CHECK_THROWS_WITH_AS((FfnExpert<B, Relu>(FfnWeights{.up = u, .down = bd})),
                         "FfnExpert: weight 'down' has shape (8, 15), expected (8, 16)", shape_error);
    CHECK_THROWS_WITH_AS((FfnExpert<B, Relu, 12>(FfnWeights{.up = u, .down = dn})),
                         "FfnExpert: weight 'up' gives d_model = 8, but the type fixes d_model = 12", shape_error);
    CHECK_THROWS_WITH_AS((FfnExpert<B, Relu, 8, 32>(FfnWeights{.up = u, .down = dn})),
                         "FfnExpert: weight 'up' gives d_ff = 16, but the type fixes d_ff = 32", shape_error);
    const std::vector<float> bias(15, 0.f);
    CHECK_THROWS_WITH_AS((FfnExpert<B, Relu>(FfnWeights{.up = u, .down = dn, .up_bias = bias})),
                         "FfnExpert weight 'up': bias has 15 elements, expected 16 (the weight's rows)", shape_error);
    CHECK_THROWS_WITH_AS((GluExpert<B, Silu>(GluWeights{.gate = u, .up = bd, .down = dn})),
                         "GluExpert: weight 'up' has shape (8, 15), expected (16, 8)", shape_error);
    CHECK_THROWS_WITH_AS((GluExpert<B, Silu>(GluWeights{.gate = u, .up = u, .down = dn, .gate_bias = bias})),
                         "GluExpert: bias 'gate' has 15 elements, expected 16", shape_error);

    const FfnExpert<B, Relu, 8> e(FfnWeights{.up = u, .down = dn});
    Workspace ws;
    Matrix<float> x(3, 9), y(3, 8);
    CHECK_THROWS_WITH_AS(e.forward(x.view(), y.view(), ws), "FfnExpert::forward: input x has 9 columns, expected 8",
                         shape_error);
    Matrix<float> x8(3, 8), y_bad(4, 8);
    CHECK_THROWS_WITH_AS(e.forward(x8.view(), y_bad.view(), ws),
                         "FfnExpert::forward: output y has shape (4, 8), expected (3, 8)", shape_error);
}
TEST_CASE_TEMPLATE_APPLY(expert_errors, test::all_backends);

namespace {

/// An expert's forward as its tiles (each stage's from the last to the first, from inputs
/// prepared once per stage) against forward() on the same rows: the same bits, kept
/// activations included.
template <class Expert>
void check_forward_tiles(const Expert& e, index_t rows, bool keep) {
    CAPTURE(rows);
    CAPTURE(keep);
    const index_t d = e.d_model(), ff = e.d_ff();
    const Matrix<float> x = random_matrix(rows, d, 21);
    Matrix<float> want(rows, d), got(rows, d), hidden(rows, ff);
    Matrix<float> kept_want(rows, e.kept_width()), kept_got(rows, e.kept_width());
    Workspace ws;
    e.forward(x.view(), want.view(), ws, {}, keep ? kept_want.view() : MatrixView<float>{});
    const typename Expert::ForwardTile t{x.view(), got.view(), hidden.view(), keep ? kept_got.view() : MatrixView<float>{}};
    for (const int stage : {1, 2}) {
        Workspace::Scope scope(ws, e.forward_prepared_bytes(stage, rows) + e.forward_tile_workspace_bytes(rows));
        const PreparedInput in = e.forward_prepare(stage, t, ws);
        for (index_t i = e.forward_tiles(stage) - 1; i >= 0; --i) e.forward_tile(stage, i, t, in, ws);
    }
    const auto same = [](const Matrix<float>& a, const Matrix<float>& b) {
        return std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.rows() * a.cols())) == 0;
    };
    CHECK(same(got, want));
    if (keep) CHECK(same(kept_got, kept_want));
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("expert forward tiles, in any order, give forward()'s bits for every storage and precision", B,
                          expert_forward_tiles) {
    for (const auto& shape : {std::pair<index_t, index_t>{320, 1152}, {24, 40}}) {
        const index_t d = shape.first, ff = shape.second;
        CAPTURE(d);
        CAPTURE(ff);
        const Matrix<float> gate = random_matrix(ff, d, 1, 0.2f), up = random_matrix(ff, d, 2, 0.2f), down = random_matrix(d, ff, 3, 0.2f);
        const std::vector<float> bg = random_vector(ff, 4), bu = random_vector(ff, 5), bd = random_vector(d, 6);
        for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k})
            for (const precision prec : {precision::exact, precision::fast}) {
                if (prec == precision::fast && storage == dtype::f32) continue;
                CAPTURE(to_string(storage));
                CAPTURE(to_string(prec));
                const ExpertOptions opt{storage, prec};
                const GluExpert<B, Silu> glu(GluWeights{gate.view(), up.view(), down.view(), bg, bu, bd}, opt);
                const FfnExpert<B, Gelu> ffn(FfnWeights{up.view(), down.view(), bu, bd}, opt);
                if (d == 320) {
                    CHECK(glu.forward_tiles(1) == 3); // 512, 512 and 128 columns of d_ff
                    CHECK(glu.forward_tile_columns(1, 2) == std::pair<index_t, index_t>{1024, 128});
                    CHECK(glu.forward_tile_columns(2, 1) == std::pair<index_t, index_t>{256, 64});
                    CHECK(glu.forward_tiles(2) == 2);
                    CHECK(ffn.forward_tiles(1) == 3);
                }
                for (const index_t rows : {1, 9, 70})
                    for (const bool keep : {false, true}) {
                        check_forward_tiles(glu, rows, keep);
                        check_forward_tiles(ffn, rows, keep);
                    }
            }
    }
    // Typed errors: the stage, the tile, the views.
    const Matrix<float> gate = random_matrix(40, 24, 1), down = random_matrix(24, 40, 3);
    const GluExpert<B, Silu> glu(GluWeights{gate.view(), gate.view(), down.view()});
    Matrix<float> x(3, 24), y(3, 24), hidden(3, 40), narrow(3, 39);
    Workspace ws;
    const typename GluExpert<B, Silu>::ForwardTile t{x.view(), y.view(), hidden.view(), {}};
    const PreparedInput in = glu.forward_prepare(1, t, ws);
    CHECK_THROWS_WITH_AS(glu.forward_tile(3, 0, t, in, ws), "GluExpert::forward_tile: stage 3, expected 1 or 2", config_error);
    CHECK_THROWS_WITH_AS(glu.forward_tile(2, glu.forward_tiles(2), t, in, ws),
                         doctest::Contains("GluExpert::forward_tile: tile 1 of stage 2, expected one of [0, 1)"), shape_error);
    const typename GluExpert<B, Silu>::ForwardTile bad{x.view(), y.view(), narrow.view(), {}};
    CHECK_THROWS_WITH_AS(glu.forward_tile(1, 0, bad, in, ws), "GluExpert::forward_tile: hidden has shape (3, 39), expected (3, 40)",
                         shape_error);
    CHECK_THROWS_WITH_AS((void)glu.forward_prepare(2, bad, ws), "GluExpert::forward_tile: hidden has shape (3, 39), expected (3, 40)",
                         shape_error);
}
TEST_CASE_TEMPLATE_APPLY(expert_forward_tiles, test::all_backends);
