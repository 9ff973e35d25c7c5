// A small HyperMoE stack: two pre-norm HyperMoE blocks with their own experts, router,
// expert embeddings and projectors, and ONE hypernetwork shared by both (held by shared_ptr).
// Runs the stack with cached HyperExperts, checks it against per-token generation, and prints
// the routing statistics and cache use of each block.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include <hypermoe/hypermoe.hpp>

namespace hm = hypermoe;
using B = hm::reference;

constexpr hm::index_t d_model = 32, d_ff = 64, experts = 6, top_k = 2, rank = 8, layers = 2, tokens = 48;

hm::Matrix<float> random_matrix(hm::index_t rows, hm::index_t cols, unsigned seed, float scale) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-scale, scale);
    hm::Matrix<float> m(rows, cols);
    for (hm::index_t i = 0; i < rows * cols; ++i) m.data()[i] = dist(rng);
    return m;
}
std::vector<float> random_vector(hm::index_t n, unsigned seed, float scale) {
    const auto m = random_matrix(1, n, seed, scale);
    return {m.data(), m.data() + n};
}
hm::WeightView view(const hm::Matrix<float>& m) { return hm::ConstMatrixView<float>(m.view()); }

using Expert = hm::FfnExpert<B, hm::GeluTanh, d_model>;
using Block = hm::HyperMoeLayer<Expert, hm::TopKRouter>;

// One hypernetwork for the whole stack: d_e = p = q = h = 16, d_l = 4, rank 8.
std::shared_ptr<const hm::Hypernetwork<B>> make_hypernetwork() {
    const auto le = random_matrix(layers, 4, 1, 1.0f), trunk = random_matrix(16, 16 + 4, 2, 0.3f),
               dw = random_matrix(d_model * rank, 16, 3, 0.2f), uw = random_matrix(rank * d_model, 16, 4, 0.2f),
               db = random_matrix(rank, 16, 5, 0.2f), ub = random_matrix(d_model, 16, 6, 0.2f);
    const auto tb = random_vector(16, 7, 0.1f), dwb = random_vector(d_model * rank, 8, 0.05f),
               uwb = random_vector(rank * d_model, 9, 0.05f), dbb = random_vector(rank, 10, 0.05f),
               ubb = random_vector(d_model, 11, 0.05f);
    return std::make_shared<const hm::Hypernetwork<B>>(hm::HypernetworkWeights{
        view(le), view(trunk), tb, view(dw), dwb, view(uw), uwb, view(db), dbb, view(ub), ubb});
}

// Block l: its own experts, router, embedding and projector; the shared hypernetwork.
Block make_block(hm::index_t l, std::shared_ptr<const hm::Hypernetwork<B>> hyper, hm::HyperMode mode) {
    const unsigned s = 100 * unsigned(l + 1);
    std::vector<Expert> ex;
    for (unsigned e = 0; e < experts; ++e) {
        const auto up = random_matrix(d_ff, d_model, s + 2 * e, 0.2f), down = random_matrix(d_model, d_ff, s + 2 * e + 1, 0.2f);
        ex.emplace_back(hm::FfnWeights{.up = view(up), .down = view(down)});
    }
    const auto gate = random_matrix(experts, d_model, s + 50, 0.5f), emb = random_matrix(experts, 16, s + 51, 1.0f),
               w0 = random_matrix(16, 16, s + 52, 0.3f), w2 = random_matrix(16, 16, s + 53, 0.3f);
    const auto b0 = random_vector(16, s + 54, 0.1f), b2 = random_vector(16, s + 55, 0.1f);
    return Block(hm::MoeLayer(view(gate), hm::TopKRouter(experts, hm::TopK{top_k}, {.weighting = {.renormalize = true}}), ex),
                 l, hm::ExpertEmbedding(view(emb)), hm::Projector<B>(hm::ProjectorWeights{view(w0), b0, view(w2), b2}),
                 std::move(hyper), {.mode = mode});
}

auto make_stack(hm::HyperMode mode) {
    const auto hyper = make_hypernetwork();
    const std::vector<float> norm(d_model, 1.0f);
    return hm::Sequential(hm::Residual(hm::Sequential(hm::RmsNorm<d_model>(norm, 1e-6f), make_block(0, hyper, mode))),
                          hm::Residual(hm::Sequential(hm::RmsNorm<d_model>(norm, 1e-6f), make_block(1, hyper, mode))));
}

int main() {
    const auto cached = make_stack(hm::HyperMode::cached);
    const auto per_token = make_stack(hm::HyperMode::per_token);
    const auto x = random_matrix(tokens, d_model, 7, 1.0f);
    hm::Matrix<float> y(tokens, d_model), y_ref(tokens, d_model);
    hm::Workspace ws;
    const auto t0 = std::chrono::steady_clock::now();
    cached.forward(x.view(), y.view(), ws);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    per_token.forward(x.view(), y_ref.view(), ws);
    double diff = 0, scale = 0;
    for (hm::index_t i = 0; i < tokens * d_model; ++i) {
        diff = std::fmax(diff, std::fabs(double(y.data()[i]) - y_ref.data()[i]));
        scale = std::fmax(scale, std::fabs(double(y_ref.data()[i])));
    }
    std::printf("HyperMoE stack: %lld blocks, d_model %lld, %lld experts (top-%lld), adapter rank %lld, %lld tokens\n",
                static_cast<long long>(layers), static_cast<long long>(d_model), static_cast<long long>(experts),
                static_cast<long long>(top_k), static_cast<long long>(rank), static_cast<long long>(tokens));
    std::printf("forward (cached HyperExperts, cold): %.3f ms; max rel diff vs per-token generation: %.2e\n", ms, diff / scale);
    const auto report = [&](const Block& b) {
        hm::RoutingPlan plan;
        hm::Matrix<float> out(tokens, d_model);
        b.moe().forward(x.view(), out.view(), ws, plan);
        const auto s = hm::routing_stats(plan);
        std::printf("block %lld (its router on the stack input): load CV %.3f, max/mean %.2f; cache: %lld of %lld patterns, %llu hits / %llu misses\n",
                    static_cast<long long>(b.layer_index()), s.load_cv, s.max_over_mean,
                    static_cast<long long>(b.cache().size()), static_cast<long long>(b.cache().patterns()),
                    static_cast<unsigned long long>(b.cache().hits()), static_cast<unsigned long long>(b.cache().misses()));
    };
    report(cached.layer<0>().inner().layer<1>());
    report(cached.layer<1>().inner().layer<1>());
    std::printf("both blocks share one hypernetwork: %s\n",
                &cached.layer<0>().inner().layer<1>().hypernetwork() == &cached.layer<1>().inner().layer<1>().hypernetwork()
                    ? "yes" : "no");
    return diff / scale < 1e-5 ? 0 : 1;
}
