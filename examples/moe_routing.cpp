// One set of experts, several routers: each router makes a RoutingPlan for the same tokens, and
// the same MoeLayer machinery computes the output from it. Prints each router's load statistics.
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

#include <hypermoe/hypermoe.hpp>

namespace hm = hypermoe;

constexpr hm::index_t d_model = 64, d_ff = 96, experts = 8, tokens = 256;

hm::Matrix<float> random_matrix(hm::index_t rows, hm::index_t cols, unsigned seed, float scale) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-scale, scale);
    hm::Matrix<float> m(rows, cols);
    for (hm::index_t i = 0; i < rows * cols; ++i) m.data()[i] = dist(rng);
    return m;
}

std::vector<hm::GluExpert<hm::reference, hm::Silu>> make_experts() {
    std::vector<hm::GluExpert<hm::reference, hm::Silu>> out;
    for (unsigned e = 0; e < experts; ++e) {
        const auto gate = random_matrix(d_ff, d_model, 3 * e + 1, 0.1f);
        const auto up = random_matrix(d_ff, d_model, 3 * e + 2, 0.1f);
        const auto down = random_matrix(d_model, d_ff, 3 * e + 3, 0.1f);
        out.emplace_back(hm::GluWeights{.gate = hm::ConstMatrixView<float>(gate.view()),
                                        .up = hm::ConstMatrixView<float>(up.view()),
                                        .down = hm::ConstMatrixView<float>(down.view())});
    }
    return out;
}

// Any router over the same experts: the layer's type changes with the router, its kernels do not.
template <class Router>
void run(std::string_view name, Router router, const hm::Matrix<float>& gate, const hm::Matrix<float>& x,
         const hm::RouterContext& context = {}) {
    const hm::MoeLayer layer(hm::WeightView(hm::ConstMatrixView<float>(gate.view())), std::move(router), make_experts());
    hm::Matrix<float> y(x.rows(), d_model);
    hm::RoutingPlan plan;
    hm::Workspace ws;
    layer.forward(x.view(), y.view(), ws, plan, context);
    const hm::RoutingStats s = hm::routing_stats(plan);
    std::printf("%-14s %6.3f %8.2f %8lld %6lld %9.3f\n", name.data(), s.load_cv, s.max_over_mean,
                static_cast<long long>(s.dropped), static_cast<long long>(s.experts_used), s.adjacent_overlap);
}

int main() {
    const auto gate = random_matrix(experts, d_model, 100, 0.3f);
    const auto x = random_matrix(tokens, d_model, 7, 1.0f);
    std::vector<std::int32_t> token_ids(tokens);
    for (hm::index_t t = 0; t < tokens; ++t) token_ids[std::size_t(t)] = std::int32_t(t % 50);
    std::printf("%lld tokens, %lld experts, d_model %lld, d_ff %lld\n", static_cast<long long>(tokens),
                static_cast<long long>(experts), static_cast<long long>(d_model), static_cast<long long>(d_ff));
    std::printf("%-14s %6s %8s %8s %6s %9s\n", "router", "loadCV", "max/mean", "dropped", "used", "overlap");
    run("top-2", hm::TopKRouter(experts, hm::TopK{2}, {.weighting = {.renormalize = true}}), gate, x);
    run("switch C=40", hm::SwitchRouter(experts, hm::Top1Capacity{40}), gate, x, {.sequence_length = 128});
    run("expert-choice", hm::ExpertChoiceRouter(experts, hm::ExpertChoice{2.0}), gate, x);
    run("top-p 0.5", hm::TopPRouter(experts, hm::TopP{.p = 0.5, .k_max = 4}), gate, x);
    run("sinkhorn", hm::SinkhornRouter(experts, hm::SinkhornBalanced{8}), gate, x);
    run("hash", hm::HashRouter(experts, hm::HashRouting{}), gate, x, {.token_ids = token_ids});
    run("deepseek", hm::DeepSeekRouter(experts, hm::GroupLimitedTopK{.k = 2, .n_group = 4, .topk_group = 2}), gate, x);
}
