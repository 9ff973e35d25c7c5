#pragma once
#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct TinyMoe {
    static constexpr std::string_view name = "tinymoe"; // what --family and errors say
    static constexpr bool two_stacks = false;           // true: blocks named by encoder/decoder

    // Is this config ours? (The first family in FamilyList that says yes wins.)
    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "tinymoe"; }

    // Sizes, routing and which blocks are MoE; ConfigReader turns every bad value into a
    // config_error naming the file and key.
    static void describe(const ConfigReader& c, ModelInfo& m) {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("intermediate_size", 1);
        m.experts = c.integer("num_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.expert_kind = "SwiGLU", m.routing = "softmax, top-k, renormalised";
        for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i) m.moe_blocks.push_back({i, ""});
    }

    // Every layer type load() can return (they join LoadedMoeBlock's variant).
    template <Backend B>
    using layers = type_list<SwiGluTopKLayer<B>>;

    // Bind every tensor first, then finish() (it reports all missing or mis-shaped tensors at
    // once), then build.
    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        const index_t d = s.info.d_model, e = s.info.experts;
        const std::string p = "model.layers." + s.layer() + ".moe.";
        const WeightView gate = s.bind_matrix(s.names.router, p + "router.weight", e, d);
        const auto w = detail::glu_weights(s, p + "experts.", e, d, s.info.d_ff,
                                           "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        s.tensors.finish();
        return Out(SwiGluTopKLayer<B>(gate, TopKRouter(e, TopK{s.info.top_k}, {.weighting = {.renormalize = true}}),
                                      detail::build_experts<SwiGluExpert<B>>(w, s)));
    }

    // The same tensor names with random weights, for `hypermoe bench --family tinymoe` and tests.
    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        c.update({{"model_type", name}, {"hidden_size", m.d_model}, {"intermediate_size", m.d_ff},
                  {"num_experts", m.experts}, {"num_experts_per_tok", m.top_k}, {"num_hidden_layers", m.layers}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".moe.";
            w.matrix(p + "router.weight", m.experts, m.d_model);
            for (index_t x = 0; x < m.experts; ++x) w.glu(p + "experts." + std::to_string(x) + ".", m.d_model, m.d_ff);
        }
    }
};

} // namespace hypermoe::families
