#pragma once
// Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B and Qwen3-235B-A22B): SwiGLU experts of
// width moe_intermediate_size, softmax top-k (renormalised when norm_topk_prob, which those
// checkpoints set), no shared expert. MoE blocks as Qwen2-MoE's: layers not in mlp_only_layers
// with (l + 1) % decoder_sparse_step == 0 (intermediate_size is the other layers' dense width).
// Tensors: model.layers.<l>.mlp.{gate.weight, experts.<e>.{gate,up,down}_proj.weight}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct Qwen3Moe {
    static constexpr std::string_view name = "qwen3_moe";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "qwen3_moe"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        detail::describe_swiglu_top_k(c, m, "moe_intermediate_size");
        detail::qwen_moe_blocks(c, m);
    }

    template <Backend B>
    using layers = type_list<SwiGluTopKLayer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) { return detail::load_mlp_top_k<Out>(s); }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        c.update({{"model_type", name}, {"hidden_size", m.d_model}, {"num_experts_per_tok", m.top_k},
                  {"num_hidden_layers", m.layers}, {"hidden_act", "silu"}, {"norm_topk_prob", true},
                  {"moe_intermediate_size", m.d_ff}, {"intermediate_size", 3 * m.d_ff}, {"num_experts", m.experts},
                  {"decoder_sparse_step", 1}, {"mlp_only_layers", nlohmann::json::array()}});
        detail::write_mlp_top_k(m, w);
    }
};

} // namespace hypermoe::families
