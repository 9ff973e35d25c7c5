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

#include <atomic>
#include <cstdint>
#include <span>
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
        if (layer < 0 || layer >= p.layers)
            throw config_error(detail::concat("Hypernetwork: layer index is ", layer, ", expected 0 <= layer < ", p.layers,
                                              " (rows of layer_embed)"));
        if (z.cols() != p.q)
            throw shape_error(detail::concat("Hypernetwork::generate: z has ", z.cols(), " columns, expected q = ", p.q));
        const index_t n = z.rows();
        Workspace::Scope scope(ws, workspace_bytes(n));
        MatrixView<float> u = ws.take_matrix<float>(n, p.q + p.dl); // (n, q + d_l) = [z ; layer_embed[l]]
        for (index_t i = 0; i < n; ++i) {
            for (index_t c = 0; c < p.q; ++c) u(i, c) = z(i, c);
            for (index_t c = 0; c < p.dl; ++c) u(i, p.q + c) = p.layer_embed[std::size_t(layer * p.dl + c)];
        }
        MatrixView<float> g = ws.take_matrix<float>(n, hidden_dim()); // (n, h)
        p.trunk(u, g, ws);
        p.down_weight(g, out.down, ws);
        p.up_weight(g, out.up, ws);
        p.down_bias(g, out.down_bias, ws);
        p.up_bias(g, out.up_bias, ws);
    }

private:
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
