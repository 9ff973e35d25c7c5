// Backward passes (issue 12): each backend's linear map against the reference (the oracle)
// and, through its fused activation and scale, against central differences; the activations'
// derivatives; the experts and MoE layers against central differences; the typed errors. The MoE blocks against the float64 autograd gradients of the fixtures are in
// test_backward_fixtures.cpp.

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::random_vector;
using test::relative_error;
using test::GradientGap;
using test::central_difference;
using test::dot;

namespace {

/// max |got - ref| / max |ref| over two vectors.
double vector_error(const std::vector<float>& got, const std::vector<float>& ref) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        num = std::max(num, std::abs(double(got[i]) - ref[i]));
        den = std::max(den, std::abs(double(ref[i])));
    }
    return den == 0 ? num : num / den;
}

/// A matrix as a weight (an f32 view).
WeightView weight(const Matrix<float>& m) { return WeightView(m.view()); }

/// The reference backend's GluExpert backward of (x, dy) into dx_ref and the returned
/// gradients, checked against another backend's dx and g to 1e-5.
template <class Act = Silu>
GluGradients check_glu_against_reference(const GluWeights& w, const Matrix<float>& x, const Matrix<float>& dy, const Matrix<float>& dx,
                                         const GluGradients& g, Matrix<float>& dx_ref, Workspace& ws) {
    const GluExpert<reference, Act> oracle(w);
    GluGradients g_ref = oracle.make_gradients();
    oracle.backward(x, dy, dx_ref, g_ref, ws);
    CHECK(relative_error(dx, dx_ref) <= 1e-5);
    CHECK(relative_error(g.gate_up, g_ref.gate_up) <= 1e-5);
    CHECK(relative_error(g.down, g_ref.down) <= 1e-5);
    CHECK(vector_error(g.gate_up_bias, g_ref.gate_up_bias) <= 1e-5);
    CHECK(vector_error(g.down_bias, g_ref.down_bias) <= 1e-5);
    return g_ref;
}

/// The reference GluExpert<Act>'s gradients (g_ref, dx_ref) against central differences of
/// L = sum(y * dy) with step h: every third row and second column of the matrices, every bias and
/// input element, within 2e-3 of the largest difference quotient.
template <class Act>
void check_glu_central_differences(Matrix<float>& gate, Matrix<float>& up, Matrix<float>& down, std::vector<float>& bg, std::vector<float>& bu,
                                   std::vector<float>& bd, Matrix<float>& x, const Matrix<float>& dy, const GluGradients& g_ref,
                                   const Matrix<float>& dx_ref, float h, Workspace& ws) {
    const index_t ff = gate.rows(), d = gate.cols(), m = x.rows();
    const auto loss = [&] {
        const GluExpert<reference, Act> e(GluWeights{weight(gate), weight(up), weight(down), bg, bu, bd});
        Matrix<float> y(m, d);
        e.forward(x, y, ws);
        return dot(y, dy);
    };
    GradientGap compare;
    for (index_t i = 0; i < ff; i += 3)
        for (index_t j = 0; j < d; j += 2) {
            compare(g_ref.gate()(i, j), central_difference(gate(i, j), loss, h));
            compare(g_ref.up()(i, j), central_difference(up(i, j), loss, h));
            compare(g_ref.down(j, i), central_difference(down(j, i), loss, h));
        }
    for (index_t i = 0; i < ff; ++i) {
        compare(g_ref.gate_up_bias[std::size_t(i)], central_difference(bg[std::size_t(i)], loss, h));
        compare(g_ref.gate_up_bias[std::size_t(ff + i)], central_difference(bu[std::size_t(i)], loss, h));
    }
    for (index_t j = 0; j < d; ++j) compare(g_ref.down_bias[std::size_t(j)], central_difference(bd[std::size_t(j)], loss, h));
    for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < d; ++j) compare(dx_ref(r, j), central_difference(x(r, j), loss, h));
    CHECK(compare.within(2e-3));
}

/// The same for an FfnExpert (GELU, tanh form).
FfnGradients check_ffn_against_reference(const FfnWeights& w, const Matrix<float>& x, const Matrix<float>& dy, const Matrix<float>& dx,
                                         const FfnGradients& g, Matrix<float>& dx_ref, Workspace& ws) {
    const FfnExpert<reference, GeluTanh> oracle(w);
    FfnGradients g_ref = oracle.make_gradients();
    oracle.backward(x, dy, dx_ref, g_ref, ws);
    CHECK(relative_error(dx, dx_ref) <= 1e-5);
    CHECK(relative_error(g.up, g_ref.up) <= 1e-5);
    CHECK(relative_error(g.down, g_ref.down) <= 1e-5);
    CHECK(vector_error(g.up_bias, g_ref.up_bias) <= 1e-5);
    CHECK(vector_error(g.down_bias, g_ref.down_bias) <= 1e-5);
    return g_ref;
}

/// The row-wise linear map (HyperMoE's generation runs on it) in a backend's shape, so the
/// linear tests below cover it beside the backends.
struct rowwise_map {
    template <class Act>
    using linear = detail::RowwiseLinear<Act>;
};
using linear_maps = decltype(std::tuple_cat(test::all_backends{}, std::tuple<rowwise_map>{}));

template <class B>
constexpr bool is_eigen = false;
#if HYPERMOE_HAS_EIGEN
template <>
constexpr bool is_eigen<eigen> = true;
#endif

} // namespace

TEST_CASE_TEMPLATE_DEFINE("linear backward matches the reference on every backend and the row-wise map", B, linear_backward) {
    Workspace ws;
    for (const index_t m : {1, 3, 17, 70})
        // (80, 192): where oneDNN has brgemm, W^T is held in BA16a64b and dz W reads it directly
        for (const auto& kn : {std::pair<index_t, index_t>{8, 5}, {33, 40}, {64, 130}, {80, 192}})
            for (const bool bias : {false, true})
                for (const bool accumulate : {false, true}) {
                    const index_t k = kn.first, n = kn.second;
                    CAPTURE(m);
                    CAPTURE(k);
                    CAPTURE(n);
                    CAPTURE(bias);
                    CAPTURE(accumulate);
                    const auto w = random_matrix(n, k, 1);
                    const auto b = bias ? random_vector(n, 2) : std::vector<float>{};
                    const auto a = random_matrix(m, k, 3);
                    const auto dz = random_matrix(m, n, 4);
                    const typename B::template linear<Identity> lin(WeightView(w.view()), b, LinearOptions{"w"});
                    const reference::linear<Identity> oracle(WeightView(w.view()), b, LinearOptions{"w"});
                    // Start from non-zero gradients: backward adds to them.
                    auto da = random_matrix(m, k, 5), dw = random_matrix(n, k, 6);
                    auto db = bias ? random_vector(n, 7) : std::vector<float>{};
                    auto da_ref = da, dw_ref = dw;
                    auto db_ref = db;
                    lin.backward(a, dz, da, LinearGrads{dw.view(), db}, ws, accumulate);
                    oracle.backward(a, dz, da_ref, LinearGrads{dw_ref.view(), db_ref}, ws, accumulate);
                    CHECK(relative_error(da, da_ref) <= 1e-6);
                    CHECK(relative_error(dw, dw_ref) <= 1e-6);
                    if (bias) CHECK(vector_error(db, db_ref) <= 1e-6);
                }
    // The oracle itself against the formulas: da = dz W, dW = dz^T a.
    const auto w = random_matrix(3, 4, 8), a = random_matrix(2, 4, 9), dz = random_matrix(2, 3, 10);
    const reference::linear<Identity> oracle(WeightView(w.view()), {}, LinearOptions{"w"});
    Matrix<float> da(2, 4), dw(3, 4);
    oracle.backward(a, dz, da, LinearGrads{dw.view()}, ws);
    for (index_t i = 0; i < 2; ++i)
        for (index_t j = 0; j < 4; ++j) {
            double x = 0;
            for (index_t n = 0; n < 3; ++n) x += double(dz(i, n)) * w(n, j);
            CHECK(da(i, j) == doctest::Approx(x).epsilon(1e-6));
        }
    for (index_t n = 0; n < 3; ++n)
        for (index_t j = 0; j < 4; ++j) {
            double x = 0;
            for (index_t i = 0; i < 2; ++i) x += double(dz(i, n)) * a(i, j);
            CHECK(dw(n, j) == doctest::Approx(x).epsilon(1e-6));
        }
}
TEST_CASE_TEMPLATE_APPLY(linear_backward, linear_maps);

TEST_CASE_TEMPLATE_DEFINE("linear backward: strided views, and its typed errors", B, linear_backward_errors) {
    Workspace ws;
    const auto w = random_matrix(6, 4, 1);
    const typename B::template linear<Identity> lin(WeightView(w.view()), {}, LinearOptions{"w"});
    // Strided a, dz, da and dW (column blocks of wider matrices) give what dense ones give.
    auto a_wide = random_matrix(5, 7, 2), dz_wide = random_matrix(5, 9, 3);
    const auto a = ConstMatrixView<float>(a_wide.view()).col_block(1, 4);
    const auto dz = ConstMatrixView<float>(dz_wide.view()).col_block(2, 6);
    Matrix<float> da_wide(5, 6), dw_wide(6, 5), da(5, 4), dw(6, 4);
    Matrix<float> a_dense(5, 4), dz_dense(5, 6);
    for (index_t r = 0; r < 5; ++r) {
        for (index_t c = 0; c < 4; ++c) a_dense(r, c) = a(r, c);
        for (index_t c = 0; c < 6; ++c) dz_dense(r, c) = dz(r, c);
    }
    lin.backward(a, dz, da_wide.view().col_block(1, 4), LinearGrads{dw_wide.view().col_block(1, 4)}, ws);
    lin.backward(a_dense, dz_dense, da, LinearGrads{dw.view()}, ws);
    for (index_t r = 0; r < 5; ++r)
        for (index_t c = 0; c < 4; ++c) CHECK(da_wide(r, c + 1) == doctest::Approx(da(r, c)).epsilon(1e-6));
    for (index_t r = 0; r < 6; ++r)
        for (index_t c = 0; c < 4; ++c) CHECK(dw_wide(r, c + 1) == doctest::Approx(dw(r, c)).epsilon(1e-6));

    Matrix<float> bad(5, 3), dwbad(6, 3);
    std::vector<float> db_bad(5);
    CHECK_THROWS_WITH_AS(lin.backward(a_dense, dz_dense, bad, LinearGrads{dw.view()}, ws),
                         "w backward: input gradient has shape (5, 3), expected (5, 4)", shape_error);
    CHECK_THROWS_WITH_AS(lin.backward(a_dense, bad, da, LinearGrads{dw.view()}, ws),
                         "w backward: output gradient has shape (5, 3), expected (5, 6)", shape_error);
    CHECK_THROWS_WITH_AS(lin.backward(a_dense, dz_dense, da, LinearGrads{dwbad.view()}, ws),
                         "w backward: weight gradient has shape (6, 3), expected (6, 4)", shape_error);
    CHECK_THROWS_WITH_AS(lin.backward(a_dense, dz_dense, da, LinearGrads{dw.view(), db_bad}, ws),
                         "w backward: bias gradient has 5 elements, expected 6", shape_error);
    CHECK_THROWS_WITH_AS(lin.backward(bad, dz_dense, da, LinearGrads{dw.view()}, ws),
                         "w backward: input has 3 columns, expected 4", shape_error);
    // An inference copy (bf16 or blocks) has no backward.
    const auto w32 = random_matrix(6, 32, 4);
    for (const dtype storage : {dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k}) {
        CAPTURE(storage);
        const typename B::template linear<Identity> stored(WeightView(w32.view()), {}, LinearOptions{"w", false, storage});
        Matrix<float> a32(2, 32), da32(2, 32), dz32(2, 6), dw32(6, 32);
        CHECK_THROWS_WITH_AS(stored.backward(a32, dz32, da32, LinearGrads{dw32.view()}, ws),
                             ("w: backward needs f32 storage, but the weights are stored as " + std::string(to_string(storage)) +
                              " (load or build the layer with f32 storage to train it)")
                                 .c_str(),
                             config_error);
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_backward_errors, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("linear backward a tile at a time: affine_columns', backward_input's columns and weight_gradient's "
                          "blocks give the whole product's bits", B, linear_backward_tiles) {
    // What a pool of work items runs (GluExpert::backward_tile): da's columns in multiples of
    // backward_column_unit(), dW in blocks of rows and columns, in any order.
    Workspace ws;
    for (const auto& shape : {std::array<index_t, 3>{3, 8, 5}, {17, 80, 192}, {9, 300, 130}, {6, 1100, 40}, {5, 64, 2112}})
        for (const bool accumulate : {false, true}) {
            const index_t m = shape[0], k = shape[1], n = shape[2]; // (not a structured binding: CAPTURE's lambda takes them)
            CAPTURE(m);
            CAPTURE(k);
            CAPTURE(n);
            CAPTURE(accumulate);
            const auto w = random_matrix(n, k, 1), a = random_matrix(m, k, 3), dz = random_matrix(m, n, 4);
            const typename B::template linear<Identity> lin(WeightView(w.view()), {}, LinearOptions{"w"});
            const auto da0 = random_matrix(m, k, 5), dw0 = random_matrix(n, k, 6);
            auto da = da0, dw = dw0, da_tiles = da0, dw_tiles = dw0;
            lin.backward(a, dz, da, LinearGrads{dw.view()}, ws, accumulate);
            const index_t unit = lin.backward_column_unit(), width = std::max<index_t>(unit, (40 + unit - 1) / unit * unit);
            CHECK(unit >= 1);
            // Last tile first: each tile's columns depend on no other tile.
            for (index_t k0 = (k - 1) / width * width; k0 >= 0; k0 -= width)
                lin.backward_input(dz, da_tiles.view().col_block(k0, std::min(width, k - k0)), k0, ws, accumulate);
            for (index_t n0 = 0; n0 < n; n0 += 24)
                for (index_t k0 = (k - 1) / width * width; k0 >= 0; k0 -= width) {
                    const index_t rows = std::min<index_t>(24, n - n0), cols = std::min(width, k - k0);
                    lin.weight_gradient(a.view().col_block(k0, cols), dz.view().col_block(n0, rows),
                                        dw_tiles.view().row_block(n0, rows).col_block(k0, cols), ws);
                }
            CHECK(relative_error(da_tiles, da) == 0.0);
            // Eigen blocks a product by its shape, so a block of dW may sum in another order.
            CHECK(relative_error(dw_tiles, dw) <= (is_eigen<B> ? 1e-6 : 0.0));

            // The pre-activation Z = a W^T + b, whole and in tiles of forward_column_unit()
            const auto b = random_vector(n, 7);
            const typename B::template linear<Silu> biased(WeightView(w.view()), b, LinearOptions{"w"});
            const reference::linear<Silu> oracle(WeightView(w.view()), b, LinearOptions{"w"});
            Matrix<float> z(m, n), z_ref(m, n), z_tiles(m, n);
            biased.affine_columns(a, z.view(), 0, ws);
            oracle.affine_columns(a, z_ref.view(), 0, ws);
            CHECK(relative_error(z, z_ref) <= test::tolerance(k));
            const index_t f_unit = biased.forward_column_unit(), f_width = std::max<index_t>(f_unit, (40 + f_unit - 1) / f_unit * f_unit);
            for (index_t n0 = (n - 1) / f_width * f_width; n0 >= 0; n0 -= f_width)
                biased.affine_columns(a, z_tiles.view().col_block(n0, std::min(f_width, n - n0)), n0, ws);
            CHECK(relative_error(z_tiles, z) == 0.0);
        }

    // Typed errors, naming the call and both sides.
    const auto w = random_matrix(6, 64, 1);
    const typename B::template linear<Identity> lin(WeightView(w.view()), {}, LinearOptions{"w"});
    Matrix<float> dz(5, 6), da(5, 16), dz_bad(5, 7), da_short(4, 16), a(5, 64), dw(6, 64);
    CHECK_THROWS_WITH_AS(lin.backward_input(dz, da, 56, ws), "w backward_input: columns [56, 72) of the input gradient, expected a range within [0, 64)",
                         shape_error);
    CHECK_THROWS_WITH_AS(lin.backward_input(dz_bad, da, 0, ws), "w backward_input: output gradient has 7 columns, expected 6", shape_error);
    CHECK_THROWS_WITH_AS(lin.backward_input(dz, da_short, 0, ws),
                         "w backward_input: input gradient has 4 rows, expected 5 (the output gradient's)", shape_error);
    // A tile that starts inside a unit of columns (where the backend has units narrower than the
    // map): the message names the range, the unit and where the last tile may end.
    const auto misaligned = [](const std::string& call, const std::string& of, index_t start, index_t unit, const std::string& unit_call,
                               index_t end) {
        return "w " + call + ": columns [" + std::to_string(start) + ", " + std::to_string(start + unit) + ") of " + of +
               ", expected multiples of " + std::to_string(unit) + " (" + unit_call + "()) or a range that ends at " + std::to_string(end);
    };
    {
        const auto deep = random_matrix(6, 256, 3);
        const typename B::template linear<Identity> lin256(WeightView(deep.view()), {}, LinearOptions{"w"});
        Matrix<float> da256(5, 256);
        if (const index_t unit = lin256.backward_column_unit(); unit > 1 && unit < 256)
            CHECK_THROWS_WITH_AS(lin256.backward_input(dz, da256.view().col_block(0, unit), unit / 2, ws),
                                 misaligned("backward_input", "the input gradient", unit / 2, unit, "backward_column_unit", 256).c_str(),
                                 shape_error);
    }
    CHECK_THROWS_WITH_AS(lin.weight_gradient(a, dz, dw.view().col_block(0, 32), ws),
                         "w weight_gradient: weight gradient block has shape (6, 32), expected (6, 64)", shape_error);
    CHECK_THROWS_WITH_AS(lin.weight_gradient(a.view().row_block(0, 4), dz, dw, ws),
                         "w weight_gradient: output gradient has 5 rows, expected 4 (the input's)", shape_error);
    CHECK_THROWS_WITH_AS(lin.weight_gradient(a, dz_bad, dw, ws),
                         "w weight_gradient: input block has 64 columns and output gradient block 7, expected at most 64 and 6",
                         shape_error);
    Matrix<float> z(5, 6);
    CHECK_THROWS_WITH_AS(lin.affine_columns(a, z.view().col_block(2, 4), 4, ws),
                         "w affine_columns: columns [4, 8) of Z, expected a range within [0, 6)", shape_error);
    CHECK_THROWS_WITH_AS(lin.affine_columns(a.view().col_block(0, 60), z, 0, ws), "w affine_columns: input has 60 columns, expected 64",
                         shape_error);
    CHECK_THROWS_WITH_AS(lin.affine_columns(a.view().row_block(0, 4), z, 0, ws),
                         "w affine_columns: output has 5 rows, expected 4 (the input's)", shape_error);
    {
        const auto wide = random_matrix(40, 64, 2);
        const typename B::template linear<Identity> lin40(WeightView(wide.view()), {}, LinearOptions{"w"});
        Matrix<float> z40(5, 40);
        if (const index_t unit = lin40.forward_column_unit(); unit > 1 && unit < 40)
            CHECK_THROWS_WITH_AS(lin40.affine_columns(a, z40.view().col_block(0, unit), unit / 2, ws),
                                 misaligned("affine_columns", "Z", unit / 2, unit, "forward_column_unit", 40).c_str(), shape_error);
    }
    const typename B::template linear<Identity> stored(WeightView(w.view()), {}, LinearOptions{"w", false, dtype::bf16});
    CHECK_THROWS_AS(stored.affine_columns(a, z, 0, ws), config_error);
    CHECK_THROWS_AS(stored.backward_input(dz, da, 0, ws), config_error);
    CHECK_THROWS_AS(stored.weight_gradient(a, dz, dw, ws), config_error);
}
TEST_CASE_TEMPLATE_APPLY(linear_backward_tiles, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("a linear with no outputs, no inputs or no rows: the forward gives the bias, the backward zeros", B,
                          linear_empty) {
    Workspace ws;
    const auto all_zero = [](const Matrix<float>& m) {
        for (index_t r = 0; r < m.rows(); ++r)
            for (index_t c = 0; c < m.cols(); ++c)
                if (m(r, c) != 0.0f) return false;
        return true;
    };
    const Matrix<float> a = random_matrix(3, 8, 1);
    SUBCASE("N = 0: the input gradient is zero, or left as it is when accumulating") {
        const Matrix<float> w(0, 8);
        const typename B::template linear<Silu> lin(WeightView(w.view()), {}, LinearOptions{"none"});
        Matrix<float> c(3, 0), dc(3, 0), dw(0, 8);
        lin(a.view(), c.view(), ws);
        Matrix<float> da = random_matrix(3, 8, 2);
        lin.backward(a.view(), dc.view(), da.view(), LinearGrads{dw.view()}, ws);
        CHECK(all_zero(da));
        da = random_matrix(3, 8, 2);
        const Matrix<float> before = da;
        lin.backward_input(dc.view(), da.view(), 0, ws, true);
        CHECK(relative_error(da, before) == 0.0);
    }
    SUBCASE("K = 0: the output is the activated bias, and the bias gradient dz's column sums") {
        const Matrix<float> w(4, 0);
        const std::vector<float> bias = {-1.0f, 0.0f, 0.5f, 2.0f};
        const typename B::template linear<Silu> lin(WeightView(w.view()), bias, LinearOptions{"k0"});
        const Matrix<float> a0(3, 0);
        Matrix<float> c = random_matrix(3, 4, 3), z = random_matrix(3, 4, 4), da(3, 0), dw(4, 0);
        lin(a0.view(), c.view(), ws);
        lin.affine_columns(a0.view(), z.view(), 0, ws);
        for (index_t r = 0; r < 3; ++r)
            for (index_t j = 0; j < 4; ++j) {
                CHECK(z(r, j) == bias[std::size_t(j)]);
                CHECK(c(r, j) == doctest::Approx(Silu::apply(double(bias[std::size_t(j)]))).epsilon(1e-6));
            }
        const Matrix<float> dc = random_matrix(3, 4, 5);
        std::vector<float> db(4, 0.0f);
        lin.backward(a0.view(), dc.view(), da.view(), LinearGrads{dw.view(), db}, ws);
        for (index_t j = 0; j < 4; ++j) {
            double want = 0;
            for (index_t r = 0; r < 3; ++r) want += double(dc(r, j)) * Silu::derivative(double(bias[std::size_t(j)]));
            CHECK(db[std::size_t(j)] == doctest::Approx(want).epsilon(1e-6));
        }
    }
    SUBCASE("M = 0: a weight gradient over no rows adds nothing") {
        const Matrix<float> w = random_matrix(4, 8, 6);
        const typename B::template linear<Identity> lin(WeightView(w.view()), {}, LinearOptions{"w"});
        const Matrix<float> a0(0, 8), dz0(0, 4);
        Matrix<float> dw = random_matrix(4, 8, 7);
        const Matrix<float> before = dw;
        lin.weight_gradient(a0.view(), dz0.view(), dw.view(), ws);
        CHECK(relative_error(dw, before) == 0.0);
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_empty, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("linear backward through the fused activation and scale matches central differences", B,
                          linear_backward_activation) {
    const index_t m = 4, k = 9, n = 7;
    auto w = random_matrix(n, k, 1, 0.5f);
    auto b = random_vector(n, 2, 0.3f);
    auto a = random_matrix(m, k, 3);
    const auto dc = random_matrix(m, n, 4);
    Workspace ws;
    const auto run = [&]<class Act>(std::type_identity<Act>) {
        CAPTURE(Act::name);
        const float scale = 0.75f;
        const typename B::template linear<Act> lin(weight(w), b, LinearOptions{"w"});
        Matrix<float> da(m, k), dw(n, k);
        auto db = std::vector<float>(std::size_t(n));
        lin.backward(a, dc, da, LinearGrads{dw.view(), db}, ws, false, scale);
        const auto loss = [&] {
            const reference::linear<Act> l(weight(w), b, LinearOptions{"w"});
            Matrix<float> c(m, n);
            l(a, c, ws, scale);
            return dot(c, dc);
        };
        GradientGap compare;
        const float h = 1e-3f;
        for (index_t r = 0; r < m; ++r)
            for (index_t c = 0; c < k; ++c) compare(da(r, c), central_difference(a(r, c), loss, h));
        for (index_t r = 0; r < n; ++r) {
            for (index_t c = 0; c < k; ++c) compare(dw(r, c), central_difference(w(r, c), loss, h));
            compare(db[std::size_t(r)], central_difference(b[std::size_t(r)], loss, h));
        }
        CHECK(compare.within(2e-3));
    };
    run(std::type_identity<Identity>{});
    run(std::type_identity<Relu>{});
    run(std::type_identity<Gelu>{});
    run(std::type_identity<GeluTanh>{});
    run(std::type_identity<Silu>{});
}
TEST_CASE_TEMPLATE_APPLY(linear_backward_activation, linear_maps);

TEST_CASE_TEMPLATE_DEFINE("FfnExpert backward matches central differences and the reference on every backend", B, ffn_backward) {
    const index_t d = 10, ff = 16, m = 6;
    auto up = random_matrix(ff, d, 1, 0.4f), down = random_matrix(d, ff, 2, 0.4f);
    auto bu = random_vector(ff, 3, 0.2f), bd = random_vector(d, 4, 0.2f);
    auto x = random_matrix(m, d, 5);
    const auto dy = random_matrix(m, d, 6);
    Workspace ws;
    const FfnExpert<B, GeluTanh> expert(FfnWeights{weight(up), weight(down), bu, bd});
    Matrix<float> dx(m, d), dx_ref(m, d);
    FfnGradients g = expert.make_gradients();
    expert.backward(x, dy, dx, g, ws);
    const FfnGradients g_ref = check_ffn_against_reference(FfnWeights{weight(up), weight(down), bu, bd}, x, dy, dx, g, dx_ref, ws);
    const auto loss = [&] {
        const FfnExpert<reference, GeluTanh> e(FfnWeights{weight(up), weight(down), bu, bd});
        Matrix<float> y(m, d);
        e.forward(x, y, ws);
        return dot(y, dy);
    };
    GradientGap compare;
    const float h = 1e-2f;
    for (index_t i = 0; i < ff; i += 2)
        for (index_t j = 0; j < d; ++j) {
            compare(g_ref.up(i, j), central_difference(up(i, j), loss, h));
            compare(g_ref.down(j, i), central_difference(down(j, i), loss, h));
        }
    for (index_t i = 0; i < ff; ++i) compare(g_ref.up_bias[std::size_t(i)], central_difference(bu[std::size_t(i)], loss, h));
    for (index_t j = 0; j < d; ++j) compare(g_ref.down_bias[std::size_t(j)], central_difference(bd[std::size_t(j)], loss, h));
    for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < d; ++j) compare(dx_ref(r, j), central_difference(x(r, j), loss, h));
    CHECK(compare.within(2e-3));

    // On request the backward also gives the forward's output, the same bits as forward().
    Matrix<float> y(m, d), y_fwd(m, d), narrow_y(m, d - 1);
    FfnGradients again = expert.make_gradients();
    expert.backward(x, dy, dx, again, ws, false, y);
    expert.forward(x, y_fwd, ws);
    CHECK(relative_error(y, y_fwd) == 0.0);
    CHECK(relative_error(dx, dx_ref) <= 1e-5);
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx, again, ws, false, narrow_y),
                         "FfnExpert::backward: output y has shape (6, 9), expected (6, 10)", shape_error);
    Matrix<float> keep(m, expert.kept_width()), y_keep(m, d), dx_kept(m, d);
    expert.forward(x, y_keep, ws, {}, keep);
    CHECK(relative_error(y_keep, y_fwd) == 0.0);
    FfnGradients from_kept = expert.make_gradients();
    expert.backward(x, dy, dx_kept, from_kept, ws, false, {}, keep);
    CHECK(relative_error(dx_kept, dx) == 0.0);
    CHECK(relative_error(from_kept.up, again.up) == 0.0);
    CHECK(relative_error(from_kept.down, again.down) == 0.0);
    CHECK_THROWS_WITH_AS(expert.forward(x, y_keep, ws, {}, keep.view().col_block(0, 3)),
                         "FfnExpert: kept activations 'keep' have shape (6, 3), expected (6, 16)", shape_error);

    FfnGradients wrong = expert.make_gradients();
    wrong.up_bias.pop_back();
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx, wrong, ws),
                         "FfnExpert::backward: gradient 'up_bias' has 15 elements, expected 16 (use make_gradients())", shape_error);
}
TEST_CASE_TEMPLATE_APPLY(ffn_backward, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("activation derivatives match central differences", Act, activation_derivative) {
    for (double x = -6.0; x <= 6.0; x += 0.173) {
        if (std::abs(x) < 1e-3) continue; // Relu's kink
        const double h = 1e-6;
        const double fd = (Act::apply(x + h) - Act::apply(x - h)) / (2 * h);
        CAPTURE(x);
        CHECK(Act::derivative(x) == doctest::Approx(fd).epsilon(1e-6).scale(1.0));
        CHECK(double(Act::derivative(float(x))) == doctest::Approx(Act::derivative(x)).epsilon(1e-5).scale(1.0));
    }
}
TEST_CASE_TEMPLATE_APPLY(activation_derivative, std::tuple<Identity, Relu, Gelu, GeluTanh, Silu, Relu2>);

TEST_CASE_TEMPLATE_DEFINE("gated activations' partial derivatives match central differences", G, gated_derivative) {
    for (double g = -10.0; g <= 10.0; g += 0.313)
        for (double u = -10.0; u <= 10.0; u += 0.291) {
            if (std::abs(std::abs(g) - SwiGluOai::limit) < 1e-3 || std::abs(std::abs(u) - SwiGluOai::limit) < 1e-3) continue; // the clamps' kinks
            const double h = 1e-6;
            CAPTURE(g);
            CAPTURE(u);
            CHECK(G::gate_derivative(g, u) == doctest::Approx((G::apply(g + h, u) - G::apply(g - h, u)) / (2 * h)).epsilon(1e-6).scale(1.0));
            CHECK(G::up_derivative(g, u) == doctest::Approx((G::apply(g, u + h) - G::apply(g, u - h)) / (2 * h)).epsilon(1e-6).scale(1.0));
            CHECK(double(G::gate_derivative(float(g), float(u))) == doctest::Approx(G::gate_derivative(g, u)).epsilon(1e-5).scale(1.0));
            CHECK(double(G::up_derivative(float(g), float(u))) == doctest::Approx(G::up_derivative(g, u)).epsilon(1e-5).scale(1.0));
        }
}
TEST_CASE_TEMPLATE_APPLY(gated_derivative, std::tuple<GatedBy<Silu>, SwiGluOai>);

TEST_CASE_TEMPLATE_DEFINE("GluExpert backward with gpt-oss's clamped SwiGLU matches finite differences and the reference", B,
                          glu_oai_backward) {
    // Inputs wide enough that gate and up pass their clamps: there the gradient is zero.
    const index_t d = 12, ff = 20, m = 5;
    auto gate = random_matrix(ff, d, 1, 0.6f), up = random_matrix(ff, d, 2, 0.6f), down = random_matrix(d, ff, 3, 0.3f);
    auto bg = random_vector(ff, 4, 0.2f), bu = random_vector(ff, 5, 0.2f), bd = random_vector(d, 6, 0.2f);
    auto x = random_matrix(m, d, 7, 5.0f);
    const auto dy = random_matrix(m, d, 8);
    Matrix<float> pre(m, 2 * ff);
    Workspace ws;
    const GluExpert<B, SwiGluOai> expert(GluWeights{weight(gate), weight(up), weight(down), bg, bu, bd});
    expert.gate_up()(x, pre, ws);
    index_t clamped = 0;
    for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < ff; ++j) clamped += pre(r, j) > 7.0f || std::abs(pre(r, ff + j)) > 7.0f;
    CHECK(clamped >= 5); // 5 of the 200 pre-activations
    Matrix<float> dx(m, d), dx_ref(m, d);
    GluGradients g = expert.make_gradients();
    expert.backward(x, dy, dx, g, ws);
    const GluGradients g_ref =
        check_glu_against_reference<SwiGluOai>(GluWeights{weight(gate), weight(up), weight(down), bg, bu, bd}, x, dy, dx, g, dx_ref, ws);
    // A smaller step than SwiGLU's test: fewer pre-activations cross a clamp within it.
    check_glu_central_differences<SwiGluOai>(gate, up, down, bg, bu, bd, x, dy, g_ref, dx_ref, 1e-3f, ws);
}
TEST_CASE_TEMPLATE_APPLY(glu_oai_backward, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("GluExpert backward matches finite differences and the reference on every backend", B, glu_backward) {
    const index_t d = 12, ff = 20, m = 5;
    auto gate = random_matrix(ff, d, 1, 0.3f), up = random_matrix(ff, d, 2, 0.3f), down = random_matrix(d, ff, 3, 0.3f);
    auto bg = random_vector(ff, 4, 0.2f), bu = random_vector(ff, 5, 0.2f), bd = random_vector(d, 6, 0.2f);
    auto x = random_matrix(m, d, 7);
    const auto dy = random_matrix(m, d, 8);
    const GluWeights weights{weight(gate), weight(up), weight(down), bg, bu, bd};
    const GluExpert<B, Silu> expert(weights);
    Workspace ws;
    Matrix<float> dx(m, d);
    GluGradients g = expert.make_gradients();
    expert.backward(x, dy, dx, g, ws);

    // The reference backend is the oracle for the other backends.
    Matrix<float> dx_ref(m, d);
    const GluGradients g_ref = check_glu_against_reference(weights, x, dy, dx, g, dx_ref, ws);

    // The oracle against central differences of L = sum(y * dy), every parameter and input.
    check_glu_central_differences<Silu>(gate, up, down, bg, bu, bd, x, dy, g_ref, dx_ref, 1e-2f, ws);

    // Gradients accumulate across calls; dx is written, or added with accumulate_input.
    expert.backward(x, dy, dx, g, ws, true);
    for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < d; ++j) CHECK(dx(r, j) == doctest::Approx(2 * dx_ref(r, j)).epsilon(1e-5).scale(1e-3));
    for (index_t i = 0; i < ff; ++i) CHECK(g.down(0, i) == doctest::Approx(2 * g_ref.down(0, i)).epsilon(1e-5).scale(1e-3));

    // On request the backward also gives the forward's output, the same bits as forward().
    Matrix<float> y(m, d), y_fwd(m, d);
    GluGradients again = expert.make_gradients();
    expert.backward(x, dy, dx, again, ws, false, y);
    expert.forward(x, y_fwd, ws);
    CHECK(relative_error(y, y_fwd) == 0.0);
    CHECK(relative_error(again.gate_up, g_ref.gate_up) <= 1e-5);
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx, again, ws, false, y.view().row_block(0, m - 1)),
                         "GluExpert::backward: output y has shape (4, 12), expected (5, 12)", shape_error);
    // Kept activations: what a forward with `keep` wrote gives the same gradients, in their shape only.
    Matrix<float> keep(m, expert.kept_width()), y_keep(m, d);
    expert.forward(x, y_keep, ws, {}, keep);
    CHECK(relative_error(y_keep, y_fwd) == 0.0);
    GluGradients from_kept = expert.make_gradients();
    Matrix<float> dx_kept(m, d), dx_again(m, d);
    expert.backward(x, dy, dx_kept, from_kept, ws, false, {}, keep);
    GluGradients recomputed = expert.make_gradients();
    expert.backward(x, dy, dx_again, recomputed, ws);
    CHECK(relative_error(dx_kept, dx_again) == 0.0);
    CHECK(relative_error(from_kept.gate_up, recomputed.gate_up) == 0.0);
    CHECK(relative_error(from_kept.down, recomputed.down) == 0.0);
    CHECK_THROWS_WITH_AS(expert.forward(x, y_keep, ws, {}, keep.view().col_block(0, 3)),
                         "GluExpert: kept activations 'keep' have shape (5, 3), expected (5, 40)", shape_error);
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx_kept, from_kept, ws, false, {}, keep.view().row_block(0, 2)),
                         "GluExpert: kept activations 'kept' have shape (2, 40), expected (5, 40)", shape_error);

    GluGradients wrong{Matrix<float>(2 * ff, d + 1), Matrix<float>(d, ff), {}, {}};
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx, wrong, ws),
                         "GluExpert::backward: gradient 'gate_up' has shape (40, 13), expected (40, 12) (use make_gradients())",
                         shape_error);
    wrong = expert.make_gradients();
    wrong.down_bias.clear();
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, dx, wrong, ws),
                         "GluExpert::backward: gradient 'down_bias' has 0 elements, expected 12 (use make_gradients())", shape_error);
    Matrix<float> narrow(m, d - 1);
    CHECK_THROWS_WITH_AS(expert.backward(x, dy, narrow, g, ws),
                         "GluExpert::backward: input gradient dx has shape (5, 11), expected (5, 12)", shape_error);
}
TEST_CASE_TEMPLATE_APPLY(glu_backward, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("GluExpert backward: its tiles run in any order give backward()'s bits on every backend", B,
                          glu_backward_tiles) {
    // What an MoE layer's pool runs: stage 1 tiles of d_ff (512, 512, 64 columns here), then
    // stage 2 tiles of d_model (256, 64), each item on its own, here last first.
    const index_t d = 320, ff = 1088, m = 7;
    const auto gate = random_matrix(ff, d, 1, 0.3f), up = random_matrix(ff, d, 2, 0.3f), down = random_matrix(d, ff, 3, 0.3f);
    const auto bg = random_vector(ff, 4, 0.2f), bu = random_vector(ff, 5, 0.2f), bd = random_vector(d, 6, 0.2f);
    const auto x = random_matrix(m, d, 7), dy = random_matrix(m, d, 8);
    const GluExpert<B, Silu> expert(GluWeights{weight(gate), weight(up), weight(down), bg, bu, bd});
    Workspace ws;
    Matrix<float> dx(m, d), y(m, d);
    GluGradients g = expert.make_gradients();
    expert.backward(x, dy, dx, g, ws); // gate|up recomputed

    Matrix<float> kept(m, expert.kept_width()), scratch(m, expert.backward_scratch_width()), dx_tiles(m, d);
    expert.forward(x, y, ws, {}, kept.view());
    GluGradients g_tiles = expert.make_gradients();
    const typename GluExpert<B, Silu>::BackwardTile t{x, dy, kept, scratch.view(), dx_tiles.view(), false};
    REQUIRE(expert.backward_tiles(1) == 3);
    REQUIRE(expert.backward_tiles(2) == 2);
    CHECK(expert.backward_tile_columns(1, 2) == std::pair<index_t, index_t>{1024, 64});
    CHECK(expert.backward_tile_columns(2, 1) == std::pair<index_t, index_t>{256, 64});
    for (const int stage : {1, 2})
        for (index_t i = expert.backward_tiles(stage) - 1; i >= 0; --i) {
            Workspace item(expert.backward_tile_workspace_bytes(m), WorkspaceGrowth::fixed); // what a pool's slice holds
            const detail::ThreadCountScope one(1);
            expert.backward_tile(stage, i, t, g_tiles, item);
        }
    CHECK(relative_error(dx_tiles, dx) == 0.0);
    CHECK(relative_error(g_tiles.gate_up, g.gate_up) == 0.0);
    // Typed errors: the stage, the tile, a view of another shape.
    CHECK_THROWS_WITH_AS(expert.backward_tile(3, 0, t, g_tiles, ws), "GluExpert::backward_tile: stage 3, expected 1 or 2", config_error);
    CHECK_THROWS_WITH_AS(expert.backward_tile(1, 3, t, g_tiles, ws), "GluExpert::backward_tile: tile 3 of stage 1, expected one of [0, 3)",
                         shape_error);
    const typename GluExpert<B, Silu>::BackwardTile narrow{x, dy, kept, scratch.view().col_block(0, 100), dx_tiles.view(), false};
    CHECK_THROWS_WITH_AS(expert.backward_tile(2, 0, narrow, g_tiles, ws), "GluExpert::backward_tile: scratch has shape (7, 100), expected (7, 3264)",
                         shape_error);
    CHECK(relative_error(g_tiles.down, g.down) == 0.0);
    CHECK(vector_error(g_tiles.gate_up_bias, g.gate_up_bias) == 0.0);
    CHECK(vector_error(g_tiles.down_bias, g.down_bias) == 0.0);

    // And the reference backend agrees, within float tolerance.
    Matrix<float> dx_ref(m, d);
    (void)check_glu_against_reference(GluWeights{weight(gate), weight(up), weight(down), bg, bu, bd}, x, dy, dx, g, dx_ref, ws);
}
TEST_CASE_TEMPLATE_APPLY(glu_backward_tiles, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("FfnExpert backward: its tiles run in any order give backward()'s bits on every backend", B,
                          ffn_backward_tiles) {
    // Stage 1 tiles of d_ff (512, 512, 64 columns), each recomputing its columns of up's
    // pre-activations through the GELU; stage 2 tiles of d_model (256, 64); last first.
    const index_t d = 320, ff = 1088, m = 7;
    const auto up = random_matrix(ff, d, 1, 0.3f), down = random_matrix(d, ff, 3, 0.3f);
    const auto bu = random_vector(ff, 5, 0.2f), bd = random_vector(d, 6, 0.2f);
    const auto x = random_matrix(m, d, 7), dy = random_matrix(m, d, 8);
    const FfnWeights weights{weight(up), weight(down), bu, bd};
    const FfnExpert<B, GeluTanh> expert(weights);
    Workspace ws;
    Matrix<float> dx(m, d), y(m, d);
    FfnGradients g = expert.make_gradients();
    expert.backward(x, dy, dx, g, ws); // h recomputed

    Matrix<float> kept(m, expert.kept_width()), scratch(m, expert.backward_scratch_width()), dx_tiles(m, d);
    expert.forward(x, y, ws, {}, kept.view());
    FfnGradients g_tiles = expert.make_gradients();
    const typename FfnExpert<B, GeluTanh>::BackwardTile t{x, dy, kept, scratch.view(), dx_tiles.view(), false};
    REQUIRE(expert.backward_tiles(1) == 3);
    REQUIRE(expert.backward_tiles(2) == 2);
    for (const int stage : {1, 2})
        for (index_t i = expert.backward_tiles(stage) - 1; i >= 0; --i) {
            Workspace item(expert.backward_tile_workspace_bytes(m), WorkspaceGrowth::fixed);
            const detail::ThreadCountScope one(1);
            expert.backward_tile(stage, i, t, g_tiles, item);
        }
    CHECK(relative_error(dx_tiles, dx) == 0.0);
    CHECK(relative_error(g_tiles.up, g.up) == 0.0);
    CHECK(relative_error(g_tiles.down, g.down) == 0.0);
    CHECK(vector_error(g_tiles.up_bias, g.up_bias) == 0.0);
    CHECK(vector_error(g_tiles.down_bias, g.down_bias) == 0.0);

    Matrix<float> dx_ref(m, d);
    (void)check_ffn_against_reference(weights, x, dy, dx, g, dx_ref, ws);
}
TEST_CASE_TEMPLATE_APPLY(ffn_backward_tiles, test::all_backends);

namespace {

/// The parameters of a small MoE layer of gated experts, as plain matrices (so a test can
/// perturb any of them and build the layer again).
struct MoeParams {
    index_t d = 8, ff = 12, experts = 4;
    Matrix<float> gate;                               // (E, d)
    std::vector<Matrix<float>> w_gate, w_up, w_down;  // per expert
    Matrix<float> s_gate, s_up, s_down, s_router;     // shared expert and its gate (1, d)
    explicit MoeParams(std::uint32_t seed) : gate(random_matrix(experts, d, seed, 0.8f)) {
        for (index_t e = 0; e < experts; ++e) {
            w_gate.push_back(random_matrix(ff, d, seed + 10 + std::uint32_t(e), 0.4f));
            w_up.push_back(random_matrix(ff, d, seed + 20 + std::uint32_t(e), 0.4f));
            w_down.push_back(random_matrix(d, ff, seed + 30 + std::uint32_t(e), 0.4f));
        }
        s_gate = random_matrix(ff, d, seed + 40, 0.4f), s_up = random_matrix(ff, d, seed + 41, 0.4f);
        s_down = random_matrix(d, ff, seed + 42, 0.4f), s_router = random_matrix(1, d, seed + 43, 0.5f);
    }
    template <class B>
    [[nodiscard]] std::vector<GluExpert<B, Silu>> build_experts() const {
        std::vector<GluExpert<B, Silu>> out;
        for (index_t e = 0; e < experts; ++e)
            out.emplace_back(GluWeights{weight(w_gate[std::size_t(e)]), weight(w_up[std::size_t(e)]), weight(w_down[std::size_t(e)])});
        return out;
    }
    template <class B>
    [[nodiscard]] SharedExpert<GluExpert<B, Silu>> build_shared() const {
        return SharedExpert<GluExpert<B, Silu>>(GluExpert<B, Silu>(GluWeights{weight(s_gate), weight(s_up), weight(s_down)}),
                                                weight(s_router));
    }
};

/// Checks the reference layer's backward against central differences of sum(y * dy) over x,
/// the router weight, one expert's weights and the shared expert's gate; and every backend
/// against the reference. `make(params)` builds the layer on backend B.
template <class Make>
void check_moe_backward(MoeParams& p, Make make, index_t tokens, const Context& ctx) {
    auto x = random_matrix(tokens, p.d, 90);
    const auto dy = random_matrix(tokens, p.d, 91);
    Workspace ws;
    const auto layer = make(p, reference{});
    auto g = layer.make_gradients();
    Matrix<float> dx(tokens, p.d);
    layer.backward(x, dy, dx, g, ws, ctx);
    const auto loss = [&] {
        const auto l = make(p, reference{});
        Matrix<float> y(tokens, p.d);
        l.forward(x, y, ws, ctx);
        return dot(y, dy);
    };
    const float h = 2e-3f;
    GradientGap compare;
    for (index_t t = 0; t < tokens; ++t)
        for (index_t c = 0; c < p.d; ++c) compare(dx(t, c), central_difference(x(t, c), loss, h));
    for (index_t e = 0; e < p.gate.rows(); ++e) // one row per expert, then any noise rows
        for (index_t c = 0; c < p.d; ++c) compare(g.gate(e, c), central_difference(p.gate(e, c), loss, h));
    for (index_t r = 0; r < p.ff; r += 2)
        for (index_t c = 0; c < p.d; c += 3) {
            compare(g.experts[1].gate()(r, c), central_difference(p.w_gate[1](r, c), loss, h));
            compare(g.experts[1].down(c, r), central_difference(p.w_down[1](c, r), loss, h));
        }
    if constexpr (requires { g.shared.gate; })
        for (index_t c = 0; c < p.d; ++c) compare(g.shared.gate(0, c), central_difference(p.s_router(0, c), loss, h));
    CHECK(compare.within(3e-3));

    // Every backend equals the reference, and on each the backward from a forward's kept
    // activations gives the same bits as the one that recomputes them.
    const auto other = [&](auto backend) {
        const auto l = make(p, backend);
        auto go = l.make_gradients();
        Matrix<float> dxo(tokens, p.d);
        l.backward(x, dy, dxo, go, ws, ctx);
        CHECK(relative_error(dxo, dx) <= 1e-5);
        CHECK(relative_error(go.gate, g.gate) <= 1e-5);
        for (index_t e = 0; e < p.experts; ++e) {
            CHECK(relative_error(go.experts[std::size_t(e)].gate_up, g.experts[std::size_t(e)].gate_up) <= 1e-5);
            CHECK(relative_error(go.experts[std::size_t(e)].down, g.experts[std::size_t(e)].down) <= 1e-5);
        }
        MoeActivations kept;
        Matrix<float> y(tokens, p.d), y_kept(tokens, p.d), dxk(tokens, p.d);
        l.forward(x, y, ws, ctx);
        l.forward(x, y_kept, ws, kept, ctx);
        CHECK(relative_error(y_kept, y) == 0.0);
        auto gk = l.make_gradients();
        l.backward(kept, x, dy, dxk, gk, ws, ctx);
        CHECK(relative_error(dxk, dxo) == 0.0);
        CHECK(relative_error(gk.gate, go.gate) == 0.0);
        for (index_t e = 0; e < p.experts; ++e) {
            CHECK(relative_error(gk.experts[std::size_t(e)].gate_up, go.experts[std::size_t(e)].gate_up) == 0.0);
            CHECK(relative_error(gk.experts[std::size_t(e)].down, go.experts[std::size_t(e)].down) == 0.0);
        }
        if constexpr (requires { gk.shared.gate; }) CHECK(relative_error(gk.shared.gate, go.shared.gate) == 0.0);
    };
    other(reference{});
#if HYPERMOE_HAS_EIGEN
    other(eigen{});
#endif
#if HYPERMOE_HAS_ONEDNN
    other(onednn{});
#endif
}

} // namespace

TEST_CASE("MoeLayer backward matches central differences: softmax top-k renormalised, with a gated shared expert") {
    MoeParams p(1);
    const auto make = [](const MoeParams& q, auto backend) {
        using B = decltype(backend);
        return MoeLayer<GluExpert<B, Silu>, TopKRouter, SharedExpert<GluExpert<B, Silu>>>(
            weight(q.gate), TopKRouter(q.experts, TopK{2}, {.weighting = {.renormalize = true}}), q.build_experts<B>(),
            q.build_shared<B>());
    };
    check_moe_backward(p, make, 7, {});

    // The shared expert's gate gradient must be shaped as its gate.
    const auto layer = make(p, reference{});
    const Matrix<float> x = random_matrix(5, p.d, 3), dy = random_matrix(5, p.d, 4);
    Matrix<float> dx(5, p.d);
    Workspace ws;
    auto g = layer.make_gradients();
    g.shared.gate = Matrix<float>(1, p.d + 1);
    CHECK_THROWS_WITH_AS(layer.backward(x.view(), dy.view(), dx.view(), g, ws),
                         ("SharedExpert::backward: gate gradient has shape (1, " + std::to_string(p.d + 1) + "), expected (1, " +
                          std::to_string(p.d) + ") (use make_gradients())")
                             .c_str(),
                         shape_error);
}

TEST_CASE("MoeLayer backward matches central differences: sigmoid scores, scaled, not renormalised (DeepSeek-style)") {
    MoeParams p(2);
    const auto make = [](const MoeParams& q, auto backend) {
        using B = decltype(backend);
        return MoeLayer<GluExpert<B, Silu>, DeepSeekRouter>(
            weight(q.gate), DeepSeekRouter(q.experts, GroupLimitedTopK{2, 2, 1}, {.weighting = {.renormalize = false, .scale = 2.5f}}),
            q.build_experts<B>());
    };
    check_moe_backward(p, make, 6, {});
}

TEST_CASE("MoeLayer backward matches central differences: Switch top-1 with capacity, dropped tokens passed through or zeroed") {
    for (const DroppedTokens dropped : {DroppedTokens::scaled_input, DroppedTokens::zero}) {
        CAPTURE(int(dropped));
        MoeParams p(3);
        const auto make = [dropped](const MoeParams& q, auto backend) {
            using B = decltype(backend);
            return MoeLayer<GluExpert<B, Silu>, SwitchRouter>(weight(q.gate), SwitchRouter(q.experts, Top1Capacity{2}),
                                                              q.build_experts<B>(), NoSharedExpert{}, MoeOptions{dropped});
        };
        // 12 tokens in sequences of 6, at most 2 per expert and sequence: some are dropped.
        const Context ctx{.sequence_length = 6};
        {
            const auto layer = make(p, reference{});
            RoutingPlan plan;
            Workspace ws;
            const auto x = random_matrix(12, p.d, 90);
            Matrix<float> y(12, p.d);
            layer.forward(x, y, ws, plan, ctx);
            index_t kept = 0;
            for (index_t t = 0; t < 12; ++t) kept += plan.kept(t) ? 1 : 0;
            REQUIRE(kept < 12);
        }
        check_moe_backward(p, make, 12, ctx);
    }
}

TEST_CASE("auxiliary losses: gradients with respect to the logits match central differences, and an MoE layer's backward adds them") {
    // 12 tokens in sequences of 6, top-1 with at most 2 per expert and sequence: some are dropped.
    const index_t tokens = 12, experts = 4;
    const SwitchRouter router(experts, Top1Capacity{2});
    auto logits = random_matrix(tokens, experts, 11, 1.5f);
    const Context ctx{.sequence_length = 6};
    RoutingPlan plan;
    Workspace ws;
    router.route(logits, ctx, plan, ws);
    index_t kept = 0;
    for (index_t t = 0; t < tokens; ++t) kept += plan.kept(t) ? 1 : 0;
    REQUIRE(kept < tokens);
    const float h = 1e-3f;
    for (const LoadBalancingOptions opt : {LoadBalancingOptions{}, LoadBalancingOptions{.group_size = 6},
                                           LoadBalancingOptions{.group_size = 6, .dropped_as_first_expert = true},
                                           LoadBalancingOptions{.group_size = 5}}) {
        CAPTURE(opt.group_size);
        CAPTURE(opt.dropped_as_first_expert);
        Matrix<float> dl = random_matrix(tokens, experts, 12); // backward adds to it
        const Matrix<float> before = dl;
        load_balancing_loss_backward(plan, logits, dl, 0.5, ws, opt);
        GradientGap gap;
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < experts; ++e)
                gap(dl(t, e) - before(t, e),
                    0.5 * central_difference(logits(t, e), [&] { return load_balancing_loss(plan, logits, opt); }, h));
        CHECK(gap.scale > 0);
        CHECK(gap.within(1e-3));
    }
    {
        Matrix<float> dl(tokens, experts);
        router_z_loss_backward(logits, dl, 2.0);
        GradientGap gap;
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < experts; ++e)
                gap(dl(t, e), 2.0 * central_difference(logits(t, e), [&] { return router_z_loss(logits); }, h));
        CHECK(gap.within(1e-3));
    }
    // Grouping per sequence and counting a dropped token for expert 0 change the value.
    CHECK(load_balancing_loss(plan, logits, {.group_size = 6}) != load_balancing_loss(plan, logits));
    CHECK(load_balancing_loss(plan, logits, {.group_size = 6, .dropped_as_first_expert = true}) !=
          load_balancing_loss(plan, logits, {.group_size = 6}));
    CHECK(load_balancing_options(Context{.sequence_length = 6, .aux_losses = {.per_sequence = true}}).group_size == 6);
    CHECK(load_balancing_options(Context{.sequence_length = 6}).group_size == 0);

    // Through an MoE layer: with dy = 0, the router weight's gradient is exactly the aux
    // losses' dlogits^T x, and nothing else moves.
    MoeParams p(8);
    const MoeLayer<GluExpert<reference, Silu>, SwitchRouter> layer(weight(p.gate), SwitchRouter(p.experts, Top1Capacity{2}),
                                                                   p.build_experts<reference>());
    const auto x = random_matrix(tokens, p.d, 13);
    const Matrix<float> zero(tokens, p.d);
    const Context aux_ctx{.sequence_length = 6, .aux_losses = {.load_balancing = 0.01, .z_loss = 0.001, .per_sequence = true}};
    auto g = layer.make_gradients();
    Matrix<float> dx(tokens, p.d), layer_logits(tokens, p.experts), dl(tokens, p.experts);
    layer.backward(x, zero, dx, g, ws, aux_ctx);
    Matrix<float> y(tokens, p.d);
    layer.forward(x, y, ws, plan, aux_ctx);
    layer.router_logits(x, layer_logits, ws);
    load_balancing_loss_backward(plan, layer_logits, dl, 0.01, ws, load_balancing_options(aux_ctx));
    router_z_loss_backward(layer_logits, dl, 0.001);
    Matrix<float> want(p.experts, p.d);
    for (index_t e = 0; e < p.experts; ++e)
        for (index_t c = 0; c < p.d; ++c) {
            double sum = 0;
            for (index_t t = 0; t < tokens; ++t) sum += double(dl(t, e)) * x(t, c);
            want(e, c) = float(sum);
        }
    CHECK(relative_error(g.gate, want) <= 1e-6);
    CHECK(test::dot(g.experts[0].down, g.experts[0].down) == 0.0);
    // The logits' gradient goes on to x through the router weight.
    CHECK(test::dot(dx, dx) > 0.0);
    Matrix<float> bad(tokens, 3);
    CHECK_THROWS_WITH_AS(load_balancing_loss_backward(plan, layer_logits, bad, 1.0, ws),
                         "load_balancing_loss_backward: dlogits has shape (12, 3), expected (12, 4)", shape_error);
    CHECK_THROWS_WITH_AS(router_z_loss_backward(layer_logits, bad, 1.0),
                         "router_z_loss_backward: dlogits has shape (12, 3), expected (12, 4)", shape_error);
}

TEST_CASE("MoeLayer backward matches central differences: noisy top-k (softmax over the selected noisy logits), renormalised and scaled") {
    for (const bool renormalize : {false, true}) {
        CAPTURE(renormalize);
        MoeParams p(10);
        const auto make = [renormalize](const MoeParams& q, auto backend) {
            using B = decltype(backend);
            return MoeLayer<GluExpert<B, Silu>, NoisyTopKRouter>(
                weight(q.gate),
                NoisyTopKRouter(q.experts, NoisyTopK{.k = 2, .noise_std = 0.5f, .seed = 7},
                                {.weighting = {.renormalize = renormalize, .epsilon = 0.1, .scale = 1.5f}}),
                q.build_experts<B>());
        };
        // The noise is a function of (position, expert, call seed): the same in every call.
        check_moe_backward(p, make, 9, Context{.noise_seed = 3});
    }
}

TEST_CASE("MoeLayer backward matches central differences: noisy top-k with Shazeer's learned noise scale (gate = W_g over W_noise)") {
    MoeParams p(25);
    p.gate = random_matrix(2 * p.experts, p.d, 25, 0.8f); // E clean rows, then E noise rows
    const auto make = [](const MoeParams& q, auto backend) {
        using B = decltype(backend);
        return MoeLayer<GluExpert<B, Silu>, NoisyTopKRouter>(
            weight(q.gate), NoisyTopKRouter(q.experts, NoisyTopK{.k = 2, .noise_std = 0.7f, .seed = 5, .learned_scale = true}),
            q.build_experts<B>());
    };
    check_moe_backward(p, make, 9, Context{.sequence_length = 3, .noise_seed = 4});
    // The noise rows get a gradient (through the selected experts' noisy values).
    const auto layer = make(p, reference{});
    CHECK(layer.logit_columns() == 2 * p.experts);
    auto g = layer.make_gradients();
    Workspace ws;
    Matrix<float> dx(9, p.d);
    layer.backward(random_matrix(9, p.d, 3), random_matrix(9, p.d, 4), dx, g, ws, Context{.noise_seed = 4});
    double noise_rows = 0;
    for (index_t e = p.experts; e < 2 * p.experts; ++e)
        for (index_t c = 0; c < p.d; ++c) noise_rows += std::abs(g.gate(e, c));
    CHECK(noise_rows > 0);
    // Shazeer's load loss through the layer (dy = 0): the gate's gradient is dlogits^T x, with
    // dlogits from smooth_load_loss_backward on the layer's own 2E logits.
    {
        const auto x = random_matrix(9, p.d, 5);
        const Matrix<float> zero(9, p.d);
        const Context aux{.noise_seed = 4, .aux_losses = {.load = 0.5}};
        auto ga = layer.make_gradients();
        layer.backward(x, zero, dx, ga, ws, aux);
        Matrix<float> l(9, 2 * p.experts), dl(9, 2 * p.experts);
        layer.router_logits(x, l, ws);
        smooth_load_loss_backward(layer.router(), l, aux, dl, 0.5, ws);
        Matrix<float> want(2 * p.experts, p.d);
        for (index_t e = 0; e < 2 * p.experts; ++e)
            for (index_t c = 0; c < p.d; ++c) {
                double sum = 0;
                for (index_t t = 0; t < 9; ++t) sum += double(dl(t, e)) * x(t, c);
                want(e, c) = float(sum);
            }
        CHECK(test::dot(want, want) > 0);
        CHECK(relative_error(ga.gate, want) <= 1e-6);
    }
    // A gate of E rows is not enough for it.
    const Matrix<float> clean_only = random_matrix(p.experts, p.d, 15);
    CHECK_THROWS_WITH_AS((MoeLayer<GluExpert<reference, Silu>, NoisyTopKRouter>(
                             weight(clean_only), NoisyTopKRouter(p.experts, NoisyTopK{.k = 2, .learned_scale = true}),
                             p.build_experts<reference>())),
                         "MoeLayer: weight 'gate' has shape (4, 8), expected (8, 8): 4 experts' rows, then 4 noise rows "
                         "(the router learns its noise scale)",
                         shape_error);
    // Gradients made by a layer without the noise rows.
    auto wrong = MoeLayer<GluExpert<reference, Silu>, NoisyTopKRouter>(weight(clean_only), NoisyTopKRouter(p.experts, NoisyTopK{.k = 2}),
                                                                        p.build_experts<reference>())
                     .make_gradients();
    CHECK_THROWS_WITH_AS(layer.backward(random_matrix(9, p.d, 3), random_matrix(9, p.d, 4), dx, wrong, ws),
                         "MoeLayer::backward: gradients for a gate of shape (4, 8) and 4 experts, expected (8, 8) and 4 "
                         "(use make_gradients())",
                         shape_error);
}

TEST_CASE("importance loss (cv^2 of the experts' summed weights): gradient through the combine weights matches central differences") {
    const index_t tokens = 10, experts = 4;
    Workspace ws;
    RoutingPlan plan;
    TopKRouter(experts, TopK{2}).route(random_matrix(tokens, experts, 51, 2.0f), {}, plan, ws);
    Matrix<float> dw(tokens, 2);
    importance_loss_backward(plan, dw, 0.5, ws);
    GradientGap gap;
    for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < 2; ++j)
            gap(dw(t, j), 0.5 * central_difference(plan.weights(t)[std::size_t(j)], [&] { return cv_squared(importance(plan)); }, 1e-3f));
    CHECK(gap.scale > 0);
    CHECK(gap.within(1e-3));
    // Through an MoE layer (dy = 0, so only the loss): the router weight's gradient.
    MoeParams p(11);
    const auto make = [&] {
        return MoeLayer<GluExpert<reference, Silu>, TopKRouter>(weight(p.gate),
                                                                TopKRouter(p.experts, TopK{2}, {.weighting = {.renormalize = true}}),
                                                                p.build_experts<reference>());
    };
    const auto x = random_matrix(tokens, p.d, 52);
    const Matrix<float> zero(tokens, p.d);
    const Context ctx{.aux_losses = {.importance = 0.5}};
    auto g = make().make_gradients();
    Matrix<float> dx(tokens, p.d);
    make().backward(x, zero, dx, g, ws, ctx);
    const auto loss = [&] {
        RoutingPlan q;
        Matrix<float> y(tokens, p.d);
        make().forward(x, y, ws, q, ctx);
        return 0.5 * cv_squared(importance(q));
    };
    GradientGap through;
    for (index_t e = 0; e < p.experts; ++e)
        for (index_t c = 0; c < p.d; ++c) through(g.gate(e, c), central_difference(p.gate(e, c), loss, 2e-3f));
    CHECK(through.scale > 0);
    CHECK(through.within(3e-3));
    Matrix<float> bad(tokens, 3);
    CHECK_THROWS_WITH_AS(importance_loss_backward(plan, bad, 1.0, ws),
                         "importance_loss_backward: dweights has shape (10, 3), expected (10, 2)", shape_error);
}

TEST_CASE("smooth load (Shazeer et al.'s load estimator): the probability the definition states, its limits, and its loss's gradient") {
    const index_t tokens = 12, experts = 5;
    const Context ctx{.sequence_length = 6, .noise_seed = 9};
    using NoisySoftmaxRouter = ScoredRouter<Softmax, NoisyTopK>;
    const NoisyTopKRouter raw(experts, NoisyTopK{.k = 2, .noise_std = 0.8f, .seed = 4});
    // Softmax scores with a selection bias: the load is counted on scores + bias.
    const NoisySoftmaxRouter biased(experts, NoisyTopK{.k = 2, .noise_std = 0.1f, .seed = 5},
                                    {.selection_bias = {0.05f, -0.02f, 0.0f, 0.03f, -0.04f}});
    // Shazeer's learned scale: 2E logit columns, the noise logits after the clean ones.
    const NoisyTopKRouter learned(experts, NoisyTopK{.k = 2, .noise_std = 0.6f, .seed = 6, .learned_scale = true});
    Matrix<float> logits = random_matrix(tokens, experts, 61, 1.5f), logits2 = random_matrix(tokens, 2 * experts, 63, 1.5f);
    // P(t, e) by sampling: redraw expert e's noise alone and count how often e stays in the top
    // k of the noisy logits (raw scores, no bias).
    const auto check_sampled = [&](const NoisyTopKRouter& router, const Matrix<float>& l) {
        const std::vector<double> got = smooth_load(router, l, ctx);
        std::mt19937 rng(3);
        std::normal_distribution<double> normal;
        const int draws = 4000;
        std::vector<double> sampled(std::size_t(experts), 0.0);
        const NoisyTopK& pol = router.selection();
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < experts; ++e) {
                int stays = 0;
                for (int n = 0; n < draws; ++n) {
                    const double h_e = l(t, e) + pol.scale(l.view().row(t), experts, e) * normal(rng);
                    int above = 0; // the other experts whose noisy logit beats h_e
                    for (index_t o = 0; o < experts; ++o)
                        if (o != e && double(pol.noisy_value(l(t, o), pol.scale(l.view().row(t), experts, o), pol.sample(ctx, t, o))) > h_e)
                            ++above;
                    stays += above < pol.k;
                }
                sampled[std::size_t(e)] += double(stays) / draws;
            }
        double total = 0;
        for (index_t e = 0; e < experts; ++e) {
            CHECK(std::abs(got[std::size_t(e)] - sampled[std::size_t(e)]) <= 0.1); // 12 tokens x ~0.008 sampling error each
            total += got[std::size_t(e)];
        }
        CHECK(total > 0.5 * tokens * pol.k); // close to k per token, not exactly: each P is taken alone
        CHECK(smooth_load_loss(router, l, ctx) == doctest::Approx(cv_squared(got)));
    };
    check_sampled(raw, logits);
    check_sampled(learned, logits2);
    {   // The learned scale is noise_std (softplus(r) + noise_floor), by hand.
        const double r = logits2(3, experts + 1), softplus = std::log1p(std::exp(r));
        CHECK(learned.selection().scale(logits2.view().row(3), experts, 1) == doctest::Approx(0.6 * (softplus + 0.01)).epsilon(1e-6));
        CHECK(raw.selection().scale(logits.view().row(3), experts, 1) == 0.8f);
    }
    {   // Without noise it is the counts of the plan route() makes; with k = E every P is 1.
        Workspace ws;
        RoutingPlan plan;
        const NoisyTopKRouter exact(experts, NoisyTopK{.k = 2, .noise_std = 0.0f, .seed = 4});
        exact.route(logits, ctx, plan, ws);
        CHECK(smooth_load(exact, logits, ctx) == load(plan));
        const NoisyTopKRouter all(experts, NoisyTopK{.k = experts, .noise_std = 1.0f});
        CHECK(smooth_load(all, logits, ctx) == std::vector<double>(std::size_t(experts), double(tokens)));
        CHECK(smooth_load_loss(all, logits, ctx) == 0.0);
        Matrix<float> dl(tokens, experts);
        smooth_load_loss_backward(exact, logits, ctx, dl, 1.0, ws);
        smooth_load_loss_backward(all, logits, ctx, dl, 1.0, ws);
        CHECK(dot(dl, dl) == 0.0);
    }
    // The gradient with respect to the logits, for both routers, against central differences.
    const auto check_gradient = [&](const auto& router, Matrix<float>& l) {
        Workspace ws;
        Matrix<float> dl(tokens, l.cols());
        smooth_load_loss_backward(router, l, ctx, dl, 0.5, ws);
        GradientGap gap, noise;
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < l.cols(); ++e)
                (e < experts ? gap : noise)(dl(t, e), 0.5 * central_difference(l(t, e), [&] { return smooth_load_loss(router, l, ctx); }, 1e-3f));
        CHECK(gap.scale > 0);
        CHECK(gap.within(2e-3));
        CHECK(noise.within(2e-3));
        return noise.scale;
    };
    CHECK(check_gradient(raw, logits) == 0);
    CHECK(check_gradient(biased, logits) == 0);
    CHECK(check_gradient(learned, logits2) > 0); // the noise logits' gradient
    // Through an MoE layer (dy = 0, so only the loss): the router weight's gradient.
    MoeParams p(12);
    const NoisyTopK policy{.k = 2, .noise_std = 0.5f, .seed = 8};
    const auto make = [&] {
        return MoeLayer<GluExpert<reference, Silu>, NoisyTopKRouter>(weight(p.gate), NoisyTopKRouter(p.experts, policy),
                                                                     p.build_experts<reference>());
    };
    const auto x = random_matrix(tokens, p.d, 62);
    const Matrix<float> zero(tokens, p.d);
    const Context aux{.sequence_length = 6, .noise_seed = 9, .aux_losses = {.load = 0.5}};
    Workspace ws;
    auto g = make().make_gradients();
    Matrix<float> dx(tokens, p.d);
    make().backward(x, zero, dx, g, ws, aux);
    const auto loss = [&] {
        Matrix<float> l(tokens, p.experts);
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < p.experts; ++e) {
                double sum = 0;
                for (index_t c = 0; c < p.d; ++c) sum += double(x(t, c)) * p.gate(e, c);
                l(t, e) = float(sum);
            }
        return 0.5 * smooth_load_loss(NoisyTopKRouter(p.experts, policy), l, aux);
    };
    GradientGap through;
    for (index_t e = 0; e < p.experts; ++e)
        for (index_t c = 0; c < p.d; ++c) through(g.gate(e, c), central_difference(p.gate(e, c), loss, 2e-3f));
    CHECK(through.scale > 0);
    CHECK(through.within(5e-3));
    CHECK(dot(dx, dx) > 0.0);
    // Errors: a router without noise, a dlogits of the wrong shape, non-finite logits.
    MoeParams q(13);
    const MoeLayer<GluExpert<reference, Silu>, TopKRouter> top_k(weight(q.gate), TopKRouter(q.experts, TopK{2}),
                                                                 q.build_experts<reference>());
    auto gq = top_k.make_gradients();
    CHECK_THROWS_WITH_AS(top_k.backward(x, zero, dx, gq, ws, aux),
                         "MoeLayer::backward: Context::aux_losses.load is 0.5, expected 0: Shazeer's smooth load loss needs a "
                         "noisy top-k router (NoisyTopKRouter), which this layer's router is not",
                         config_error);
    Matrix<float> bad(tokens, 3);
    CHECK_THROWS_WITH_AS(smooth_load_loss_backward(raw, logits, ctx, bad, 1.0, ws),
                         "smooth_load_loss_backward: dlogits has shape (12, 3), expected (12, 5)", shape_error);
    CHECK_THROWS_WITH_AS((void)smooth_load(raw, bad, ctx), "smooth_load: logits have 3 columns, expected experts = 5", shape_error);
    logits(4, 2) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS((void)smooth_load_loss(raw, logits, ctx),
                         "smooth_load: token 4 has router logit nan for expert 2, expected finite logits", numeric_error);
    // With a learned scale: the noise logits are missing, or one is not finite.
    CHECK_THROWS_WITH_AS((void)smooth_load(learned, random_matrix(tokens, experts, 64), ctx),
                         "smooth_load: logits have 5 columns, expected 10 (5 experts' logits, then 5 noise logits)", shape_error);
    logits2(4, experts + 2) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(smooth_load_loss_backward(learned, logits2, ctx, bad, 1.0, ws),
                         "smooth_load_loss_backward: token 4 has noise logit inf for expert 2, expected finite logits", numeric_error);
}

TEST_CASE("MoeLayer backward matches central differences: expert choice (tokens taken by several experts or by none)") {
    MoeParams p(5);
    const auto make = [](const MoeParams& q, auto backend) {
        using B = decltype(backend);
        return MoeLayer<GluExpert<B, Silu>, ExpertChoiceRouter>(weight(q.gate), ExpertChoiceRouter(q.experts, ExpertChoice{1.0}),
                                                                q.build_experts<B>());
    };
    {   // The batch has tokens no expert takes and tokens several take.
        const auto layer = make(p, reference{});
        RoutingPlan plan;
        Workspace ws;
        const auto x = random_matrix(12, p.d, 90);
        Matrix<float> y(12, p.d);
        layer.forward(x, y, ws, plan);
        index_t none = 0, several = 0;
        for (index_t t = 0; t < 12; ++t) {
            index_t n = 0;
            for (const auto id : plan.ids(t)) n += id >= 0 ? 1 : 0;
            none += n == 0 ? 1 : 0;
            several += n > 1 ? 1 : 0;
        }
        REQUIRE(none > 0);
        REQUIRE(several > 0);
    }
    check_moe_backward(p, make, 12, {});
}

TEST_CASE("MoeLayer backward with hash routing: the router gets no gradient, the experts and x do") {
    MoeParams p(6);
    const std::vector<std::int32_t> ids = {3, 1, 4, 1, 5, 9, 2};
    const auto make = [](const MoeParams& q, auto backend) {
        using B = decltype(backend);
        return MoeLayer<GluExpert<B, Silu>, HashRouter>(weight(q.gate), HashRouter(q.experts, HashRouting{}), q.build_experts<B>());
    };
    check_moe_backward(p, make, 7, Context{.token_ids = ids});
    const auto layer = make(p, reference{});
    auto g = layer.make_gradients();
    Workspace ws;
    Matrix<float> dx(7, p.d);
    layer.backward(random_matrix(7, p.d, 1), random_matrix(7, p.d, 2), dx, g, ws, Context{.token_ids = ids});
    for (index_t e = 0; e < p.experts; ++e)
        for (index_t c = 0; c < p.d; ++c) CHECK(g.gate(e, c) == 0.0f);
    // The router alone: constant weights give zero logit gradients.
    const HashRouter router(p.experts, HashRouting{});
    const auto logits = random_matrix(7, p.experts, 3);
    RoutingPlan plan;
    router.route(logits, Context{.token_ids = ids}, plan, ws);
    auto dl = random_matrix(7, p.experts, 4);
    router.backward(logits, plan, random_matrix(7, 1, 5), dl, ws);
    for (index_t t = 0; t < 7; ++t)
        for (index_t e = 0; e < p.experts; ++e) CHECK(dl(t, e) == 0.0f);
}

TEST_CASE("MoeLayer and Router backward: typed errors") {
    MoeParams p(4);
    const MoeLayer<GluExpert<reference, Silu>, TopKRouter> layer(weight(p.gate), TopKRouter(p.experts, TopK{2}), p.build_experts<reference>());
    const MoeLayer<GluExpert<reference, Silu>, TopKRouter> smaller(WeightView(ConstMatrixView<float>(p.gate.view().row_block(0, 3))), TopKRouter(3, TopK{2}),
                                                                   [&] {
                                                                       auto e = p.build_experts<reference>();
                                                                       e.pop_back();
                                                                       return e;
                                                                   }());
    Workspace ws;
    const auto x = random_matrix(3, p.d, 1), dy = random_matrix(3, p.d, 2);
    Matrix<float> dx(3, p.d);
    auto wrong = smaller.make_gradients();
    CHECK_THROWS_WITH_AS(layer.backward(x, dy, dx, wrong, ws),
                         "MoeLayer::backward: gradients for a gate of shape (3, 8) and 3 experts, expected (4, 8) and 4 (use make_gradients())",
                         shape_error);
    auto g = layer.make_gradients();
    Matrix<float> dy_bad(2, p.d);
    CHECK_THROWS_WITH_AS(layer.backward(x, dy_bad, dx, g, ws), "MoeLayer::backward: output gradient dy has shape (2, 8), expected (3, 8)",
                         shape_error);
    CHECK_THROWS_WITH_AS(layer.backward(x, dy, dx.view().col_block(0, 4), g, ws),
                         "MoeLayer::backward: input gradient dx has shape (3, 4), expected (3, 8)", shape_error);
    // Kept activations must be what this layer's forward kept for x.
    MoeActivations kept, never;
    Matrix<float> y(3, p.d), y2(2, p.d);
    CHECK_THROWS_WITH_AS(layer.backward(never, x, dy, dx, g, ws),
                         "MoeLayer::backward: the kept activations are for 0 tokens of another layer (or incomplete), expected 3 "
                         "tokens of this layer (pass what forward(x, y, ws, kept) kept)",
                         shape_error);
    smaller.forward(x, y, ws, kept);
    CHECK_THROWS_WITH_AS(layer.backward(kept, x, dy, dx, g, ws),
                         "MoeLayer::backward: the kept activations are for 3 tokens of another layer (or incomplete), expected 3 "
                         "tokens of this layer (pass what forward(x, y, ws, kept) kept)",
                         shape_error);
    layer.forward(x.view().row_block(0, 2), y2, ws, kept);
    CHECK_THROWS_WITH_AS(layer.backward(kept, x, dy, dx, g, ws),
                         "MoeLayer::backward: the kept activations are for 2 tokens, expected 3 tokens of this layer (pass what "
                         "forward(x, y, ws, kept) kept)",
                         shape_error);
    CHECK_THROWS_WITH_AS(layer.backward(kept, x, dy, dx, wrong, ws),
                         "MoeLayer::backward: gradients for a gate of shape (3, 8) and 3 experts, expected (4, 8) and 4 (use make_gradients())",
                         shape_error);
    // An expert's gradients of another shape are refused before any tile runs.
    auto g_bad = layer.make_gradients();
    g_bad.experts[2].down = Matrix<float>(p.d, 3);
    CHECK_THROWS_WITH_AS(layer.backward(x, dy, dx, g_bad, ws),
                         ("GluExpert::backward: gradient 'down' has shape (8, 3), expected (8, " + std::to_string(p.ff) +
                          ") (use make_gradients())")
                             .c_str(),
                         shape_error);
    Matrix<float> nan_x = random_matrix(3, p.d, 1);
    nan_x(1, 2) = std::nanf("");
    CHECK_THROWS_AS(layer.backward(nan_x, dy, dx, g, ws), numeric_error);

    const TopKRouter router(4, TopK{2});
    const auto logits = random_matrix(3, 4, 5);
    RoutingPlan plan;
    router.route(logits, {}, plan, ws);
    Matrix<float> dl(3, 4), dw_bad(3, 3);
    CHECK_THROWS_WITH_AS(router.backward(logits, plan, dw_bad, dl, ws), "Router::backward: dweights has shape (3, 3), expected (3, 2)",
                         shape_error);
    CHECK_THROWS_WITH_AS(router.backward(logits.view().row_block(0, 2), plan, random_matrix(2, 2, 6), dl, ws),
                         "Router::backward: logits (2, 4) and a plan of 3 tokens over 4 experts, 2 slots; expected 4 logit columns "
                         "and the plan route() made from these logits (4 experts, 2 slots)",
                         shape_error);
    {   // A router that learns its noise scale reads 2E logit columns.
        const NoisyTopKRouter learned(4, NoisyTopK{.k = 2, .learned_scale = true});
        RoutingPlan lp;
        const auto l2 = random_matrix(3, 8, 7);
        learned.route(l2, {}, lp, ws);
        CHECK_THROWS_WITH_AS(learned.backward(l2, lp, random_matrix(3, 2, 6), dl, ws),
                             "Router::backward: dlogits has shape (3, 4), expected (3, 8)", shape_error);
        CHECK_THROWS_WITH_AS(learned.backward(logits, lp, random_matrix(3, 2, 6), dl, ws),
                             "Router::backward: logits (3, 4) and a plan of 3 tokens over 4 experts, 2 slots; expected 8 logit "
                             "columns and the plan route() made from these logits (4 experts, 2 slots)",
                             shape_error);
    }

    // A layer stored for inference (bf16 experts) has no backward: the error names the weight.
    const MoeLayer<GluExpert<reference, Silu>, TopKRouter> bf16_layer(
        weight(p.gate), TopKRouter(p.experts, TopK{2}), [&] {
            std::vector<GluExpert<reference, Silu>> e;
            for (index_t i = 0; i < p.experts; ++i)
                e.emplace_back(GluWeights{weight(p.w_gate[std::size_t(i)]), weight(p.w_up[std::size_t(i)]), weight(p.w_down[std::size_t(i)])},
                               ExpertOptions{.storage = dtype::bf16});
            return e;
        }());
    auto gb = bf16_layer.make_gradients();
    CHECK_THROWS_WITH_AS(bf16_layer.backward(x, dy, dx, gb, ws),
                         "GluExpert weight 'gate|up': backward needs f32 storage, but the weights are stored as bf16 (load or build the "
                         "layer with f32 storage to train it)",
                         config_error);
}

TEST_CASE_TEMPLATE_DEFINE("backward on one const layer from several threads at once equals the serial result", B, backward_threads) {
    // Each thread has its own workspace and gradients; the layer, its linear maps and the
    // backends' caches are shared.
    MoeParams p(7);
    const MoeLayer<GluExpert<B, Silu>, TopKRouter, SharedExpert<GluExpert<B, Silu>>> layer(
        weight(p.gate), TopKRouter(p.experts, TopK{2}, {.weighting = {.renormalize = true}}), p.build_experts<B>(), p.build_shared<B>());
    const auto x = random_matrix(11, p.d, 1), dy = random_matrix(11, p.d, 2);
    Workspace ws;
    auto serial = layer.make_gradients();
    Matrix<float> dx_serial(11, p.d);
    layer.backward(x, dy, dx_serial, serial, ws);
    constexpr int threads = 4;
    std::vector<decltype(layer.make_gradients())> grads;
    std::vector<Matrix<float>> dxs;
    for (int i = 0; i < threads; ++i) grads.push_back(layer.make_gradients()), dxs.emplace_back(11, p.d);
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i)
        pool.emplace_back([&, i] {
            const detail::ThreadCountScope one(1); // as an embedding application's worker threads would
            Workspace mine;
            for (int round = 0; round < 3; ++round) {
                auto g = layer.make_gradients();
                layer.backward(x, dy, dxs[std::size_t(i)], g, mine);
                if (round == 2) grads[std::size_t(i)] = std::move(g);
            }
        });
    for (auto& t : pool) t.join();
    for (int i = 0; i < threads; ++i) {
        CAPTURE(i);
        CHECK(relative_error(dxs[std::size_t(i)], dx_serial) <= 1e-5);
        CHECK(relative_error(grads[std::size_t(i)].gate, serial.gate) <= 1e-5);
        for (index_t e = 0; e < p.experts; ++e)
            CHECK(relative_error(grads[std::size_t(i)].experts[std::size_t(e)].gate_up, serial.experts[std::size_t(e)].gate_up) <= 1e-5);
        CHECK(relative_error(grads[std::size_t(i)].shared.gate, serial.shared.gate) <= 1e-5);
    }
}
TEST_CASE_TEMPLATE_APPLY(backward_threads, test::all_backends);

// ---- Norms, Residual, DenseFfn and the stacks.

TEST_CASE("RmsNorm and LayerNorm backward match central differences") {
    const index_t rows = 5, d = 12;
    auto x = random_matrix(rows, d, 31);
    const auto dy = random_matrix(rows, d, 32);
    auto w = random_vector(d, 33), b = random_vector(d, 34, 0.3f);
    Workspace ws;
    const float h = 1e-3f;
    {
        const RmsNorm<> norm(w, 1e-5f);
        auto g = norm.make_gradients();
        Matrix<float> dx(rows, d);
        norm.backward(x, dy, dx, g, ws);
        const auto loss = [&] {
            Matrix<float> y(rows, d);
            RmsNorm<>(w, 1e-5f).forward(x, y, ws);
            return dot(y, dy);
        };
        GradientGap gap;
        for (index_t r = 0; r < rows; ++r)
            for (index_t c = 0; c < d; ++c) gap(dx(r, c), central_difference(x(r, c), loss, h));
        for (index_t c = 0; c < d; ++c) gap(g.weight[std::size_t(c)], central_difference(w[std::size_t(c)], loss, h));
        CHECK(gap.within(2e-3));
        Matrix<float> short_dx(rows - 1, d);
        CHECK_THROWS_WITH_AS(norm.backward(x, dy, short_dx, g, ws),
                             "RmsNorm::backward: input gradient dx has shape (4, 12), expected (5, 12)", shape_error);
        g.weight.resize(3);
        CHECK_THROWS_WITH_AS(norm.backward(x, dy, dx, g, ws),
                             "RmsNorm::backward: gradient 'weight' has 3 elements, expected 12 (use make_gradients())", shape_error);
    }
    {
        const LayerNorm<> norm(w, b, 1e-5f);
        auto g = norm.make_gradients();
        Matrix<float> dx(rows, d);
        norm.backward(x, dy, dx, g, ws);
        const auto loss = [&] {
            Matrix<float> y(rows, d);
            LayerNorm<>(w, b, 1e-5f).forward(x, y, ws);
            return dot(y, dy);
        };
        GradientGap gap;
        for (index_t r = 0; r < rows; ++r)
            for (index_t c = 0; c < d; ++c) gap(dx(r, c), central_difference(x(r, c), loss, h));
        for (index_t c = 0; c < d; ++c) {
            gap(g.weight[std::size_t(c)], central_difference(w[std::size_t(c)], loss, h));
            gap(g.bias[std::size_t(c)], central_difference(b[std::size_t(c)], loss, h));
        }
        CHECK(gap.within(2e-3));
        x(1, 2) = std::nanf("");
        CHECK_THROWS_WITH_AS(norm.backward(x, dy, dx, g, ws),
                             "LayerNorm::backward: input x: element (1, 2) is nan, expected a finite value", numeric_error);
    }
}

namespace {

/// A pre-norm block stack: RmsNorm -> Residual(MoE with a shared expert) -> LayerNorm ->
/// Residual(DenseFfn), from MoeParams plus its own norm and dense weights.
struct StackParams {
    MoeParams moe{9};
    std::vector<float> rms = random_vector(8, 41), ln_w = random_vector(8, 42), ln_b = random_vector(8, 43, 0.3f);
    Matrix<float> up = random_matrix(16, 8, 44, 0.4f), down = random_matrix(8, 16, 45, 0.4f);
    std::vector<float> up_b = random_vector(16, 46, 0.2f), down_b = random_vector(8, 47, 0.2f);

    template <class B>
    auto layers() const {
        using Glu = GluExpert<B, Silu>;
        using Moe = MoeLayer<Glu, TopKRouter, SharedExpert<Glu>>;
        return std::tuple{RmsNorm<>(rms, 1e-5f),
                          Residual<Moe>(Moe(weight(moe.gate), TopKRouter(moe.experts, TopK{2}, {.weighting = {.renormalize = true}}),
                                            moe.build_experts<B>(), moe.build_shared<B>())),
                          LayerNorm<>(ln_w, ln_b, 1e-5f),
                          Residual<DenseFfn<FfnExpert<B, GeluTanh>>>(
                              DenseFfn<FfnExpert<B, GeluTanh>>(FfnExpert<B, GeluTanh>(FfnWeights{weight(up), weight(down), up_b, down_b})))};
    }
    template <class B>
    auto sequential() const {
        return std::apply([](auto... l) { return Sequential(std::move(l)...); }, layers<B>());
    }
    template <class B>
    DynamicStack dynamic() const {
        DynamicStack s;
        std::apply([&](auto... l) { (s.push_back(std::move(l)), ...); }, layers<B>());
        return s;
    }
};

/// A layer without a backward (a copy).
struct NoBackward {
    static constexpr index_t static_in_width = dynamic, static_out_width = dynamic;
    [[nodiscard]] index_t in_width() const noexcept { return 8; }
    [[nodiscard]] index_t out_width() const noexcept { return 8; }
    [[nodiscard]] std::size_t workspace_bytes(index_t) const noexcept { return 0; }
    void forward(ConstMatrixView<float> in, MatrixView<float> out, Workspace&, const Context& = {}) const {
        for (index_t r = 0; r < in.rows(); ++r)
            for (index_t c = 0; c < 8; ++c) out(r, c) = in(r, c);
    }
};

} // namespace

TEST_CASE("Sequential backward through norms, residual MoE and dense blocks matches central differences; DynamicStack gives the same") {
    StackParams p;
    const index_t tokens = 7;
    auto x = random_matrix(tokens, 8, 48);
    const auto dy = random_matrix(tokens, 8, 49);
    Workspace ws;
    const auto stack = p.sequential<reference>();
    static_assert(TrainableLayer<decltype(stack)>);
    auto g = stack.make_gradients();
    Matrix<float> dx(tokens, 8);
    stack.backward(x, dy, dx, g, ws);
    const auto loss = [&] {
        Matrix<float> y(tokens, 8);
        p.sequential<reference>().forward(x, y, ws);
        return dot(y, dy);
    };
    const float h = 2e-3f;
    GradientGap gap;
    for (index_t t = 0; t < tokens; ++t)
        for (index_t c = 0; c < 8; ++c) gap(dx(t, c), central_difference(x(t, c), loss, h));
    for (index_t c = 0; c < 8; ++c) {
        gap(std::get<0>(g).weight[std::size_t(c)], central_difference(p.rms[std::size_t(c)], loss, h));
        gap(std::get<2>(g).bias[std::size_t(c)], central_difference(p.ln_b[std::size_t(c)], loss, h));
        gap(std::get<1>(g).gate(1, c), central_difference(p.moe.gate(1, c), loss, h));
        gap(std::get<3>(g).down(c, 3), central_difference(p.down(c, 3), loss, h));
    }
    CHECK(gap.within(3e-3));

    // The type-erased stack: the same gradients, bit for bit.
    const DynamicStack dyn = p.dynamic<reference>();
    auto gd = dyn.make_gradients();
    Matrix<float> dxd(tokens, 8);
    dyn.backward(x, dy, dxd, gd, ws);
    CHECK(relative_error(dxd, dx) == 0.0);
    const auto& moe_d = std::any_cast<const gradients_of<std::tuple_element_t<1, decltype(p.layers<reference>())>>&>(gd[1]);
    CHECK(relative_error(moe_d.gate, std::get<1>(g).gate) == 0.0);
    CHECK(relative_error(std::any_cast<const FfnGradients&>(gd[3]).up, std::get<3>(g).up) == 0.0);

    // Every backend equals the reference.
    const auto other = [&](auto backend) {
        using B = decltype(backend);
        const auto s = p.sequential<B>();
        auto go = s.make_gradients();
        Matrix<float> dxo(tokens, 8);
        s.backward(x, dy, dxo, go, ws);
        CHECK(relative_error(dxo, dx) <= 1e-5);
        CHECK(relative_error(std::get<1>(go).gate, std::get<1>(g).gate) <= 1e-5);
        CHECK(relative_error(std::get<3>(go).down, std::get<3>(g).down) <= 1e-5);
    };
#if HYPERMOE_HAS_EIGEN
    other(eigen{});
#endif
#if HYPERMOE_HAS_ONEDNN
    other(onednn{});
#endif

    // Typed errors of the type-erased stack.
    auto wrong = gd;
    std::swap(wrong[0], wrong[2]);
    CHECK_THROWS_WITH_AS(dyn.backward(x, dy, dxd, wrong, ws),
                         "DynamicStack::backward: the gradients given for layer 2 are not that layer's (use make_gradients())", shape_error);
    wrong.pop_back();
    CHECK_THROWS_WITH_AS(dyn.backward(x, dy, dxd, wrong, ws),
                         "DynamicStack::backward: gradients for 3 layers, expected 4 (use make_gradients())", shape_error);
    DynamicStack plain = p.dynamic<reference>();
    plain.push_back(NoBackward{});
    CHECK_THROWS_WITH_AS((void)plain.make_gradients(), "DynamicStack: layer 4 has no backward (it cannot be trained)", config_error);
}

TEST_CASE_TEMPLATE_DEFINE("MoE layer backward gives the same bits at 1, 2 and 16 threads", B, backward_thread_counts) {
    // Large enough for every parallel path to split (the GEMMs, the row-wise loops).
    const auto layer = test::make_layer<B>(TopKRouter(8, TopK{2}, {.weighting = {.renormalize = true}}), 192, 320);
    const auto x = random_matrix(512, 192, 60), dy = random_matrix(512, 192, 61);
    const auto run = [&](const auto& what, int threads) { // a layer or an expert
        const detail::ThreadCountScope scope(threads);
        Workspace ws;
        auto g = what.make_gradients();
        Matrix<float> dx(x.rows(), x.cols());
        what.backward(x, dy, dx, g, ws);
        return std::pair{std::move(dx), std::move(g)};
    };
    const auto [dx1, g1] = run(layer, 1);
    bool same = true;
    // The layer's experts balance, so at 2 threads each expert's tiles run as one item on one
    // thread; at 16 threads (more than the 8 experts) as one pool of (expert, tile) items per
    // stage. One expert's backward alone runs its tiles as such pools.
    for (const int threads : {2, 16}) {
        const auto [dx2, g2] = run(layer, threads);
        same = same && relative_error(dx1, dx2) == 0.0 && relative_error(g1.gate, g2.gate) == 0.0;
        for (std::size_t e = 0; e < g1.experts.size(); ++e)
            same = same && relative_error(g1.experts[e].gate_up, g2.experts[e].gate_up) == 0.0 &&
                   relative_error(g1.experts[e].down, g2.experts[e].down) == 0.0;
    }
    const auto gw = random_matrix(320, 192, 62, 0.3f), uw = random_matrix(320, 192, 63, 0.3f), dw = random_matrix(192, 320, 64, 0.3f);
    const GluExpert<B, Silu> expert(GluWeights{weight(gw), weight(uw), weight(dw)});
    const auto [ex1, eg1] = run(expert, 1);
    const auto [ex2, eg2] = run(expert, 2);
    same = same && relative_error(ex1, ex2) == 0.0 && relative_error(eg1.gate_up, eg2.gate_up) == 0.0 &&
           relative_error(eg1.down, eg2.down) == 0.0;
    const std::string verdict = std::string(B::name) + ": 1, 2 and 16 threads give " + (same ? "the same bits" : "different bits");
    MESSAGE(verdict);
    // Our loops, our panel kernels (oneDNN's backward products) and Eigen's GEMM (fixed 128-column
    // blocks) never split a reduction over threads: the same bits at any thread count.
    CHECK(same);
}
TEST_CASE_TEMPLATE_APPLY(backward_thread_counts, test::all_backends);
