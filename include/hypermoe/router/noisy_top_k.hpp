#pragma once
// Noisy top-k gating for training (Shazeer et al., arXiv 1701.06538): H = logits + noise_std *
// N(0, 1), select the top k of H, weight them by the softmax over the k selected H values.
// The noise scale is one constant, or Shazeer's learned one (learned_scale): the router's logits
// then have 2E columns, the clean logits x W_g^T and beside them r = x W_noise^T (the layer's gate
// weight is the two stacked, (2E, d_model)), and expert e's scale is noise_std (softplus(r_e) +
// noise_floor), as the HyperMoE reference code's softplus(x w_noise) + 1e-2. The noise is a pure
// function of (seed, the call's noise seed, the token's position in its sequence, expert): splitmix64 counters
// through Box-Muller, so runs are reproducible, independent of threading, and a sequence gets
// the same noise however it is batched or cut into calls (Context::position). Shazeer's smooth
// load estimator, the load loss's differentiable stand-in for the counts, is smooth_load in
// router/losses.hpp.

#include <cmath>
#include <span>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/router/hash_routing.hpp"
#include "hypermoe/router/selection.hpp"

namespace hypermoe {

struct NoisyTopK {
    static constexpr std::string_view name = "noisy_top_k";
    static constexpr bool fixed_selection = true;
    /// The weights are a softmax over the selected H, H - score a constant: ScoredRouter::backward.
    static constexpr bool weights_are_selected_softmax = true;
    index_t k = 2;
    /// The noise scale; with learned_scale, the factor of softplus(r) + noise_floor.
    float noise_std = 1.0f;
    std::uint64_t seed = 0;
    /// Shazeer's learned scale: the logits carry E noise logits r after the E clean ones.
    bool learned_scale = false;
    /// Added to softplus(r) (learned_scale only), so the scale stays above noise_std noise_floor.
    float noise_floor = 1e-2f;

    /// Logit columns read beside the experts' E: the noise logits with learned_scale.
    [[nodiscard]] index_t extra_logit_columns(index_t experts) const noexcept { return learned_scale ? experts : 0; }

    [[nodiscard]] index_t slots(index_t /*experts*/) const noexcept { return k; }
    [[nodiscard]] std::size_t workspace_bytes(index_t tokens, index_t experts) const noexcept {
        return detail::padded_bytes<float>(tokens, experts);
    }
    void validate(index_t experts) const {
        if (k < 1 || k > experts)
            throw config_error(detail::concat("NoisyTopK: k is ", k, ", expected 1 <= k <= experts = ", experts));
        if (!(noise_std >= 0) || !is_finite(noise_std))
            throw config_error(detail::concat("NoisyTopK: noise_std is ", noise_std, ", expected a finite value >= 0"));
        if (!(noise_floor >= 0) || !is_finite(noise_floor))
            throw config_error(detail::concat("NoisyTopK: noise_floor is ", noise_floor, ", expected a finite value >= 0"));
    }
    /// Expert e's noise scale for a token whose logits (E, or 2E with learned_scale) are `row`:
    /// noise_std, or noise_std (softplus(r_e) + noise_floor) with r_e = row[E + e].
    [[nodiscard]] float scale(std::span<const float> row, index_t experts, index_t e) const noexcept {
        if (!learned_scale) return noise_std;
        const double r = row[std::size_t(experts + e)];
        const double softplus = r > 0 ? r + std::log1p(std::exp(-r)) : std::log1p(std::exp(r));
        return float(double(noise_std) * (softplus + double(noise_floor)));
    }
    /// d scale / d r_e: noise_std sigmoid(r_e) with learned_scale, else 0.
    [[nodiscard]] double scale_derivative(std::span<const float> row, index_t experts, index_t e) const noexcept {
        if (!learned_scale) return 0.0;
        const double r = row[std::size_t(experts + e)];
        return double(noise_std) / (1.0 + std::exp(-r));
    }
    /// The standard normal sample for (position in the sequence, expert), under the call's
    /// noise seed (Context::noise_seed; 0 = none).
    [[nodiscard]] float noise(index_t position, index_t expert, std::uint64_t call_seed = 0) const noexcept {
        const std::uint64_t s = call_seed == 0 ? seed : seed ^ detail::splitmix64(call_seed ^ 0x6E6F697365ull);
        const std::uint64_t a = detail::splitmix64(s ^ detail::splitmix64(std::uint64_t(position) * 0x10001ull + std::uint64_t(expert)));
        const std::uint64_t b = detail::splitmix64(a);
        const double u1 = (double(a >> 11) + 0.5) * 0x1.0p-53, u2 = double(b >> 11) * 0x1.0p-53;
        return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
    /// Token t's noise sample for `expert` in a call with `context`: noise() at the token's
    /// position under the call's noise seed, or 0 when the context turns router noise off.
    [[nodiscard]] float sample(const RouterContext& context, index_t t, index_t expert) const noexcept {
        return context.router_noise ? noise(context.position(t), expert, context.noise_seed) : 0.0f;
    }
    /// The value selection ranks: a selection score plus the noise scale (scale()) times the
    /// token's noise sample (sample()); smooth_load_loss recomputes it the same way.
    [[nodiscard]] static float noisy_value(float selection_score, float scale, float sample) noexcept {
        return selection_score + scale * sample;
    }
    void select(const SelectionInput& in, RoutingPlan& plan, Workspace& ws) const {
        const index_t tokens = in.scores.rows(), e = in.scores.cols();
        Workspace::Scope scope(ws, workspace_bytes(tokens, e));
        const auto h = ws.take<float>(tokens * e);
        // Tokens are independent: in parallel, each writing only its own row of h and plan.
        detail::parallel_for(tokens, tokens * e * (k + 8), [&](index_t t) {
            for (index_t x = 0; x < e; ++x)
                h[std::size_t(t * e + x)] =
                    noisy_value(in.selection_scores(t, x), scale(in.logits.row(t), e, x), sample(in.context, t, x));
            const auto ids = plan.ids(t);
            const auto w = plan.weights(t);
            const float* row = h.data() + t * e;
            detail::ordered_top_k(
                e, k, [&](index_t i) { return row[i]; }, detail::all_allowed,
                [&](index_t j, index_t i) { ids[std::size_t(j)] = std::int32_t(i); });
            double sum = 0;
            const float top = row[ids[0]];
            for (index_t j = 0; j < k; ++j) sum += std::exp(double(row[ids[std::size_t(j)]]) - top);
            for (index_t j = 0; j < k; ++j) w[std::size_t(j)] = float(std::exp(double(row[ids[std::size_t(j)]]) - top) / sum);
        });
    }
};

} // namespace hypermoe
