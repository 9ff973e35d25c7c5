#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <tuple>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "test_support.hpp"

using namespace hypermoe;
using test::random_matrix;
using test::relative_error;

namespace {

Matrix<float> logits_of(std::initializer_list<std::initializer_list<float>> rows) {
    Matrix<float> m(index_t(rows.size()), index_t(rows.begin()->size()));
    index_t r = 0;
    for (const auto& row : rows) {
        index_t c = 0;
        for (const float v : row) m(r, c++) = v;
        ++r;
    }
    return m;
}

template <class Router>
RoutingPlan route(const Router& router, const Matrix<float>& logits, const RouterContext& ctx = {}) {
    RoutingPlan plan;
    Workspace ws;
    router.route(logits.view(), ctx, plan, ws);
    return plan;
}

std::vector<std::int32_t> ids_of(const RoutingPlan& p, index_t t) { return {p.ids(t).begin(), p.ids(t).end()}; }

} // namespace

TEST_CASE("softmax is max-subtracted and exact on a hand case") {
    const float l[3] = {1000.0f, 1000.0f + std::log(3.0f), 0.0f};
    float s[3];
    Softmax::apply(l, s);
    CHECK(s[0] == doctest::Approx(0.25));
    CHECK(s[1] == doctest::Approx(0.75));
    CHECK(s[2] == 0.0f);
}

TEST_CASE("top-k: descending order, ties to the lower index, renormalised weights") {
    const TopKRouter router(4, TopK{2}, {.weighting = {.renormalize = true}});
    // token 0: p ~ (0.1, 0.2, 0.3, 0.4); token 1: experts 1 and 3 tie for first.
    const auto logits = logits_of({{std::log(1.f), std::log(2.f), std::log(3.f), std::log(4.f)}, {0.f, 2.f, 1.f, 2.f}});
    const RoutingPlan p = route(router, logits);
    CHECK(ids_of(p, 0) == std::vector<std::int32_t>{3, 2});
    CHECK(p.weights(0)[0] == doctest::Approx(4.0 / 7.0));
    CHECK(p.weights(0)[1] == doctest::Approx(3.0 / 7.0));
    CHECK(ids_of(p, 1) == std::vector<std::int32_t>{1, 3});
    CHECK(p.weights(1)[0] == doctest::Approx(0.5));
    // CSR: expert 3 holds token 0 slot 0 then token 1 slot 1, in token order.
    CHECK(p.rows_of(3) == 2);
    CHECK(p.row_tokens()[std::size_t(p.offsets()[3])] == 0);
    CHECK(p.row_tokens()[std::size_t(p.offsets()[3] + 1)] == 1);
    CHECK(p.row_slots()[std::size_t(p.offsets()[3] + 1)] == 1);
    CHECK(p.rows_of(0) == 0);
}

TEST_CASE("routers reject non-finite logits, naming the token") {
    const TopKRouter router(3, TopK{1});
    auto logits = logits_of({{0.f, 1.f, 2.f}, {0.f, 1.f, 2.f}});
    logits(1, 2) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS((void)route(router, logits),
                         "Router::route: token 1 has router logit nan for expert 2, expected finite logits", numeric_error);
    const Matrix<float> wrong(2, 4);
    CHECK_THROWS_WITH_AS((void)route(router, wrong), "Router::route: logits have 4 columns, expected experts = 3",
                         shape_error);
}

TEST_CASE("router configuration errors name the value and its range") {
    CHECK_THROWS_WITH_AS(TopKRouter(4, TopK{5}), "TopK: k is 5, expected 1 <= k <= experts = 4", config_error);
    CHECK_THROWS_WITH_AS(DeepSeekRouter(8, GroupLimitedTopK{.k = 2, .n_group = 3, .topk_group = 1}),
                         "GroupLimitedTopK: n_group is 3, expected a divisor of experts = 8 in [1, 64]", config_error);
    CHECK_THROWS_WITH_AS(DeepSeekRouter(8, GroupLimitedTopK{.k = 5, .n_group = 4, .topk_group = 2}),
                         "GroupLimitedTopK: k is 5, expected 1 <= k <= topk_group * 2 = 4", config_error);
    CHECK_THROWS_WITH_AS(SwitchRouter(4, Top1Capacity{0}), "Top1Capacity: capacity is 0, expected >= 1", config_error);
    CHECK_THROWS_WITH_AS(TopPRouter(4, TopP{.p = 1.5, .k_max = 2}), "TopP: p is 1.5, expected 0 < p <= 1", config_error);
    CHECK_THROWS_WITH_AS(ExpertChoiceRouter(4, ExpertChoice{0.0}),
                         "ExpertChoice: capacity_factor is 0, expected a finite value > 0", config_error);
    CHECK_THROWS_WITH_AS(HashRouter(4, HashRouting{{0, 4}}), "HashRouting: table[1] is 4, expected an expert in [0, 4)",
                         config_error);
    CHECK_THROWS_WITH_AS(TopKRouter(4, TopK{1}, {.selection_bias = {1.f, 2.f}}),
                         "Router: selection bias has 2 elements, expected experts = 4", shape_error);
    CHECK_THROWS_WITH_AS(NoisyTopKRouter(4, NoisyTopK{.k = 1, .noise_std = -1.f}),
                         "NoisyTopK: noise_std is -1, expected a finite value >= 0", config_error);
    CHECK_THROWS_WITH_AS(NoisyTopKRouter(4, NoisyTopK{.k = 1, .learned_scale = true, .noise_floor = -0.5f}),
                         "NoisyTopK: noise_floor is -0.5, expected a finite value >= 0", config_error);
    CHECK_THROWS_WITH_AS(NoisyTopKRouter(4, NoisyTopK{.k = 5}), "NoisyTopK: k is 5, expected 1 <= k <= experts = 4", config_error);
    CHECK_THROWS_WITH_AS(DeepSeekRouter(8, GroupLimitedTopK{.k = 1, .n_group = 8, .topk_group = 1}),
                         "GroupLimitedTopK: 1 experts per group, expected >= 2 (a group scores its two best)", config_error);
    CHECK_THROWS_WITH_AS(DeepSeekRouter(8, GroupLimitedTopK{.k = 1, .n_group = 4, .topk_group = 5}),
                         "GroupLimitedTopK: topk_group is 5, expected 1 <= topk_group <= n_group = 4", config_error);
    CHECK_THROWS_WITH_AS(TopPRouter(4, TopP{.p = 0.5, .k_max = 5}), "TopP: k_max is 5, expected 1 <= k_max <= experts = 4",
                         config_error);
    CHECK_THROWS_WITH_AS(SinkhornRouter(4, SinkhornBalanced{.iterations = 1001}),
                         "SinkhornBalanced: iterations is 1001, expected 0..1000", config_error);
    CHECK_THROWS_WITH_AS(TopKRouter(4, TopK{1}, {.weighting = {.epsilon = -1e-9}}),
                         "Router: weighting epsilon = -1e-09, scale = 1, expected finite values, epsilon >= 0", config_error);
    CHECK_THROWS_WITH_AS(TopKRouter(4, TopK{1}, {.selection_bias = {0.f, 1.f, std::nanf(""), 2.f}}),
                         "Router: selection bias element 2 is nan, expected a finite value", weight_error);
}

TEST_CASE("RoutingPlan: its shape is checked, and an id a custom selection wrote outside the experts is an error") {
    RoutingPlan plan;
    CHECK_THROWS_WITH_AS(plan.reset(3, 0, 2), "RoutingPlan::reset: tokens = 3, experts = 0, slots = 2, expected tokens >= 0 and the others > 0",
                         config_error);
    plan.reset(2, 4, 1);
    plan.ids(0)[0] = 3;
    plan.ids(1)[0] = 4; // one past the last expert
    CHECK_THROWS_WITH_AS(plan.build_index(), "RoutingPlan: token 1 names expert 4, expected < 4", error);
    plan.ids(1)[0] = 0;
    plan.build_index();
    CHECK(plan.rows_of(3) == 1);
    CHECK(plan.rows_of(0) == 1);
}

TEST_CASE("group-limited top-k: the bias selects, the unbiased score weights, groups limit the choice") {
    // 4 experts in 2 groups {0,1}, {2,3}; keep 1 group; k = 2.
    // Scores (sigmoid of logits) s; expert 2 alone is best, but group {0,1} sums higher.
    const auto inv = [](float p) { return std::log(p / (1 - p)); };
    const auto logits = logits_of({{inv(0.6f), inv(0.55f), inv(0.7f), inv(0.1f)}});
    const DeepSeekRouter plain(4, GroupLimitedTopK{.k = 2, .n_group = 2, .topk_group = 1});
    RoutingPlan p = route(plain, logits);
    CHECK(ids_of(p, 0) == std::vector<std::int32_t>{0, 1});
    CHECK(p.weights(0)[0] == doctest::Approx(0.6));
    // A bias of +0.5 on expert 3 makes group {2,3} win and picks 3 first; weights stay unbiased.
    const DeepSeekRouter biased(4, GroupLimitedTopK{.k = 2, .n_group = 2, .topk_group = 1},
                                {.weighting = {.renormalize = false, .scale = 2.0f}, .selection_bias = {0, 0, 0, 0.7f}});
    p = route(biased, logits);
    CHECK(ids_of(p, 0) == std::vector<std::int32_t>{3, 2});
    CHECK(p.weights(0)[0] == doctest::Approx(2 * 0.1));
    CHECK(p.weights(0)[1] == doctest::Approx(2 * 0.7));
}

TEST_CASE("top-1 with capacity: per sequence, in position order, never over capacity") {
    const Matrix<float> logits = random_matrix(24, 3, 5, 0.2f);
    const SwitchRouter router(3, Top1Capacity{2});
    const RoutingPlan p = route(router, logits, {.sequence_length = 8});
    for (index_t s = 0; s < 3; ++s) {
        std::vector<index_t> count(3, 0), kept(3, 0);
        for (index_t t = s * 8; t < s * 8 + 8; ++t) {
            const auto e = std::size_t(p.ids(t)[0]);
            ++count[e];
            CHECK(p.kept(t) == (count[e] <= 2)); // 1-based position <= capacity
            kept[e] += p.kept(t);
        }
        for (const index_t k : kept) CHECK(k <= 2);
    }
    CHECK_THROWS_WITH_AS((void)route(router, logits, {.sequence_length = 7}),
                         "Top1Capacity: 24 tokens do not split into sequences of 7", shape_error);
}

TEST_CASE("expert choice loads every expert exactly c, and orders a token's experts") {
    const Matrix<float> logits = random_matrix(20, 4, 9, 2.0f);
    const ExpertChoiceRouter router(4, ExpertChoice{1.0}); // c = 20 * 1 / 4 = 5
    const RoutingPlan p = route(router, logits);
    for (index_t e = 0; e < 4; ++e) CHECK(p.rows_of(e) == 5);
    CHECK(router.selection().tokens_per_expert(20, 4) == 5);
    for (index_t t = 0; t < 20; ++t) {
        const auto ids = p.ids(t);
        for (std::size_t j = 1; j < ids.size() && ids[j] >= 0; ++j) CHECK(logits(t, ids[j - 1]) >= logits(t, ids[j]));
    }
}

TEST_CASE("hash routing is a fixed function of the token id") {
    const HashRouter router(8, HashRouting{});
    const Matrix<float> logits(4, 8);
    const std::vector<std::int32_t> ids{5, 17, 5, 99};
    const RoutingPlan a = route(router, logits, {.token_ids = ids}), b = route(router, logits, {.token_ids = ids});
    CHECK(a.all_ids().size() == 4);
    CHECK(std::equal(a.all_ids().begin(), a.all_ids().end(), b.all_ids().begin()));
    CHECK(a.ids(0)[0] == a.ids(2)[0]);
    CHECK(a.weights(1)[0] == 1.0f);
    const HashRouter table(3, HashRouting{{2, 0, 1}});
    const Matrix<float> l3(2, 3);
    const std::vector<std::int32_t> small{1, 2};
    CHECK(route(table, l3, {.token_ids = small}).ids(1)[0] == 1);
    const std::vector<std::int32_t> bad{1, 3};
    CHECK_THROWS_WITH_AS((void)route(table, l3, {.token_ids = bad}),
                         "HashRouting: token id 3 is outside the table of 3 entries", shape_error);
    CHECK_THROWS_WITH_AS((void)route(table, l3), "HashRouting: 0 token ids for 2 tokens, expected one id per token",
                         shape_error);
}

TEST_CASE("top-p: the smallest set reaching p, never more than k_max") {
    const auto logits = logits_of({{std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)},
                                   {std::log(0.25f), std::log(0.25f), std::log(0.25f), std::log(0.25f)}});
    const RoutingPlan p = route(TopPRouter(4, TopP{.p = 0.7, .k_max = 3}), logits);
    CHECK(ids_of(p, 0) == std::vector<std::int32_t>{0, 1, -1}); // 0.5 + 0.3 >= 0.7
    CHECK(ids_of(p, 1) == std::vector<std::int32_t>{0, 1, 2});  // capped at k_max
    const Matrix<float> many = random_matrix(50, 8, 3, 3.0f);
    const RoutingPlan q = route(TopPRouter(8, TopP{.p = 0.9, .k_max = 2}), many);
    for (index_t t = 0; t < 50; ++t) CHECK(q.ids(t).size() == 2);
}

TEST_CASE("Sinkhorn balances skewed routing better than top-1") {
    Matrix<float> logits = random_matrix(64, 4, 2, 0.5f);
    for (index_t t = 0; t < 64; ++t) logits(t, 0) += 2.0f; // everyone prefers expert 0
    const RoutingPlan greedy = route(TopKRouter(4, TopK{1}), logits);
    const RoutingPlan balanced = route(SinkhornRouter(4, SinkhornBalanced{20}), logits);
    const RoutingStats g = routing_stats(greedy), b = routing_stats(balanced);
    MESSAGE("load CV top-1 ", g.load_cv, ", Sinkhorn ", b.load_cv, "; max/mean ", g.max_over_mean, ", ", b.max_over_mean);
    CHECK(b.load_cv < 0.5 * g.load_cv);
    CHECK(b.max_over_mean < g.max_over_mean);
}

TEST_CASE("Sinkhorn balances the logits themselves (S-BASE), not softmax probabilities") {
    // Confident logits: exp(probability) would be nearly flat and balance differently.
    Matrix<float> logits = random_matrix(24, 4, 9, 4.0f);
    for (index_t t = 0; t < 24; ++t) logits(t, 1) += 3.0f;
    constexpr index_t iterations = 6;
    const RoutingPlan p = route(SinkhornRouter(4, SinkhornBalanced{iterations}), logits);
    // The balancing, written out: P = exp(l - row max), columns to T / E, rows to 1.
    std::vector<double> q(24 * 4);
    for (index_t t = 0; t < 24; ++t) {
        double m = logits(t, 0);
        for (index_t e = 1; e < 4; ++e) m = std::max(m, double(logits(t, e)));
        for (index_t e = 0; e < 4; ++e) q[std::size_t(t * 4 + e)] = std::exp(double(logits(t, e)) - m);
    }
    for (index_t it = 0; it < iterations; ++it) {
        double col[4] = {0, 0, 0, 0};
        for (index_t t = 0; t < 24; ++t)
            for (index_t e = 0; e < 4; ++e) col[e] += q[std::size_t(t * 4 + e)];
        for (index_t t = 0; t < 24; ++t) {
            double row = 0;
            for (index_t e = 0; e < 4; ++e) row += q[std::size_t(t * 4 + e)] *= 6.0 / col[e];
            for (index_t e = 0; e < 4; ++e) q[std::size_t(t * 4 + e)] /= row;
        }
    }
    std::vector<float> probs(4);
    for (index_t t = 0; t < 24; ++t) {
        const auto row = std::span(q).subspan(std::size_t(t * 4), 4);
        const auto best = std::int32_t(std::max_element(row.begin(), row.end()) - row.begin());
        CHECK(p.ids(t)[0] == best);
        Softmax::apply(logits.view().row(t), probs);
        CHECK(p.weights(t)[0] == probs[std::size_t(best)]);
    }
}

TEST_CASE("noisy top-k: noise keyed by position in the sequence, so batching and chunking do not change it") {
    const NoisyTopKRouter router(6, NoisyTopK{.k = 2, .noise_std = 2.0f, .seed = 7});
    const Matrix<float> a = random_matrix(5, 6, 21), b = random_matrix(5, 6, 22);
    Matrix<float> both(10, 6);
    for (index_t t = 0; t < 5; ++t)
        for (index_t e = 0; e < 6; ++e) both(t, e) = a(t, e), both(t + 5, e) = b(t, e);
    const RoutingPlan alone = route(router, b), batched = route(router, both, {.sequence_length = 5});
    for (index_t t = 0; t < 5; ++t) {
        CHECK(batched.ids(t + 5)[0] == alone.ids(t)[0]);
        CHECK(batched.ids(t + 5)[1] == alone.ids(t)[1]);
        CHECK(batched.weights(t + 5)[0] == alone.weights(t)[0]);
    }
    // A sequence cut into calls: the second call starts at position 3.
    Matrix<float> b_tail(2, 6);
    for (index_t t = 0; t < 2; ++t)
        for (index_t e = 0; e < 6; ++e) b_tail(t, e) = b(t + 3, e);
    const RoutingPlan chunk = route(router, b_tail, {.first_position = 3});
    for (index_t t = 0; t < 2; ++t) CHECK(chunk.weights(t)[0] == alone.weights(t + 3)[0]);
    // Position 0 and 3 differ in noise; the per-call seed changes it too.
    CHECK(router.selection().noise(0, 1) != router.selection().noise(3, 1));
    CHECK(router.selection().noise(3, 1, 99) != router.selection().noise(3, 1));
}

TEST_CASE("noisy top-k with Shazeer's learned noise scale: H = logits + noise_std (softplus(r) + noise_floor) n, by hand") {
    const index_t tokens = 7, experts = 5;
    const NoisyTopKRouter router(experts, NoisyTopK{.k = 2, .noise_std = 1.5f, .seed = 11, .learned_scale = true});
    CHECK(router.logit_columns() == 2 * experts);
    const Matrix<float> logits = random_matrix(tokens, 2 * experts, 41, 2.0f); // clean, then noise logits r
    const RouterContext ctx{.noise_seed = 6};
    const RoutingPlan plan = route(router, logits, ctx);
    const NoisyTopK& pol = router.selection();
    for (index_t t = 0; t < tokens; ++t) {
        std::vector<double> h(static_cast<std::size_t>(experts));
        for (index_t e = 0; e < experts; ++e) {
            const double r = logits(t, experts + e);
            h[std::size_t(e)] = double(logits(t, e)) + 1.5 * (std::log1p(std::exp(r)) + 0.01) * double(pol.noise(t, e, 6));
        }
        std::vector<index_t> order(static_cast<std::size_t>(experts));
        std::iota(order.begin(), order.end(), index_t(0));
        std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return h[std::size_t(a)] > h[std::size_t(b)]; });
        CHECK(plan.ids(t)[0] == order[0]);
        CHECK(plan.ids(t)[1] == order[1]);
        const double w0 = 1.0 / (1.0 + std::exp(h[std::size_t(order[1])] - h[std::size_t(order[0])]));
        CHECK(plan.weights(t)[0] == doctest::Approx(w0).epsilon(1e-5));
    }
    // Very negative noise logits with no floor: no noise, plain top-k of the clean logits.
    Matrix<float> quiet(tokens, 2 * experts), clean(tokens, experts);
    for (index_t t = 0; t < tokens; ++t)
        for (index_t e = 0; e < experts; ++e) clean(t, e) = quiet(t, e) = logits(t, e), quiet(t, experts + e) = -200.0f;
    const NoisyTopKRouter floorless(experts, NoisyTopK{.k = 2, .noise_std = 1.5f, .seed = 11, .learned_scale = true, .noise_floor = 0});
    const RoutingPlan calm = route(floorless, quiet, ctx);
    const RoutingPlan top = route(TopKRouter(experts, TopK{2}), clean);
    CHECK(std::equal(calm.all_ids().begin(), calm.all_ids().end(), top.all_ids().begin()));
    // A context with router noise off (evaluation): the same, whatever the noise logits.
    const RoutingPlan off = route(router, logits, {.noise_seed = 6, .router_noise = false});
    CHECK(std::equal(off.all_ids().begin(), off.all_ids().end(), top.all_ids().begin()));
    CHECK_FALSE(std::equal(plan.all_ids().begin(), plan.all_ids().end(), top.all_ids().begin()));
    // The logits must carry the noise logits, finite.
    CHECK_THROWS_WITH_AS((void)route(router, clean),
                         "Router::route: logits have 5 columns, expected 10 (5 experts' logits, then 5 noise logits)", shape_error);
    quiet(2, experts + 3) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS((void)route(floorless, quiet),
                         "Router::route: token 2 has noise logit nan for expert 3, expected finite logits", numeric_error);
}

TEST_CASE("routing in parallel over tokens gives the plans of one thread, bit for bit") {
    const Matrix<float> logits = random_matrix(3000, 64, 31, 2.0f);
    std::vector<std::int32_t> ids(3000);
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(i * 7919 % 50000);
    const RouterContext ctx{.token_ids = ids};
    const auto check = [&](const auto& router) {
        CAPTURE(std::decay_t<decltype(router)>::selection_type::name);
        RoutingPlan one;
        {
            const detail::ThreadCountScope single(1);
            one = route(router, logits, ctx);
        }
        const detail::ThreadCountScope two(2);
        const RoutingPlan many = route(router, logits, ctx);
        CHECK(std::memcmp(one.all_ids().data(), many.all_ids().data(), one.all_ids().size_bytes()) == 0);
        CHECK(std::memcmp(one.all_weights().data(), many.all_weights().data(), one.all_weights().size_bytes()) == 0);
    };
    check(TopKRouter(64, TopK{4}, {.weighting = {.renormalize = true}}));
    check(DeepSeekRouter(64, GroupLimitedTopK{.k = 6, .n_group = 8, .topk_group = 3},
                         {.weighting = {.renormalize = true, .epsilon = 1e-20, .scale = 2.5f},
                          .selection_bias = test::random_vector(64, 4)}));
    check(NoisyTopKRouter(64, NoisyTopK{.k = 2, .noise_std = 1.0f, .seed = 3}));
    check(TopPRouter(64, TopP{.p = 0.3, .k_max = 8}));
    check(HashRouter(64, HashRouting{}));
}

TEST_CASE("noisy top-k is deterministic per seed and reduces to top-k without noise") {
    const Matrix<float> logits = random_matrix(16, 6, 4, 1.0f);
    const NoisyTopKRouter a(6, NoisyTopK{.k = 2, .noise_std = 1.0f, .seed = 42});
    const NoisyTopKRouter b(6, NoisyTopK{.k = 2, .noise_std = 1.0f, .seed = 43});
    const RoutingPlan pa = route(a, logits), pa2 = route(a, logits), pb = route(b, logits);
    CHECK(std::equal(pa.all_ids().begin(), pa.all_ids().end(), pa2.all_ids().begin()));
    CHECK_FALSE(std::equal(pa.all_ids().begin(), pa.all_ids().end(), pb.all_ids().begin()));
    for (index_t t = 0; t < 16; ++t) CHECK(pa.weights(t)[0] + pa.weights(t)[1] == doctest::Approx(1.0));
    const RoutingPlan quiet = route(NoisyTopKRouter(6, NoisyTopK{.k = 2, .noise_std = 0.0f}), logits);
    const RoutingPlan top = route(TopKRouter(6, TopK{2}), logits);
    CHECK(std::equal(quiet.all_ids().begin(), quiet.all_ids().end(), top.all_ids().begin()));
    double mean = 0, sq = 0;
    for (index_t i = 0; i < 4000; ++i) {
        const double n = a.selection().noise(i, 3);
        mean += n;
        sq += n * n;
    }
    CHECK(std::abs(mean / 4000) < 0.06);
    CHECK(std::abs(sq / 4000 - 1.0) < 0.08);
}

TEST_CASE("losses and statistics on hand cases") {
    // Uniform logits, top-1 spread evenly over 4 experts: load-balancing loss 1, CV 0.
    Matrix<float> logits(8, 4);
    for (index_t t = 0; t < 8; ++t) logits(t, t % 4) = 1e-6f; // tiny preference: routes evenly
    const RoutingPlan p = route(TopKRouter(4, TopK{1}), logits);
    CHECK(load_balancing_loss(p, logits.view()) == doctest::Approx(1.0).epsilon(1e-5));
    const RoutingStats s = routing_stats(p, logits.view());
    CHECK(s.load_cv == 0.0);
    CHECK(s.max_over_mean == 1.0);
    CHECK(s.experts_used == 4);
    CHECK(s.dropped == 0);
    CHECK(*s.entropy == doctest::Approx(std::log(4.0)).epsilon(1e-5));
    CHECK(s.adjacent_overlap == 0.0);
    CHECK(router_z_loss(logits.view()) == doctest::Approx(std::log(4.0) * std::log(4.0)).epsilon(1e-5));
    const std::vector<double> equal{2, 2, 2}, skew{0, 0, 6};
    CHECK(cv_squared(equal) == 0.0);
    CHECK(cv_squared(skew) == doctest::Approx(3.0)); // var 12 / mean^2 4
    // Everything to expert 2: CV of (0, 0, 8, 0) = 2 (sample std 4 / mean 2), max/mean 4, overlap 1.
    Matrix<float> one(8, 4);
    for (index_t t = 0; t < 8; ++t) one(t, 2) = 5.0f;
    const RoutingStats t = routing_stats(route(TopKRouter(4, TopK{1}), one));
    CHECK(t.load_cv == doctest::Approx(2.0));
    CHECK(t.load_cv * t.load_cv == doctest::Approx(cv_squared(load(route(TopKRouter(4, TopK{1}), one)))));
    CHECK(t.max_over_mean == 4.0);
    CHECK(t.adjacent_overlap == 1.0);
    CHECK_FALSE(t.entropy.has_value());
}

namespace {


template <class B, class R>
void compare_router(const R& router, index_t tokens, const RouterContext& ctx = {}) {
    CAPTURE(R::selection_type::name);
    CAPTURE(tokens);
    const auto layer = test::make_layer<B>(router);
    const auto oracle = test::make_layer<reference>(router);
    const Matrix<float> x = random_matrix(tokens, 24, 77);
    Matrix<float> y(tokens, 24), y_ref(tokens, 24);
    RoutingPlan plan, plan_ref;
    Workspace ws;
    layer.forward(x.view(), y.view(), ws, plan, ctx);
    oracle.forward(x.view(), y_ref.view(), ws, plan_ref, ctx);
    CHECK(std::equal(plan.all_ids().begin(), plan.all_ids().end(), plan_ref.all_ids().begin()));
    CHECK(relative_error(y.view(), y_ref.view()) <= test::tolerance(3 * (24 + 20)));
    // apply() with forward()'s own plan is forward(), bitwise; with the reference's plan (same
    // ids, weights from the reference's logits) it agrees to rounding.
    Matrix<float> y2(tokens, 24);
    layer.apply(x.view(), plan, y2.view(), ws);
    CHECK(relative_error(y2.view(), y.view()) == 0.0);
    layer.apply(x.view(), plan_ref, y2.view(), ws);
    CHECK(relative_error(y2.view(), y_ref.view()) <= test::tolerance(3 * (24 + 20)));
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("every router through MoeLayer on every backend matches the reference", B, moe_backends) {
    for (const index_t tokens : {0, 1, 37}) {
        compare_router<B>(TopKRouter(6, TopK{2}, {.weighting = {.renormalize = true}}), tokens);
        compare_router<B>(DeepSeekRouter(6, GroupLimitedTopK{.k = 2, .n_group = 3, .topk_group = 2},
                                         {.weighting = {.renormalize = true, .epsilon = 1e-20, .scale = 2.5f},
                                          .selection_bias = {0.1f, 0, 0, -0.1f, 0, 0}}),
                          tokens);
        compare_router<B>(ExpertChoiceRouter(6, ExpertChoice{1.5}), tokens);
        compare_router<B>(TopPRouter(6, TopP{.p = 0.6, .k_max = 3}), tokens);
        compare_router<B>(SinkhornRouter(6, SinkhornBalanced{5}), tokens);
        compare_router<B>(NoisyTopKRouter(6, NoisyTopK{.k = 2, .noise_std = 0.5f, .seed = 1}), tokens);
        const std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens), 7);
        compare_router<B>(HashRouter(6, HashRouting{}), tokens, {.token_ids = ids});
    }
    compare_router<B>(SwitchRouter(6, Top1Capacity{3}), 36, {.sequence_length = 12});
}
TEST_CASE_TEMPLATE_APPLY(moe_backends, test::all_backends);

TEST_CASE("a token that expert choice routes nowhere gets zero routed output") {
    // 8 tokens, 4 experts, c = 1 each: at most 4 tokens are taken.
    const auto layer = test::make_layer<reference>(ExpertChoiceRouter(4, ExpertChoice{0.5}));
    const Matrix<float> x = random_matrix(8, 24, 5);
    Matrix<float> y(8, 24);
    RoutingPlan plan;
    Workspace ws;
    layer.forward(x.view(), y.view(), ws, plan);
    index_t nowhere = 0;
    for (index_t t = 0; t < 8; ++t) {
        if (plan.ids(t)[0] >= 0) continue;
        ++nowhere;
        for (index_t j = 0; j < 24; ++j) CHECK(y(t, j) == 0.0f);
    }
    CHECK(nowhere >= 4);
}

TEST_CASE_TEMPLATE_DEFINE("MoeLayer is bitwise deterministic across runs and thread counts", B, determinism) {
    for (const auto& shape : {std::tuple<index_t, index_t, index_t>{64, 48, 129}, {256, 512, 300}}) {
        const index_t d = std::get<0>(shape), ff = std::get<1>(shape), tokens = std::get<2>(shape);
        CAPTURE(d);
        const auto layer = test::make_layer<B>(TopKRouter(8, TopK{2}), d, ff);
        const Matrix<float> x = random_matrix(tokens, d, 8);
        Matrix<float> a(tokens, d), b(tokens, d), c(tokens, d);
        const auto bytes = sizeof(float) * std::size_t(tokens * d);
        Workspace ws;
        layer.forward(x.view(), a.view(), ws);
        layer.forward(x.view(), b.view(), ws);
        CHECK(std::memcmp(a.data(), b.data(), bytes) == 0);
#if defined(_OPENMP)
        const int threads = omp_get_max_threads();
        omp_set_num_threads(1);
        layer.forward(x.view(), c.view(), ws);
        omp_set_num_threads(threads);
        MESSAGE(B::name, ": 1 vs ", threads, " threads compared");
        CHECK(std::memcmp(a.data(), c.data(), bytes) == 0);
        // More threads than experts: the experts' forward pool of (expert, tile) items
        // (oversubscribed here, which is fine), and a plan whose experts do not balance.
        for (const int more : {3, 16}) {
            omp_set_num_threads(more);
            std::fill_n(c.data(), tokens * d, 0.0f);
            layer.forward(x.view(), c.view(), ws);
            omp_set_num_threads(threads);
            CAPTURE(more);
            CHECK(std::memcmp(a.data(), c.data(), bytes) == 0);
        }
#endif
    }
}
TEST_CASE_TEMPLATE_APPLY(determinism, test::all_backends);

TEST_CASE("MoeLayer rejects mismatched parts and inputs") {
    const auto layer = test::make_layer<reference>(TopKRouter(4, TopK{2}));
    Workspace ws;
    Matrix<float> x(3, 24), y(3, 24);
    x(2, 5) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(layer.forward(x.view(), y.view(), ws),
                         "MoeLayer: input x: element (2, 5) is inf, expected a finite value", numeric_error);
    RoutingPlan other;
    other.reset(2, 4, 2);
    other.build_index();
    Matrix<float> ok(3, 24);
    CHECK_THROWS_WITH_AS(layer.apply(ok.view(), other, y.view(), ws),
                         "MoeLayer::apply: the plan routes 2 tokens over 4 experts, expected 3 over 4", shape_error);
    const Matrix<float> gate = random_matrix(4, 24, 1);
    std::vector<FfnExpert<reference, Relu>> three;
    const Matrix<float> up = random_matrix(8, 24, 2), down = random_matrix(24, 8, 3);
    for (int i = 0; i < 3; ++i)
        three.emplace_back(FfnWeights{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())});
    CHECK_THROWS_WITH_AS(MoeLayer(WeightView(ConstMatrixView<float>(gate.view())), TopKRouter(4, TopK{1}), three),
                         "MoeLayer: the router routes over 4 experts, but 3 experts were given", config_error);
    const Matrix<float> gate3 = random_matrix(3, 20, 1);
    CHECK_THROWS_WITH_AS(MoeLayer(WeightView(ConstMatrixView<float>(gate3.view())), TopKRouter(3, TopK{1}), three),
                         "MoeLayer: weight 'gate' has shape (3, 20), expected (3, 24)", shape_error);
    // Experts of different widths (dynamic extents, so only the run-time check sees it).
    const Matrix<float> up16 = random_matrix(8, 16, 4), down16 = random_matrix(16, 8, 5);
    std::vector<FfnExpert<reference, Relu>> mixed = three;
    mixed[2] = FfnExpert<reference, Relu>(FfnWeights{.up = ConstMatrixView<float>(up16.view()), .down = ConstMatrixView<float>(down16.view())});
    const Matrix<float> gate_3x24 = random_matrix(3, 24, 1);
    CHECK_THROWS_WITH_AS(MoeLayer(WeightView(ConstMatrixView<float>(gate_3x24.view())), TopKRouter(3, TopK{1}), mixed),
                         "MoeLayer: expert 2 has d_model = 16, expected 24 (expert 0's)", shape_error);
    // Routing alone checks its input too.
    const Matrix<float> narrow(3, 20);
    RoutingPlan plan;
    CHECK_THROWS_WITH_AS(layer.route(narrow.view(), {}, plan, ws), "MoeLayer::route: input x has 20 columns, expected 24", shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("MoeLayer with a router bias: the logits are x W^T + b, routing follows them, and b gets a gradient", B, gate_bias) {
    const auto plain = test::make_layer<B>(TopKRouter(4, TopK{1}));
    const Matrix<float> gate = random_matrix(4, 24, 100, 0.5f); // make_layer's gate
    std::vector<GluExpert<B, Silu>> experts;
    for (index_t e = 0; e < 4; ++e) experts.push_back(plain.expert(e));
    // Expert 2's bias outweighs every logit: each token picks it, with weight 1.
    const std::vector<float> bias = {0.25f, -0.5f, 100.0f, 0.0f};
    const MoeLayer biased(WeightView(ConstMatrixView<float>(gate.view())), bias, TopKRouter(4, TopK{1}), experts);
    const Matrix<float> x = random_matrix(6, 24, 7);
    Workspace ws;
    Matrix<float> logits(6, 4), plain_logits(6, 4), y(6, 24), y2(6, 24);
    biased.router_logits(x.view(), logits.view(), ws);
    plain.router_logits(x.view(), plain_logits.view(), ws);
    for (index_t t = 0; t < 6; ++t)
        for (index_t e = 0; e < 4; ++e) CHECK(logits(t, e) == doctest::Approx(plain_logits(t, e) + bias[std::size_t(e)]).epsilon(1e-6));
    biased.forward(x.view(), y.view(), ws);
    plain.expert(2).forward(x.view(), y2.view(), ws);
    CHECK(relative_error(y.view(), y2.view()) <= 1e-6);
    // Its gradient: one value per logit, the column sums of dL/dlogits (the fixtures' d/router.bias
    // check the values, tests/test_backward_fixtures.cpp).
    auto g = biased.make_gradients();
    CHECK(g.gate_bias.size() == 4u);
    CHECK(plain.make_gradients().gate_bias.empty());
    Matrix<float> dx(6, 24);
    biased.backward(x.view(), x.view(), dx.view(), g, ws);
    g.gate_bias.pop_back();
    CHECK_THROWS_WITH_AS(biased.backward(x.view(), x.view(), dx.view(), g, ws),
                         "MoeLayer::backward: gradients for a gate bias of 3 values, expected 4 (use make_gradients())", shape_error);
    const std::vector<float> short_bias = {1.0f, 2.0f};
    CHECK_THROWS_WITH_AS(MoeLayer(WeightView(ConstMatrixView<float>(gate.view())), short_bias, TopKRouter(4, TopK{1}), experts),
                         "MoeLayer: bias 'gate' has 2 values, expected 4 (one per router logit)", shape_error);
    std::vector<float> nan_bias = bias;
    nan_bias[1] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(MoeLayer(WeightView(ConstMatrixView<float>(gate.view())), nan_bias, TopKRouter(4, TopK{1}), experts),
                         "MoeLayer weight 'gate': bias element 1 is nan, expected a finite value", weight_error);
}
TEST_CASE_TEMPLATE_APPLY(gate_bias, test::all_backends);

TEST_CASE("apply() takes a plan from another router, even one with more assignments") {
    const auto layer = test::make_layer<reference>(TopKRouter(6, TopK{1}));
    const auto oracle = test::make_layer<reference>(ExpertChoiceRouter(6, ExpertChoice{3.0})); // same weights, other router
    const Matrix<float> x = random_matrix(20, 24, 12);
    Matrix<float> logits(20, 6), y(20, 24), y_ref(20, 24);
    RoutingPlan plan, plan_ref;
    Workspace ws; // fresh: apply() must size its scratch from the plan (60 rows, not 20)
    layer.router_logits(x.view(), logits.view(), ws);
    ExpertChoiceRouter(6, ExpertChoice{3.0}).route(logits.view(), {}, plan, ws);
    CHECK(plan.rows() == 60);
    Workspace fresh;
    layer.apply(x.view(), plan, y.view(), fresh);
    oracle.forward(x.view(), y_ref.view(), ws, plan_ref);
    CHECK(relative_error(y.view(), y_ref.view()) == 0.0);
}
