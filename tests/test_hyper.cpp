#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::random_vector;
using test::relative_error;

namespace {

WeightView view(const Matrix<float>& m) { return ConstMatrixView<float>(m.view()); }

bool bitwise(const Matrix<float>& a, const Matrix<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.rows() * a.cols())) == 0;
}

struct HyperRun {
    Matrix<float> y, h;
    RoutingPlan plan;
};

template <class L>
HyperRun run(const L& layer, const Matrix<float>& x, const RouterContext& ctx = {}) {
    HyperRun r{Matrix<float>(x.rows(), x.cols()), Matrix<float>(x.rows(), x.cols()), {}};
    Workspace ws;
    layer.forward(x.view(), r.y.view(), ws, r.plan, ctx);
    layer.hyper_term(x.view(), r.plan, r.h.view(), ws);
    return r;
}

/// Random HyperMoE parts at small sizes: d_model d, E experts, adapter rank r.
struct RandomHyper {
    index_t d, e, r, de = 8, p = 12, q = 10, h = 16, dl = 4, layers = 3;
    Matrix<float> gate, emb, w0, w2, layer_embed, trunk, dw, uw, db, ub;
    std::vector<float> b0, b2, trunk_b, dw_b, uw_b, db_b, ub_b;
    std::vector<Matrix<float>> up, down;

    RandomHyper(index_t d_, index_t e_, index_t r_, std::uint32_t seed) : d(d_), e(e_), r(r_) {
        gate = random_matrix(e, d, seed, 0.5f);
        emb = random_matrix(e, de, seed + 1);
        w0 = random_matrix(p, de, seed + 2, 0.4f);
        w2 = random_matrix(q, p, seed + 3, 0.4f);
        layer_embed = random_matrix(layers, dl, seed + 4);
        trunk = random_matrix(h, q + dl, seed + 5, 0.4f);
        dw = random_matrix(d * r, h, seed + 6, 0.3f);
        uw = random_matrix(r * d, h, seed + 7, 0.3f);
        db = random_matrix(r, h, seed + 8, 0.3f);
        ub = random_matrix(d, h, seed + 9, 0.3f);
        b0 = random_vector(p, seed + 10);
        b2 = random_vector(q, seed + 11);
        trunk_b = random_vector(h, seed + 12);
        dw_b = random_vector(d * r, seed + 13, 0.1f);
        uw_b = random_vector(r * d, seed + 14, 0.1f);
        db_b = random_vector(r, seed + 15, 0.1f);
        ub_b = random_vector(d, seed + 16, 0.1f);
        for (index_t x = 0; x < e; ++x) {
            up.push_back(random_matrix(2 * d, d, seed + 100 + std::uint32_t(x), 0.3f));
            down.push_back(random_matrix(d, 2 * d, seed + 200 + std::uint32_t(x), 0.3f));
        }
    }
    [[nodiscard]] HypernetworkWeights hyper_weights() const {
        return {view(layer_embed), view(trunk), trunk_b, view(dw), dw_b, view(uw), uw_b, view(db), db_b, view(ub), ub_b};
    }
    template <class B, index_t D = dynamic>
    auto layer(index_t k, index_t layer_index, std::shared_ptr<const Hypernetwork<B>> hyper, HyperOptions opt = {}) const {
        std::vector<FfnExpert<B, GeluTanh, D>> experts;
        for (index_t x = 0; x < e; ++x)
            experts.emplace_back(FfnWeights{.up = view(up[std::size_t(x)]), .down = view(down[std::size_t(x)])});
        return HyperMoeLayer(MoeLayer(view(gate), TopKRouter(e, TopK{k}, {.weighting = {.renormalize = true}}), experts),
                             layer_index, ExpertEmbedding(view(emb)), Projector<B>(ProjectorWeights{view(w0), b0, view(w2), b2}),
                             std::move(hyper), opt);
    }
    template <class B>
    [[nodiscard]] std::shared_ptr<Hypernetwork<B>> hypernetwork() const {
        return std::make_shared<Hypernetwork<B>>(hyper_weights());
    }

    /// H(x) for token x and selected set S at layer l, written out in double from the formulas.
    [[nodiscard]] std::vector<double> naive(std::span<const float> x, std::vector<std::int32_t> s, index_t l) const {
        std::vector<double> sum(static_cast<std::size_t>(de), 0.0), hp(static_cast<std::size_t>(p)), z(static_cast<std::size_t>(q)),
            g(static_cast<std::size_t>(h));
        for (index_t j = 0; j < e; ++j)
            if (std::find(s.begin(), s.end(), j) == s.end())
                for (index_t c = 0; c < de; ++c) sum[std::size_t(c)] += emb(j, c);
        for (index_t i = 0; i < p; ++i) {
            double a = b0[std::size_t(i)];
            for (index_t c = 0; c < de; ++c) a += w0(i, c) * sum[std::size_t(c)];
            hp[std::size_t(i)] = std::max(a, 0.0);
        }
        for (index_t i = 0; i < q; ++i) {
            double a = b2[std::size_t(i)];
            for (index_t c = 0; c < p; ++c) a += w2(i, c) * hp[std::size_t(c)];
            z[std::size_t(i)] = a;
        }
        for (index_t i = 0; i < h; ++i) {
            double a = trunk_b[std::size_t(i)];
            for (index_t c = 0; c < q; ++c) a += trunk(i, c) * z[std::size_t(c)];
            for (index_t c = 0; c < dl; ++c) a += trunk(i, q + c) * layer_embed(l, c);
            g[std::size_t(i)] = std::max(a, 0.0);
        }
        const auto head = [&](const Matrix<float>& w, const std::vector<float>& b, index_t row) {
            double a = b[std::size_t(row)];
            for (index_t c = 0; c < h; ++c) a += w(row, c) * g[std::size_t(c)];
            return a;
        };
        std::vector<double> hidden(static_cast<std::size_t>(r)), out(static_cast<std::size_t>(d));
        for (index_t j = 0; j < r; ++j) {
            double a = head(db, db_b, j);
            for (index_t i = 0; i < d; ++i) a += x[std::size_t(i)] * head(dw, dw_b, i * r + j);
            hidden[std::size_t(j)] = std::max(a, 0.0);
        }
        for (index_t i = 0; i < d; ++i) {
            double a = head(ub, ub_b, i);
            for (index_t j = 0; j < r; ++j) a += hidden[std::size_t(j)] * head(uw, uw_b, j * d + i);
            out[std::size_t(i)] = a;
        }
        return out;
    }
};

double max_rel(const Matrix<float>& got, const std::vector<std::vector<double>>& want) {
    double diff = 0, scale = 0;
    for (index_t t = 0; t < got.rows(); ++t)
        for (index_t c = 0; c < got.cols(); ++c) {
            diff = std::max(diff, std::abs(got(t, c) - want[std::size_t(t)][std::size_t(c)]));
            scale = std::max(scale, std::abs(want[std::size_t(t)][std::size_t(c)]));
        }
    return diff / scale;
}

template <class B, index_t D>
struct HyperConfig {
    using backend = B;
    static constexpr index_t static_d = D;
};
template <class B>
using hyper_configs_of = std::tuple<HyperConfig<B, dynamic>, HyperConfig<B, 16>>;
using all_hyper_configs = decltype(std::apply(
    [](auto... b) { return std::tuple_cat(hyper_configs_of<decltype(b)>{}...); }, test::all_backends{}));

} // namespace

TEST_CASE_TEMPLATE_DEFINE("cached HyperExperts equal per-token generation", C, cached_vs_per_token) {
    using B = typename C::backend;
    for (const index_t e : {4, 8})
        for (const index_t k : {1, 2, 3})
            for (const index_t tokens : {1, 37}) {
                CAPTURE(e);
                CAPTURE(k);
                CAPTURE(tokens);
                const RandomHyper parts(16, e, 4, std::uint32_t(e * 10 + k));
                const auto hyper = parts.hypernetwork<B>();
                const auto cached = parts.layer<B, C::static_d>(k, 1, hyper);
                const auto per_token = parts.layer<B, C::static_d>(k, 1, hyper, {.mode = HyperMode::per_token});
                const Matrix<float> x = random_matrix(tokens, 16, 5);
                const HyperRun a = run(cached, x), b = run(per_token, x);
                // The same kernels on the same adapters: the same bits (docs/threading.md).
                CHECK(bitwise(a.h, b.h));
                CHECK(bitwise(a.y, b.y));
                // And both equal the formulas written out in double.
                std::vector<std::vector<double>> want;
                for (index_t t = 0; t < tokens; ++t)
                    want.push_back(parts.naive(x.view().row(t), {a.plan.ids(t).begin(), a.plan.ids(t).end()}, 1));
                CHECK(max_rel(a.h, want) <= 1e-5);
                CHECK(cached.cache().size() <= binomial(e, k));
            }
}
TEST_CASE_TEMPLATE_APPLY(cached_vs_per_token, all_hyper_configs);

TEST_CASE("the layer index enters only through the layer embedding") {
    const RandomHyper parts(16, 6, 4, 77);
    const auto hyper = parts.hypernetwork<reference>();
    const Matrix<float> x = random_matrix(9, 16, 3);
    for (const index_t l : {0, 2}) {
        const auto layer = parts.layer<reference>(2, l, hyper);
        const HyperRun r = run(layer, x);
        std::vector<std::vector<double>> want;
        for (index_t t = 0; t < 9; ++t) want.push_back(parts.naive(x.view().row(t), {r.plan.ids(t).begin(), r.plan.ids(t).end()}, l));
        CHECK(max_rel(r.h, want) <= 1e-6);
    }
    const HyperRun r0 = run(parts.layer<reference>(2, 0, hyper), x), r2 = run(parts.layer<reference>(2, 2, hyper), x);
    CHECK(relative_error(r0.h.view(), r2.h.view()) > 1e-3); // the layers really differ
    // The routed part is the same at both layers: y - H agrees.
    for (index_t t = 0; t < 9; ++t)
        for (index_t c = 0; c < 16; ++c) CHECK(r0.y(t, c) - r0.h(t, c) == doctest::Approx(r2.y(t, c) - r2.h(t, c)));
}

TEST_CASE_TEMPLATE_DEFINE("cache: precompute, budget, invalidation, concurrent use", B, cache_behaviour) {
    const RandomHyper parts(16, 8, 4, 5);
    const auto hyper = parts.hypernetwork<B>();
    const Matrix<float> x = random_matrix(64, 16, 9);
    const auto unlimited = parts.layer<B>(2, 1, hyper);
    const HyperRun want = run(unlimited, x);
    CHECK(unlimited.cache().size() > 2);
    CHECK(unlimited.cache().misses() == std::uint64_t(unlimited.cache().size()));

    // precompute(): every one of the C(8, 2) = 28 patterns, generated 28 at once, and the
    // output is the same bits as with patterns generated one at a time on first use.
    const auto pre = parts.layer<B>(2, 1, hyper);
    Workspace ws;
    CHECK(pre.precompute(ws) == 28);
    CHECK(pre.cache().size() == 28);
    const HyperRun p = run(pre, x);
    CHECK(bitwise(p.y, want.y));
    // A token's term does not depend on its batch: each token alone gives the same bits.
    const auto alone = parts.layer<B>(2, 1, hyper);
    for (index_t t = 0; t < x.rows(); t += 7) {
        Matrix<float> xt(1, 16);
        xt.copy_from(x.view().row_block(t, 1));
        const HyperRun one = run(alone, xt);
        CHECK(std::memcmp(one.h.data(), want.h.view().row(t).data(), sizeof(float) * 16) == 0);
    }
    CHECK(pre.cache().misses() == 28);

    // Budget for two adapters: at most two are kept, outputs stay identical.
    const std::size_t one = sizeof(float) * std::size_t(2 * 16 * 4 + 4 + 16);
    const auto small = parts.layer<B>(2, 1, hyper, {.cache_budget_bytes = 2 * one});
    const HyperRun s = run(small, x), s2 = run(small, x);
    CHECK(small.cache().size() == 2);
    CHECK(small.cache().bytes() <= 2 * one);
    CHECK(bitwise(s.y, want.y)); // over budget, generated per call: still the same bits
    CHECK(bitwise(s.y, s2.y));

    // New hypernetwork weights: the cache notices the version and regenerates.
    const auto mutable_hyper = parts.hypernetwork<B>();
    const auto layer = parts.layer<B>(2, 1, mutable_hyper);
    (void)run(layer, x);
    const index_t before = layer.cache().size();
    const RandomHyper other(16, 8, 4, 6);
    mutable_hyper->set_weights(other.hyper_weights());
    const HyperRun changed = run(layer, x);
    const auto fresh = parts.layer<B>(2, 1, other.hypernetwork<B>());
    const HyperRun expect = run(fresh, x);
    CHECK(relative_error(changed.h.view(), expect.h.view()) <= 1e-6);
    CHECK(layer.cache().size() <= before);

    // Two threads, one layer, separate workspaces: the same results as one thread.
    const auto shared = parts.layer<B>(2, 1, hyper);
    Matrix<float> y1(64, 16), y2(64, 16);
    std::thread t1([&] { Workspace w; RoutingPlan pl; shared.forward(x.view(), y1.view(), w, pl); });
    std::thread t2([&] { Workspace w; RoutingPlan pl; shared.forward(x.view(), y2.view(), w, pl); });
    t1.join();
    t2.join();
    CHECK(relative_error(y1.view(), want.y.view()) <= 1e-6);
    CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * 64 * 16) == 0);
}
TEST_CASE_TEMPLATE_APPLY(cache_behaviour, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("copies share weights, hypernetwork and cache on every backend", B, copies) {
    // One rule on every backend: a linear map is never copied, layers hold theirs shared.
    static_assert(!std::is_copy_constructible_v<typename B::template linear<Identity>>);
    static_assert(std::is_copy_constructible_v<HyperMoeLayer<FfnExpert<B, GeluTanh>, TopKRouter>>);
    const RandomHyper parts(16, 8, 4, 5);
    const auto layer = parts.layer<B>(2, 1, parts.hypernetwork<B>());
    const auto copy = layer;
    for (index_t e = 0; e < 8; ++e) {
        CHECK(&copy.moe().expert(e).up() == &layer.moe().expert(e).up());
        CHECK(&copy.moe().expert(e).down() == &layer.moe().expert(e).down());
    }
    CHECK(&copy.hypernetwork() == &layer.hypernetwork());
    CHECK(&copy.cache() == &layer.cache());
    // The copy computes the same bits, and fills the cache both use.
    const Matrix<float> x = random_matrix(16, 16, 3);
    const HyperRun a = run(layer, x);
    const std::size_t cached = std::size_t(layer.cache().size());
    const HyperRun b = run(copy, x);
    CHECK(bitwise(a.y, b.y));
    CHECK(std::size_t(copy.cache().size()) == cached);
    // Moving keeps the same weights too.
    auto moved = std::move(copy);
    CHECK(&moved.moe().expert(0).down() == &layer.moe().expert(0).down());
}
TEST_CASE_TEMPLATE_APPLY(copies, test::all_backends);

TEST_CASE("HyperMoE errors name both sides") {
    const RandomHyper parts(16, 6, 4, 1);
    const auto hyper = parts.hypernetwork<reference>();
    CHECK_THROWS_WITH_AS((void)parts.layer<reference>(2, 3, hyper),
                         "HyperMoeLayer: layer index is 3, expected 0 <= layer < 3 (the hypernetwork's layer embeddings)",
                         config_error);
    const RandomHyper wide(24, 6, 4, 1);
    CHECK_THROWS_WITH_AS((void)wide.layer<reference>(2, 0, hyper),
                         "HyperMoeLayer: hypernetwork generates adapters for d_model = 16, expected 24", shape_error);
    HypernetworkWeights bad = parts.hyper_weights();
    const Matrix<float> short_dw = random_matrix(16 * 4 - 1, 16, 1);
    bad.down_weight = view(short_dw);
    CHECK_THROWS_WITH_AS(Hypernetwork<reference>{bad},
                         "Hypernetwork: weight 'down_weight' has shape (63, 16), expected (64, 16)", shape_error);
    CHECK_THROWS_WITH_AS(HyperExpertCache<reference>(64, 20), doctest::Contains("HyperExpertCache: C(64, 20) patterns"),
                         config_error);

    // The hypernetwork's own weights and calls.
    bad = parts.hyper_weights();
    const Matrix<float> no_layers(0, 4);
    bad.layer_embed = view(no_layers);
    CHECK_THROWS_WITH_AS(Hypernetwork<reference>{bad},
                         "Hypernetwork: layers = 0, q = 10, h = 16, d = 16, r = 4 from the weights, expected all >= 1", weight_error);
    Matrix<float> nan_embed = parts.layer_embed;
    nan_embed(1, 2) = std::numeric_limits<float>::quiet_NaN();
    bad = parts.hyper_weights();
    bad.layer_embed = view(nan_embed);
    CHECK_THROWS_WITH_AS(Hypernetwork<reference>{bad}, "Hypernetwork: layer_embed element 6 is nan, expected a finite value",
                         weight_error);
    Workspace ws;
    Matrix<float> z(2, parts.q), down(2, parts.d * parts.r), up(2, parts.r * parts.d), db(2, parts.r), ub(2, parts.d);
    const GeneratedAdapters out{down.view(), up.view(), db.view(), ub.view()};
    CHECK_THROWS_WITH_AS(hyper->generate(3, z.view(), out, ws),
                         "Hypernetwork: layer index is 3, expected 0 <= layer < 3 (rows of layer_embed)", config_error);
    Matrix<float> z9(2, 9), dz(3, parts.q);
    CHECK_THROWS_WITH_AS(hyper->generate(0, z9.view(), out, ws), "Hypernetwork::generate: z has 9 columns, expected q = 10",
                         shape_error);
    auto g = hyper->make_gradients();
    CHECK_THROWS_WITH_AS(hyper->backward(0, z.view(), out, dz.view(), g, ws),
                         "Hypernetwork::backward: dz has shape (3, 10), expected (2, 10)", shape_error);

    // The expert embedding table.
    const Matrix<float> empty(6, 0);
    CHECK_THROWS_WITH_AS(ExpertEmbedding(view(empty)),
                         "ExpertEmbedding: table has shape (6, 0), expected at least one expert and one column", weight_error);
    Matrix<float> inf_emb = parts.emb;
    inf_emb(4, 1) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(ExpertEmbedding(view(inf_emb)), "ExpertEmbedding: element (4, 1) is inf, expected a finite value",
                         weight_error);
    const ExpertEmbedding table(view(parts.emb));
    const std::vector<std::int32_t> ids = {0, 1, 2, 3};
    Matrix<float> ds(2, parts.de), dtable(6, parts.de + 1);
    CHECK_THROWS_WITH_AS(table.backward(ids, ds.view(), dtable.view()),
                         "ExpertEmbedding::backward: ds has shape (2, 8) for 4 selected ids and the gradient has shape (6, 9), "
                         "expected ds (n, 8), n k ids and a gradient of shape (6, 8)",
                         shape_error);

    // Parts of a HyperMoE layer that disagree with each other.
    RandomHyper other = parts;
    other.emb = random_matrix(5, other.de, 2);
    CHECK_THROWS_WITH_AS((void)other.layer<reference>(2, 0, hyper), "HyperMoeLayer: expert embedding has 5 rows, expected experts = 6",
                         shape_error);
    other = parts;
    other.w0 = random_matrix(other.p, other.de + 1, 2);
    CHECK_THROWS_WITH_AS((void)other.layer<reference>(2, 0, hyper), "HyperMoeLayer: projector takes 9 inputs, expected the embedding width 8",
                         shape_error);
    other = parts;
    other.w2 = random_matrix(other.q + 1, other.p, 2);
    other.b2.push_back(0.0f);
    CHECK_THROWS_WITH_AS((void)other.layer<reference>(2, 0, hyper),
                         "HyperMoeLayer: projector gives 11 outputs, but the hypernetwork takes q = 10", shape_error);

    // hyper_term with a plan made for other tokens.
    const auto layer = parts.layer<reference>(2, 0, hyper);
    const Matrix<float> x4 = random_matrix(4, 16, 5), x5 = random_matrix(5, 16, 6);
    const HyperRun r4 = run(layer, x4);
    Matrix<float> h5(5, 16);
    CHECK_THROWS_WITH_AS(layer.hyper_term(x5.view(), r4.plan, h5.view(), ws),
                         "HyperMoeLayer::hyper_term: the plan routes 4 tokens over 6 experts, expected 5 over 6", shape_error);
}

TEST_CASE("pattern ranks are a bijection onto 0 .. C(E, k) - 1") {
    std::vector<bool> seen(std::size_t(binomial(7, 3)), false);
    for (std::int32_t a = 0; a < 7; ++a)
        for (std::int32_t b = a + 1; b < 7; ++b)
            for (std::int32_t c = b + 1; c < 7; ++c) {
                const std::array<std::int32_t, 3> s{a, b, c};
                const index_t r = pattern_rank(s);
                REQUIRE(r >= 0);
                REQUIRE(r < 35);
                CHECK_FALSE(seen[std::size_t(r)]);
                seen[std::size_t(r)] = true;
            }
}

// ---- Backward (issue 12): the HyperExpert's gradient through the adapter, the hypernetwork,
// the projector and the expert embeddings. The fixtures' float64 autograd gradients are checked
// in test_backward_fixtures.cpp; here central differences of each part, every backend against
// the reference, accumulation across the layers that share a hypernetwork, thread counts and
// the typed errors.

namespace {

/// Every gradient of a HyperMoE layer against another set (relative to each one's largest entry).
template <class G>
double worst_gap(const G& a, const G& b) {
    const auto m = [](const Matrix<float>& x, const Matrix<float>& y) { return relative_error(x.view(), y.view()); };
    const auto v = [](const std::vector<float>& x, const std::vector<float>& y) {
        return relative_error(ConstMatrixView<float>(x.data(), 1, index_t(x.size())),
                              ConstMatrixView<float>(y.data(), 1, index_t(y.size())));
    };
    const HypernetworkGradients &h = *a.hypernetwork, &k = *b.hypernetwork;
    double w = std::max({m(a.moe.gate, b.moe.gate), m(a.embedding, b.embedding), m(a.projector.first, b.projector.first),
                         v(a.projector.first_bias, b.projector.first_bias), m(a.projector.second, b.projector.second),
                         v(a.projector.second_bias, b.projector.second_bias), m(h.layer_embed, k.layer_embed), m(h.trunk, k.trunk),
                         v(h.trunk_bias, k.trunk_bias), m(h.down_weight, k.down_weight), v(h.down_weight_bias, k.down_weight_bias),
                         m(h.up_weight, k.up_weight), v(h.up_weight_bias, k.up_weight_bias), m(h.down_bias, k.down_bias),
                         v(h.down_bias_bias, k.down_bias_bias), m(h.up_bias, k.up_bias), v(h.up_bias_bias, k.up_bias_bias)});
    for (std::size_t e = 0; e < a.moe.experts.size(); ++e)
        w = std::max({w, m(a.moe.experts[e].up, b.moe.experts[e].up), m(a.moe.experts[e].down, b.moe.experts[e].down)});
    return w;
}

} // namespace

TEST_CASE("HyperMoeLayer backward matches central differences of every HyperMoE part") {
    RandomHyper parts(6, 4, 3, 21);
    const index_t tokens = 9, layer = 1;
    auto x = random_matrix(tokens, parts.d, 90);
    const auto dy = random_matrix(tokens, parts.d, 91);
    Workspace ws;
    const auto make = [&] { return parts.layer<reference>(2, layer, parts.hypernetwork<reference>()); };
    const auto l = make();
    auto g = l.make_gradients();
    Matrix<float> dx(tokens, parts.d);
    l.backward(x.view(), dy.view(), dx.view(), g, ws);
    const auto loss = [&] {
        const auto fresh = make();
        Matrix<float> y(tokens, parts.d);
        fresh.forward(x.view(), y.view(), ws);
        return test::dot(y.view(), dy.view());
    };
    const float step = 2e-3f;
    const HypernetworkGradients& h = *g.hypernetwork;
    // Each part separately, so a failure names it.
    const auto check = [&](const std::string& name, auto&& each) {
        CAPTURE(name);
        test::GradientGap gap;
        each(gap);
        CHECK(gap.scale > 0);
        CHECK(gap.within(3e-3));
    };
    const auto matrix = [&](test::GradientGap& gap, const Matrix<float>& analytic, Matrix<float>& param, index_t stride) {
        for (index_t i = 0; i < param.rows() * param.cols(); i += stride)
            gap(analytic.data()[i], test::central_difference(param.data()[i], loss, step));
    };
    const auto vector = [&](test::GradientGap& gap, const std::vector<float>& analytic, std::vector<float>& param, index_t stride) {
        for (std::size_t i = 0; i < param.size(); i += std::size_t(stride))
            gap(analytic[i], test::central_difference(param[i], loss, step));
    };
    check("x", [&](auto& gap) { matrix(gap, dx, x, 1); });
    check("router", [&](auto& gap) { matrix(gap, g.moe.gate, parts.gate, 1); });
    check("expert embeddings", [&](auto& gap) { matrix(gap, g.embedding, parts.emb, 1); });
    check("projector", [&](auto& gap) {
        matrix(gap, g.projector.first, parts.w0, 1), vector(gap, g.projector.first_bias, parts.b0, 1);
        matrix(gap, g.projector.second, parts.w2, 1), vector(gap, g.projector.second_bias, parts.b2, 1);
    });
    check("layer embedding", [&](auto& gap) { matrix(gap, h.layer_embed, parts.layer_embed, 1); });
    check("trunk", [&](auto& gap) { matrix(gap, h.trunk, parts.trunk, 3), vector(gap, h.trunk_bias, parts.trunk_b, 1); });
    check("heads", [&](auto& gap) {
        matrix(gap, h.down_weight, parts.dw, 5), vector(gap, h.down_weight_bias, parts.dw_b, 1);
        matrix(gap, h.up_weight, parts.uw, 5), vector(gap, h.up_weight_bias, parts.uw_b, 1);
        matrix(gap, h.down_bias, parts.db, 1), vector(gap, h.down_bias_bias, parts.db_b, 1);
        matrix(gap, h.up_bias, parts.ub, 1), vector(gap, h.up_bias_bias, parts.ub_b, 1);
    });
    // Only the layer's own row of the layer embedding gets gradient.
    for (index_t r = 0; r < parts.layers; ++r)
        for (index_t c = 0; c < parts.dl; ++c)
            if (r != layer) CHECK(h.layer_embed(r, c) == 0.0f);
}

TEST_CASE_TEMPLATE_DEFINE("HyperMoeLayer backward on every backend equals the reference", B, hyper_backward_backends) {
    const RandomHyper parts(16, 6, 4, 22);
    const auto x = random_matrix(40, parts.d, 92), dy = random_matrix(40, parts.d, 93);
    Workspace ws;
    const auto run = [&](const auto& l) {
        auto g = l.make_gradients();
        Matrix<float> dx(x.rows(), x.cols());
        l.backward(x.view(), dy.view(), dx.view(), g, ws);
        return std::pair{std::move(dx), std::move(g)};
    };
    for (const HyperMode mode : {HyperMode::cached, HyperMode::per_token}) {
        const auto [dx_ref, g_ref] = run(parts.layer<reference>(2, 0, parts.hypernetwork<reference>(), {.mode = mode}));
        const auto [dx, g] = run(parts.layer<B>(2, 0, parts.hypernetwork<B>(), {.mode = mode}));
        CHECK(relative_error(dx.view(), dx_ref.view()) <= 1e-5);
        CHECK(worst_gap(g, g_ref) <= 1e-5);
    }
}
TEST_CASE_TEMPLATE_APPLY(hyper_backward_backends, test::all_backends);

TEST_CASE("HyperMoE layers that share a hypernetwork accumulate into one set of its gradients") {
    const RandomHyper parts(8, 5, 2, 23);
    const auto hyper = parts.hypernetwork<reference>();
    const auto l0 = parts.layer<reference>(2, 0, hyper), l2 = parts.layer<reference>(2, 2, hyper);
    const auto x = random_matrix(12, parts.d, 94), dy = random_matrix(12, parts.d, 95);
    Workspace ws;
    Matrix<float> dx(x.rows(), x.cols());
    auto g0 = l0.make_gradients();
    auto g2 = l2.make_gradients(g0.hypernetwork); // the stack's one set
    CHECK(g2.hypernetwork == g0.hypernetwork);
    l0.backward(x.view(), dy.view(), dx.view(), g0, ws);
    l2.backward(x.view(), dy.view(), dx.view(), g2, ws);
    // The same two calls into separate sets: the shared one holds their sum.
    auto a = l0.make_gradients(), b = l2.make_gradients();
    CHECK(a.hypernetwork != b.hypernetwork);
    l0.backward(x.view(), dy.view(), dx.view(), a, ws);
    l2.backward(x.view(), dy.view(), dx.view(), b, ws);
    const HypernetworkGradients &s = *g0.hypernetwork, &ha = *a.hypernetwork, &hb = *b.hypernetwork;
    for (index_t i = 0; i < s.trunk.rows() * s.trunk.cols(); ++i)
        CHECK(s.trunk.data()[i] == doctest::Approx(ha.trunk.data()[i] + hb.trunk.data()[i]).epsilon(1e-6));
    for (index_t c = 0; c < parts.dl; ++c) {
        CHECK(s.layer_embed(0, c) == ha.layer_embed(0, c));
        CHECK(s.layer_embed(1, c) == 0.0f);
        CHECK(s.layer_embed(2, c) == hb.layer_embed(2, c));
    }
}

TEST_CASE("HyperMoeLayer backward gives the same bits at 1 and 2 threads (reference backend)") {
    const RandomHyper parts(16, 6, 4, 24);
    const auto l = parts.layer<reference>(2, 1, parts.hypernetwork<reference>());
    const auto x = random_matrix(300, parts.d, 96), dy = random_matrix(300, parts.d, 97);
    const auto run = [&](int threads) {
        const detail::ThreadCountScope scope(threads);
        Workspace ws;
        auto g = l.make_gradients();
        Matrix<float> dx(x.rows(), x.cols());
        l.backward(x.view(), dy.view(), dx.view(), g, ws);
        return std::pair{std::move(dx), std::move(g)};
    };
    const auto [dx1, g1] = run(1);
    const auto [dx2, g2] = run(2);
    CHECK(bitwise(dx1, dx2));
    CHECK(worst_gap(g1, g2) == 0.0);
}

TEST_CASE("HyperMoeLayer backward: typed errors") {
    const RandomHyper parts(8, 4, 2, 25);
    const auto l = parts.layer<reference>(2, 0, parts.hypernetwork<reference>());
    const auto x = random_matrix(5, parts.d, 98), dy = random_matrix(5, parts.d, 99);
    Matrix<float> dx(5, parts.d);
    Workspace ws;
    auto g = l.make_gradients();
    g.hypernetwork.reset();
    CHECK_THROWS_WITH_AS(l.backward(x.view(), dy.view(), dx.view(), g, ws),
                         "HyperMoeLayer::backward: no hypernetwork gradients (use make_gradients())", config_error);
    g = l.make_gradients();
    g.embedding = Matrix<float>(4, 7);
    CHECK_THROWS_WITH_AS(l.backward(x.view(), dy.view(), dx.view(), g, ws),
                         "HyperMoeLayer::backward: gradient 'embedding' has shape (4, 7), expected (4, 8) (use make_gradients())",
                         shape_error);
    g = l.make_gradients();
    g.hypernetwork->trunk_bias.resize(3);
    CHECK_THROWS_WITH_AS(l.backward(x.view(), dy.view(), dx.view(), g, ws),
                         "Hypernetwork::backward: gradient 'trunk_bias' has 3 elements, expected 16 (use make_gradients())",
                         shape_error);
    g = l.make_gradients();
    g.projector.second = Matrix<float>(10, 11);
    CHECK_THROWS_WITH_AS(l.backward(x.view(), dy.view(), dx.view(), g, ws),
                         "Projector::backward: gradient 'second' has shape (10, 11), expected (10, 12) (use make_gradients())",
                         shape_error);
    g = l.make_gradients();
    const Matrix<float> short_dy(4, parts.d);
    CHECK_THROWS_WITH_AS(l.backward(x.view(), short_dy.view(), dx.view(), g, ws),
                         "HyperMoeLayer::backward: output gradient dy has shape (4, 8), expected (5, 8)", shape_error);
    // Training needs f32 weights: a bf16 inference copy is refused, naming the weight.
    std::vector<FfnExpert<reference, GeluTanh>> experts;
    for (index_t e = 0; e < parts.e; ++e)
        experts.emplace_back(FfnWeights{.up = view(parts.up[std::size_t(e)]), .down = view(parts.down[std::size_t(e)])},
                             ExpertOptions{.storage = dtype::bf16});
    const HyperMoeLayer bf16_layer(MoeLayer(view(parts.gate), TopKRouter(parts.e, TopK{2}), experts), 0, ExpertEmbedding(view(parts.emb)),
                                   Projector<reference>(ProjectorWeights{view(parts.w0), parts.b0, view(parts.w2), parts.b2}),
                                   parts.hypernetwork<reference>());
    auto gb = bf16_layer.make_gradients();
    CHECK_THROWS_WITH_AS(bf16_layer.backward(x.view(), dy.view(), dx.view(), gb, ws),
                         doctest::Contains("backward needs f32 storage, but the weights are stored as bf16"), config_error);
}

TEST_CASE("a stack of HyperMoE layers shares one set of hypernetwork gradients and equals the layers chained by hand") {
    const RandomHyper parts(8, 5, 2, 26);
    const auto hyper = parts.hypernetwork<reference>();
    const auto l0 = parts.layer<reference>(2, 0, hyper), l1 = parts.layer<reference>(2, 1, hyper);
    const auto x = random_matrix(10, parts.d, 60), dy = random_matrix(10, parts.d, 61);
    Workspace ws;
    // By hand: forward through l0, backward through l1 then l0, into one hypernetwork set.
    Matrix<float> h(10, parts.d), dh(10, parts.d), dx(10, parts.d);
    l0.forward(x.view(), h.view(), ws);
    auto g0 = l0.make_gradients();
    auto g1 = l1.make_gradients(g0.hypernetwork);
    l1.backward(h.view(), dy.view(), dh.view(), g1, ws);
    l0.backward(x.view(), dh.view(), dx.view(), g0, ws);
    const auto check = [&](const auto& stack, auto& g, const auto& first, const auto& second) {
        CHECK(first.hypernetwork == second.hypernetwork); // one set for the shared hypernetwork
        Matrix<float> dxs(10, parts.d);
        stack.backward(x.view(), dy.view(), dxs.view(), g, ws);
        CHECK(bitwise(dxs, dx));
        CHECK(worst_gap(first, g0) == 0.0);
        CHECK(worst_gap(second, g1) == 0.0);
    };
    {
        const Sequential stack(l0, l1);
        auto g = stack.make_gradients();
        check(stack, g, std::get<0>(g), std::get<1>(g));
    }
    {
        DynamicStack stack;
        stack.push_back(l0).push_back(l1);
        auto g = stack.make_gradients();
        using G = gradients_of<decltype(l0)>;
        check(stack, g, std::any_cast<G&>(g[0]), std::any_cast<G&>(g[1]));
    }
}
