#pragma once
// HyperMoE on Switch Transformers (the paper's reference code, config use_hypernet: true): the
// switch_transformers blocks plus a HyperExpert generated from the unselected experts'
// embeddings by one hypernetwork per stack.
// Tensors: those of switch_transformers, plus under each sparse block's mlp.
// {n_experts_embedding.weight, embedding_process.{0,2}.{weight,bias}} and the stack's
// <stack>.param_gen.{layer_embed.weight, decoder.*} (io/family/family_support.hpp).

#include "hypermoe/io/family/switch_transformers.hpp"

namespace hypermoe::families {

struct HyperMoeSwitch : detail::SwitchBlocks {
    static constexpr std::string_view name = "hypermoe_switch";

    static bool matches(const ConfigReader& c) { return is_switch(c) && c.boolean_or("use_hypernet", false); }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        SwitchBlocks::describe(c, m);
        m.adapter_rank = c.integer("adapter_dim", 1), m.routing += ", + HyperExpert";
    }

    template <Backend B>
    using Layer = HyperMoeLayer<FfnExpert<B, Relu>, SwitchRouter>;
    template <Backend B>
    using layers = type_list<Layer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        const Bound b = bind(s);
        const std::string& stack = s.block.stack;
        const auto hyper = detail::bind_hyper_parts(s, mlp_prefix(stack, s.block.layer), stack + ".param_gen.",
                                                    stack_layers(s.config, stack));
        s.tensors.finish();
        return Out(detail::build_hyper_layer(s, build(s, b), hyper));
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        write(m, w, c, [&](const std::string& mlp, const std::string& stack, bool first) {
            detail::write_synthetic_hyper(m, w, c, mlp, stack + ".param_gen.", first);
        });
    }
};

} // namespace hypermoe::families
