// Optimisers (issue 12): AdamW and SGD with momentum against torch.optim on known values
// (three steps of fixed gradients; the expected parameters were computed by PyTorch 1.13 in
// float64 with the script in the comment below), gradient clipping against
// torch.nn.utils.clip_grad_norm_, parameter groups, and the typed errors.
//
//   p0 = [0.5, -1.25, 2.0, 0.0]; grads = [0.1, -0.2, 0.3, -0.4], [-0.5, 0.25, 0.0, 1.0],
//   [0.3, 0.3, -0.3, 0.05]; for g in grads: p.grad = g; opt.step()

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "test_support.hpp"

using namespace hypermoe;

namespace {

const std::vector<float> start = {0.5f, -1.25f, 2.0f, 0.0f};
const std::vector<std::vector<float>> gradients = {{0.1f, -0.2f, 0.3f, -0.4f}, {-0.5f, 0.25f, 0.0f, 1.0f}, {0.3f, 0.3f, -0.3f, 0.05f}};

/// Three steps of `Opt` with one group on the known gradients; the final values.
template <class Opt>
std::vector<float> three_steps(const typename Opt::Group& group) {
    std::vector<float> value = start, grad(start.size());
    Opt opt({Parameter{"p", value, grad, 0}}, {group});
    for (const auto& g : gradients) {
        grad = g;
        opt.step();
    }
    CHECK(opt.steps() == 3);
    return value;
}

void check_values(const std::vector<float>& got, const std::vector<double>& want) {
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(got[i] == doctest::Approx(want[i]).epsilon(2e-6).scale(1.0));
    }
}

} // namespace

TEST_CASE("AdamW matches torch.optim.AdamW on known values") {
    check_values(three_steps<AdamW>({.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05}),
                 {0.46039311243149217, -1.2013349484779807, 1.8129117313373866, 0.017940039286101377});
    check_values(three_steps<AdamW>({.lr = 0.01, .beta1 = 0.8, .beta2 = 0.999, .eps = 1e-6, .weight_decay = 0.0}),
                 {0.4969019958587119, -1.2482263839584116, 1.9855200897446035, 0.001129398771368864});
}

TEST_CASE("SGD with momentum matches torch.optim.SGD on known values") {
    check_values(three_steps<Sgd>({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01}),
                 {0.5350853895, -1.26634447875, 1.937603568, -0.08665195999999997});
    check_values(three_steps<Sgd>({.lr = 0.05, .momentum = 0.8, .nesterov = true}), {0.51924, -1.27798, 1.98272, -0.06746});
    check_values(three_steps<Sgd>({.lr = 0.05, .momentum = 0.7, .dampening = 0.3}), {0.5083, -1.253475, 1.97765, -0.01745});
    check_values(three_steps<Sgd>({.lr = 0.2}), {0.52, -1.32, 2.0, -0.13});
}

TEST_CASE("parameter groups: each parameter steps with its group's settings") {
    // Two copies of one tensor, one in a group without weight decay: the same as two optimisers.
    std::vector<float> a = start, b = start, ga(4), gb(4);
    AdamW opt({Parameter{"weight", a, ga, 0}, Parameter{"bias", b, gb, 1}},
              {{.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05},
               {.lr = 0.01, .beta1 = 0.8, .beta2 = 0.999, .eps = 1e-6, .weight_decay = 0.0}});
    for (const auto& g : gradients) {
        ga = g, gb = g;
        opt.step();
    }
    check_values(a, {0.46039311243149217, -1.2013349484779807, 1.8129117313373866, 0.017940039286101377});
    check_values(b, {0.4969019958587119, -1.2482263839584116, 1.9855200897446035, 0.001129398771368864});
    // A schedule changes one group's rate.
    opt.set_lr(1, 0.5);
    CHECK(opt.group(1).lr == 0.5);
    CHECK(opt.group(0).lr == 0.1);
}

TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_") {
    std::vector<float> a = {0, 0}, b = {0}, ga = {3, 4}, gb = {12};
    const std::vector<Parameter> params = {{"a", a, ga, 0}, {"b", b, gb, 0}};
    CHECK(clip_grad_norm(params, 6.5) == doctest::Approx(13.0));
    // torch: [1.4999998846153937, 1.9999998461538582], [5.999999538461575]
    CHECK(ga[0] == doctest::Approx(1.4999998846153937).epsilon(1e-7));
    CHECK(ga[1] == doctest::Approx(1.9999998461538582).epsilon(1e-7));
    CHECK(gb[0] == doctest::Approx(5.999999538461575).epsilon(1e-7));
    // Below the limit nothing changes.
    ga = {3, 4}, gb = {12};
    CHECK(clip_grad_norm(params, 20.0) == doctest::Approx(13.0));
    CHECK(ga == std::vector<float>{3, 4});
    CHECK(gb == std::vector<float>{12});
}

TEST_CASE("clip_grad_norm, AdamW and SGD on parameters of many chunks: the same bits at 1 and 2 threads") {
    // 200,003 elements: 13 chunks of the optimisers' parallel loops, the last one short.
    const index_t n = 200003;
    const auto run = [&](int threads) {
        const detail::ThreadCountScope scope(threads);
        const auto size = static_cast<std::size_t>(n);
        std::vector<float> a(size), ga(size), b(size), gb(size);
        for (index_t j = 0; j < n; ++j) {
            a[std::size_t(j)] = b[std::size_t(j)] = float(std::sin(0.001 * double(j)));
            ga[std::size_t(j)] = gb[std::size_t(j)] = float(std::cos(0.37 * double(j)));
        }
        const std::vector<Parameter> params = {{"a", a, ga, 0}};
        AdamW adamw(params, {AdamWGroup{}});
        Sgd sgd({{"b", b, gb, 0}}, {SgdGroup{.momentum = 0.9}});
        const double norm = clip_grad_norm(params, 1.0);
        adamw.step();
        sgd.step();
        sgd.step();
        return std::tuple(norm, a, b);
    };
    const auto [norm1, a1, b1] = run(1);
    const auto [norm2, a2, b2] = run(2);
    double want = 0;
    for (index_t j = 0; j < n; ++j) want += std::pow(double(float(std::cos(0.37 * double(j)))), 2);
    CHECK(norm1 == doctest::Approx(std::sqrt(want)).epsilon(1e-12));
    CHECK(norm1 == norm2);
    CHECK(a1 == a2);
    CHECK(b1 == b2);
}

TEST_CASE("optimiser errors name the parameter, the option and both sides") {
    std::vector<float> v(4), g(4), short_g(3);
    CHECK_THROWS_WITH_AS(AdamW({Parameter{"w", v, short_g, 0}}, {AdamW::Group{}}),
                         "AdamW: parameter 'w' has 4 values but its gradient has 3 elements", shape_error);
    CHECK_THROWS_WITH_AS(Sgd({Parameter{"w", v, g, 2}}, {Sgd::Group{}, Sgd::Group{}}),
                         "Sgd: parameter 'w' is in group 2, expected a group below 2", config_error);
    CHECK_THROWS_WITH_AS(AdamW({Parameter{"w", v, g, 0}}, {}), "AdamW: no parameter groups, expected at least one", config_error);
    CHECK_THROWS_WITH_AS(AdamW({Parameter{"w", v, g, 0}}, {{.beta1 = 1.0}}), "AdamW: beta1 is 1, expected 0 <= beta1 < 1",
                         config_error);
    CHECK_THROWS_WITH_AS(AdamW({Parameter{"w", v, g, 0}}, {{.lr = -0.1}}), "AdamW: lr is -0.1, expected 0 <= lr <= 1e+06",
                         config_error);
    CHECK_THROWS_WITH_AS(Sgd({Parameter{"w", v, g, 0}}, {{.lr = 0.1, .nesterov = true}}),
                         "Sgd: nesterov needs momentum > 0 and dampening = 0, but momentum is 0 and dampening is 0", config_error);
    AdamW opt({Parameter{"w", v, g, 0}}, {AdamW::Group{}});
    CHECK_THROWS_WITH_AS(opt.set_lr(0, std::nan("")), doctest::Contains("AdamW: lr is nan"), config_error);
    CHECK_THROWS_AS(opt.set_lr(1, 0.1), std::out_of_range);
    // A NaN gradient is refused before anything moves.
    g[2] = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> before = v;
    CHECK_THROWS_WITH_AS(opt.step(), "AdamW::step: gradient of 'w' element 2 is nan, expected a finite value", numeric_error);
    CHECK(v == before);
    CHECK(opt.steps() == 0);
    const std::vector<Parameter> params = {{"w", v, g, 0}};
    CHECK_THROWS_WITH_AS((void)clip_grad_norm(params, 1.0), "clip_grad_norm: gradient of 'w' element 2 is nan, expected a finite value",
                         numeric_error);
    CHECK_THROWS_WITH_AS((void)clip_grad_norm(params, 0.0), "clip_grad_norm: max_norm is 0, expected a finite value > 0",
                         config_error);
}

TEST_CASE("AdamW's vector update equals the plain loop's, and a non-finite gradient deep in a large tensor is found") {
    // The AVX2 kernel against the portable loop on the same state: 1,003 elements (a 3-element
    // tail), gradients over six decades and zero, moments from earlier steps. The same operations
    // in the same order; they differ at most where the compiler contracted the plain loop's
    // multiply-adds into FMAs: by a rounding of a term and of the result, a few 2^-24 of the sum
    // of the terms' magnitudes (2^-22 here).
    const std::size_t n = 1003;
    std::vector<float> value(n), grad(n), m(n), v(n);
    for (std::size_t j = 0; j < n; ++j) {
        value[j] = float(std::sin(0.01 * double(j)));
        grad[j] = j % 97 == 0 ? 0.0f : float(std::cos(0.37 * double(j)) * std::pow(10.0, double(j % 7) - 4));
        m[j] = 0.1f * grad[j] + float(1e-3 * std::sin(double(j)));
        v[j] = grad[j] * grad[j] * 0.5f + 1e-9f;
    }
    const double c2 = std::sqrt(1 - 0.999 * 0.999);
    const detail::AdamWStep u{0.9f, 0.999f, float(1e-3 * 0.01), float(1e-3 / (1 - 0.9 * 0.9)), float(1 / c2), 1e-8f};
    std::vector<float> pv = value, pm = m, pw = v;
    detail::adamw_update_portable(u, pv.data(), grad.data(), pm.data(), pw.data(), n);
    std::vector<float> fv = value, fm = m, fw = v;
    detail::adamw_update(u, fv.data(), grad.data(), fm.data(), fw.data(), n);
    MESSAGE("AdamW update on ", detail::to_string(detail::vector_kernel()));
    // Each result against the sum of its terms' magnitudes, in double from the same inputs.
    const auto within_roundings = [&](const std::vector<float>& a, const std::vector<float>& b, auto term) {
        for (std::size_t j = 0; j < a.size(); ++j)
            if (std::abs(double(a[j]) - double(b[j])) > term(j) * 0x1p-22) return false;
        return true;
    };
    CHECK(within_roundings(fm, pm, [&](std::size_t j) { return std::abs(0.9 * m[j]) + std::abs(0.1 * grad[j]); }));
    CHECK(within_roundings(fw, pw, [&](std::size_t j) { return 0.999 * v[j] + 1e-3 * grad[j] * grad[j]; }));
    CHECK(within_roundings(fv, pv, [&](std::size_t j) { return std::abs(double(value[j])) + std::abs(double(pv[j]) - value[j]); }));
    CHECK(fv != value); // it moved
    // A gradient of 13 chunks with an infinity in the 10th: named by its element, nothing moved.
    std::vector<float> big(200003, 0.5f), big_grad(200003, 0.25f);
    big_grad[150001] = -std::numeric_limits<float>::infinity();
    big_grad[170000] = std::numeric_limits<float>::quiet_NaN();
    AdamW opt({Parameter{"big", big, big_grad, 0}}, {AdamW::Group{}});
    CHECK_THROWS_WITH_AS(opt.step(), "AdamW::step: gradient of 'big' element 150001 is -inf, expected a finite value", numeric_error);
    CHECK(std::all_of(big.begin(), big.end(), [](float x) { return x == 0.5f; }));
    CHECK(all_finite(std::span<const float>(big)));
    CHECK_FALSE(all_finite(std::span<const float>(big_grad)));
}

TEST_CASE("BiasBalancer: the update rule on known loads") {
    BiasBalancer b(3, 0.01);
    RoutingPlan plan;
    Workspace ws;
    // 9 tokens, top-1 on logits that pick experts 0,0,0,0,0,1,2,2,2: loads 5, 1, 3 (mean 3).
    Matrix<float> logits(9, 3);
    const int picks[] = {0, 0, 0, 0, 0, 1, 2, 2, 2};
    for (index_t t = 0; t < 9; ++t) logits(t, picks[t]) = 1.0f;
    TopKRouter(3, TopK{1}).route(logits, {}, plan, ws);
    b.observe(plan);
    CHECK(std::vector<double>(b.load().begin(), b.load().end()) == std::vector<double>{5, 1, 3});
    std::vector<float> bias; // empty: becomes zeros first
    b.update(bias);
    CHECK(bias == std::vector<float>{-0.01f, 0.01f, 0.0f});
    CHECK(b.load()[0] == 0); // counting starts again
    b.update(bias);          // nothing counted: no change
    CHECK(bias == std::vector<float>{-0.01f, 0.01f, 0.0f});
    std::vector<float> wrong(4);
    CHECK_THROWS_WITH_AS(b.update(wrong), "BiasBalancer::update: bias has 4 elements, expected experts = 3", shape_error);
    RoutingPlan other;
    TopKRouter(4, TopK{1}).route(Matrix<float>(2, 4), {}, other, ws);
    CHECK_THROWS_WITH_AS(b.observe(other), "BiasBalancer::observe: the plan routes over 4 experts, expected 3", shape_error);
    CHECK_THROWS_WITH_AS(BiasBalancer(3, -1.0), "BiasBalancer: gamma is -1, expected a finite value >= 0", config_error);
}

TEST_CASE("auxiliary-loss-free balancing brings a skewed router's load CV down, and leaves the combine weights unbiased") {
    const index_t experts = 8, tokens = 256, steps = 300;
    TopKRouter router(experts, TopK{2}, {.weighting = {.renormalize = true}});
    BiasBalancer balancer(experts, 0.01);
    std::vector<float> bias;
    Workspace ws;
    RoutingPlan plan;
    // Logits: noise plus a fixed preference for the low-numbered experts.
    const auto logits_at = [&](index_t step) {
        Matrix<float> l = test::random_matrix(tokens, experts, std::uint32_t(1000 + step));
        for (index_t t = 0; t < tokens; ++t)
            for (index_t e = 0; e < experts; ++e) l(t, e) += 0.4f * float(experts - e);
        return l;
    };
    const auto cv = [&] { return std::sqrt(cv_squared(load(plan))); };
    router.route(logits_at(0), {}, plan, ws);
    const double before = cv();
    double after = 0;
    for (index_t step = 0; step < steps; ++step) {
        const Matrix<float> logits = logits_at(step);
        router.route(logits, {}, plan, ws);
        if (step >= steps - 20) after += cv() / 20;
        balancer.observe(plan);
        balancer.update(bias);
        router.set_selection_bias(bias);
    }
    MESSAGE("load CV: " << before << " before, " << after << " over the last 20 steps");
    CHECK(before > 1.0);
    CHECK(after < before / 4);
    // The bias selects, the unbiased scores weight: each weight is the softmax probability of
    // its expert renormalised over the selected ones.
    const Matrix<float> logits = logits_at(steps);
    router.route(logits, {}, plan, ws);
    std::vector<float> p(static_cast<std::size_t>(experts));
    for (index_t t = 0; t < 4; ++t) {
        Softmax::apply(logits.view().row(t), p);
        const auto ids = plan.ids(t);
        const auto w = plan.weights(t);
        const double sum = p[std::size_t(ids[0])] + p[std::size_t(ids[1])];
        for (std::size_t j = 0; j < 2; ++j) CHECK(w[j] == doctest::Approx(p[std::size_t(ids[j])] / sum).epsilon(1e-6));
    }
    // An MoE layer installs the bias in its router.
    auto layer = test::make_layer<reference>(TopKRouter(experts, TopK{2}));
    layer.set_selection_bias(bias);
    CHECK(layer.router().options().selection_bias == bias);
    const std::vector<float> three(3);
    CHECK_THROWS_WITH_AS(layer.set_selection_bias(three), "Router: selection bias has 3 elements, expected experts = 8", shape_error);
}
