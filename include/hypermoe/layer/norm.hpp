#pragma once
// Row normalisations: RmsNorm (Zhang & Sennrich, arXiv 1910.07467; Llama, Mixtral, Qwen2,
// OLMoE, DeepSeek; T5's LayerNorm is the same without a bias) and LayerNorm (GPT-2, BERT).
// Statistics are accumulated in double, so the result does not depend on the row length's
// rounding; outputs are float.

#include <algorithm>
#include <cmath>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/core/workspace.hpp"

namespace hypermoe {

namespace detail {

inline void check_weight_width_of(std::string_view who, index_t static_d, index_t d) {
    if (static_d != dynamic && static_d != d)
        throw shape_error(concat(who, ": weight has ", d, " elements, but the type fixes d = ", static_d));
}

/// Checks a norm's parameters: eps finite and > 0, weight (and bias) of length d, finite.
inline index_t check_norm_params(std::string_view who, index_t static_d, std::span<const float> weight,
                                 std::span<const float> bias, bool has_bias, float eps) {
    if (!(eps > 0.0f) || !is_finite(eps))
        throw config_error(concat(who, ": eps is ", eps, ", expected a finite value > 0"));
    const auto d = static_cast<index_t>(weight.size());
    check_weight_width_of(who, static_d, d);
    if (has_bias && static_cast<index_t>(bias.size()) != d)
        throw shape_error(concat(who, ": bias has ", bias.size(), " elements, expected ", d, " (the weight's)"));
    if (const index_t i = find_non_finite(weight); i >= 0)
        throw weight_error(concat(who, ": weight element ", i, " is ", weight[std::size_t(i)], ", expected a finite value"));
    if (const index_t i = find_non_finite(bias); i >= 0)
        throw weight_error(concat(who, ": bias element ", i, " is ", bias[std::size_t(i)], ", expected a finite value"));
    return d;
}

/// out += sums, element by element (a norm's parameter gradients, summed in double).
inline void add_sums(std::span<const double> sums, std::span<float> out) noexcept {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += float(sums[i]);
}

} // namespace detail

/// y = x / sqrt(mean(x^2) + eps) * weight.
template <index_t D = dynamic>
class RmsNorm {
public:
    static constexpr index_t static_in_width = D;
    static constexpr index_t static_out_width = D;

    RmsNorm(std::span<const float> weight, float eps)
        : d_(extents<D>(detail::check_norm_params("RmsNorm", D, weight, {}, false, eps))), eps_(eps),
          weight_(weight.begin(), weight.end()) {}

    [[nodiscard]] index_t in_width() const noexcept { return d_.extent(0); }
    [[nodiscard]] index_t out_width() const noexcept { return d_.extent(0); }
    [[nodiscard]] float eps() const noexcept { return eps_; }
    [[nodiscard]] std::size_t workspace_bytes(index_t /*rows*/) const noexcept { return 0; }

    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& /*ws*/, const Context& /*ctx*/ = {}) const {
        const index_t d = in_width();
        detail::check_forward_shapes(x, y, d, d, "RmsNorm");
        check_finite(x, "RmsNorm::forward: input x");
        for (index_t r = 0; r < x.rows(); ++r) {
            double ss = 0;
            for (index_t j = 0; j < d; ++j) ss += double(x(r, j)) * double(x(r, j));
            const double inv = 1.0 / std::sqrt(ss / double(d > 0 ? d : 1) + double(eps_));
            for (index_t j = 0; j < d; ++j) y(r, j) = static_cast<float>(double(x(r, j)) * inv) * weight_[std::size_t(j)];
        }
    }

    struct Gradients {
        std::vector<float> weight; ///< d
    };
    [[nodiscard]] Gradients make_gradients() const { return {std::vector<float>(std::size_t(in_width()))}; }
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t /*rows*/) const noexcept {
        return detail::padded_bytes<double>(in_width());
    }

    /// dx from dy, and dL/dweight added to g: with r = 1 / sqrt(mean(x^2) + eps) and
    /// u = weight * dy, dx = r u - r^3 x mean(u x). Sums in double; the weight gradient per
    /// column over the rows in order.
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, Gradients& g, Workspace& ws,
                  const Context& /*ctx*/ = {}) const {
        const index_t d = in_width();
        detail::check_backward_shapes(x, dy, dx, d, d, "RmsNorm");
        detail::check_gradient_shapes("RmsNorm", {{"weight", index_t(g.weight.size()), 1, d, 1}});
        check_finite(x, "RmsNorm::backward: input x");
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const std::span<double> dw = ws.take<double>(d); // the weight gradient, summed over the rows in order
        std::fill(dw.begin(), dw.end(), 0.0);
        for (index_t r = 0; r < x.rows(); ++r) {
            double ss = 0, ux = 0;
            for (index_t j = 0; j < d; ++j) {
                ss += double(x(r, j)) * double(x(r, j));
                ux += double(weight_[std::size_t(j)]) * dy(r, j) * x(r, j);
            }
            const double inv = 1.0 / std::sqrt(ss / double(d) + double(eps_)), c = inv * inv * inv * ux / double(d);
            for (index_t j = 0; j < d; ++j) {
                dx(r, j) = float(inv * weight_[std::size_t(j)] * dy(r, j) - c * x(r, j));
                dw[std::size_t(j)] += double(dy(r, j)) * double(static_cast<float>(double(x(r, j)) * inv));
            }
        }
        detail::add_sums(dw, g.weight);
    }

private:
    extents<D> d_;
    float eps_;
    std::vector<float> weight_;
};

/// y = (x - mean) / sqrt(var + eps) * weight + bias (biased variance, as PyTorch).
template <index_t D = dynamic>
class LayerNorm {
public:
    static constexpr index_t static_in_width = D;
    static constexpr index_t static_out_width = D;

    LayerNorm(std::span<const float> weight, std::span<const float> bias, float eps)
        : d_(extents<D>(detail::check_norm_params("LayerNorm", D, weight, bias, true, eps))), eps_(eps),
          weight_(weight.begin(), weight.end()), bias_(bias.begin(), bias.end()) {}

    [[nodiscard]] index_t in_width() const noexcept { return d_.extent(0); }
    [[nodiscard]] index_t out_width() const noexcept { return d_.extent(0); }
    [[nodiscard]] float eps() const noexcept { return eps_; }
    [[nodiscard]] std::size_t workspace_bytes(index_t /*rows*/) const noexcept { return 0; }

    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& /*ws*/, const Context& /*ctx*/ = {}) const {
        const index_t d = in_width();
        detail::check_forward_shapes(x, y, d, d, "LayerNorm");
        check_finite(x, "LayerNorm::forward: input x");
        for (index_t r = 0; r < x.rows(); ++r) {
            const auto [mean, inv] = row_stats(x.row(r));
            for (index_t j = 0; j < d; ++j)
                y(r, j) = static_cast<float>((x(r, j) - mean) * inv) * weight_[std::size_t(j)] + bias_[std::size_t(j)];
        }
    }

    struct Gradients {
        std::vector<float> weight; ///< d
        std::vector<float> bias;   ///< d
    };
    [[nodiscard]] Gradients make_gradients() const {
        return {std::vector<float>(std::size_t(in_width())), std::vector<float>(std::size_t(in_width()))};
    }
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t /*rows*/) const noexcept {
        return 2 * detail::padded_bytes<double>(in_width());
    }

    /// dx from dy, and dL/dweight, dL/dbias added to g: with xhat = (x - mean) r and
    /// u = weight * dy, dx = r (u - mean(u) - xhat mean(u xhat)). Sums in double; the parameter
    /// gradients per column over the rows in order.
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, Gradients& g, Workspace& ws,
                  const Context& /*ctx*/ = {}) const {
        const index_t d = in_width();
        detail::check_backward_shapes(x, dy, dx, d, d, "LayerNorm");
        detail::check_gradient_shapes("LayerNorm",
                                      {{"weight", index_t(g.weight.size()), 1, d, 1}, {"bias", index_t(g.bias.size()), 1, d, 1}});
        check_finite(x, "LayerNorm::backward: input x");
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const std::span<double> dw = ws.take<double>(d), db = ws.take<double>(d); // summed over the rows in order
        std::fill(dw.begin(), dw.end(), 0.0);
        std::fill(db.begin(), db.end(), 0.0);
        const double n = double(d);
        for (index_t r = 0; r < x.rows(); ++r) {
            const auto [mean, inv] = row_stats(x.row(r));
            double mu = 0, mux = 0;
            for (index_t j = 0; j < d; ++j) {
                const double u = double(weight_[std::size_t(j)]) * dy(r, j), xhat = (x(r, j) - mean) * inv;
                mu += u, mux += u * xhat;
            }
            mu /= n, mux /= n;
            for (index_t j = 0; j < d; ++j) {
                const double u = double(weight_[std::size_t(j)]) * dy(r, j), xhat = (x(r, j) - mean) * inv;
                dx(r, j) = float(inv * (u - mu - xhat * mux));
                dw[std::size_t(j)] += double(dy(r, j)) * double(static_cast<float>(xhat));
                db[std::size_t(j)] += dy(r, j);
            }
        }
        detail::add_sums(dw, g.weight);
        detail::add_sums(db, g.bias);
    }

private:
    /// A row's mean and 1 / sqrt(biased variance + eps), summed in double.
    [[nodiscard]] std::pair<double, double> row_stats(std::span<const float> x) const noexcept {
        const double n = double(x.empty() ? 1 : x.size());
        double sum = 0;
        for (const float v : x) sum += v;
        const double mean = sum / n;
        double ss = 0;
        for (const float v : x) ss += (v - mean) * (v - mean);
        return {mean, 1.0 / std::sqrt(ss / n + double(eps_))};
    }

    extents<D> d_;
    float eps_;
    std::vector<float> weight_;
    std::vector<float> bias_;
};

} // namespace hypermoe
