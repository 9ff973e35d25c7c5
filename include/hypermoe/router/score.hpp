#pragma once
// Score functions: map a token's router logits (E) to scores (E). Computed in double and
// stored as float; softmax subtracts the maximum first, so large logits do not overflow.

#include <cmath>
#include <span>
#include <string_view>

namespace hypermoe {

/// p = softmax(logits) over all experts.
struct Softmax {
    static constexpr std::string_view name = "softmax";
    static void apply(std::span<const float> logits, std::span<float> scores) noexcept {
        float m = logits[0];
        for (const float l : logits) m = l > m ? l : m;
        double sum = 0;
        for (std::size_t e = 0; e < logits.size(); ++e) sum += std::exp(double(logits[e]) - m);
        for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = float(std::exp(double(logits[e]) - m) / sum);
    }
    /// dlogits = p * (ds - sum(p * ds)), from the scores p.
    static void backward(std::span<const float> scores, std::span<const double> dscores, std::span<double> dlogits) noexcept {
        double inner = 0;
        for (std::size_t e = 0; e < scores.size(); ++e) inner += double(scores[e]) * dscores[e];
        for (std::size_t e = 0; e < scores.size(); ++e) dlogits[e] = double(scores[e]) * (dscores[e] - inner);
    }
};

/// s = sigmoid(logits), element-wise (DeepSeek-V3).
struct Sigmoid {
    static constexpr std::string_view name = "sigmoid";
    static void apply(std::span<const float> logits, std::span<float> scores) noexcept {
        for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = float(1.0 / (1.0 + std::exp(-double(logits[e]))));
    }
    /// dlogits = s (1 - s) ds, from the scores s.
    static void backward(std::span<const float> scores, std::span<const double> dscores, std::span<double> dlogits) noexcept {
        for (std::size_t e = 0; e < scores.size(); ++e) dlogits[e] = double(scores[e]) * (1.0 - double(scores[e])) * dscores[e];
    }
};

/// The raw logits as scores (e.g. for noisy top-k, which applies softmax after selection).
struct RawLogits {
    static constexpr std::string_view name = "logits";
    static void apply(std::span<const float> logits, std::span<float> scores) noexcept {
        for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = logits[e];
    }
    static void backward(std::span<const float> /*scores*/, std::span<const double> dscores, std::span<double> dlogits) noexcept {
        for (std::size_t e = 0; e < dscores.size(); ++e) dlogits[e] = dscores[e];
    }
};

/// A score function: `apply` maps a token's logits to scores; `backward` maps the gradient of
/// the scores (given the scores) to the gradient of the logits.
template <class S>
concept ScoreFunction = requires(std::span<const float> l, std::span<float> s, std::span<const double> ds, std::span<double> dl) {
    { S::name } -> std::convertible_to<std::string_view>;
    S::apply(l, s);
    S::backward(l, ds, dl);
};

} // namespace hypermoe
