#pragma once
// gpt-oss (GptOssForCausalLM: OpenAI's gpt-oss-20b and gpt-oss-120b): every decoder layer's MLP
// is an MoE block. The router is a linear map with a bias; a token takes the k experts of
// largest logit, weighted by the softmax of those k logits (softmax top-k renormalised). The
// experts are GLUs with biases on gate, up and down and the clamped SwiGLU (SwiGluOai: alpha
// 1.702, limit swiglu_limit = 7).
// Tensors, under model.layers.<l>.mlp.: router.{weight, bias}, and the experts either
// - fused, as Hugging Face's GptOssForCausalLM holds them: experts.gate_up_proj [E, d, 2 ff]
//   (y = x W; gate's and up's outputs interleaved), experts.gate_up_proj_bias [E, 2 ff],
//   experts.down_proj [E, ff, d], experts.down_proj_bias [E, d]; or, as OpenAI publishes the
//   checkpoints, the two matrices' MXFP4 experts.{gate_up,down}_proj_{blocks,scales} (held as
//   mxfp4 without requantising: TensorBinder::deferred_fused). The gradients of the
//   dequantised ones are named as the fused tensors (TensorName::experts); MXFP4 blocks are not
//   trained;
// - or each on its own, as llama.cpp's converter splits them (and how a GGUF gpt-oss file is
//   read, io/gguf_model.hpp): experts.<e>.{gate_proj, up_proj, down_proj}.{weight, bias}.

#include "hypermoe/io/family/family_support.hpp"

namespace hypermoe::families {

struct GptOss {
    static constexpr std::string_view name = "gpt_oss";
    static constexpr bool two_stacks = false;

    static bool matches(const ConfigReader& c) { return c.string_or("model_type", "") == "gpt_oss"; }

    static void describe(const ConfigReader& c, ModelInfo& m) {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("intermediate_size", 1);
        m.experts = c.integer("num_local_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        if (const double limit = c.number_or("swiglu_limit", SwiGluOai::limit); limit != SwiGluOai::limit)
            throw config_error(detail::concat(c.file(), ": swiglu_limit is ", limit, ", expected ", SwiGluOai::limit,
                                              " (the clamp of gpt-oss's SwiGLU, SwiGluOai, is fixed)"));
        m.expert_kind = "SwiGLU-OAI (clamped, with biases)";
        m.routing = "softmax over the top-k logits (router with bias)";
        for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i) m.moe_blocks.push_back({i, ""});
    }

    template <Backend B>
    using Expert = GluExpert<B, SwiGluOai>;
    template <Backend B>
    using Layer = MoeLayer<Expert<B>, TopKRouter>;
    template <Backend B>
    using layers = type_list<Layer<B>>;

    template <class Out, Backend B>
    static Out load(BlockSource<B>& s) {
        const index_t d = s.info.d_model, e = s.info.experts, ff = s.info.d_ff;
        const std::string p = "model.layers." + s.layer() + ".mlp.";
        const WeightView gate = s.bind_matrix(s.names.router, p + "router.weight", e, d);
        const std::span<const float> gate_bias = s.bind_vector(s.names.router_bias, p + "router.bias", e);
        const bool fused = s.tensors.has(p + "experts.gate_up_proj") || s.tensors.has(p + "experts.gate_up_proj_blocks");
        std::vector<GluWeights> w;
        std::vector<std::vector<float>> biases; // fused: the experts' gate, up and down biases, de-interleaved
        if (fused) {
            const WeightView gate_up_bias = s.tensors.matrix(p + "experts.gate_up_proj_bias", e, 2 * ff);
            const WeightView down_bias = s.tensors.matrix(p + "experts.down_proj_bias", e, d);
            // The gradients' names: each expert's slices of the fused tensors (MXFP4 blocks are not trained).
            const bool blocks = s.tensors.has(p + "experts.gate_up_proj_blocks");
            if (!blocks) s.names.experts.resize(std::size_t(e));
            const auto gate_up = s.tensors.deferred_fused(p + "experts.gate_up_proj", e, 2, ff, d, s.options.storage, s.options.keep_stored);
            const auto down = s.tensors.deferred_fused(p + "experts.down_proj", e, 1, d, ff, s.options.storage, s.options.keep_stored);
            for (index_t x = 0; x < e; ++x) {
                w.push_back({gate_up[std::size_t(2 * x)], gate_up[std::size_t(2 * x + 1)], down[std::size_t(x)]});
                if (blocks) continue;
                const auto slice = [&](const char* tensor, bool matrix, index_t pieces, index_t piece) {
                    return TensorName{p + "experts." + tensor, matrix, e, x, pieces, piece};
                };
                s.names.experts[std::size_t(x)] = {slice("gate_up_proj", true, 2, 0),      slice("gate_up_proj", true, 2, 1),
                                                   slice("down_proj", true, 1, 0),         slice("gate_up_proj_bias", false, 2, 0),
                                                   slice("gate_up_proj_bias", false, 2, 1), slice("down_proj_bias", false, 1, 0)};
            }
            s.tensors.finish();
            biases.reserve(std::size_t(3 * e));
            const auto column = [&biases](const WeightView& t, index_t x, index_t n, index_t step, index_t first) {
                std::vector<float>& b = biases.emplace_back(std::size_t(n));
                for (index_t j = 0; j < n; ++j) b[std::size_t(j)] = t.at(x, step * j + first);
                return std::span<const float>(b);
            };
            for (index_t x = 0; x < e; ++x) { // gate_up_proj_bias interleaves gate's and up's
                GluWeights& g = w[std::size_t(x)];
                g.gate_bias = column(gate_up_bias, x, ff, 2, 0);
                g.up_bias = column(gate_up_bias, x, ff, 2, 1);
                g.down_bias = column(down_bias, x, d, 1, 0);
            }
        } else {
            w = detail::glu_weights(s, p + "experts.", e, d, ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
            for (index_t x = 0; x < e; ++x) {
                ExpertTensorNames& n = s.names.experts[std::size_t(x)];
                const std::string q = p + "experts." + std::to_string(x) + ".";
                GluWeights& g = w[std::size_t(x)];
                g.gate_bias = s.bind_vector(n.gate_bias, q + "gate_proj.bias", ff);
                g.up_bias = s.bind_vector(n.up_bias, q + "up_proj.bias", ff);
                g.down_bias = s.bind_vector(n.down_bias, q + "down_proj.bias", d);
            }
            s.tensors.finish();
        }
        const TopKRouter router(e, TopK{s.info.top_k}, {.weighting = {.renormalize = true}});
        return Out(Layer<B>(gate, gate_bias, router, detail::build_experts<Expert<B>>(w, s)));
    }

    static void write_synthetic(const SyntheticModel& m, detail::SyntheticWriter& w, nlohmann::json& c) {
        c.update({{"model_type", name}, {"hidden_size", m.d_model}, {"intermediate_size", m.d_ff},
                  {"num_local_experts", m.experts}, {"num_experts_per_tok", m.top_k}, {"num_hidden_layers", m.layers},
                  {"swiglu_limit", SwiGluOai::limit}, {"hidden_act", "silu"}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
            w.matrix(p + "router.weight", m.experts, m.d_model);
            w.vector(p + "router.bias", m.experts);
            for (index_t x = 0; x < m.experts; ++x) {
                const std::string q = p + "experts." + std::to_string(x) + ".";
                w.glu(q, m.d_model, m.d_ff);
                w.vector(q + "gate_proj.bias", m.d_ff);
                w.vector(q + "up_proj.bias", m.d_ff);
                w.vector(q + "down_proj.bias", m.d_model);
            }
        }
    }
};

} // namespace hypermoe::families
