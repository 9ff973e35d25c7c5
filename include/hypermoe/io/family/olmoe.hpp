#pragma once
// OLMoE (OlmoeForCausalLM): every layer's MLP is an MoE block of SwiGLU experts, softmax top-k
// (renormalised when norm_topk_prob).
// Tensors: model.layers.<l>.mlp.{gate.weight, experts.<e>.{gate,up,down}_proj.weight}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct Olmoe {
    static constexpr std::string_view name = "olmoe";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "olmoe"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        detail::describe_swiglu_top_k(c, m, "intermediate_size");
        for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i) m.moe_blocks.push_back({i, ""});
    }

    template <Backend B>
    using layers = type_list<SwiGluTopKLayer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) { return detail::load_mlp_top_k<Out>(s); }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        c.update({{"model_type", name}, {"hidden_size", m.d_model}, {"num_experts_per_tok", m.top_k},
                  {"num_hidden_layers", m.layers}, {"hidden_act", "silu"}, {"norm_topk_prob", true},
                  {"intermediate_size", m.d_ff}, {"num_experts", m.experts}});
        detail::write_mlp_top_k(m, w);
    }
};

} // namespace hypermoe::families
