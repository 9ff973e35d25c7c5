#pragma once
// Switch Transformers (SwitchTransformersForConditionalGeneration): an encoder and a decoder
// stack; their sparse blocks' MLPs are MoE blocks of ReLU FFN experts with softmax top-1 routing
// and a capacity of expert_capacity tokens per expert per sequence (dropped tokens pass through,
// scaled). Sparse blocks: with step = layers / num_sparse_*_layers, every block when step is 1,
// else those with l % step == 1.
// Tensors: <stack>.block.<l>.layer.<1 (encoder) | 2 (decoder)>.mlp.{router.classifier.weight,
// experts.expert_<e>.{wi,wo}.weight}.
// detail::SwitchBlocks is also the MoE part of the hypermoe_switch family.

#include <vector>

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe {
namespace detail {

inline std::vector<index_t> switch_sparse_blocks(index_t layers, index_t sparse) {
    std::vector<index_t> out;
    if (sparse <= 0) return out;
    const index_t step = layers / sparse;
    for (index_t i = 0; i < layers; ++i)
        if (step == 1 || (step > 0 && i % step == 1)) out.push_back(i);
    return out;
}

/// What the Switch families share: config, tensors and the MoE layer of a block.
struct SwitchBlocks {
    static constexpr bool two_stacks = true;

    static bool is_switch(const ConfigReader& c) { return c.string_or("model_type", "") == "switch_transformers"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        m.d_model = c.integer("d_model", 1), m.d_ff = c.integer("d_ff", 1);
        m.experts = c.integer("num_experts", 1), m.top_k = 1;
        if (c.boolean_or("router_bias", false))
            throw config_error(detail::concat(c.file(), ": 'router_bias' is true, supported: false (the router classifier's "
                                                        "bias is not loaded)"));
        m.expert_kind = c.string_or("dense_act_fn", "relu") + " FFN";
        m.routing = detail::concat("softmax, top-1, capacity ", c.integer("expert_capacity", 1),
                                   " per expert per sequence, dropped tokens pass through scaled");
        const index_t enc = c.integer("num_layers", 1), dec = c.integer_or("num_decoder_layers", enc);
        for (const index_t i : switch_sparse_blocks(enc, c.integer_or("num_sparse_encoder_layers", 0)))
            m.moe_blocks.push_back({i, "encoder"});
        for (const index_t i : switch_sparse_blocks(dec, c.integer_or("num_sparse_decoder_layers", 0)))
            m.moe_blocks.push_back({i, "decoder"});
    }

    /// Blocks in the block's stack.
    static index_t stack_layers(const ConfigReader& c, const std::string& stack) {
        const index_t enc = c.integer("num_layers", 1);
        return stack == "decoder" ? c.integer_or("num_decoder_layers", enc) : enc;
    }
    /// The prefix of a block's MLP tensors.
    static std::string mlp_prefix(const std::string& stack, index_t layer) {
        return stack + ".block." + std::to_string(layer) + (stack == "decoder" ? ".layer.2.mlp." : ".layer.1.mlp.");
    }

    template <Backend B>
    using Moe = MoeLayer<FfnExpert<B, Relu>, SwitchRouter>;

    struct Bound {
        WeightView gate;
        std::vector<FfnWeights> experts;
    };
    template <Backend B>
    static Bound bind(BlockSource<B>& s) {
        s.config.expect_string("dense_act_fn", "relu", {"relu"});
        const index_t d = s.info.d_model, ff = s.info.d_ff, e = s.info.experts;
        const std::string p = mlp_prefix(s.block.stack, s.block.layer);
        Bound b{s.bind_matrix(s.names.router, p + "router.classifier.weight", e, d), {}};
        s.names.experts.resize(std::size_t(e));
        for (index_t x = 0; x < e; ++x) {
            const std::string q = p + "experts.expert_" + std::to_string(x) + ".";
            ExpertTensorNames& n = s.names.experts[std::size_t(x)];
            b.experts.push_back({s.bind_matrix(n.up, q + "wi.weight", ff, d), s.bind_matrix(n.down, q + "wo.weight", d, ff)});
        }
        return b;
    }
    /// The MoE layer from tensors bound and checked before.
    template <Backend B>
    static Moe<B> build(BlockSource<B>& s, const Bound& b) {
        return Moe<B>(b.gate, SwitchRouter(s.info.experts, Top1Capacity{s.config.integer("expert_capacity", 1)}),
                      build_experts<FfnExpert<B, Relu>>(b.experts, s), NoSharedExpert{},
                      {.dropped = s.options.dropped});
    }

    /// A synthetic checkpoint whose sparse blocks are the odd ones of each stack; `block` writes
    /// whatever a block has besides its MoE tensors (given its MLP prefix and stack, and whether it
    /// is the stack's first).
    template <class Extra>
    static void write(const SyntheticModel& m, SyntheticWriter& w, nlohmann::json& c, Extra&& block) {
        c.update({{"model_type", "switch_transformers"}, {"d_model", m.d_model}, {"d_ff", m.d_ff}, {"num_experts", m.experts},
                  {"expert_capacity", m.capacity}, {"num_layers", m.layers}, {"num_decoder_layers", m.layers},
                  {"num_sparse_encoder_layers", m.layers / 2}, {"num_sparse_decoder_layers", m.layers / 2},
                  {"dense_act_fn", "relu"}, {"router_bias", false}});
        for (const std::string stack : {"encoder", "decoder"}) {
            for (index_t l = 1; l < m.layers; l += 2) {
                const std::string p = mlp_prefix(stack, l);
                w.matrix(p + "router.classifier.weight", m.experts, m.d_model);
                for (index_t x = 0; x < m.experts; ++x) {
                    w.matrix(p + "experts.expert_" + std::to_string(x) + ".wi.weight", m.d_ff, m.d_model);
                    w.matrix(p + "experts.expert_" + std::to_string(x) + ".wo.weight", m.d_model, m.d_ff);
                }
                block(p, stack, l == 1);
            }
        }
    }
};

} // namespace detail

namespace families {

struct SwitchTransformers : detail::SwitchBlocks {
    static constexpr std::string_view name = "switch_transformers";

    static bool matches(const ConfigReader& c) { return is_switch(c) && !c.boolean_or("use_hypernet", false); }

    template <Backend B>
    using layers = type_list<Moe<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        const Bound b = bind(s);
        s.tensors.finish();
        return Out(build(s, b));
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        write(m, w, c, [](const std::string&, const std::string&, bool) {});
    }
};

} // namespace families
} // namespace hypermoe
