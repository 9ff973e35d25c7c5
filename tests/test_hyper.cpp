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
