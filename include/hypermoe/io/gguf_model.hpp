#pragma once
// A GGUF model seen as a Hugging Face checkpoint: the config.json its family loader reads, made
// from the GGUF metadata keys llama.cpp writes, and its MoE tensors under the Hugging Face names,
// each a view of the GGUF bytes (no copy). So every family loader (io/family/) reads a GGUF file
// unchanged, and the only GGUF-specific code is this translation.
//
// Architectures (general.architecture) and the family each becomes:
//   llama (with <arch>.expert_count > 0)  -> mixtral
//   qwen2moe                              -> qwen2_moe (softmax top-k, not renormalised; shared
//                                            expert with its sigmoid gate)
//   qwen3moe                              -> qwen3_moe (softmax top-k, renormalised: what
//                                            llama.cpp computes; every block MoE)
//   olmoe                                 -> olmoe (softmax top-k, not renormalised)
//   deepseek2                             -> deepseek_v3 (sigmoid or softmax gating, selection
//                                            bias exp_probs_b, groups, weight norm and scale,
//                                            shared experts, leading dense blocks)
//   gpt-oss                               -> gpt_oss (router bias ffn_gate_inp.bias, the
//                                            experts' biases blk.N.ffn_{gate,up,down}_exps.bias)
// The experts are read from the merged 3-D tensors blk.N.ffn_{gate,up,down}_exps.weight (expert
// e is slice e of the outermost dimension) or, in older llama files, from the per-expert
// blk.N.ffn_{gate,up,down}.E.weight. GGUF dims are innermost first; the names below are given
// the Hugging Face shape (outermost first).

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/io/gguf.hpp"

namespace hypermoe {

/// What a GGUF model is to the family loaders.
struct GgufCheckpoint {
    std::string architecture;          ///< general.architecture
    nlohmann::json config;             ///< the Hugging Face config the family reads
    std::vector<TensorInfo> tensors;   ///< MoE tensors under Hugging Face names (origin: the GGUF tensor)
    /// Every Hugging Face name the mapping knows, with the GGUF tensor(s) it is read from (for
    /// messages about a missing tensor). A routed expert's matrix is listed once per block and
    /// matrix, with `*` for the expert index in both (`gguf_source()` fills it in).
    std::map<std::string, std::string> sources;
};

namespace detail {

class GgufMapper {
public:
    explicit GgufMapper(const GgufView& g) : g_(g) {
        if (const auto parts = g_.integer("split.count"); parts && *parts > 1)
            throw config_error(detail::concat(g_.source(), ": one part of a split GGUF model (split.count = ", *parts,
                                              "); merge the parts into one file first (llama-gguf-split --merge)"));
        out_.architecture = required_string("general.architecture");
        arch_ = out_.architecture + ".";
    }

    GgufCheckpoint map() {
        const std::string& a = out_.architecture;
        if (a == "llama") llama();
        else if (a == "qwen2moe") qwen2moe();
        else if (a == "qwen3moe") qwen3moe();
        else if (a == "olmoe") olmoe();
        else if (a == "deepseek2") deepseek2();
        else if (a == "gpt-oss") gpt_oss();
        else
            throw config_error(detail::concat(g_.source(), ": general.architecture is \"", a,
                                              "\"; supported MoE architectures: llama (with experts), qwen2moe, qwen3moe, olmoe, deepseek2, gpt-oss"));
        return std::move(out_);
    }

private:
    [[nodiscard]] std::string required_string(const std::string& key) const {
        const auto v = g_.string(key);
        if (!v) throw config_error(detail::concat(g_.source(), ": no metadata '", key, "'"));
        return *v;
    }
    /// <arch>.<key> as an integer in [min, max]; required unless `fallback` is given.
    [[nodiscard]] index_t integer(const std::string& key, index_t min, std::optional<index_t> fallback = std::nullopt,
                                  index_t max = index_t{1} << 31) const {
        const auto v = g_.integer(arch_ + key);
        if (!v && !fallback) throw config_error(detail::concat(g_.source(), ": no metadata '", arch_, key, "'"));
        const index_t x = v ? *v : *fallback;
        if (x < min || x > max)
            throw config_error(detail::concat(g_.source(), ": metadata '", arch_, key, "' is ", x, ", expected an integer in [", min,
                                              ", ", max, "]"));
        return x;
    }
    /// Upper bounds of a block and an expert count (llama.cpp's are 512 and 512).
    static constexpr index_t max_blocks = 4096, max_experts = 4096;

    /// The sizes every MoE architecture has; then the experts' width from `ff_key` (or
    /// `ff_fallback_key` when that is absent).
    void common(const char* model_type, const std::string& ff_key, const std::string& ff_fallback_key = "") {
        layers_ = integer("block_count", 1, std::nullopt, max_blocks);
        d_ = integer("embedding_length", 1);
        experts_ = integer("expert_count", 0, 0, max_experts);
        if (experts_ == 0)
            throw config_error(detail::concat(g_.source(), ": ", out_.architecture, " model without experts (", arch_,
                                              "expert_count is absent or 0): not an MoE model"));
        const auto fallback = ff_fallback_key.empty() ? std::nullopt : g_.integer(arch_ + ff_fallback_key);
        ff_ = integer(ff_key, 1, fallback);
        out_.config = {{"model_type", model_type}, {"hidden_size", d_}, {"num_hidden_layers", layers_},
                       {"num_experts_per_tok", integer("expert_used_count", 1, std::nullopt, max_experts)}, {"hidden_act", "silu"}};
    }

    /// One tensor under `hf`, read from GGUF tensor `gguf` when present.
    void one(const std::string& hf, const std::string& gguf, std::optional<std::vector<index_t>> shape = std::nullopt) {
        out_.sources[hf] = "GGUF '" + gguf + "'";
        const TensorInfo* t = g_.find(gguf);
        if (t == nullptr) return;
        TensorInfo m = *t;
        m.name = hf, m.origin = "GGUF '" + gguf + "'";
        // A 1-D tensor read as one row ([n] -> [1, n]), as ffn_gate_inp_shexp.
        if (shape && m.shape.size() == 1 && shape->size() == 2 && (*shape)[0] == 1) m.shape = {1, m.shape[0]};
        out_.tensors.push_back(std::move(m));
    }

    /// Expert e's matrix under `hf(e)`, from the merged `blk.L.<merged>.weight` (slice e) or the
    /// per-expert `blk.L.<single>.e.weight`; with `kind` "bias", its bias vector from the merged
    /// `blk.L.<merged>.bias` ([E, N] -> [N]) or `blk.L.<single>.e.bias`.
    void experts(index_t l, const std::function<std::string(const std::string&)>& hf, const std::string& merged,
                 const std::string& single, const std::string& kind = "weight") {
        const std::string b = "blk." + std::to_string(l) + ".";
        const std::string whole = b + merged + "." + kind;
        const std::size_t rank = kind == "weight" ? 3 : 2;
        out_.sources[hf("*")] = "GGUF '" + whole + "' or '" + b + single + ".*." + kind + "'";
        const TensorInfo* t = g_.find(whole);
        for (index_t e = 0; e < experts_; ++e) {
            const std::string each = b + single + "." + std::to_string(e) + "." + kind;
            if (t == nullptr) {
                if (const TensorInfo* u = g_.find(each)) {
                    TensorInfo m = *u;
                    m.name = hf(std::to_string(e)), m.origin = "GGUF '" + each + "'";
                    out_.tensors.push_back(std::move(m));
                }
                continue;
            }
            TensorInfo m = *t;
            m.name = hf(std::to_string(e));
            if (t->shape.size() == rank && t->shape[0] == experts_) { // [E, N, K] -> expert e's [N, K]; [E, N] -> [N]
                const std::size_t bytes = (t->end - t->begin) / std::size_t(experts_);
                m.shape.assign(t->shape.begin() + 1, t->shape.end());
                m.begin = t->begin + std::size_t(e) * bytes, m.end = m.begin + bytes;
                m.origin = detail::concat("GGUF '", whole, "' expert ", e);
            } else {
                m.origin = detail::concat("GGUF '", whole, "' ", t->shape_string(), ", expected [", experts_, rank == 3 ? ", N, K]" : ", N]");
            }
            out_.tensors.push_back(std::move(m));
        }
    }

    /// The routed experts and router of block l under `p` (Hugging Face prefix of the MLP), with
    /// the family's names for the three matrices.
    void routed(index_t l, const std::string& p, const char* gate, const char* up, const char* down) {
        const std::string b = "blk." + std::to_string(l) + ".";
        one(p + "gate.weight", b + "ffn_gate_inp.weight");
        const auto name = [&](const char* w) { return [p, w](const std::string& e) { return p + "experts." + e + "." + w; }; };
        experts(l, name(gate), "ffn_gate_exps", "ffn_gate");
        experts(l, name(up), "ffn_up_exps", "ffn_up");
        experts(l, name(down), "ffn_down_exps", "ffn_down");
    }

    /// Hugging Face's prefix of block l's MLP in the Qwen, OLMoE, DeepSeek and gpt-oss layouts.
    [[nodiscard]] static std::string mlp(index_t l) { return "model.layers." + std::to_string(l) + ".mlp."; }

    /// routed() for the experts.<e>.{gate,up,down}_proj.weight of those layouts.
    void routed_proj(index_t l) { routed(l, mlp(l), "gate_proj.weight", "up_proj.weight", "down_proj.weight"); }

    /// A shared expert of block l under `p` from blk.l.ffn_{gate,up,down}_shexp.
    void shared(index_t l, const std::string& p) {
        const std::string b = "blk." + std::to_string(l) + ".";
        one(p + "gate_proj.weight", b + "ffn_gate_shexp.weight");
        one(p + "up_proj.weight", b + "ffn_up_shexp.weight");
        one(p + "down_proj.weight", b + "ffn_down_shexp.weight");
    }

    void llama() {
        common("mixtral", "feed_forward_length");
        out_.config.update({{"intermediate_size", ff_}, {"num_local_experts", experts_}});
        for (index_t l = 0; l < layers_; ++l)
            routed(l, "model.layers." + std::to_string(l) + ".block_sparse_moe.", "w1.weight", "w3.weight", "w2.weight");
    }

    void qwen2moe() {
        common("qwen2_moe", "expert_feed_forward_length");
        const index_t shared_ff = integer("expert_shared_feed_forward_length", 0, 0);
        out_.config.update({{"moe_intermediate_size", ff_}, {"num_experts", experts_}, {"shared_expert_intermediate_size", shared_ff},
                            {"norm_topk_prob", false}, {"decoder_sparse_step", 1}, {"mlp_only_layers", nlohmann::json::array()}});
        for (index_t l = 0; l < layers_; ++l) {
            const std::string p = mlp(l);
            routed_proj(l);
            if (shared_ff == 0) continue;
            shared(l, p + "shared_expert.");
            one(p + "shared_expert_gate.weight", "blk." + std::to_string(l) + ".ffn_gate_inp_shexp.weight", std::vector<index_t>{1, d_});
        }
    }

    void qwen3moe() {
        // llama.cpp runs every block as MoE and renormalises the k weights (norm_w) for qwen3moe.
        common("qwen3_moe", "expert_feed_forward_length");
        out_.config.update({{"moe_intermediate_size", ff_}, {"num_experts", experts_}, {"norm_topk_prob", true},
                            {"decoder_sparse_step", 1}, {"mlp_only_layers", nlohmann::json::array()}});
        for (index_t l = 0; l < layers_; ++l) routed_proj(l);
    }

    void olmoe() {
        // llama.cpp reads OLMoE's expert width from feed_forward_length.
        common("olmoe", "expert_feed_forward_length", "feed_forward_length");
        out_.config.update({{"intermediate_size", ff_}, {"num_experts", experts_}, {"norm_topk_prob", false}});
        for (index_t l = 0; l < layers_; ++l) routed_proj(l);
    }

    void deepseek2() {
        common("deepseek_v3", "expert_feed_forward_length");
        const index_t leading = integer("leading_dense_block_count", 0, 0);
        // expert_gating_func: 1 softmax, 2 sigmoid; absent (DeepSeek-V2 files) means softmax, as in llama.cpp.
        const index_t gating = integer("expert_gating_func", 0, 1);
        if (gating != 1 && gating != 2)
            throw config_error(detail::concat(g_.source(), ": metadata '", arch_, "expert_gating_func' is ", gating,
                                              ", expected 1 (softmax) or 2 (sigmoid)"));
        const auto scale = g_.number(arch_ + "expert_weights_scale");
        const auto norm = g_.boolean(arch_ + "expert_weights_norm");
        out_.config.update({{"moe_intermediate_size", ff_}, {"n_routed_experts", experts_},
                            {"n_shared_experts", integer("expert_shared_count", 0, 0)}, {"first_k_dense_replace", leading},
                            {"moe_layer_freq", 1}, {"routed_scaling_factor", scale.value_or(1.0)}, {"norm_topk_prob", norm.value_or(false)},
                            {"n_group", integer("expert_group_count", 1, 1)}, {"topk_group", integer("expert_group_used_count", 1, 1)},
                            {"scoring_func", gating == 2 ? "sigmoid" : "softmax"}, {"topk_method", "noaux_tc"}});
        for (index_t l = leading; l < layers_; ++l) {
            const std::string p = mlp(l);
            routed_proj(l);
            one(p + "gate.e_score_correction_bias", "blk." + std::to_string(l) + ".exp_probs_b.bias");
            shared(l, p + "shared_experts.");
        }
    }

    void gpt_oss() {
        // llama.cpp's converter splits Hugging Face's fused gate_up_proj into ffn_gate_exps and
        // ffn_up_exps (and their biases), and writes swiglu_limit nowhere: its SWIGLU_OAI uses 7.
        common("gpt_oss", "expert_feed_forward_length");
        out_.config.update({{"intermediate_size", ff_}, {"num_local_experts", experts_}, {"swiglu_limit", 7.0}});
        for (index_t l = 0; l < layers_; ++l) {
            const std::string p = mlp(l), b = "blk." + std::to_string(l) + ".";
            one(p + "router.weight", b + "ffn_gate_inp.weight");
            one(p + "router.bias", b + "ffn_gate_inp.bias");
            for (const auto& [g, h] : {std::pair{"gate", "gate_proj"}, {"up", "up_proj"}, {"down", "down_proj"}})
                for (const char* kind : {"weight", "bias"}) {
                    const std::string suffix = std::string(".") + h + "." + kind;
                    experts(l, [&](const std::string& e) { return p + "experts." + e + suffix; }, std::string("ffn_") + g + "_exps",
                            std::string("ffn_") + g, kind);
                }
        }
    }

    const GgufView& g_;
    std::string arch_;
    GgufCheckpoint out_;
    index_t layers_ = 0, d_ = 0, experts_ = 0, ff_ = 0;
};

} // namespace detail

/// Where a Hugging Face name of `g` is read from ("GGUF '...'"), "" if the mapping does not know it.
[[nodiscard]] inline std::string gguf_source(const GgufCheckpoint& g, const std::string& name) {
    if (const auto it = g.sources.find(name); it != g.sources.end()) return it->second;
    // A routed expert: "...experts.<e>...." is listed as "...experts.*....".
    const std::string tag = ".experts.";
    const std::size_t at = name.find(tag);
    if (at == std::string::npos) return "";
    const std::size_t begin = at + tag.size(), end = name.find('.', begin);
    if (end == std::string::npos || end == begin) return "";
    const std::string e = name.substr(begin, end - begin);
    const auto it = g.sources.find(name.substr(0, begin) + "*" + name.substr(end));
    if (it == g.sources.end()) return "";
    std::string out = it->second;
    for (std::size_t star; (star = out.find('*')) != std::string::npos;) out.replace(star, 1, e);
    return out;
}

/// The family config and Hugging Face-named MoE tensors of a GGUF model (see the top of this file);
/// config_error when the architecture or a metadata key is missing or unsupported.
[[nodiscard]] inline GgufCheckpoint gguf_checkpoint(const GgufView& g) { return detail::GgufMapper(g).map(); }

} // namespace hypermoe
