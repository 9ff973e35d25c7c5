#pragma once
// Mixtral (MixtralForCausalLM): every decoder layer's MLP is an MoE block of SwiGLU experts,
// softmax top-k routing with the k weights renormalised.
// Tensors: model.layers.<l>.block_sparse_moe.{gate.weight, experts.<e>.{w1,w3,w2}.weight}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct Mixtral {
    static constexpr std::string_view name = "mixtral";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "mixtral"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("intermediate_size", 1);
        m.experts = c.integer("num_local_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.expert_kind = "SwiGLU", m.routing = "softmax, top-k, renormalised";
        for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i) m.moe_blocks.push_back({i, ""});
    }

    template <Backend B>
    using layers = type_list<SwiGluTopKLayer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        s.config.expect_string("hidden_act", "silu", {"silu"});
        const index_t d = s.info.d_model, e = s.info.experts;
        const std::string p = "model.layers." + s.layer() + ".block_sparse_moe.";
        const WeightView gate = s.bind_matrix(s.names.router, p + "gate.weight", e, d);
        const auto w = detail::glu_weights(s, p + "experts.", e, d, s.info.d_ff, "w1.weight", "w3.weight", "w2.weight");
        s.tensors.finish();
        return Out(SwiGluTopKLayer<B>(gate, TopKRouter(e, TopK{s.info.top_k}, {.weighting = {.renormalize = true}}),
                            detail::build_experts<SwiGluExpert<B>>(w, s)));
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        c.update({{"model_type", name}, {"hidden_size", m.d_model}, {"intermediate_size", m.d_ff},
                  {"num_local_experts", m.experts}, {"num_experts_per_tok", m.top_k}, {"num_hidden_layers", m.layers},
                  {"hidden_act", "silu"}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
            w.matrix(p + "gate.weight", m.experts, m.d_model);
            for (index_t x = 0; x < m.experts; ++x)
                w.glu(p + "experts." + std::to_string(x) + ".", m.d_model, m.d_ff, "w1.weight", "w3.weight", "w2.weight");
        }
    }
};

} // namespace hypermoe::families
