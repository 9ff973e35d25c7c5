#pragma once
// Synthetic checkpoints: config.json + model.safetensors of any supported family with random
// weights from a fixed seed, laid out exactly as the family's real checkpoints (the tensor
// names the adapters read). The `hypermoe` command's bench and demo build their layers this way,
// so random-weight layers go through the same loading path as real ones.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/io/families.hpp"
#include "hypermoe/io/safetensors.hpp"
#include "hypermoe/router/hash_routing.hpp"

namespace hypermoe {

struct SyntheticModel {
    Family family = Family::mixtral;
    index_t d_model = 64, d_ff = 128, experts = 8, top_k = 2, layers = 2;
    index_t capacity = 64;       ///< Switch families: expert_capacity
    index_t adapter_rank = 8;    ///< HyperMoE: r
    index_t hyper_dim = 16;      ///< HyperMoE: d_e = p = q = h
    index_t layer_dim = 4;       ///< HyperMoE: d_l
    std::uint64_t seed = 1;
    dtype weights = dtype::f32;  ///< F32 or BF16 tensors
};

namespace detail {

class SyntheticWriter {
public:
    SyntheticWriter(std::uint64_t seed, dtype type) : seed_(seed), type_(type) {}
    /// A (rows, cols) weight, uniform in +-1/sqrt(cols) (the fan-in), under `name`.
    void matrix(const std::string& name, index_t rows, index_t cols) { add(name, {rows, cols}, 1.0 / std::sqrt(double(cols))); }
    void vector(const std::string& name, index_t n, double scale = 0.02) { add(name, {n}, scale); }
    [[nodiscard]] const std::vector<TensorToWrite>& tensors() const noexcept { return tensors_; }

private:
    void add(const std::string& name, std::vector<index_t> shape, double scale) {
        index_t n = 1;
        for (const index_t s : shape) n *= s;
        std::vector<std::byte> bytes(std::size_t(n) * size_of(type_));
        for (index_t i = 0; i < n; ++i) {
            const std::uint64_t r = splitmix64(seed_ + counter_++);
            const float v = float(scale * (double(r >> 11) * 0x1.0p-53 * 2.0 - 1.0));
            if (type_ == dtype::f32) std::memcpy(bytes.data() + 4 * i, &v, 4);
            else {
                const bf16 b = bf16::from_float(v);
                std::memcpy(bytes.data() + 2 * i, &b.bits, 2);
            }
        }
        tensors_.push_back({name, type_ == dtype::f32 ? tensor_dtype::f32 : tensor_dtype::bf16, std::move(shape), std::move(bytes)});
    }
    std::uint64_t seed_, counter_ = 0;
    dtype type_;
    std::vector<TensorToWrite> tensors_;
};

} // namespace detail

/// Writes `dir`/config.json and `dir`/model.safetensors for `m` (creating `dir`).
inline void write_synthetic_checkpoint(const std::string& dir, const SyntheticModel& m) {
    namespace fs = std::filesystem;
    fs::create_directories(dir);
    detail::SyntheticWriter w(m.seed, m.weights);
    const index_t d = m.d_model, ff = m.d_ff, e = m.experts, k = m.top_k, h = m.hyper_dim, r = m.adapter_rank, dl = m.layer_dim;
    nlohmann::json c;
    c["torch_dtype"] = m.weights == dtype::f32 ? "float32" : "bfloat16";
    const auto glu = [&](const std::string& p, index_t width, const char* g, const char* u, const char* dn) {
        w.matrix(p + g, width, d);
        w.matrix(p + u, width, d);
        w.matrix(p + dn, d, width);
    };
    const auto hyper_tensors = [&](const std::string& mlp, const std::string& gen, index_t rows_of_layer_embed, bool write_gen) {
        w.matrix(mlp + "n_experts_embedding.weight", e, h);
        w.matrix(mlp + "embedding_process.0.weight", h, h);
        w.vector(mlp + "embedding_process.0.bias", h);
        w.matrix(mlp + "embedding_process.2.weight", h, h);
        w.vector(mlp + "embedding_process.2.bias", h);
        if (!write_gen) return;
        w.matrix(gen + "layer_embed.weight", rows_of_layer_embed, dl);
        w.matrix(gen + "decoder.linear1.weight", h, h + dl);
        w.vector(gen + "decoder.linear1.bias", h);
        w.matrix(gen + "decoder.weight_down.weight", d * r, h);
        w.vector(gen + "decoder.weight_down.bias", d * r);
        w.matrix(gen + "decoder.weight_up.weight", r * d, h);
        w.vector(gen + "decoder.weight_up.bias", r * d);
        w.matrix(gen + "decoder.bias_down.weight", r, h);
        w.vector(gen + "decoder.bias_down.bias", r);
        w.matrix(gen + "decoder.bias_up.weight", d, h);
        w.vector(gen + "decoder.bias_up.bias", d);
    };
    const auto hyper_config = [&] {
        c["use_hypernet"] = true, c["experts_embedding"] = true, c["experts_embedding_dim"] = h, c["process_dim"] = h;
        c["hypernet_input"] = h, c["hypernetwork_bottleneck"] = h, c["layer_emb_dim"] = dl, c["adapter_dim"] = r;
    };
    switch (m.family) {
    case Family::mixtral:
        c.update({{"model_type", "mixtral"}, {"hidden_size", d}, {"intermediate_size", ff}, {"num_local_experts", e},
                  {"num_experts_per_tok", k}, {"num_hidden_layers", m.layers}, {"hidden_act", "silu"}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
            w.matrix(p + "gate.weight", e, d);
            for (index_t x = 0; x < e; ++x) glu(p + "experts." + std::to_string(x) + ".", ff, "w1.weight", "w3.weight", "w2.weight");
        }
        break;
    case Family::qwen2_moe:
    case Family::olmoe:
    case Family::deepseek_v3: {
        const bool qwen = m.family == Family::qwen2_moe, deepseek = m.family == Family::deepseek_v3;
        c.update({{"model_type", to_string(m.family)}, {"hidden_size", d}, {"num_experts_per_tok", k},
                  {"num_hidden_layers", m.layers}, {"hidden_act", "silu"}, {"norm_topk_prob", true}});
        if (m.family == Family::olmoe) c.update({{"intermediate_size", ff}, {"num_experts", e}});
        if (qwen) c.update({{"moe_intermediate_size", ff}, {"num_experts", e}, {"shared_expert_intermediate_size", 2 * ff},
                            {"decoder_sparse_step", 1}, {"mlp_only_layers", nlohmann::json::array()}});
        const index_t groups = e % 4 == 0 && e >= 8 ? 4 : 1;
        if (deepseek) c.update({{"moe_intermediate_size", ff}, {"n_routed_experts", e}, {"n_shared_experts", 1},
                                {"n_group", groups}, {"topk_group", groups > 1 ? 2 : 1}, {"routed_scaling_factor", 2.5},
                                {"first_k_dense_replace", 0}, {"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"}});
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
            w.matrix(p + "gate.weight", e, d);
            if (deepseek) w.vector(p + "gate.e_score_correction_bias", e, 0.01);
            for (index_t x = 0; x < e; ++x)
                glu(p + "experts." + std::to_string(x) + ".", ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
            if (qwen) {
                glu(p + "shared_expert.", 2 * ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
                w.matrix(p + "shared_expert_gate.weight", 1, d);
            }
            if (deepseek) glu(p + "shared_experts.", ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        }
        break;
    }
    case Family::switch_transformers:
    case Family::hypermoe_switch: {
        // Sparse blocks are the odd ones (i % 2 == 1) of each stack.
        c.update({{"model_type", "switch_transformers"}, {"d_model", d}, {"d_ff", ff}, {"num_experts", e},
                  {"expert_capacity", m.capacity}, {"num_layers", m.layers}, {"num_decoder_layers", m.layers},
                  {"num_sparse_encoder_layers", m.layers / 2}, {"num_sparse_decoder_layers", m.layers / 2},
                  {"dense_act_fn", "relu"}, {"router_bias", false}});
        const bool hyper = m.family == Family::hypermoe_switch;
        if (hyper) hyper_config();
        for (const std::string stack : {"encoder", "decoder"}) {
            bool gen_written = false;
            for (index_t l = 1; l < m.layers; l += 2) {
                const std::string p = stack + ".block." + std::to_string(l) + (stack == "decoder" ? ".layer.2.mlp." : ".layer.1.mlp.");
                w.matrix(p + "router.classifier.weight", e, d);
                for (index_t x = 0; x < e; ++x) {
                    w.matrix(p + "experts.expert_" + std::to_string(x) + ".wi.weight", ff, d);
                    w.matrix(p + "experts.expert_" + std::to_string(x) + ".wo.weight", d, ff);
                }
                if (hyper) hyper_tensors(p, stack + ".param_gen.", m.layers, !gen_written), gen_written = true;
            }
        }
        break;
    }
    case Family::hypermoe_gpt2:
        c.update({{"model_type", "gpt2"}, {"n_embd", d}, {"n_layer", m.layers}, {"n_experts", e}, {"k", k},
                  {"activation_function", "gelu_new"}, {"use_moe", "MoE"}});
        hyper_config();
        for (index_t l = 0; l < m.layers; ++l) {
            const std::string p = "transformer.h." + std::to_string(l) + ".mlp.";
            w.matrix(p + "w_gate", d, e);
            for (index_t x = 0; x < e; ++x) {
                const std::string q = p + "experts.expert_" + std::to_string(x) + ".";
                w.matrix(q + "c_fc.weight", d, 4 * d);
                w.vector(q + "c_fc.bias", 4 * d);
                w.matrix(q + "c_proj.weight", 4 * d, d);
                w.vector(q + "c_proj.bias", d);
            }
            hyper_tensors(p, "transformer.param_gen.", m.layers, l == 0);
        }
        break;
    }
    write_safetensors((fs::path(dir) / "model.safetensors").string(), w.tensors(), {{"format", "pt"}});
    std::ofstream(fs::path(dir) / "config.json") << c.dump(2);
}

} // namespace hypermoe
