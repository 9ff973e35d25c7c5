#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include <omp.h>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::random_vector;
using test::relative_error;

namespace {

struct Case {
    index_t m, k, n;
    bool bias;
    bool accumulate;
    float scale;
    dtype storage;
    bool strided = true; ///< input rows with a stride wider than K
    precision prec = precision::exact;
};

/// Runs linear<Act> of backend B and of the reference on the same inputs and compares.
template <class B, class Act>
void compare_with_reference(const Case& c, WeightView w) {
    CAPTURE(c.m);
    CAPTURE(c.k);
    CAPTURE(c.n);
    CAPTURE(c.bias);
    CAPTURE(c.accumulate);
    CAPTURE(c.scale);
    CAPTURE(to_string(c.storage));
    CAPTURE(to_string(c.prec));
    CAPTURE(Act::name);
    const auto bias = c.bias ? random_vector(c.n, 7) : std::vector<float>{};
    const LinearOptions opt{"test", c.accumulate, c.storage, c.prec};
    const typename B::template linear<Act> lin(w, bias, opt);
    const reference::linear<Act> ref(w, bias, opt);
    CHECK(lin.storage() == c.storage);
    CHECK(lin.in_features() == c.k);
    CHECK(lin.out_features() == c.n);

    CAPTURE(c.strided);
    // By default the input is a column block of a wider buffer, so strided rows are covered too.
    const index_t pad = c.strided ? 3 : 0;
    const Matrix<float> wide = random_matrix(c.m, c.k + pad, 11);
    const auto a = ConstMatrixView<float>(wide.view()).col_block(pad == 0 ? 0 : 2, c.k);
    Matrix<float> got = random_matrix(c.m, c.n, 13); // accumulate adds to these
    Matrix<float> want = got;
    Workspace ws;
    lin(a, got.view(), ws, c.scale);
    ref(a, want.view(), ws, c.scale);
    CHECK(relative_error(got.view(), want.view()) <= test::tolerance(c.k));
}

template <class B, class Act>
void sweep() {
    for (const index_t m : {0, 1, 7, 64})
        for (const auto& [k, n] : {std::pair<index_t, index_t>{37, 19}, {64, 128}, {48, 48}, {0, 5}, {6, 0}})
            for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k}) {
                // The weight is a column block of a wider matrix: rows further apart than K.
                const Matrix<float> wide = random_matrix(n, k + 5, 5, 0.3f);
                const ConstMatrixView<float> w = ConstMatrixView<float>(wide.view()).col_block(2, k);
                for (const bool bias : {false, true})
                    for (const bool acc : {false, true})
                        for (const float scale : {1.0f, 0.5f})
                            for (const precision prec : {precision::exact, precision::fast})
                                if (prec == precision::exact || storage != dtype::f32)
                                    compare_with_reference<B, Act>({m, k, n, bias, acc, scale, storage, true, prec}, w);
            }
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("linear matches the reference for every epilogue", B, linear_sweep) {
    sweep<B, Identity>();
    sweep<B, Relu>();
    sweep<B, Gelu>();
    sweep<B, GeluTanh>();
    sweep<B, Silu>();
    sweep<B, Relu2>();
}
TEST_CASE_TEMPLATE_APPLY(linear_sweep, test::all_backends);

namespace {

/// forward_columns over tiles `width` columns wide (the last one what is left), run from the
/// last tile to the first, against the whole call on the same inputs: the same bits.
template <class B, class Act>
void compare_columns(const Case& c, WeightView w) {
    CAPTURE(c.m);
    CAPTURE(c.k);
    CAPTURE(c.n);
    CAPTURE(c.bias);
    CAPTURE(c.accumulate);
    CAPTURE(to_string(c.storage));
    CAPTURE(to_string(c.prec));
    CAPTURE(Act::name);
    const auto bias = c.bias ? random_vector(c.n, 7) : std::vector<float>{};
    const typename B::template linear<Act> lin(w, bias, LinearOptions{"test", c.accumulate, c.storage, c.prec});
    const Matrix<float> wide = random_matrix(c.m, c.k + 3, 11);
    const auto a = ConstMatrixView<float>(wide.view()).col_block(2, c.k);
    Matrix<float> want = random_matrix(c.m, c.n + 5, 13); // accumulate adds to these; c strided
    Matrix<float> got = want;
    Workspace ws;
    lin(a, want.view().col_block(1, c.n), ws, c.scale);
    const index_t unit = lin.forward_column_unit();
    CAPTURE(unit);
    REQUIRE(unit >= 1);
    for (const index_t width : {unit, 2 * unit, std::max<index_t>(c.n, 1)}) {
        CAPTURE(width);
        Matrix<float> tiled = got;
        {
            Workspace::Scope scope(ws, lin.prepared_bytes(c.m));
            const PreparedInput p = lin.prepare(a, ws);
            const index_t tiles = (c.n + width - 1) / width;
            for (index_t t = tiles - 1; t >= 0; --t) {
                const index_t n0 = t * width, cols = std::min(width, c.n - n0);
                lin.forward_columns(p, tiled.view().col_block(1 + n0, cols), n0, ws, c.scale);
            }
        }
        index_t differ = 0;
        for (index_t r = 0; r < c.m; ++r)
            for (index_t j = 0; j < c.n + 5; ++j) differ += std::memcmp(&tiled(r, j), &want(r, j), sizeof(float)) != 0;
        CHECK(differ == 0);
    }
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("forward_columns: a linear's tiles give the whole call's bits, for every storage and precision", B,
                          linear_columns) {
    for (const auto& [k, n] : {std::pair<index_t, index_t>{100, 300}, {64, 256}, {37, 19}, {0, 40}}) {
        const Matrix<float> w = random_matrix(n, k, 5, 0.3f);
        for (const index_t m : {1, 7, 33, 300})
            for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4})
                for (const precision prec : {precision::exact, precision::fast}) {
                    if (prec == precision::fast && storage == dtype::f32) continue;
                    if (m == 300 && std::is_same_v<B, reference>) continue; // slow, and no different
                    for (const bool bias : {false, true})
                        for (const bool acc : {false, true}) {
                            compare_columns<B, Identity>({m, k, n, bias, acc, 0.5f, storage, true, prec}, w.view());
                            compare_columns<B, Silu>({m, k, n, bias, acc, 1.0f, storage, true, prec}, w.view());
                        }
                }
    }
    // Typed errors name the call, the columns asked for and what is allowed.
    const Matrix<float> w = random_matrix(300, 100, 5, 0.3f);
    const typename B::template linear<Identity> lin(w.view(), {}, LinearOptions{"lin300"});
    const Matrix<float> a = random_matrix(4, 100, 3);
    Workspace ws;
    const PreparedInput p = lin.prepare(a.view(), ws);
    Matrix<float> c(4, 300);
    CHECK_THROWS_WITH_AS(lin.forward_columns(p, c.view().col_block(0, 20), 290, ws), doctest::Contains("lin300 forward_columns: columns [290, 310) of the output, expected a range within [0, 300)"), shape_error);
    Matrix<float> c3(3, 300);
    CHECK_THROWS_WITH_AS(lin.forward_columns(p, c3.view(), 0, ws), doctest::Contains("lin300 forward_columns: output has 3 rows, expected 4 (the input's)"), shape_error);
    if (const index_t unit = lin.forward_column_unit(); unit > 1 && unit < 300)
        CHECK_THROWS_WITH_AS(lin.forward_columns(p, c.view().col_block(0, unit), 1, ws),
                             doctest::Contains(("expected multiples of " + std::to_string(unit) + " (forward_column_unit()) or a range that ends at 300").c_str()),
                             shape_error);
}
TEST_CASE_TEMPLATE_APPLY(linear_columns, test::all_backends);

// Row counts around the oneDNN backend's buckets (exact, padded and 256-row pieces), dense rows.
TEST_CASE_TEMPLATE_DEFINE("linear matches the reference for every row count", B, linear_rows) {
    const Matrix<float> w = random_matrix(19, 37, 5, 0.3f);
    for (const index_t m : {2, 3, 5, 16, 17, 33, 100, 140, 255, 256, 257, 600})
        for (const bool acc : {false, true}) {
            compare_with_reference<B, Silu>({m, 37, 19, true, acc, 1.0f, dtype::f32, false}, w.view());
            compare_with_reference<B, Identity>({m, 37, 19, false, acc, 0.5f, dtype::f32, false}, w.view());
            compare_with_reference<B, Gelu>({m, 37, 19, true, acc, 0.5f, dtype::bf16, false}, w.view());
        }
    // Wide enough for every panel-group shape of the bf16 kernel (4 + 3 panels, 7 rows).
    const Matrix<float> wide = random_matrix(100, 70, 6, 0.3f);
    for (const index_t m : {1, 4, 7, 8, 13})
        for (const precision prec : {precision::exact, precision::fast})
            compare_with_reference<B, Identity>({m, 70, 100, true, true, 1.0f, dtype::bf16, true, prec}, wide.view());
}
TEST_CASE_TEMPLATE_APPLY(linear_rows, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("q8_0, q4_0, mxfp4 and q4_k weights: every backend equals f32 arithmetic on the dequantised weights", B,
                          linear_blocks) {
    // K = 100: three whole blocks and a zero-padded fourth; K = 300: ten, the partial last block
    // read by every row block; K = 520: q4_k's two whole super-blocks and a third of one
    // sub-block; K = 1100: two slices of widened tiles, the second ending in a partial block. M
    // around the kernels' row blocks (4 exact, 6 fast) and the rows from which `exact` widens
    // (BlockLinear::widen_rows: 12 on AVX2, up to 112 on AVX-512, which 130 passes).
    for (const index_t k : {100, 300, 520, 1100}) {
        CAPTURE(k);
        const index_t n = 45;
        const Matrix<float> w = random_matrix(n, k, 8, 0.3f);
        for (const dtype format : test::block_formats) {
            CAPTURE(to_string(format));
            // The weights' exact values, quantised and dequantised block by block (core/quant.hpp).
            Matrix<float> exact(n, k);
            for (index_t r = 0; r < n; ++r) {
                const std::vector<float> out = test::requantized(format, std::span<const float>(w.data() + r * k, std::size_t(k)));
                std::copy(out.begin(), out.end(), exact.data() + r * k);
            }
            const auto bias = random_vector(n, 9);
            const typename B::template linear<Silu> lin(ConstMatrixView<float>(w.view()), bias, {"w", true, format});
            const reference::linear<Silu> oracle(ConstMatrixView<float>(exact.view()), bias, {"w", true, dtype::f32});
            CHECK(lin.storage() == format);
            MESSAGE("block kernels: exact ", detail::kernel_isa_name(format, precision::exact), ", fast ", detail::kernel_isa_name(format, precision::fast));
            for (const index_t m : {1, 3, 4, 5, 9, 12, 33, 130}) {
                CAPTURE(m);
                const Matrix<float> a = random_matrix(m, k, 10);
                Matrix<float> got = random_matrix(m, n, 12), want = got;
                Workspace ws;
                lin(a.view(), got.view(), ws, 0.5f);
                oracle(a.view(), want.view(), ws, 0.5f);
                CHECK(relative_error(got.view(), want.view()) <= 1e-5);
            }
            // Quantising is not the identity: the formats lose what they must.
            CHECK(relative_error(exact.view(), w.view()) > (format == dtype::q8_0 ? 1e-4 : 1e-2));
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_blocks, test::all_backends);

namespace {
/// The `fast` precision's activations, worked out independently of the library: per block of
/// 32, d = amax / 127 and q = x * (1 / d) rounded to nearest even; returns q * d.
Matrix<float> fast_activations(ConstMatrixView<float> a) {
    Matrix<float> out(a.rows(), a.cols());
    for (index_t r = 0; r < a.rows(); ++r)
        for (index_t b0 = 0; b0 < a.cols(); b0 += 32) {
            const index_t end = std::min(a.cols(), b0 + 32);
            float amax = 0.0f;
            for (index_t i = b0; i < end; ++i) amax = std::max(amax, std::abs(a(r, i)));
            const float d = amax / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
            for (index_t i = b0; i < end; ++i) out(r, i) = std::nearbyint(a(r, i) * id) * d;
        }
    return out;
}
} // namespace

TEST_CASE_TEMPLATE_DEFINE("fast q8_0 / q4_0 / mxfp4 / q4_k: every backend equals f32 arithmetic on the dequantised weights and activations", B,
                          linear_blocks_fast) {
    MESSAGE("fast block kernel: ", detail::kernel_isa_name(dtype::q8_0, precision::fast));
    // K = 100: four blocks, the last padded; K = 70: three (an odd count, paired with a zero block).
    // K = 300: ten blocks, read by every row block (M up to 70: 12 row blocks).
    for (const index_t k : {100, 70, 300})
        for (const dtype format : test::block_formats) {
            CAPTURE(k);
            CAPTURE(to_string(format));
            const index_t n = 45;
            const Matrix<float> w = random_matrix(n, k, 8, 0.3f);
            const detail::BlockWeights blocks(ConstMatrixView<float>(w.view()), format, "w");
            Matrix<float> exact(n, k);
            for (index_t r = 0; r < n; ++r)
                for (index_t i = 0; i < k; ++i) exact(r, i) = blocks.at(r, i);
            const auto bias = random_vector(n, 9);
            const typename B::template linear<Silu> fast(ConstMatrixView<float>(w.view()), bias, {"w", true, format, precision::fast});
            const typename B::template linear<Silu> slow(ConstMatrixView<float>(w.view()), bias, {"w", true, format, precision::exact});
            const reference::linear<Silu> oracle(ConstMatrixView<float>(exact.view()), bias, {"w", true, dtype::f32});
            CHECK(fast.prec() == precision::fast);
            for (const index_t m : {1, 2, 3, 4, 5, 9, 15, 16, 33, 70}) {
                CAPTURE(m);
                Matrix<float> a = random_matrix(m, k, 10);
                if (m == 5 || m == 70) std::fill_n(a.data() + 32, 32, 0.0f); // a zero block: d = 0
                const Matrix<float> a_fast = fast_activations(a.view());
                const Matrix<float> start = random_matrix(m, n, 12);
                Matrix<float> got = start, want = start, exact_out = start;
                Workspace ws;
                fast(a.view(), got.view(), ws, 0.5f);
                oracle(a_fast.view(), want.view(), ws, 0.5f);
                CHECK(relative_error(got.view(), want.view()) <= 1e-5);
                // The price of quantised activations, against exact arithmetic on the same weights.
                slow(a.view(), exact_out.view(), ws, 0.5f);
                const double cost = relative_error(got.view(), exact_out.view());
                CHECK(cost > 1e-5);
                CHECK(cost < 2e-2);
            }
        }
}
TEST_CASE_TEMPLATE_APPLY(linear_blocks_fast, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("fast q8_0 / q4_0 / mxfp4 / q4_k at the integer limits: the largest codes times the largest activations", B,
                          linear_blocks_limits) {
    // Every weight at its format's largest unsigned code (q8_0: q = 127; q4_0: nibble 15, the
    // values opposite each block's first; mxfp4: 6 x its scale, code 24; q4_k: 15, every weight
    // the same, so the fit's min is 0) and every activation
    // 127 after quantising: the kernels' int16 pairs (AVX2, AVX-512 BW) at their largest, where a
    // sum held too long in 16 bits would wrap. Against the reference's integer dots.
    const index_t n = 40, k = 256;
    for (const dtype format : test::block_formats) {
        CAPTURE(to_string(format));
        Matrix<float> w(n, k);
        for (index_t r = 0; r < n; ++r)
            for (index_t i = 0; i < k; ++i)
                w(r, i) = format == dtype::q8_0 || format == dtype::q4_k ? 1.0f : format == dtype::q4_0 ? (i % 32 == 0 ? 1.0f : -0.875f) : 1.5f;
        Matrix<float> a(3, k);
        std::fill_n(a.data(), 3 * k, 1.0f);
        const typename B::template linear<Identity> fast(ConstMatrixView<float>(w.view()), {}, {"w", false, format, precision::fast});
        const reference::linear<Identity> oracle(ConstMatrixView<float>(w.view()), {}, {"w", false, format, precision::fast});
        Matrix<float> got(3, n), want(3, n);
        Workspace ws;
        fast(a.view(), got.view(), ws, 1.0f);
        oracle(a.view(), want.view(), ws, 1.0f);
        CHECK(relative_error(got.view(), want.view()) <= 1e-6);
        const float per_block = format == dtype::q8_0 || format == dtype::q4_k ? 32.0f : format == dtype::q4_0 ? 1.0f - 31 * 0.875f : 32 * 1.5f;
        CHECK(want(0, 0) == doctest::Approx(8 * per_block).epsilon(1e-2)); // the reference is right too
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_blocks_limits, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("mxfp4: every scale byte e scales its block by 2^(e - 128) in every kernel, exact and fast", B,
                          linear_mxfp4_scales) {
    // Output n's two blocks have the scale bytes n and n ^ 1 (0..255, the subnormal 2^-128 and
    // 2^-127 included), held as the bytes they are and turned into floats as each kernel loads
    // them. Weights and inputs are small integers times powers of two, so `exact` sums them
    // without rounding and must give every output's bits; rows from e = 252 hold values of at
    // most 1 (12 x 2^125 would not be finite).
    const index_t n = 256, k = 64;
    std::mt19937 rng(41);
    std::vector<BlockMXFP4> blocks(std::size_t(n * 2));
    for (index_t r = 0; r < n; ++r)
        for (index_t b = 0; b < 2; ++b) {
            BlockMXFP4& blk = blocks[std::size_t(r * 2 + b)];
            blk.e = static_cast<std::uint8_t>(b == 0 ? r : r ^ 1);
            for (auto& q : blk.qs) {
                const unsigned lo = rng() % 16, hi = rng() % 16;
                // at most 1 in magnitude: nibbles 0, 1, 8 (-0) and 9 (-1)
                q = r >= 252 ? static_cast<std::uint8_t>((lo & 0x9u) | ((hi & 0x9u) << 4)) : static_cast<std::uint8_t>(lo | (hi << 4));
            }
        }
    const WeightView w = WeightView::blocks(blocks.data(), dtype::mxfp4, n, k);
    for (const index_t m : {3, 17}) { // 17 rows: an AMX call where the CPU (or HYPERMOE_AMX=emulate) has one
        CAPTURE(m);
        Matrix<float> a(m, k);
        for (index_t i = 0; i < m * k; ++i) a.data()[i] = std::ldexp(float(int(rng() % 31) - 15), -12);
        for (index_t r = 0; r < m; ++r) a(r, 5) = a(r, 40) = std::ldexp(15.0f, -12); // every block's amax: d_x = 15 x 2^-12 / 127
        const Matrix<float> a_fast = fast_activations(a.view());
        for (const precision prec : {precision::exact, precision::fast}) {
            CAPTURE(to_string(prec));
            const typename B::template linear<Identity> lin(w, {}, {"mx", false, dtype::mxfp4, prec});
            Matrix<float> got(m, n);
            Workspace ws;
            lin(a.view(), got.view(), ws, 1.0f);
            // `fast` again on activations 2^24 times larger: the first 24 outputs' d_w x d_x,
            // a subnormal float above, is normal there (and the later outputs could overflow).
            Matrix<float> big(m, k), got_big(m, n);
            for (index_t i = 0; i < m * k; ++i) big.data()[i] = std::ldexp(a.data()[i], 24);
            if (prec == precision::fast) lin(big.view(), got_big.view(), ws, 1.0f);
            const Matrix<float> big_fast = fast_activations(big.view());
            for (index_t r = 0; r < m; ++r)
                for (index_t o = 0; o < n; ++o) {
                    const bool low = prec == precision::fast && o < 24;
                    const Matrix<float>& x = prec == precision::exact ? a : low ? big_fast : a_fast;
                    double want = 0.0, size = 0.0;
                    for (index_t i = 0; i < k; ++i) {
                        want += double(w.at(o, i)) * double(x(r, i));
                        size += std::abs(double(w.at(o, i)) * double(x(r, i)));
                    }
                    CAPTURE(o);
                    if (prec == precision::exact) CHECK(got(r, o) == float(want));
                    else CHECK(std::abs(double(low ? got_big(r, o) : got(r, o)) - want) <= 1e-6 * size);
                }
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_mxfp4_scales, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("q4_k: each sub-block's d x sc and dmin x m reach its own outputs in every kernel, exact and fast", B,
                          linear_q4_k_scales) {
    // GGUF-style super-blocks built here: per output and super-block, d and dmin powers of two
    // (2^-8 to 2^-10), every sub-block's sc and m drawn from 0-63 (so the 12 packed scale bytes,
    // k_scale_min's two layouts, all take part) and codes 0-15. Held as stored, they must give
    // ggml's values, (d sc) q - dmin m, in the kernels' scale and min layout (Q4KScales).
    // Inputs are small integers times 2^-6, so `exact` sums them without rounding and must give
    // every output's bits; `fast` is checked to 1e-6 of the sum of |terms| (the scaled codes'
    // and the mins' apart, as the kernels sum them).
    const index_t n = 40, k = 512; // two tiles, the second of 8 outputs; two super-blocks a row
    std::mt19937 rng(43);
    std::vector<BlockQ4_K> blocks(std::size_t(n * 2));
    for (BlockQ4_K& blk : blocks) {
        blk.d = f32_to_f16_bits(std::ldexp(1.0f, -8 - int(rng() % 3)));
        blk.dmin = f32_to_f16_bits(std::ldexp(1.0f, -8 - int(rng() % 3)));
        for (auto& b : blk.scales) b = static_cast<std::uint8_t>(rng());
        for (auto& q : blk.qs) q = static_cast<std::uint8_t>(rng());
    }
    const WeightView w = WeightView::blocks(blocks.data(), dtype::q4_k, n, k);
    // Each weight's two terms, d sc q and dmin m, as ggml's dequantize_row_q4_K takes them, worked
    // out from the bytes here; the view gives their difference.
    Matrix<double> scaled(n, k), mins(n, k);
    for (index_t o = 0; o < n; ++o)
        for (index_t i = 0; i < k; ++i) {
            const BlockQ4_K& blk = blocks[std::size_t(o * 2 + i / 256)];
            const index_t j = i % 256, s = j / 32;
            const unsigned sc = s < 4 ? blk.scales[std::size_t(s)] & 63u : (blk.scales[std::size_t(s + 4)] & 15u) | (blk.scales[std::size_t(s - 4)] >> 6) << 4;
            const unsigned mn = s < 4 ? blk.scales[std::size_t(s + 4)] & 63u : (blk.scales[std::size_t(s + 4)] >> 4) | (blk.scales[std::size_t(s)] >> 6) << 4;
            const unsigned byte = blk.qs[std::size_t(32 * (j / 64) + j % 32)];
            const unsigned q = j % 64 < 32 ? byte & 15u : byte >> 4;
            scaled(o, i) = double(f16_bits_to_f32(blk.d)) * sc * q, mins(o, i) = double(f16_bits_to_f32(blk.dmin)) * mn;
            CHECK(w.at(o, i) == float(scaled(o, i) - mins(o, i)));
        }
    for (const index_t m : {3, 17}) { // 17 rows: an AMX call where the CPU (or HYPERMOE_AMX=emulate) has one
        CAPTURE(m);
        Matrix<float> a(m, k);
        for (index_t i = 0; i < m * k; ++i) a.data()[i] = std::ldexp(float(int(rng() % 15) - 7), -6);
        const Matrix<float> a_fast = fast_activations(a.view());
        for (const precision prec : {precision::exact, precision::fast}) {
            CAPTURE(to_string(prec));
            const typename B::template linear<Identity> lin(w, {}, {"q4k", false, dtype::q4_k, prec});
            Matrix<float> got(m, n);
            Workspace ws;
            lin(a.view(), got.view(), ws, 1.0f);
            const Matrix<float>& x = prec == precision::exact ? a : a_fast;
            index_t wrong = 0;
            for (index_t r = 0; r < m; ++r)
                for (index_t o = 0; o < n; ++o) {
                    double want = 0.0, size = 0.0; // size: the two terms' magnitudes, which the kernels sum apart
                    for (index_t i = 0; i < k; ++i) {
                        want += (scaled(o, i) - mins(o, i)) * double(x(r, i));
                        size += (scaled(o, i) + mins(o, i)) * std::abs(double(x(r, i)));
                    }
                    if (prec == precision::exact) wrong += got(r, o) != float(want);
                    else wrong += std::abs(double(got(r, o)) - want) > 1e-6 * size;
                }
            CHECK(wrong == 0);
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_q4_k_scales, test::all_backends);

TEST_CASE("fast q8_0 / q4_0 activations: QuantizedRows holds exactly the integers, scales and sums worked out here") {
    // Rows of K = 100: three whole blocks (the vector path where the CPU has AVX-512) and a
    // partial fourth; row 1 has a zero block, row 2 a NaN and row 3 an infinity in block 1.
    const index_t m = 4, k = 100, blocks = 4;
    Matrix<float> a = random_matrix(m, k, 21);
    std::fill_n(a.data() + 1 * k + 32, 32, 0.0f);
    a(2, 40) = std::numeric_limits<float>::quiet_NaN();
    a(3, 63) = -std::numeric_limits<float>::infinity();
    Workspace ws;
    Workspace::Scope scope(ws, detail::QuantizedRows::bytes(m, blocks));
    const detail::QuantizedRows xq(a.view(), blocks, ws);
    for (index_t r = 0; r < m; ++r)
        for (index_t b = 0; b < blocks; ++b) {
            CAPTURE(r);
            CAPTURE(b);
            const index_t len = std::min<index_t>(32, k - 32 * b);
            float amax = 0.0f;
            bool finite = true;
            for (index_t i = 0; i < len; ++i) {
                finite = finite && std::isfinite(a(r, 32 * b + i));
                amax = std::max(amax, std::abs(a(r, 32 * b + i)));
            }
            const float d = amax / 127.0f, id = finite && d != 0.0f ? 1.0f / d : 0.0f;
            std::int32_t sum = 0;
            for (index_t i = 0; i < 32; ++i) {
                const auto q = i < len && id != 0.0f ? static_cast<std::int8_t>(std::nearbyint(a(r, 32 * b + i) * id)) : std::int8_t(0);
                CHECK(xq.q_row(r)[32 * b + i] == q);
                sum += q;
            }
            if (finite) CHECK(xq.d_row(r)[b] == d);
            else CHECK(std::isnan(xq.d_row(r)[b]));
            CHECK(xq.sum_row(r)[b] == sum);
        }
}

#if HYPERMOE_X86_KERNELS
TEST_CASE("fast q8_0 / q4_0 / mxfp4 / q4_k on AMX-INT8: the tile kernel gives the VNNI kernel's bits, on emulated tiles and on the CPU's") {
    // amx_fast_tile's logic (the nibbles' unpacking into tile rows, the A tile's stride, the offsets,
    // the scales, the masks) on AmxTilesEmulated, whose integer dots are written out in C++,
    // against fast_tile in row blocks of 6; on a CPU with AMX also on its tiles (AmxTiles).
    if (!detail::cpu_isa().avx512) {
        MESSAGE("no AVX-512 here: the AMX kernel's vector part cannot run");
        return;
    }
    const bool vnni = detail::cpu_isa().vnni, amx = detail::cpu_isa().amx_int8 && !detail::cpu_isa().amx_emulated;
    MESSAGE("AMX kernel against fast_tile ", std::string(vnni ? "with" : "without"), " VNNI; on the CPU's tiles: ", std::string(amx ? "yes" : "no (none here)"));
    for (const index_t k : {32, 100, 300})
        for (const dtype format : test::block_formats)
            for (const int rows : {1, 7, 16}) detail::with_block(format, [&]<class Block>() {
                CAPTURE(k);
                CAPTURE(to_string(format));
                CAPTURE(rows);
                const index_t n = 45; // two tiles, the second one of 13 outputs
                Matrix<float> w = random_matrix(n, k, 31, 0.3f);
                std::fill_n(w.data() + 3 * k, k, 0.0f); // a zero row: d = 0
                const detail::BlockWeights blocks(ConstMatrixView<float>(w.view()), format, "w");
                Matrix<float> a = random_matrix(rows, k, 32);
                if (rows > 1) std::fill_n(a.data() + k, std::min<index_t>(k, 32), 0.0f); // a zero block
                Workspace ws;
                Workspace::Scope scope(ws, detail::QuantizedRows::bytes(rows, blocks.blocks_per_row()));
                const detail::QuantizedRows xq(a.view(), blocks.blocks_per_row(), ws);
                const float sentinel = -12345.0f;
                Matrix<float> want(rows, n), got(rows, n), on_cpu(rows, n);
                std::fill_n(want.data(), rows * n, sentinel), std::fill_n(got.data(), rows * n, sentinel), std::fill_n(on_cpu.data(), rows * n, sentinel);
                for (index_t tile = 0; tile < blocks.tiles(); ++tile) {
                    detail::TileArgs args;
                    args.wq = blocks.tile_quants(tile), args.wd = blocks.tile_scales(tile), args.nb = blocks.blocks_per_row();
                    const index_t cols = std::min<index_t>(32, n - 32 * tile);
                    for (int p = 0; p < 2; ++p)
                        args.mask[p] = static_cast<std::uint16_t>((1u << std::clamp<index_t>(cols - 16 * p, 0, 16)) - 1u);
                    args.ldc = n;
                    const detail::AmxRows x{xq.q_row(0), xq.d_row(0), xq.sum_row(0), xq.dsum_row(0), blocks.blocks_per_row(), rows};
                    args.out = got.data() + 32 * tile;
                    detail::amx_fast_tile<detail::AmxTilesEmulated, Block>(args, x);
                    if (amx) {
                        args.out = on_cpu.data() + 32 * tile;
                        detail::amx_fast_tile<detail::AmxTiles, Block>(args, x);
                    }
                    for (int m = 0; m < rows; m += 6) {
                        detail::TileRows tr;
                        const int here = std::min(6, rows - m);
                        for (int r = 0; r < here; ++r)
                            tr.q[r] = xq.q_row(m + r), tr.d[r] = xq.d_row(m + r), tr.sum[r] = xq.sum_row(m + r), tr.dsum[r] = xq.dsum_row(m + r);
                        args.out = want.data() + m * n + 32 * tile;
                        const auto run = [&]<int R>() {
                            vnni ? detail::fast_tile<R, Block, true>(args, tr) : detail::fast_tile<R, Block, false>(args, tr);
                        };
                        if (here == 6) run.template operator()<6>();
                        else if (here == 4) run.template operator()<4>();
                        else run.template operator()<1>();
                    }
                }
                CHECK(std::memcmp(got.data(), want.data(), sizeof(float) * std::size_t(rows * n)) == 0);
                if (amx) CHECK(std::memcmp(on_cpu.data(), want.data(), sizeof(float) * std::size_t(rows * n)) == 0);
                // Every output was written, and the reference is no trivial one.
                index_t written = 0, nonzero = 0;
                for (index_t i = 0; i < rows * n; ++i) written += got.data()[i] != sentinel, nonzero += got.data()[i] != 0.0f;
                CHECK(written == rows * n);
                CHECK(nonzero >= rows * (n - 1) - (rows > 1 ? n : 0));
            });
}
#endif

TEST_CASE("block_int_dot is the exact integer dot of a weight block with quantised activations") {
    // Expected values in double from the dequantising code (core/quant.hpp with d = 1), not from
    // an int8 loop of the same shape: GCC 12 has miscompiled such loops (see block_int_dot).
    std::uint64_t seed = 3;
    const auto next = [&] { return detail::splitmix64(seed++); };
    for (int trial = 0; trial < 500; ++trial) {
        std::array<std::int8_t, 32> x{};
        std::int32_t xsum = 0;
        for (auto& v : x) v = static_cast<std::int8_t>(int(next() % 255) - 127), xsum += v;
        BlockQ8_0 q8;
        BlockQ4_0 q4;
        BlockMXFP4 mx;
        q8.d = q4.d = 0x3C00; // 1.0: the dequantised values are the integers
        mx.e = 128;           // 2^0, likewise
        for (auto& v : q8.qs) v = static_cast<std::int8_t>(next() % 256); // -128 too (a GGUF file may hold it)
        for (auto& v : q4.qs) v = static_cast<std::uint8_t>(next() % 256);
        for (auto& v : mx.qs) v = static_cast<std::uint8_t>(next() % 256);
        std::array<float, 32> w8{}, w4{}, wm{};
        dequantize(q8, w8);
        dequantize(q4, w4);
        dequantize(mx, wm);
        double want8 = 0, want4 = 0, wantm = 0;
        for (std::size_t i = 0; i < 32; ++i) want8 += double(w8[i]) * x[i], want4 += double(w4[i]) * x[i], wantm += double(wm[i]) * x[i];
        CHECK(detail::block_int_dot<BlockQ8_0>(reinterpret_cast<const std::uint8_t*>(q8.qs.data()), x.data(), xsum) == want8);
        CHECK(detail::block_int_dot<BlockQ4_0>(q4.qs.data(), x.data(), xsum) == want4);
        CHECK(detail::block_int_dot<BlockMXFP4>(mx.qs.data(), x.data(), xsum) == wantm);
        // q4_k's codes 0-15 as they are (its min is apart): d = 1, sc = 1, m = 0.
        SubBlockQ4_K qk;
        qk.d = 0x3C00, qk.sc = 1;
        qk.qs = q4.qs;
        std::array<float, 32> wk{};
        dequantize(qk, wk);
        double wantk = 0;
        for (std::size_t i = 0; i < 32; ++i) wantk += double(wk[i]) * x[i];
        CHECK(detail::block_int_dot<SubBlockQ4_K>(qk.qs.data(), x.data(), xsum) == wantk);
    }
}

namespace {
/// x rounded to bf16 and back, element by element (the test's own rounding: nearest, ties to
/// even, written out here rather than taken from the library).
Matrix<float> round_to_bf16(ConstMatrixView<float> x) {
    Matrix<float> out(x.rows(), x.cols());
    for (index_t r = 0; r < x.rows(); ++r)
        for (index_t i = 0; i < x.cols(); ++i) {
            std::uint32_t u;
            const float v = x(r, i);
            std::memcpy(&u, &v, 4);
            u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
            std::memcpy(&out(r, i), &u, 4);
        }
    return out;
}
} // namespace

TEST_CASE_TEMPLATE_DEFINE("fast bf16: every backend equals f32 arithmetic on bf16 weights and activations", B, linear_bf16_fast) {
    MESSAGE("bf16 kernels: exact ", detail::kernel_isa_name(dtype::bf16, precision::exact), ", fast ",
            detail::kernel_isa_name(dtype::bf16, precision::fast));
    // K odd and even, one and several panel groups, row counts around the kernels' row blocks.
    for (const auto& shape : {std::pair<index_t, index_t>{37, 19}, {70, 100}, {256, 80}}) {
        const index_t k = shape.first, n = shape.second; // not a binding: clang 14 cannot capture those
        CAPTURE(k);
        CAPTURE(n);
        const Matrix<float> w = random_matrix(n, k, 8, 0.3f);
        const Matrix<float> w16 = round_to_bf16(w.view());
        const auto bias = random_vector(n, 9);
        const typename B::template linear<Silu> fast(ConstMatrixView<float>(w.view()), bias, {"w", true, dtype::bf16, precision::fast});
        const typename B::template linear<Silu> slow(ConstMatrixView<float>(w.view()), bias, {"w", true, dtype::bf16, precision::exact});
        const reference::linear<Silu> oracle(ConstMatrixView<float>(w16.view()), bias, {"w", true, dtype::f32});
        CHECK(fast.prec() == precision::fast);
        // Without VDPBF16PS (and off oneDNN's bf16 matmul) `fast` is the exact kernel on the
        // rounded activations, held as f32 values: bit for bit `exact` run on them.
        bool on_exact_kernel = detail::bf16_kernel(precision::fast) != detail::kernel_isa::avx512_bf16;
        if constexpr (requires { fast.kernel(); }) on_exact_kernel = on_exact_kernel && fast.kernel() == "panels";
        for (const index_t m : {1, 2, 4, 5, 8, 9, 33}) {
            CAPTURE(m);
            const Matrix<float> a = random_matrix(m, k, 10);
            const Matrix<float> a16 = round_to_bf16(a.view());
            const Matrix<float> start = random_matrix(m, n, 12);
            Matrix<float> got = start, want = start, exact_out = start;
            Workspace ws;
            fast(a.view(), got.view(), ws, 0.5f);
            oracle(a16.view(), want.view(), ws, 0.5f);
            CHECK(relative_error(got.view(), want.view()) <= 1e-5);
            // The price of bf16 activations, against exact arithmetic on the same weights.
            slow(a.view(), exact_out.view(), ws, 0.5f);
            const double cost = relative_error(got.view(), exact_out.view());
            CHECK(cost > 1e-5);
            CHECK(cost < 1e-2);
            if (on_exact_kernel) {
                Matrix<float> exact_rounded = start;
                slow(a16.view(), exact_rounded.view(), ws, 0.5f);
                CHECK(std::memcmp(got.data(), exact_rounded.data(), sizeof(float) * std::size_t(m * n)) == 0);
            }
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(linear_bf16_fast, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("a linear's workspace_bytes never decreases with the row count", B, linear_workspace_monotone) {
    // Layers size one workspace for the most rows an expert may get; a call with fewer rows
    // must fit in it, whatever the kernel its row count takes (AMX-INT8 from amx_min_rows rows).
    const Matrix<float> w = random_matrix(40, 100, 8, 0.3f);
    for (const test::StorageCase& sc : test::storage_cases)
        for (const bool acc : {false, true}) {
            CAPTURE(to_string(sc.storage));
            CAPTURE(to_string(sc.prec));
            CAPTURE(acc);
            const typename B::template linear<Silu> lin(ConstMatrixView<float>(w.view()), {}, {"w", acc, sc.storage, sc.prec});
            std::size_t before = 0;
            for (index_t m = 0; m <= 80; ++m) {
                CAPTURE(m);
                const std::size_t now = lin.workspace_bytes(m);
                CHECK(now >= before);
                before = now;
            }
        }
}
TEST_CASE_TEMPLATE_APPLY(linear_workspace_monotone, test::all_backends);

TEST_CASE("fast blocks: a non-finite activation reaches the outputs as NaN, as with exact") {
    const Matrix<float> w = random_matrix(6, 64, 8, 0.3f);
    const reference::linear<Identity> ref(ConstMatrixView<float>(w.view()), {}, {"w", false, dtype::q4_0, precision::fast});
    Matrix<float> a = random_matrix(2, 64, 10);
    a(1, 40) = std::numeric_limits<float>::infinity();
    Matrix<float> c(2, 6);
    Workspace ws;
    ref(a.view(), c.view(), ws, 1.0f);
    for (index_t j = 0; j < 6; ++j) {
        CHECK(std::isfinite(c(0, j)));
        CHECK(std::isnan(c(1, j)));
    }
}

TEST_CASE("q8_0 / q4_0 / mxfp4 / q4_k weights are held as ggml's blocks, in tiles of 32 outputs, and widen exactly") {
    // Held bytes per block: ggml's (34, 18, 17), for N rounded up to whole tiles; q4_k's per
    // sub-block 16 bytes of codes, its sc and m bytes, and per super-block its d and dmin halves
    // (Q4KScales: 640 bytes a tile's super-block), against ggml's 144 a super-block.
    const auto held = [](dtype format, std::size_t n, std::size_t k) {
        if (format != dtype::q4_k) return weight_bytes(format, n, k);
        const std::size_t tiles = (n + 31) / 32, blocks = (k + 31) / 32;
        return tiles * (blocks * 32 * 16 + (blocks + 7) / 8 * 640);
    };
    const Matrix<float> w = random_matrix(3, 40, 4, 0.3f);
    for (const dtype format : test::block_formats) {
        const detail::BlockWeights blocks(ConstMatrixView<float>(w.view()), format, "w");
        CHECK(blocks.blocks_per_row() == 2);
        CHECK(blocks.tiles() == 1);
        // 3 outputs take one tile of 32: the padding outputs hold zero blocks.
        CHECK(blocks.bytes() == held(format, 32, 40));
        CHECK(weight_bytes(format, 3, 40) ==
              (format == dtype::q4_k ? 3u * 144u : 3u * 2u * (format == dtype::q8_0 ? 34u : format == dtype::q4_0 ? 18u : 17u)));
        const std::vector<float> want = test::requantized(format, std::span<const float>(w.data() + 40, 40));
        for (index_t i = 0; i < 32; ++i) CHECK(blocks.at(1, i) == want[std::size_t(i)]);
        for (index_t i = 0; i < 32; ++i) CHECK(blocks.at(31, i) == 0.0f); // padding
    }
    // Every block of 45 outputs (two tiles, the second's second panel partial) comes back with
    // ggml's bits.
    const Matrix<float> wide = random_matrix(45, 70, 5, 0.3f);
    for (const dtype format : test::block_formats) {
        CAPTURE(to_string(format));
        const detail::BlockWeights blocks(ConstMatrixView<float>(wide.view()), format, "w");
        CHECK(blocks.tiles() == 2);
        CHECK(blocks.bytes() == held(format, 64, 70));
        detail::with_block(format, [&]<class Block>() {
            using Stored = detail::ggml_block_t<Block>;
            for (index_t r = 0; r < 45; ++r) {
                const std::span<const float> row(wide.data() + r * 70, 70);
                std::vector<Stored> q(format == dtype::q4_k ? 1 : 3);
                quantize_row<Stored>(row, q, "row");
                for (index_t b = 0; b < 3; ++b) {
                    const Block got = blocks.block<Block>(r, b);
                    Block want;
                    if constexpr (detail::has_min<Block>) want = sub_block(q[0], b);
                    else want = q[std::size_t(b)];
                    CHECK(std::memcmp(&got, &want, sizeof(Block)) == 0);
                }
            }
        });
    }
    // mxfp4's every scale byte, held and given back as it is (e = 0 and 1: subnormal scales).
    std::vector<BlockMXFP4> every(256);
    for (std::size_t e = 0; e < 256; ++e) every[e].e = static_cast<std::uint8_t>(e), every[e].qs[0] = 0x01; // element 0: 1 x 2^(e - 128)
    std::vector<BlockMXFP4> row_blocks(every.begin(), every.begin() + 128), row2(every.begin() + 128, every.end());
    for (const auto* part : {&row_blocks, &row2}) {
        // A row of 128 blocks (K = 4096); e = 253 to 255 give infinite values only where a
        // nibble is 7 or 15, which these blocks do not hold.
        const detail::BlockWeights mx(WeightView::blocks(part->data(), dtype::mxfp4, 1, 128 * 32), dtype::mxfp4, "mx");
        for (index_t b = 0; b < 128; ++b) {
            CHECK(mx.block<BlockMXFP4>(0, b).e == (*part)[std::size_t(b)].e);
            CHECK(mx.at(0, b * 32) == mxfp4_scale((*part)[std::size_t(b)].e));
        }
    }
    Matrix<float> big(1, 4);
    std::fill_n(big.data(), 4, 0.0f);
    big(0, 0) = 1e8f;
    CHECK_THROWS_WITH_AS(detail::BlockWeights(ConstMatrixView<float>(big.view()), dtype::q8_0, "up"),
                         "up row 0: element 0 is 1e+08, expected a finite value of magnitude at most 8.31901e+06 to quantise",
                         weight_error);
}

TEST_CASE_TEMPLATE_DEFINE("linear takes bf16 weights as stored", B, linear_bf16_source) {
    const Matrix<float> w = random_matrix(24, 40, 3);
    const Matrix<bf16> wb = test::to_bf16(w.view());
    const typename B::template linear<Silu> lin(ConstMatrixView<bf16>(wb.view()), {}, {"w"});
    CHECK(lin.storage() == dtype::bf16);
    // The same values given as f32 with bf16 storage give the same map.
    const reference::linear<Silu> ref(ConstMatrixView<float>(w.view()), {}, {"w", false, dtype::bf16});
    const Matrix<float> a = random_matrix(5, 40, 4);
    Matrix<float> got(5, 24), want(5, 24);
    Workspace ws;
    lin(a.view(), got.view(), ws);
    ref(a.view(), want.view(), ws);
    CHECK(relative_error(got.view(), want.view()) <= test::tolerance(40));
    // Stored as f32 instead: widened exactly, so the same map again.
    const typename B::template linear<Silu> wide(ConstMatrixView<bf16>(wb.view()), {}, {"w", false, dtype::f32});
    CHECK(wide.storage() == dtype::f32);
    Matrix<float> got32(5, 24);
    wide(a.view(), got32.view(), ws);
    CHECK(relative_error(got32.view(), want.view()) <= test::tolerance(40));
}
TEST_CASE_TEMPLATE_APPLY(linear_bf16_source, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("linear rejects bad weights and shapes", B, linear_errors) {
    Matrix<float> w = random_matrix(8, 4, 1);
    const std::vector<float> short_bias(7, 0.f);
    using L = typename B::template linear<Relu>;
    CHECK_THROWS_WITH_AS(L(ConstMatrixView<float>(w.view()), short_bias, {"up"}),
                         "up: bias has 7 elements, expected 8 (the weight's rows)", shape_error);
    w(3, 2) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(L(ConstMatrixView<float>(w.view()), {}, {"up"}),
                         "up: weight element (3, 2) is inf, expected a finite value", weight_error);
    // bf16 weights are checked as stored: the first non-finite element, row by row.
    Matrix<bf16> wb = test::to_bf16(w.view());
    wb(5, 1) = bf16{0x7FC1};
    CHECK_THROWS_WITH_AS(L(ConstMatrixView<bf16>(wb.view()), {}, {"up"}),
                         "up: weight element (3, 2) is inf, expected a finite value", weight_error);
    wb(3, 2) = bf16{};
    CHECK_THROWS_WITH_AS(L(ConstMatrixView<bf16>(wb.view()), {}, {"up"}),
                         "up: weight element (5, 1) is nan, expected a finite value", weight_error);
    w(3, 2) = 0;
    std::vector<float> nan_bias(8, 0.f);
    nan_bias[5] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(L(ConstMatrixView<float>(w.view()), nan_bias, {"up"}),
                         "up: bias element 5 is nan, expected a finite value", weight_error);

    const L lin(ConstMatrixView<float>(w.view()), {}, {"up"});
    Workspace ws;
    Matrix<float> a(3, 5), c(3, 8), c_bad(2, 8);
    CHECK_THROWS_WITH_AS(lin(a.view(), c.view(), ws), "up: input has 5 columns, expected 4", shape_error);
    Matrix<float> a_ok(3, 4);
    CHECK_THROWS_WITH_AS(lin(a_ok.view(), c_bad.view(), ws), "up: output has shape (2, 8), expected (3, 8)",
                         shape_error);
}
TEST_CASE_TEMPLATE_APPLY(linear_errors, test::all_backends);

#if HYPERMOE_HAS_ONEDNN
TEST_CASE("onednn: one set of primitives per (K, N, epilogue, threads), shared between linears") {
    const Matrix<float> w1 = random_matrix(16, 8, 1), w2 = random_matrix(16, 8, 2);
    const auto* p1 = detail::onednn_matmul(8, 16, false, activation_kind::relu, false, 1);
    const onednn::linear<Relu> a(ConstMatrixView<float>(w1.view()), {}, {"a"});
    const onednn::linear<Relu> b(ConstMatrixView<float>(w2.view()), {}, {"b"});
    CHECK(detail::onednn_matmul(8, 16, false, activation_kind::relu, false, 1) == p1);
    CHECK(p1->threads == 1);
    CHECK(detail::onednn_matmul(8, 16, true, activation_kind::relu, false, 1) != p1);
    CHECK(detail::onednn_matmul(8, 16, false, activation_kind::relu, false, 3) != p1);
    CHECK(detail::onednn_matmul(8, 16, false, activation_kind::relu, false, 3)->threads == 3);
}

TEST_CASE("onednn: a linear is correct at any thread count, whenever it changes") {
    // Built at the default thread count, then run at 1, 3 and 2 threads, from inside a parallel
    // region (where OpenMP runs nested regions on one thread) and with a Workspace thread budget:
    // each gives the same bits as the first run, and the reference's values.
    const index_t k = 512, n = 704, m = 200;
    const Matrix<float> w = random_matrix(n, k, 1), x = random_matrix(m, k, 2);
    const onednn::linear<Silu> lin(ConstMatrixView<float>(w.view()), {}, {"up"});
    const reference::linear<Silu> ref(ConstMatrixView<float>(w.view()), {}, {"up"});
    Workspace ws;
    Matrix<float> want(m, n), first(m, n), got(m, n);
    ref(x.view(), want.view(), ws);
    lin(x.view(), first.view(), ws);
    CHECK(relative_error(first.view(), want.view()) <= test::tolerance(k));
    const auto same = [&] { return std::memcmp(first.data(), got.data(), sizeof(float) * std::size_t(m * n)) == 0; };
    const int threads = omp_get_max_threads();
    for (const int t : {1, 3, 2}) {
        CAPTURE(t);
        omp_set_num_threads(t);
        std::fill_n(got.data(), m * n, -1.0f);
        Workspace fresh;
        lin(x.view(), got.view(), fresh);
        CHECK(relative_error(got.view(), want.view()) <= test::tolerance(k));
    }
    omp_set_num_threads(threads);
    bool nested_ok = true;
#pragma omp parallel num_threads(2)
    {
#pragma omp single
        {
            Workspace inner;
            Matrix<float> y(m, n);
            lin(x.view(), y.view(), inner);
            nested_ok = relative_error(y.view(), want.view()) <= test::tolerance(k);
        }
    }
    CHECK(nested_ok);
    Workspace budget;
    budget.set_threads(1);
    lin(x.view(), got.view(), budget);
    CHECK(relative_error(got.view(), want.view()) <= test::tolerance(k));
    CHECK(omp_get_max_threads() == threads); // the budget applied to the call only
    lin(x.view(), got.view(), ws);
    CHECK(same());
}

TEST_CASE("onednn: a call runs as 256-row pieces and one remainder padded by at most 15 rows") {
    for (index_t m = 1; m <= 1100; ++m) {
        CAPTURE(m);
        index_t covered = 0, pieces = 0;
        while (covered < m) {
            const auto piece = detail::onednn_next_piece(m - covered);
            const index_t bucket = detail::onednn_row_buckets[piece.index];
            REQUIRE(piece.rows >= 1);
            REQUIRE(piece.rows <= m - covered);
            CHECK(piece.rows <= bucket);
            CHECK(bucket - piece.rows <= 15);
            CHECK(bucket <= detail::onednn_largest_piece(m));
            covered += piece.rows;
            ++pieces;
        }
        CHECK(pieces == (m + 255) / 256);
    }
}

TEST_CASE("onednn: a weight in a blocked layout reorders straight into the f32 panels the backward's products read") {
    // Where oneDNN has brgemm (AVX-512), a linear holds W^T (K, N) in a blocked layout such as
    // BA16a64b, and backward() reorders it into panels of W and of W^T. Here from that layout and
    // from the plain ones, on every CPU (reorders need no AVX-512), at sizes that pad the panels:
    // the same floats as pack_f32_panels, zeros in the padding, whatever the buffer held before.
    // BA16a64b without padding (K a multiple of 16, N of 64) is read directly instead, panel
    // group by panel group (onednn_pack_w_panels): the same floats again.
    using tag = dnnl::memory::format_tag;
    using dt = dnnl::memory::data_type;
    const auto& engine = detail::onednn_engine();
    for (const auto& shape : {std::pair<index_t, index_t>{37, 50}, {64, 16}, {5, 129}, {48, 128}, {32, 64}}) {
        const index_t k = shape.first, n = shape.second;
        const Matrix<float> w = random_matrix(n, k, 7); // W (N, K)
        Matrix<float> wt(k, n);
        for (index_t r = 0; r < n; ++r)
            for (index_t c = 0; c < k; ++c) wt(c, r) = w(r, c);
        std::vector<float> want_w(std::size_t(detail::f32_panel_floats(n, k))), want_wt(std::size_t(detail::f32_panel_floats(k, n)));
        detail::pack_f32_panels(w.data(), k, false, n, k, want_w.data());   // B = W: K columns in panels
        detail::pack_f32_panels(wt.data(), n, false, k, n, want_wt.data()); // B = W^T: N columns in panels
        for (const tag layout : {tag::BA16a64b, tag::ab, tag::ba}) {
            CAPTURE(k);
            CAPTURE(n);
            CAPTURE(static_cast<int>(layout));
            dnnl::memory plain({{k, n}, dt::f32, tag::ab}, engine, wt.data());
            dnnl::memory held(dnnl::memory::desc({k, n}, dt::f32, layout), engine);
            dnnl::reorder(plain, held).execute(detail::onednn_stream(), plain, held);
            detail::onednn_stream().wait();
            const auto* reorders = detail::onednn_panel_reorders(k, n, held.get_desc());
            Workspace ws;
            std::vector<float> got_w(want_w.size(), std::numeric_limits<float>::quiet_NaN()), got_wt(want_wt.size(), -1.0f);
            detail::onednn_reorder_into_panels(*reorders, held, k, n, detail::OnednnRole::panels_of_w, got_w.data(), ws, "w");
            detail::onednn_reorder_into_panels(*reorders, held, k, n, detail::OnednnRole::panels_of_wt, got_wt.data(), ws, "w");
            CHECK(std::memcmp(got_w.data(), want_w.data(), got_w.size() * sizeof(float)) == 0);
            CHECK(std::memcmp(got_wt.data(), want_wt.data(), got_wt.size() * sizeof(float)) == 0);
            const bool direct = layout == tag::BA16a64b && k % 16 == 0 && n % 64 == 0;
            CHECK(reorders->ba16a64b == direct);
            CHECK(detail::onednn_is_ba16a64b(held.get_desc(), k, n) == direct);
            if (!direct) continue;
            // every panel of W, from two calls: panels [0, 1) and [1, K / 16)
            std::vector<float> packed(want_w.size(), std::numeric_limits<float>::quiet_NaN());
            const auto* from = static_cast<const float*>(held.get_data_handle());
            for (const detail::kernel_isa isa : {detail::vector_kernel(), detail::kernel_isa::portable}) {
                detail::onednn_pack_w_panels(isa, from, k, n, 0, 1, packed.data());
                detail::onednn_pack_w_panels(isa, from, k, n, 1, k / 16 - 1, packed.data() + n * 16);
                CHECK(std::memcmp(packed.data(), want_w.data(), packed.size() * sizeof(float)) == 0);
            }
        }
    }
}

TEST_CASE("onednn: f32 products longer than one k slice of the panel kernels match the reference, forward and backward") {
    // The panel kernels take f32 weights through k in slices of 1024 inputs, adding each slice's
    // sums to C (PanelKernels::k_slice). Here every product they run has k > 1024: the forward
    // on our panels (K = 2100; where oneDNN is capped below brgemm: test backend_onednn_avx2),
    // the backward's dz W (k = N = 2112, held in BA16a64b where brgemm exists; 2100, reordered
    // into panels) and its dW (k = the 1030 rows).
    const Matrix<float> w = random_matrix(40, 2100, 21, 0.3f);
    for (const index_t m : {3, 17})
        for (const bool acc : {false, true}) {
            compare_with_reference<onednn, Silu>({m, 2100, 40, true, acc, 1.0f, dtype::f32, true}, w.view());
            compare_with_reference<onednn, Identity>({m, 2100, 40, false, acc, 0.5f, dtype::f32, false}, w.view());
        }
    Workspace ws;
    for (const auto& shape : {std::array<index_t, 3>{5, 64, 2112}, {5, 48, 2100}, {1030, 24, 40}}) {
        const index_t m = shape[0], k = shape[1], n = shape[2]; // (not a structured binding: CAPTURE's lambda takes them)
        CAPTURE(m);
        CAPTURE(k);
        CAPTURE(n);
        const auto wn = random_matrix(n, k, 22), a = random_matrix(m, k, 23), dz = random_matrix(m, n, 24);
        const onednn::linear<Identity> lin(WeightView(wn.view()), {}, LinearOptions{"w"});
        const reference::linear<Identity> oracle(WeightView(wn.view()), {}, LinearOptions{"w"});
        auto da = random_matrix(m, k, 25), dw = random_matrix(n, k, 26); // backward adds to dW
        auto da_ref = da, dw_ref = dw;
        lin.backward(a, dz, da, LinearGrads{dw.view()}, ws);
        oracle.backward(a, dz, da_ref, LinearGrads{dw_ref.view()}, ws);
        CHECK(relative_error(da, da_ref) <= test::tolerance(n));
        CHECK(relative_error(dw, dw_ref) <= test::tolerance(m));
    }
}

TEST_CASE("onednn: bf16 `fast` runs oneDNN's bf16 matmul on AMX or where HYPERMOE_ONEDNN_BF16=primitive, else our panels") {
    // The suite runs this binary again with HYPERMOE_ONEDNN_BF16=primitive (tests/meson.build), so
    // that the AMX path's code runs on every CPU whose oneDNN has a bf16 matmul; the bf16 `fast`
    // test above then checks its results against the reference.
    const char* env = std::getenv("HYPERMOE_ONEDNN_BF16");
    const std::string choice = env != nullptr ? env : "";
    const std::string& impl = detail::onednn_bf16_impl();
    MESSAGE("oneDNN's bf16 matmul here: ", impl.empty() ? "none" : impl, ", HYPERMOE_ONEDNN_BF16=", choice);
    const bool available = !impl.empty() && !impl.starts_with("ref");
    const bool expected = choice == "primitive" ? available
                          : choice == "panels"  ? false
                                                : available && detail::cpu_isa().bf16 && impl.find("amx") != std::string::npos;
    CHECK(detail::onednn_bf16_primitive() == expected);
    const Matrix<float> w = random_matrix(48, 64, 3, 0.3f);
    const onednn::linear<Identity> fast(ConstMatrixView<float>(w.view()), {}, {"w", false, dtype::bf16, precision::fast});
    const onednn::linear<Identity> exact(ConstMatrixView<float>(w.view()), {}, {"w", false, dtype::bf16, precision::exact});
    CHECK(exact.kernel() == "panels");
    if (expected) CHECK(fast.kernel() == impl);
    else CHECK(fast.kernel() == "panels");
    // Either way the weights are held once, as bf16: no f32 copy. bf16 source weights (a bf16
    // checkpoint's) go in as they are and give the same bits as f32 ones rounded at load.
    CHECK(fast.storage() == dtype::bf16);
    std::vector<bf16> w16(std::size_t(w.rows() * w.cols()));
    for (index_t r = 0; r < w.rows(); ++r)
        for (index_t c = 0; c < w.cols(); ++c) w16[std::size_t(r * w.cols() + c)] = bf16::from_float(w(r, c));
    const onednn::linear<Identity> from16(ConstMatrixView<bf16>(w16.data(), w.rows(), w.cols()), {},
                                          {"w", false, dtype::bf16, precision::fast});
    CHECK(from16.kernel() == fast.kernel());
    const Matrix<float> a = random_matrix(5, 64, 4);
    Matrix<float> y(5, 48), y16(5, 48);
    Workspace ws;
    fast(a.view(), y.view(), ws);
    from16(a.view(), y16.view(), ws);
    CHECK(std::memcmp(y.data(), y16.data(), sizeof(float) * 5 * 48) == 0);
    const onednn::linear<Identity> f32(ConstMatrixView<float>(w.view()), {}, {"w", false, dtype::f32});
    if (detail::onednn_f32_brgemm()) CHECK(f32.kernel().starts_with("brg"));
    else CHECK(f32.kernel() == "panels");
}

TEST_CASE("onednn: a primitive oneDNN cannot create is a backend_error naming the shape") {
    CHECK_THROWS_WITH_AS((void)detail::onednn_matmul(-3, 16, false, activation_kind::relu, false, 1),
                         doctest::Contains("onednn: cannot create a matmul for K = -3, N = 16: "), backend_error);
}
#endif
