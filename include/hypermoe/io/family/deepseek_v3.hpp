#pragma once
// DeepSeek-V3 (DeepseekV3ForCausalLM): SwiGLU experts; sigmoid scores, a selection bias
// (e_score_correction_bias) added for choosing only, group-limited top-k (n_group groups, the
// topk_group best by the sum of their two best biased scores), weights renormalised when
// norm_topk_prob and scaled by routed_scaling_factor; plus ungated shared experts.
// scoring_func "softmax" (what a GGUF deepseek2 file with expert_gating_func 1, DeepSeek-V2,
// becomes: io/gguf_model.hpp) scores with a softmax instead, the same selection as llama.cpp
// makes for it; its selection bias is optional.
// MoE blocks: l >= first_k_dense_replace with l % moe_layer_freq == 0.
// Tensors: model.layers.<l>.mlp.{gate.weight, gate.e_score_correction_bias,
// experts.<e>.{gate,up,down}_proj.weight, shared_experts.{gate,up,down}_proj.weight}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct DeepSeekV3 {
    static constexpr std::string_view name = "deepseek_v3";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "deepseek_v3"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("moe_intermediate_size", 1);
        m.experts = c.integer("n_routed_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.shared_ff = m.d_ff * c.integer_or("n_shared_experts", 0);
        m.expert_kind = "SwiGLU";
        m.routing = detail::concat(c.string_or("scoring_func", "sigmoid"), " + selection bias, ", c.integer("n_group", 1), " groups keep ",
                                   c.integer("topk_group", 1), ", top-k, ",
                                   c.boolean_or("norm_topk_prob", false) ? "renormalised" : "not renormalised", ", x ",
                                   c.number_or("routed_scaling_factor", 1.0), ", ungated shared experts");
        // As DeepseekV3DecoderLayer: MoE when layer >= first_k_dense_replace and layer % moe_layer_freq == 0.
        const index_t first = c.integer_or("first_k_dense_replace", 0), freq = c.integer_or("moe_layer_freq", 1, 1);
        for (index_t i = first; i < c.integer("num_hidden_layers", 1); ++i)
            if (i % freq == 0) m.moe_blocks.push_back({i, ""});
    }

    template <Backend B, class Router = DeepSeekRouter>
    using Layer = MoeLayer<SwiGluExpert<B>, Router, SharedExpert<SwiGluExpert<B>>>;
    /// DeepSeek's selection with softmax scores.
    using SoftmaxRouter = ScoredRouter<Softmax, GroupLimitedTopK>;
    template <Backend B>
    using layers = type_list<Layer<B>, Layer<B, SoftmaxRouter>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        const ConfigReader& c = s.config;
        c.expect_string("hidden_act", "silu", {"silu"});
        const std::string scoring = c.expect_string("scoring_func", "sigmoid", {"sigmoid", "softmax"});
        c.expect_string("topk_method", "noaux_tc", {"noaux_tc"});
        const index_t d = s.info.d_model, e = s.info.experts, sf = s.info.shared_ff;
        if (sf == 0) throw config_error(detail::concat(c.file(), ": n_shared_experts is 0; deepseek_v3 blocks have shared experts"));
        const std::string p = "model.layers." + s.layer() + ".mlp.";
        const WeightView gate = s.bind_matrix(s.names.router, p + "gate.weight", e, d);
        const std::string bias_name = p + "gate.e_score_correction_bias";
        const auto bias = scoring == "sigmoid" || s.tensors.has(bias_name) ? s.bind_vector(s.names.selection_bias, bias_name, e)
                                                                            : std::span<const float>{};
        const auto w = detail::glu_weights(s, p + "experts.", e, d, s.info.d_ff, "gate_proj.weight", "up_proj.weight",
                                           "down_proj.weight");
        const GluWeights sw = detail::shared_glu_weights(s, p + "shared_experts.", d, sf);
        s.tensors.finish();
        const auto build = [&]<class Router>(std::type_identity<Router>) {
            const Router router(
                e, GroupLimitedTopK{.k = s.info.top_k, .n_group = c.integer("n_group", 1), .topk_group = c.integer("topk_group", 1)},
                {.weighting = {.renormalize = c.boolean_or("norm_topk_prob", false), .epsilon = 1e-20,
                               .scale = float(c.number_or("routed_scaling_factor", 1.0))},
                 .selection_bias = {bias.begin(), bias.end()}});
            return Out(Layer<B, Router>(gate, router, detail::build_experts<SwiGluExpert<B>>(w, s),
                                        SharedExpert<SwiGluExpert<B>>(SwiGluExpert<B>(sw, detail::expert_options(s.options)))));
        };
        if (scoring == "softmax") return build(std::type_identity<SoftmaxRouter>{});
        return build(std::type_identity<DeepSeekRouter>{});
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        const index_t d = m.d_model, ff = m.d_ff, e = m.experts;
        const index_t groups = e % 4 == 0 && e >= 8 ? 4 : 1;
        c.update({{"model_type", name}, {"hidden_size", d}, {"num_experts_per_tok", m.top_k}, {"num_hidden_layers", m.layers},
                  {"hidden_act", "silu"}, {"norm_topk_prob", true}, {"moe_intermediate_size", ff}, {"n_routed_experts", e},
                  {"n_shared_experts", 1}, {"n_group", groups}, {"topk_group", groups > 1 ? 2 : 1},
                  {"routed_scaling_factor", 2.5}, {"first_k_dense_replace", 0}, {"scoring_func", "sigmoid"},
                  {"topk_method", "noaux_tc"}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
            w.matrix(p + "gate.weight", e, d);
            w.vector(p + "gate.e_score_correction_bias", e, 0.01);
            for (index_t x = 0; x < e; ++x) w.glu(p + "experts." + std::to_string(x) + ".", d, ff);
            w.glu(p + "shared_experts.", d, ff);
        }
    }
};

} // namespace hypermoe::families
