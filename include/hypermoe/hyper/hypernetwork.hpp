#pragma once
// Hypernetwork: ONE per stack, shared by all its HyperMoE layers (held by shared_ptr, never
// copied per layer). From a layer's projected selection embedding z (q) it generates that
// layer's HyperExpert, a bottleneck adapter of rank r on d_model = d:
//
//   u  = [z ; layer_embed[l]]                                   (q + d_l)
//   g  = relu(trunk u + c)                                       (h)
//   D  = reshape(down_weight g + a_D, d x r)   row-major, used as x D
//   U  = reshape(up_weight g + a_U,   r x d)   row-major, used as a U
//   bD = down_bias g + b_D (r),  bU = up_bias g + b_U (d)
//   H(x) = relu(x D + bD) U + bU
//
// (HyperMoE, arXiv 2402.12656, as released: `param_gen`.) The hypernetwork never sees x, so H
// depends on a token only through its layer and selected set: HyperExpertCache exploits that.
//
// Generation runs on the row-wise linear map (backend/rowwise.hpp) whatever the backend B: a
// pattern's adapter is then the same bits whether it was generated alone, with 63 others in
// precompute(), or once per token in per-token mode, so the cache is exact to the last bit. It
// runs once per pattern, off the hot path. B remains the type's parameter so that a stack's
// parts keep one backend in their types.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/rowwise.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

struct HypernetworkWeights {
    WeightView layer_embed;               ///< (layers, d_l)
    WeightView trunk;                     ///< (h, q + d_l)
    std::span<const float> trunk_bias;    ///< h
    WeightView down_weight;               ///< (d r, h)
    std::span<const float> down_weight_bias;
    WeightView up_weight;                 ///< (r d, h)
    std::span<const float> up_weight_bias;
    WeightView down_bias;                 ///< (r, h)
    std::span<const float> down_bias_bias;
    WeightView up_bias;                   ///< (d, h)
    std::span<const float> up_bias_bias;
};

/// The generated adapter weights of n selections, as views into caller memory.
struct GeneratedAdapters {
    MatrixView<float> down; ///< (n, d r): row i is D_i, row-major (d, r)
    MatrixView<float> up;   ///< (n, r d): row i is U_i, row-major (r, d)
    MatrixView<float> down_bias; ///< (n, r)
    MatrixView<float> up_bias;   ///< (n, d)
};

/// Gradients of a Hypernetwork's parameters, zeroed at creation (Hypernetwork::make_gradients);
/// backward adds to them. One set serves every layer that shares the hypernetwork, as the
/// reference code's single `param_gen` collects gradient from every block.
struct HypernetworkGradients {
    Matrix<float> layer_embed; ///< (layers, d_l): only the rows of the layers run get gradient
    Matrix<float> trunk;       ///< (h, q + d_l)
    std::vector<float> trunk_bias;
    Matrix<float> down_weight; ///< (d r, h)
    std::vector<float> down_weight_bias;
    Matrix<float> up_weight;   ///< (r d, h)
    std::vector<float> up_weight_bias;
    Matrix<float> down_bias;   ///< (r, h)
    std::vector<float> down_bias_bias;
    Matrix<float> up_bias;     ///< (d, h)
    std::vector<float> up_bias_bias;
};

/// One HypernetworkGradients per hypernetwork: a stack makes its layers' gradients through one
/// pool (Sequential::make_gradients, DynamicStack::make_gradients), so the HyperMoE layers that
/// share a hypernetwork share its gradients, as they share its weights.
class HypernetworkGradientPool {
public:
    /// The set for `hypernetwork`, made by `make()` the first time it is asked for.
    template <class Make>
    std::shared_ptr<HypernetworkGradients> get(const void* hypernetwork, Make&& make) {
        for (const auto& [key, value] : sets_)
            if (key == hypernetwork) return value;
        sets_.emplace_back(hypernetwork, std::make_shared<HypernetworkGradients>(make()));
        return sets_.back().second;
    }
    [[nodiscard]] std::size_t size() const noexcept { return sets_.size(); }

private:
    std::vector<std::pair<const void*, std::shared_ptr<HypernetworkGradients>>> sets_;
};

template <Backend B>
class Hypernetwork {
public:
    /// d_model and rank r are read off the bias heads: up_bias has d rows, down_bias has r.
    explicit Hypernetwork(const HypernetworkWeights& w) : parts_(build(w)) {}

    /// Replaces every weight; caches built on this hypernetwork see the new version() and
    /// regenerate. Not to run concurrently with a forward call that uses this hypernetwork.
    void set_weights(const HypernetworkWeights& w) {
        parts_ = build(w);
        version_.fetch_add(1, std::memory_order_release);
    }

    [[nodiscard]] std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }
    [[nodiscard]] index_t layers() const noexcept { return parts_.layers; }
    [[nodiscard]] index_t layer_dim() const noexcept { return parts_.dl; }
    [[nodiscard]] index_t input_dim() const noexcept { return parts_.q; }
    [[nodiscard]] index_t hidden_dim() const noexcept { return parts_.trunk.out_features(); }
    [[nodiscard]] index_t d_model() const noexcept { return parts_.d; }
    [[nodiscard]] index_t rank() const noexcept { return parts_.r; }

    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        const Parts& p = parts_;
        return detail::padded_bytes<float>(rows, p.q + p.dl) + detail::padded_bytes<float>(rows, hidden_dim()) +
               std::max({p.trunk.workspace_bytes(rows), p.down_weight.workspace_bytes(rows),
                         p.up_weight.workspace_bytes(rows), p.down_bias.workspace_bytes(rows),
                         p.up_bias.workspace_bytes(rows)});
    }

    /// Adapters for n selections of layer `layer` from their projected embeddings z (n, q).
    void generate(index_t layer, ConstMatrixView<float> z, const GeneratedAdapters& out, Workspace& ws) const {
        const Parts& p = parts_;
        check_input(layer, z, "generate");
        const index_t n = z.rows();
        Workspace::Scope scope(ws, workspace_bytes(n));
        const auto [u, g] = trunk_forward(layer, z, ws);
        p.down_weight(g, out.down, ws);
        p.up_weight(g, out.up, ws);
        p.down_bias(g, out.down_bias, ws);
        p.up_bias(g, out.up_bias, ws);
    }

    /// Zeroed gradients shaped like the parameters (biases sized as the weights have them).
    [[nodiscard]] HypernetworkGradients make_gradients() const {
        const Parts& p = parts_;
        using detail::bias_gradient, detail::weight_gradient;
        return {Matrix<float>(p.layers, p.dl), weight_gradient(p.trunk),       bias_gradient(p.trunk),
                weight_gradient(p.down_weight), bias_gradient(p.down_weight),  weight_gradient(p.up_weight),
                bias_gradient(p.up_weight),     weight_gradient(p.down_bias),  bias_gradient(p.down_bias),
                weight_gradient(p.up_bias),     bias_gradient(p.up_bias)};
    }

    /// Scratch of backward() for n selections.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t n) const {
        const Parts& p = parts_;
        return 2 * detail::padded_bytes<float>(n, p.q + p.dl) + 2 * detail::padded_bytes<float>(n, hidden_dim()) +
               std::max({p.trunk.workspace_bytes(n), p.trunk.backward_workspace_bytes(n), p.down_weight.backward_workspace_bytes(n),
                         p.up_weight.backward_workspace_bytes(n), p.down_bias.backward_workspace_bytes(n),
                         p.up_bias.backward_workspace_bytes(n)});
    }

    /// The backward of generate(layer, z, out, ws): from `dout`, the gradients of the four
    /// generated heads (shaped as generate's `out`), dz = dL/dz (n, q), and the parameter
    /// gradients added to `g` (layer_embed's row `layer` only). The trunk's input and output
    /// are recomputed from z. Sums run in a fixed order (the row-wise map's backward), so the
    /// result does not depend on the thread count.
    void backward(index_t layer, ConstMatrixView<float> z, const GeneratedAdapters& dout, MatrixView<float> dz,
                  HypernetworkGradients& g, Workspace& ws) const {
        const Parts& p = parts_;
        check_input(layer, z, "backward");
        const index_t n = z.rows(), h = hidden_dim();
        if (dz.rows() != n || dz.cols() != p.q)
            throw shape_error(detail::concat("Hypernetwork::backward: dz has shape ", detail::shape_str(dz.rows(), dz.cols()),
                                             ", expected ", detail::shape_str(n, p.q)));
        check_gradients(g);
        Workspace::Scope scope(ws, backward_workspace_bytes(n));
        const auto trunk = trunk_forward(layer, z, ws); // (no structured binding: the lambda below captures it)
        const MatrixView<float> u = trunk.first, hidden = trunk.second;
        MatrixView<float> dhidden = ws.take_matrix<float>(n, h); // (n, h): the four heads' input gradients summed
        MatrixView<float> du = ws.take_matrix<float>(n, p.q + p.dl);
        const auto head = [&](const detail::RowwiseLinear<Identity>& lin, MatrixView<float> dhead, Matrix<float>& dw,
                              std::vector<float>& db, bool accumulate) {
            lin.backward(hidden, dhead, dhidden, LinearGrads{dw.view(), db}, ws, accumulate);
        };
        head(p.down_weight, dout.down, g.down_weight, g.down_weight_bias, false);
        head(p.up_weight, dout.up, g.up_weight, g.up_weight_bias, true);
        head(p.down_bias, dout.down_bias, g.down_bias, g.down_bias_bias, true);
        head(p.up_bias, dout.up_bias, g.up_bias, g.up_bias_bias, true);
        p.trunk.backward(u, dhidden, du, LinearGrads{g.trunk.view(), g.trunk_bias}, ws);
        for (index_t i = 0; i < n; ++i)
            for (index_t c = 0; c < p.q; ++c) dz(i, c) = du(i, c);
        for (index_t c = 0; c < p.dl; ++c) {
            double sum = 0;
            for (index_t i = 0; i < n; ++i) sum += du(i, p.q + c);
            g.layer_embed(layer, c) += float(sum);
        }
    }

private:
    void check_input(index_t layer, ConstMatrixView<float> z, const char* call) const {
        if (layer < 0 || layer >= parts_.layers)
            throw config_error(detail::concat("Hypernetwork: layer index is ", layer, ", expected 0 <= layer < ", parts_.layers,
                                              " (rows of layer_embed)"));
        if (z.cols() != parts_.q)
            throw shape_error(detail::concat("Hypernetwork::", call, ": z has ", z.cols(), " columns, expected q = ", parts_.q));
    }

    void check_gradients(const HypernetworkGradients& g) const {
        const Parts& p = parts_;
        using detail::bias_gradient_shape, detail::weight_gradient_shape;
        detail::check_gradient_shapes(
            "Hypernetwork", {{"layer_embed", g.layer_embed.rows(), g.layer_embed.cols(), p.layers, p.dl},
                             weight_gradient_shape("trunk", g.trunk, p.trunk), bias_gradient_shape("trunk_bias", g.trunk_bias, p.trunk),
                             weight_gradient_shape("down_weight", g.down_weight, p.down_weight),
                             bias_gradient_shape("down_weight_bias", g.down_weight_bias, p.down_weight),
                             weight_gradient_shape("up_weight", g.up_weight, p.up_weight), bias_gradient_shape("up_weight_bias", g.up_weight_bias, p.up_weight),
                             weight_gradient_shape("down_bias", g.down_bias, p.down_bias), bias_gradient_shape("down_bias_bias", g.down_bias_bias, p.down_bias),
                             weight_gradient_shape("up_bias", g.up_bias, p.up_bias), bias_gradient_shape("up_bias_bias", g.up_bias_bias, p.up_bias)});
    }

    /// u = [z ; layer_embed[layer]] (n, q + d_l) and the trunk's output relu(trunk u + c)
    /// (n, h), both taken from `ws`.
    std::pair<MatrixView<float>, MatrixView<float>> trunk_forward(index_t layer, ConstMatrixView<float> z, Workspace& ws) const {
        const Parts& p = parts_;
        const index_t n = z.rows();
        MatrixView<float> u = ws.take_matrix<float>(n, p.q + p.dl);
        for (index_t i = 0; i < n; ++i) {
            for (index_t c = 0; c < p.q; ++c) u(i, c) = z(i, c);
            for (index_t c = 0; c < p.dl; ++c) u(i, p.q + c) = p.layer_embed[std::size_t(layer * p.dl + c)];
        }
        MatrixView<float> g = ws.take_matrix<float>(n, hidden_dim());
        p.trunk(u, g, ws);
        return {u, g};
    }

    struct Parts {
        index_t layers, dl, q, d, r;
        std::vector<float> layer_embed;
        detail::RowwiseLinear<Relu> trunk;
        detail::RowwiseLinear<Identity> down_weight, up_weight, down_bias, up_bias;
    };

    static Parts build(const HypernetworkWeights& w) {
        const index_t layers = w.layer_embed.rows(), dl = w.layer_embed.cols(), h = w.trunk.rows();
        const index_t q = w.trunk.cols() - dl, d = w.up_bias.rows(), r = w.down_bias.rows();
        if (layers < 1 || q < 1 || h < 1 || d < 1 || r < 1)
            throw weight_error(detail::concat("Hypernetwork: layers = ", layers, ", q = ", q, ", h = ", h, ", d = ", d,
                                              ", r = ", r, " from the weights, expected all >= 1"));
        detail::check_weight_shape(w.down_weight, d * r, h, "Hypernetwork", "down_weight");
        detail::check_weight_shape(w.up_weight, r * d, h, "Hypernetwork", "up_weight");
        detail::check_weight_shape(w.down_bias, r, h, "Hypernetwork", "down_bias");
        detail::check_weight_shape(w.up_bias, d, h, "Hypernetwork", "up_bias");
        std::vector<float> emb(std::size_t(layers * dl));
        for (index_t l = 0; l < layers; ++l)
            for (index_t c = 0; c < dl; ++c) emb[std::size_t(l * dl + c)] = w.layer_embed.at(l, c);
        if (const index_t i = find_non_finite(emb); i >= 0)
            throw weight_error(detail::concat("Hypernetwork: layer_embed element ", i, " is ", emb[std::size_t(i)],
                                              ", expected a finite value"));
        return Parts{layers, dl, q, d, r, std::move(emb),
                     {w.trunk, w.trunk_bias, {"Hypernetwork weight 'trunk'"}},
                     {w.down_weight, w.down_weight_bias, {"Hypernetwork weight 'down_weight'"}},
                     {w.up_weight, w.up_weight_bias, {"Hypernetwork weight 'up_weight'"}},
                     {w.down_bias, w.down_bias_bias, {"Hypernetwork weight 'down_bias'"}},
                     {w.up_bias, w.up_bias_bias, {"Hypernetwork weight 'up_bias'"}}};
    }

    Parts parts_;
    std::atomic<std::uint64_t> version_{0};
};

} // namespace hypermoe
