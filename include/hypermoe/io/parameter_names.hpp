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
#include "hypermoe/detail/format.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// A tensor's checkpoint name, and whether the checkpoint stores it transposed; an empty name
/// = the block has no such tensor.
struct TensorName {
    std::string name;
    bool transposed = false;
    [[nodiscard]] bool empty() const noexcept { return name.empty(); }
};

/// One expert's tensors: gate (GLU experts only), up, down and the biases (where present).
struct ExpertTensorNames {
    TensorName gate, up, down, up_bias, down_bias;
};

/// Every tensor a block's forward reads, by role.
struct BlockParameterNames {
    TensorName router;
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

/// Appends `d/<name>` for a matrix gradient (transposed back when the checkpoint stores it so).
inline void add_gradient(std::vector<TensorToWrite>& out, const TensorName& n, ConstMatrixView<float> g) {
    if (n.empty()) return;
    Matrix<float> m(n.transposed ? g.cols() : g.rows(), n.transposed ? g.rows() : g.cols());
    for (index_t r = 0; r < g.rows(); ++r)
        for (index_t c = 0; c < g.cols(); ++c) (n.transposed ? m(c, r) : m(r, c)) = g(r, c);
    out.push_back(f32_tensor("d/" + n.name, {m.rows(), m.cols()}, {m.data(), std::size_t(m.rows() * m.cols())}));
}
inline void add_gradient(std::vector<TensorToWrite>& out, const TensorName& n, const std::vector<float>& g) {
    if (n.empty() || g.empty()) return;
    out.push_back(f32_tensor("d/" + n.name, {index_t(g.size())}, g));
}

/// An expert's gradients (GluGradients or FfnGradients) under its names.
template <class G>
void add_expert_gradients(std::vector<TensorToWrite>& out, const ExpertTensorNames& n, const G& g) {
    if constexpr (requires { g.gate_up; }) {
        add_gradient(out, n.gate, g.gate());
        add_gradient(out, n.up, g.up());
    } else {
        add_gradient(out, n.up, g.up.view());
        add_gradient(out, n.up_bias, g.up_bias);
    }
    add_gradient(out, n.down, g.down.view());
    add_gradient(out, n.down_bias, g.down_bias);
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
        for (const TensorName* n : {&e.gate, &e.up, &e.down, &e.up_bias, &e.down_bias}) add(*n);
    };
    add(names.router);
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

/// The gradients `g` of a block loaded with these names (MoeGradients or HyperMoeGradients, as
/// the block's make_gradients() made them) as `d/<checkpoint name>` F32 tensors.
template <class G>
[[nodiscard]] std::vector<TensorToWrite> named_gradients(const BlockParameterNames& names, const G& g) {
    std::vector<TensorToWrite> out;
    if constexpr (requires { g.moe; g.hypernetwork; }) {
        out = named_gradients(names, g.moe);
        detail::add_gradient(out, names.embedding, g.embedding.view());
        detail::add_gradient(out, names.projector_first, g.projector.first.view());
        detail::add_gradient(out, names.projector_first_bias, g.projector.first_bias);
        detail::add_gradient(out, names.projector_second, g.projector.second.view());
        detail::add_gradient(out, names.projector_second_bias, g.projector.second_bias);
        if (g.hypernetwork) {
            const auto& h = *g.hypernetwork;
            detail::add_gradient(out, names.layer_embed, h.layer_embed.view());
            detail::add_gradient(out, names.trunk, h.trunk.view());
            detail::add_gradient(out, names.trunk_bias, h.trunk_bias);
            detail::add_gradient(out, names.down_weight, h.down_weight.view());
            detail::add_gradient(out, names.down_weight_bias, h.down_weight_bias);
            detail::add_gradient(out, names.up_weight, h.up_weight.view());
            detail::add_gradient(out, names.up_weight_bias, h.up_weight_bias);
            detail::add_gradient(out, names.down_bias, h.down_bias.view());
            detail::add_gradient(out, names.down_bias_bias, h.down_bias_bias);
            detail::add_gradient(out, names.up_bias, h.up_bias.view());
            detail::add_gradient(out, names.up_bias_bias, h.up_bias_bias);
        }
    } else {
        if (names.experts.size() != g.experts.size())
            throw config_error(detail::concat("named_gradients: names for ", names.experts.size(), " experts, but gradients of ",
                                              g.experts.size(), " (names recorded by another block's load?)"));
        detail::add_gradient(out, names.router, g.gate.view());
        for (std::size_t e = 0; e < g.experts.size(); ++e) detail::add_expert_gradients(out, names.experts[e], g.experts[e]);
        if constexpr (requires { g.shared.expert; }) {
            if (names.shared) detail::add_expert_gradients(out, *names.shared, g.shared.expert);
            if (g.shared.gate.rows() > 0) detail::add_gradient(out, names.shared_gate, g.shared.gate.view());
        }
    }
    return out;
}

} // namespace hypermoe
