#pragma once
// Qwen2-MoE (Qwen2MoeForCausalLM): SwiGLU experts, softmax top-k (renormalised when
// norm_topk_prob), plus a shared SwiGLU expert scaled by sigmoid(shared_expert_gate . x).
// MoE blocks: layers not in mlp_only_layers with (l + 1) % decoder_sparse_step == 0.
// Tensors: model.layers.<l>.mlp.{gate.weight, experts.<e>.{gate,up,down}_proj.weight,
// shared_expert.{gate,up,down}_proj.weight, shared_expert_gate.weight}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct Qwen2Moe {
    static constexpr std::string_view name = "qwen2_moe";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "qwen2_moe"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        detail::describe_swiglu_top_k(c, m, "moe_intermediate_size");
        m.shared_ff = c.integer_or("shared_expert_intermediate_size", 0);
        m.routing += ", sigmoid-gated shared expert";
        detail::qwen_moe_blocks(c, m);
    }

    /// With a shared expert (shared_expert_intermediate_size > 0), else without.
    template <Backend B>
    using SharedLayer = MoeLayer<SwiGluExpert<B>, TopKRouter, SharedExpert<SwiGluExpert<B>>>;
    template <Backend B>
    using layers = type_list<SharedLayer<B>, SwiGluTopKLayer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        s.config.expect_string("hidden_act", "silu", {"silu"});
        const index_t d = s.info.d_model, e = s.info.experts, sf = s.info.shared_ff;
        const std::string p = "model.layers." + s.layer() + ".mlp.";
        const WeightView gate = s.bind_matrix(s.names.router, p + "gate.weight", e, d);
        const auto w = detail::glu_weights(s, p + "experts.", e, d, s.info.d_ff, "gate_proj.weight", "up_proj.weight",
                                           "down_proj.weight");
        const TopKRouter router(e, TopK{s.info.top_k}, {.weighting = {.renormalize = s.config.boolean_or("norm_topk_prob", false)}});
        if (sf == 0) {
            s.tensors.finish();
            return Out(SwiGluTopKLayer<B>(gate, router, detail::build_experts<SwiGluExpert<B>>(w, s)));
        }
        const GluWeights sw = detail::shared_glu_weights(s, p + "shared_expert.", d, sf);
        const WeightView shared_gate = s.bind_matrix(s.names.shared_gate, p + "shared_expert_gate.weight", 1, d);
        s.tensors.finish();
        return Out(SharedLayer<B>(gate, router, detail::build_experts<SwiGluExpert<B>>(w, s),
                                  SharedExpert<SwiGluExpert<B>>(SwiGluExpert<B>(sw, detail::expert_options(s.options)), shared_gate)));
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        const index_t d = m.d_model, ff = m.d_ff;
        c.update({{"model_type", name}, {"hidden_size", d}, {"num_experts_per_tok", m.top_k}, {"num_hidden_layers", m.layers},
                  {"hidden_act", "silu"}, {"norm_topk_prob", true}, {"moe_intermediate_size", ff}, {"num_experts", m.experts},
                  {"shared_expert_intermediate_size", 2 * ff}, {"decoder_sparse_step", 1},
                  {"mlp_only_layers", nlohmann::json::array()}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
            w.matrix(p + "gate.weight", m.experts, d);
            for (index_t x = 0; x < m.experts; ++x) w.glu(p + "experts." + std::to_string(x) + ".", d, ff);
            w.glu(p + "shared_expert.", d, 2 * ff);
            w.matrix(p + "shared_expert_gate.weight", 1, d);
        }
    }
};

} // namespace hypermoe::families
