#pragma once
// The checkpoint names of a loaded block's parameters, recorded by the family's load() as it
// binds each tensor (io/family/family_support.hpp: bind_matrix, bind_vector, glu_weights), so
// the names a block was read from and the names its gradients are written under come from one
// place. named_gradients() turns a block's gradients into `d/<name>` tensors in the fixtures'
// layout (tests/data/README.md, "Backward"): F32, the checkpoint's shape (GPT-2's Conv1D
// weights, stored [in, out], are transposed back).

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/detail/format.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// A tensor's checkpoint name, and whether the checkpoint stores it transposed; an empty name
/// = the block has no such tensor. With `experts` > 0 the name is a fused tensor holding every
/// expert's (gpt-oss's experts.gate_up_proj): this role is expert `expert`'s slice of it, its
/// outputs every `pieces`-th from `piece` (gate and up interleaved: pieces = 2); the tensor is
/// [experts, K, pieces x N] for an (N, K) matrix (stored transposed: y = x W) and
/// [experts, pieces x N] for an N-vector.
struct TensorName {
    std::string name;
    bool transposed = false;
    index_t experts = 0, expert = 0, pieces = 1, piece = 0;
    [[nodiscard]] bool empty() const noexcept { return name.empty(); }
    [[nodiscard]] bool fused() const noexcept { return experts > 0; }
};

/// One expert's tensors: gate (GLU experts only), up, down and the biases (where present).
struct ExpertTensorNames {
    TensorName gate, up, down, gate_bias, up_bias, down_bias;
};

/// Every tensor a block's forward reads, by role.
struct BlockParameterNames {
    TensorName router;
    TensorName router_bias;    ///< the router logits' bias (gpt-oss)
    TensorName router_noise;   ///< the noise weight below the router's in the gate (LoadOptions::noisy_gating)
    TensorName selection_bias; ///< a router's selection-only bias (DeepSeek-V3): no gradient, not a trained parameter
    std::vector<ExpertTensorNames> experts;
    std::optional<ExpertTensorNames> shared; ///< the shared expert(s), merged as the block runs them
    TensorName shared_gate;
    // HyperMoE: the block's own parts and its stack's hypernetwork.
    TensorName embedding, projector_first, projector_first_bias, projector_second, projector_second_bias;
    TensorName layer_embed, trunk, trunk_bias, down_weight, down_weight_bias, up_weight, up_weight_bias, down_bias, down_bias_bias,
        up_bias, up_bias_bias;
};

namespace detail {

/// The checkpoint shape of the tensor named by n, from the gradient m of its role (in the
/// block's layout: (N, K), or one row for a vector).
[[nodiscard]] inline std::vector<index_t> gradient_shape(const TensorName& n, ConstMatrixView<float> m, bool vector) {
    if (n.fused()) return vector ? std::vector<index_t>{n.experts, n.pieces * m.cols()} : std::vector<index_t>{n.experts, m.cols(), n.pieces * m.rows()};
    if (vector) return {m.cols()};
    return n.transposed ? std::vector<index_t>{m.cols(), m.rows()} : std::vector<index_t>{m.rows(), m.cols()};
}

/// Adds the gradient m of n's role (the block's layout) into `dst`, the elements of n's whole
/// tensor in the checkpoint's layout (gradient_shape): transposed back, or into the fused
/// tensor's slice, where n says so.
inline void add_gradient(const TensorName& n, ConstMatrixView<float> m, bool vector, std::span<float> dst) {
    float* const out = dst.data();
    const index_t rows = m.rows(), cols = m.cols();
    detail::parallel_for(rows, rows * cols, [&](index_t r) {
        const float* row = m.row(r).data();
        if (n.fused() && vector) {
            for (index_t c = 0; c < cols; ++c) out[(n.expert * cols + c) * n.pieces + n.piece] += row[c];
        } else if (n.fused()) { // [experts, K = cols, pieces x N]: output r of this piece is column r pieces + piece
            for (index_t c = 0; c < cols; ++c) out[(n.expert * cols + c) * n.pieces * rows + r * n.pieces + n.piece] += row[c];
        } else if (n.transposed) {
            for (index_t c = 0; c < cols; ++c) out[c * rows + r] += row[c];
        } else {
            for (index_t c = 0; c < cols; ++c) out[r * cols + c] += row[c];
        }
    });
}

/// A vector as a one-row matrix view.
[[nodiscard]] inline ConstMatrixView<float> as_row(const std::vector<float>& v) {
    return {v.data(), v.empty() ? 0 : 1, index_t(v.size())};
}

/// An expert's gradients (GluGradients or FfnGradients) to fn under their names.
template <class G, class Fn>
void visit_expert_gradients(const ExpertTensorNames& n, const G& g, Fn& fn) {
    if constexpr (requires { g.gate_up; }) {
        fn(n.gate, g.gate(), false);
        fn(n.up, g.up(), false);
        // [gate bias | up bias], as the fused gate|up map holds them
        const index_t half = index_t(g.gate_up_bias.size() / 2);
        const ConstMatrixView<float> both = as_row(g.gate_up_bias);
        if (half > 0) fn(n.gate_bias, both.col_block(0, half), true), fn(n.up_bias, both.col_block(half, half), true);
    } else {
        fn(n.up, g.up.view(), false);
        fn(n.up_bias, as_row(g.up_bias), true);
    }
    fn(n.down, g.down.view(), false);
    fn(n.down_bias, as_row(g.down_bias), true);
}

} // namespace detail

/// Every tensor name recorded in `names` (each once, in role order): the tensors a block's
/// backward gives gradients for, which a trainer updates; with with_hyper = false, a HyperMoE
/// block's MoE part only (router, experts, shared expert).
[[nodiscard]] inline std::vector<std::string> parameter_tensor_names(const BlockParameterNames& names, bool with_hyper = true) {
    std::vector<std::string> out;
    const auto add = [&](const TensorName& n) {
        if (!n.empty() && std::find(out.begin(), out.end(), n.name) == out.end()) out.push_back(n.name);
    };
    const auto add_expert = [&](const ExpertTensorNames& e) {
        for (const TensorName* n : {&e.gate, &e.up, &e.down, &e.gate_bias, &e.up_bias, &e.down_bias}) add(*n);
    };
    add(names.router);
    add(names.router_bias);
    add(names.router_noise);
    for (const auto& e : names.experts) add_expert(e);
    if (names.shared) add_expert(*names.shared);
    add(names.shared_gate);
    if (!with_hyper) return out;
    for (const TensorName* n : {&names.embedding, &names.projector_first, &names.projector_first_bias,
                                &names.projector_second, &names.projector_second_bias, &names.layer_embed, &names.trunk,
                                &names.trunk_bias, &names.down_weight, &names.down_weight_bias, &names.up_weight,
                                &names.up_weight_bias, &names.down_bias, &names.down_bias_bias, &names.up_bias, &names.up_bias_bias})
        add(*n);
    return out;
}

/// Whether `name` is a fused tensor of the experts' bias vectors (gpt-oss's
/// experts.gate_up_proj_bias, [experts, n]): a vector parameter, though of rank 2.
[[nodiscard]] inline bool is_fused_vector(const BlockParameterNames& names, const std::string& name) {
    return std::any_of(names.experts.begin(), names.experts.end(), [&](const ExpertTensorNames& e) {
        return (e.gate_bias.fused() && e.gate_bias.name == name) || (e.up_bias.fused() && e.up_bias.name == name) ||
               (e.down_bias.fused() && e.down_bias.name == name);
    });
}

/// Calls fn(name, gradient, is_vector) for every tensor gradient of `g` (MoeGradients or
/// HyperMoeGradients, as the block's make_gradients() made them) whose name `names` recorded:
/// `gradient` is a view into g in the block's layout (a vector as one row; a name with
/// `transposed` is stored transposed in the checkpoint). The one walk over a block's gradients
/// by name: named_gradients() and the trainer both use it.
template <class G, class Fn>
void for_each_named_gradient(const BlockParameterNames& names, const G& g, Fn&& fn) {
    const auto visit = [&](const TensorName& n, ConstMatrixView<float> m, bool vector) {
        if (!n.empty() && m.rows() * m.cols() > 0) fn(n, m, vector);
    };
    if constexpr (requires { g.moe; g.hypernetwork; }) {
        for_each_named_gradient(names, g.moe, fn);
        visit(names.embedding, g.embedding.view(), false);
        visit(names.projector_first, g.projector.first.view(), false);
        visit(names.projector_first_bias, detail::as_row(g.projector.first_bias), true);
        visit(names.projector_second, g.projector.second.view(), false);
        visit(names.projector_second_bias, detail::as_row(g.projector.second_bias), true);
        if (g.hypernetwork) {
            const auto& h = *g.hypernetwork;
            visit(names.layer_embed, h.layer_embed.view(), false);
            visit(names.trunk, h.trunk.view(), false);
            visit(names.trunk_bias, detail::as_row(h.trunk_bias), true);
            visit(names.down_weight, h.down_weight.view(), false);
            visit(names.down_weight_bias, detail::as_row(h.down_weight_bias), true);
            visit(names.up_weight, h.up_weight.view(), false);
            visit(names.up_weight_bias, detail::as_row(h.up_weight_bias), true);
            visit(names.down_bias, h.down_bias.view(), false);
            visit(names.down_bias_bias, detail::as_row(h.down_bias_bias), true);
            visit(names.up_bias, h.up_bias.view(), false);
            visit(names.up_bias_bias, detail::as_row(h.up_bias_bias), true);
        }
    } else {
        if (names.experts.empty() && !g.experts.empty())
            throw config_error(detail::concat("named_gradients: the block's experts have no tensor names of their own (a gpt_oss ",
                                              "checkpoint's fused expert tensors): their gradients cannot be named; split the experts ",
                                              "(as llama.cpp's converter does), or take the layer's gradients (MoeLayer::backward)"));
        if (names.experts.size() != g.experts.size())
            throw config_error(detail::concat("named_gradients: names for ", names.experts.size(), " experts, but gradients of ",
                                              g.experts.size(), " (names recorded by another block's load?)"));
        // The gate: the experts' rows, then (noisy gating) the noise weight's.
        const index_t experts = index_t(g.experts.size());
        if (names.router_noise.empty()) {
            visit(names.router, g.gate.view(), false);
        } else {
            visit(names.router, g.gate.view().row_block(0, experts), false);
            visit(names.router_noise, g.gate.view().row_block(experts, g.gate.rows() - experts), false);
        }
        visit(names.router_bias, detail::as_row(g.gate_bias), true);
        for (std::size_t e = 0; e < g.experts.size(); ++e) detail::visit_expert_gradients(names.experts[e], g.experts[e], visit);
        if constexpr (requires { g.shared.expert; }) {
            if (names.shared) detail::visit_expert_gradients(*names.shared, g.shared.expert, visit);
            if (g.shared.gate.rows() > 0) visit(names.shared_gate, g.shared.gate.view(), false);
        }
    }
}

namespace detail {

inline void zero_buffer(Matrix<float>& m) {
    parallel_for(m.rows(), m.rows() * m.cols(), [&](index_t r) { std::fill_n(m.data() + r * m.cols(), m.cols(), 0.0f); });
}
inline void zero_buffer(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }

/// Sets every buffer of `g` (MoeGradients or HyperMoeGradients, with their experts', shared
/// expert's, projector's and hypernetwork's parts) to zero, as make_gradients() made it: what
/// GradientBuffers does before a backward adds to buffers it reuses.
template <class G>
void zero_gradients(G& g) {
    if constexpr (requires { g.moe; g.hypernetwork; }) { // HyperMoeGradients
        zero_gradients(g.moe);
        zero_buffer(g.embedding);
        zero_buffer(g.projector.first);
        zero_buffer(g.projector.first_bias);
        zero_buffer(g.projector.second);
        zero_buffer(g.projector.second_bias);
        if (auto* h = g.hypernetwork.get()) {
            for (Matrix<float>* m : {&h->layer_embed, &h->trunk, &h->down_weight, &h->up_weight, &h->down_bias, &h->up_bias}) zero_buffer(*m);
            for (std::vector<float>* v : {&h->trunk_bias, &h->down_weight_bias, &h->up_weight_bias, &h->down_bias_bias, &h->up_bias_bias})
                zero_buffer(*v);
        }
    } else if constexpr (requires { g.experts; g.gate; }) { // MoeGradients
        zero_buffer(g.gate);
        zero_buffer(g.gate_bias);
        for (auto& e : g.experts) zero_gradients(e);
        if constexpr (requires { g.shared.expert; }) {
            zero_gradients(g.shared.expert);
            zero_buffer(g.shared.gate);
        }
    } else if constexpr (requires { g.gate_up; }) { // GluGradients
        zero_buffer(g.gate_up);
        zero_buffer(g.gate_up_bias);
        zero_buffer(g.down);
        zero_buffer(g.down_bias);
    } else { // FfnGradients
        zero_buffer(g.up);
        zero_buffer(g.up_bias);
        zero_buffer(g.down);
        zero_buffer(g.down_bias);
    }
}

} // namespace detail

/// The gradients `g` of a block loaded with these names as `d/<checkpoint name>` F32 tensors in
/// the checkpoint's shapes (transposed back where the checkpoint stores a tensor transposed).
template <class G>
[[nodiscard]] std::vector<TensorToWrite> named_gradients(const BlockParameterNames& names, const G& g) {
    std::vector<TensorToWrite> out;
    for_each_named_gradient(names, g, [&](const TensorName& n, ConstMatrixView<float> m, bool vector) {
        const std::string name = "d/" + n.name;
        // A fused tensor's slices, one per expert and piece, fill one tensor.
        auto it = std::find_if(out.begin(), out.end(), [&](const TensorToWrite& t) { return t.name == name; });
        if (it == out.end()) {
            std::vector<index_t> shape = detail::gradient_shape(n, m, vector);
            index_t numel = 1;
            for (const index_t x : shape) numel *= x;
            out.push_back({name, tensor_dtype::f32, std::move(shape), std::vector<std::byte>(std::size_t(numel) * sizeof(float))});
            it = out.end() - 1;
        }
        detail::add_gradient(n, m, vector, {reinterpret_cast<float*>(it->bytes.data()), it->bytes.size() / sizeof(float)});
    });
    return out;
}

} // namespace hypermoe
