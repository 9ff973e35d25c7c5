#pragma once
// Family adapters: what a Hugging Face config says about a model's MoE blocks, and how to build
// one of them from its checkpoint. Supported: mixtral, qwen2_moe, olmoe, deepseek_v3,
// switch_transformers, and the two HyperMoE reference variants (hypermoe_gpt2, hypermoe_switch).
// Tensor names, layouts and routing rules are those of ../docs/checkpoints.md.
//
// A loaded block is a LoadedMoeBlock<Backend>: a std::variant over the layer types of the
// families (a closed set), so no virtual dispatch is added besides DynamicStack's.

#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "hypermoe/expert/expert.hpp"
#include "hypermoe/hyper/hyper.hpp"
#include "hypermoe/io/checkpoint.hpp"
#include "hypermoe/io/tensor_binder.hpp"
#include "hypermoe/layer/moe_layer.hpp"
#include "hypermoe/router/router.hpp"

namespace hypermoe {

enum class Family { mixtral, qwen2_moe, olmoe, deepseek_v3, switch_transformers, hypermoe_gpt2, hypermoe_switch };

inline constexpr std::string_view supported_families =
    "mixtral, qwen2_moe, olmoe, deepseek_v3, switch_transformers, hypermoe_gpt2, hypermoe_switch";

[[nodiscard]] constexpr std::string_view to_string(Family f) noexcept {
    constexpr std::string_view names[] = {"mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "switch_transformers",
                                          "hypermoe_gpt2", "hypermoe_switch"};
    return names[static_cast<int>(f)];
}

/// Typed access to config.json values: config_error names the file, key and what was wrong.
class ConfigReader {
public:
    ConfigReader(const nlohmann::json& j, std::string file) : j_(j), file_(std::move(file)) {}

    [[nodiscard]] bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
    /// Largest integer a config may give: sizes multiply (d x r, T x d x ff), and no width or
    /// count of a real model comes near 2^31, so products of two stay far from overflowing.
    static constexpr index_t max_integer = index_t{1} << 31;

    [[nodiscard]] index_t integer(const char* key, index_t min = 0) const {
        const auto& v = need(key);
        if (!v.is_number_integer()) bad(key, v, "an integer");
        if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(max_integer))
            throw config_error(detail::concat(file_, ": '", key, "' is ", v.dump(), ", expected <= ", max_integer));
        const index_t i = v.get<index_t>();
        if (i < min) throw config_error(detail::concat(file_, ": '", key, "' is ", i, ", expected >= ", min));
        if (i > max_integer) throw config_error(detail::concat(file_, ": '", key, "' is ", i, ", expected <= ", max_integer));
        return i;
    }
    [[nodiscard]] index_t integer_or(const char* key, index_t fallback, index_t min = 0) const {
        return has(key) ? integer(key, min) : fallback;
    }
    [[nodiscard]] double number(const char* key) const {
        const auto& v = need(key);
        if (!v.is_number()) bad(key, v, "a number");
        return v.get<double>();
    }
    [[nodiscard]] double number_or(const char* key, double fallback) const { return has(key) ? number(key) : fallback; }
    [[nodiscard]] bool boolean_or(const char* key, bool fallback) const {
        if (!has(key)) return fallback;
        const auto& v = j_.at(key);
        if (!v.is_boolean()) bad(key, v, "true or false");
        return v.get<bool>();
    }
    [[nodiscard]] std::string string_or(const char* key, std::string fallback) const {
        if (!has(key)) return fallback;
        const auto& v = j_.at(key);
        if (!v.is_string()) bad(key, v, "a string");
        return v.get<std::string>();
    }
    [[nodiscard]] std::vector<index_t> integers_or_empty(const char* key) const {
        std::vector<index_t> out;
        if (!has(key)) return out;
        const auto& v = j_.at(key);
        if (!v.is_array()) bad(key, v, "an array of integers");
        for (const auto& e : v) {
            if (!e.is_number_integer()) bad(key, v, "an array of integers");
            out.push_back(e.get<index_t>());
        }
        return out;
    }
    /// Requires `key` to equal one of the accepted strings (e.g. an activation we implement).
    void expect_string(const char* key, std::string_view fallback, std::initializer_list<std::string_view> accepted) const {
        const std::string v = string_or(key, std::string(fallback));
        for (const auto a : accepted)
            if (v == a) return;
        std::string list;
        for (const auto a : accepted) list += (list.empty() ? "" : ", ") + std::string(a);
        throw config_error(detail::concat(file_, ": '", key, "' is \"", v, "\", supported: ", list));
    }
    [[nodiscard]] const std::string& file() const noexcept { return file_; }

private:
    const nlohmann::json& need(const char* key) const {
        if (!has(key)) throw config_error(detail::concat(file_, ": missing key '", key, "'"));
        return j_.at(key);
    }
    [[noreturn]] void bad(const char* key, const nlohmann::json& v, const char* expected) const {
        throw config_error(detail::concat(file_, ": '", key, "' is ", v.dump(), ", expected ", expected));
    }
    const nlohmann::json& j_;
    std::string file_;
};

/// The family of a config (model_type, plus use_hypernet for the HyperMoE variants).
[[nodiscard]] inline Family detect_family(const nlohmann::json& config, const std::string& file) {
    const ConfigReader c(config, file);
    const std::string type = c.string_or("model_type", "");
    const bool hyper = c.boolean_or("use_hypernet", false);
    if (type == "mixtral") return Family::mixtral;
    if (type == "qwen2_moe") return Family::qwen2_moe;
    if (type == "olmoe") return Family::olmoe;
    if (type == "deepseek_v3") return Family::deepseek_v3;
    if (type == "switch_transformers") return hyper ? Family::hypermoe_switch : Family::switch_transformers;
    if (type == "gpt2" && hyper && c.string_or("use_moe", "") == "MoE") return Family::hypermoe_gpt2;
    throw config_error(detail::concat(file, ": model_type \"", type, "\"", type == "gpt2" ? " without HyperMoE keys" : "",
                                      " is not a supported family; supported: ", supported_families));
}

/// One MoE block of a model: its index within its stack, and the stack ("" for decoder-only).
struct MoeBlockRef {
    index_t layer = 0;
    std::string stack;
    friend bool operator==(const MoeBlockRef&, const MoeBlockRef&) = default;
};

/// What inspect prints: the family, its MoE blocks, sizes, routing and dtypes.
struct ModelInfo {
    Family family{};
    index_t d_model = 0, d_ff = 0, experts = 0, top_k = 0;
    index_t shared_ff = 0;       ///< 0 = no shared expert
    std::string expert_kind;     ///< "SwiGLU" or the FFN activation
    std::string routing;         ///< one line
    std::vector<MoeBlockRef> moe_blocks;
    std::set<std::string> dtypes;
    index_t adapter_rank = 0;    ///< HyperMoE only
};

namespace detail {

inline std::vector<index_t> switch_sparse_blocks(index_t layers, index_t sparse) {
    std::vector<index_t> out;
    if (sparse <= 0) return out;
    const index_t step = layers / sparse;
    for (index_t i = 0; i < layers; ++i)
        if (step == 1 || (step > 0 && i % step == 1)) out.push_back(i);
    return out;
}

} // namespace detail

/// What a config says (everything but the dtypes, which need the tensors); `file` names it in errors.
[[nodiscard]] inline ModelInfo describe(const nlohmann::json& config, const std::string& file) {
    if (!config.is_object()) throw config_error(detail::concat(file, ": not a JSON object"));
    const ConfigReader c(config, file);
    ModelInfo m;
    m.family = detect_family(config, file);
    const auto all = [&](index_t n, const std::string& stack) {
        for (index_t i = 0; i < n; ++i) m.moe_blocks.push_back({i, stack});
    };
    switch (m.family) {
    case Family::mixtral:
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("intermediate_size", 1);
        m.experts = c.integer("num_local_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.expert_kind = "SwiGLU", m.routing = "softmax, top-k, renormalised";
        all(c.integer("num_hidden_layers", 1), "");
        break;
    case Family::qwen2_moe: {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("moe_intermediate_size", 1);
        m.experts = c.integer("num_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.shared_ff = c.integer_or("shared_expert_intermediate_size", 0);
        m.expert_kind = "SwiGLU";
        m.routing = std::string("softmax, top-k, ") + (c.boolean_or("norm_topk_prob", false) ? "renormalised" : "not renormalised") +
                    ", sigmoid-gated shared expert";
        const auto only = c.integers_or_empty("mlp_only_layers");
        const index_t step = c.integer_or("decoder_sparse_step", 1, 1);
        for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i)
            if (std::find(only.begin(), only.end(), i) == only.end() && (i + 1) % step == 0) m.moe_blocks.push_back({i, ""});
        break;
    }
    case Family::olmoe:
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("intermediate_size", 1);
        m.experts = c.integer("num_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.expert_kind = "SwiGLU";
        m.routing = std::string("softmax, top-k, ") + (c.boolean_or("norm_topk_prob", false) ? "renormalised" : "not renormalised");
        all(c.integer("num_hidden_layers", 1), "");
        break;
    case Family::deepseek_v3: {
        m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer("moe_intermediate_size", 1);
        m.experts = c.integer("n_routed_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
        m.shared_ff = m.d_ff * c.integer_or("n_shared_experts", 0);
        m.expert_kind = "SwiGLU";
        m.routing = detail::concat("sigmoid + selection bias, ", c.integer("n_group", 1), " groups keep ",
                                   c.integer("topk_group", 1), ", top-k, ",
                                   c.boolean_or("norm_topk_prob", false) ? "renormalised" : "not renormalised", ", x ",
                                   c.number_or("routed_scaling_factor", 1.0), ", ungated shared experts");
        // As DeepseekV3DecoderLayer: MoE when layer >= first_k_dense_replace and layer % moe_layer_freq == 0.
        const index_t first = c.integer_or("first_k_dense_replace", 0), freq = c.integer_or("moe_layer_freq", 1, 1);
        for (index_t i = first; i < c.integer("num_hidden_layers", 1); ++i)
            if (i % freq == 0) m.moe_blocks.push_back({i, ""});
        break;
    }
    case Family::switch_transformers:
    case Family::hypermoe_switch: {
        m.d_model = c.integer("d_model", 1), m.d_ff = c.integer("d_ff", 1);
        m.experts = c.integer("num_experts", 1), m.top_k = 1;
        if (c.boolean_or("router_bias", false))
            throw config_error(detail::concat(file, ": 'router_bias' is true, supported: false (the router classifier's "
                                                    "bias is not loaded)"));
        m.expert_kind = c.string_or("dense_act_fn", "relu") + " FFN";
        m.routing = detail::concat("softmax, top-1, capacity ", c.integer("expert_capacity", 1),
                                   " per expert per sequence, dropped tokens pass through scaled");
        const index_t enc = c.integer("num_layers", 1), dec = c.integer_or("num_decoder_layers", enc);
        for (const index_t i : detail::switch_sparse_blocks(enc, c.integer_or("num_sparse_encoder_layers", 0)))
            m.moe_blocks.push_back({i, "encoder"});
        for (const index_t i : detail::switch_sparse_blocks(dec, c.integer_or("num_sparse_decoder_layers", 0)))
            m.moe_blocks.push_back({i, "decoder"});
        if (m.family == Family::hypermoe_switch) m.adapter_rank = c.integer("adapter_dim", 1), m.routing += ", + HyperExpert";
        break;
    }
    case Family::hypermoe_gpt2:
        m.d_model = c.integer("n_embd", 1), m.d_ff = 4 * m.d_model;
        m.experts = c.integer("n_experts", 1), m.top_k = c.integer("k", 1);
        m.expert_kind = "gelu_new FFN with biases";
        m.routing = "softmax, top-k, renormalised, + HyperExpert";
        m.adapter_rank = c.integer("adapter_dim", 1);
        all(c.integer("n_layer", 1), "");
        break;
    }
    if (m.top_k > m.experts)
        throw config_error(detail::concat(file, ": top-k is ", m.top_k, ", expected at most the ", m.experts, " experts"));
    return m;
}

[[nodiscard]] inline ModelInfo describe(const Checkpoint& ck) {
    ModelInfo m = describe(ck.config(), ck.dir() + "/config.json");
    m.dtypes = ck.dtypes();
    return m;
}

/// How to load a block.
struct LoadOptions {
    /// dtype the expert weights are kept in; default: f32 (bf16 checkpoints are widened, exactly).
    dtype storage = dtype::f32;
    HyperOptions hyper = {};
    /// What a token dropped by capacity outputs (Switch families).
    DroppedTokens dropped = DroppedTokens::scaled_input;
};

template <Backend B>
class LoadedMoeBlock {
public:
    using Glu = GluExpert<B, Silu>;
    using Mixtral = MoeLayer<Glu, TopKRouter>;
    using Qwen = MoeLayer<Glu, TopKRouter, SharedExpert<Glu>>;
    using DeepSeek = MoeLayer<Glu, DeepSeekRouter, SharedExpert<Glu>>;
    using Switch = MoeLayer<FfnExpert<B, Relu>, SwitchRouter>;
    using HyperGpt2 = HyperMoeLayer<FfnExpert<B, GeluTanh>, TopKRouter>;
    using HyperSwitch = HyperMoeLayer<FfnExpert<B, Relu>, SwitchRouter>;
    using Layer = std::variant<Mixtral, Qwen, DeepSeek, Switch, HyperGpt2, HyperSwitch>;
    // A Layer whose widths are read from the checkpoint.
    static constexpr index_t static_in_width = dynamic;
    static constexpr index_t static_out_width = dynamic;

    LoadedMoeBlock(Layer layer, ModelInfo info, MoeBlockRef block)
        : layer_(std::move(layer)), info_(std::move(info)), block_(std::move(block)) {}

    [[nodiscard]] const ModelInfo& info() const noexcept { return info_; }
    [[nodiscard]] const MoeBlockRef& block() const noexcept { return block_; }
    [[nodiscard]] const Layer& layer() const noexcept { return layer_; }
    [[nodiscard]] index_t d_model() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t in_width() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t out_width() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t slots() const noexcept { return visit_moe([](const auto& m) { return m.router().slots(); }); }
    [[nodiscard]] bool has_capacity() const noexcept {
        return std::holds_alternative<Switch>(layer_) || std::holds_alternative<HyperSwitch>(layer_);
    }
    [[nodiscard]] bool is_hyper() const noexcept {
        return std::holds_alternative<HyperGpt2>(layer_) || std::holds_alternative<HyperSwitch>(layer_);
    }

    /// Scratch of forward() for `rows` tokens: a Workspace of this size runs it without growing.
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return std::visit([&](const auto& l) { return l.workspace_bytes(rows); }, layer_);
    }

    /// The Layer entry point: y = block(x), routed with a per-thread plan.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& context = {}) const {
        thread_local RoutingPlan plan;
        forward(x, y, ws, plan, context);
    }

    /// y = block(x), routed into `plan`; with_hyper = false runs a HyperMoE block without its
    /// HyperExpert.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, RoutingPlan& plan,
                 const Context& context = {}, bool with_hyper = true) const {
        std::visit(
            [&](const auto& l) {
                if constexpr (requires { l.moe(); }) {
                    if (with_hyper) l.forward(x, y, ws, plan, context);
                    else l.moe().forward(x, y, ws, plan, context);
                } else {
                    l.forward(x, y, ws, plan, context);
                }
            },
            layer_);
    }

    /// The hypernetwork of a HyperMoE block (null otherwise), to share with the stack's other blocks.
    [[nodiscard]] std::shared_ptr<const Hypernetwork<B>> shared_hypernetwork() const {
        return std::visit(
            [](const auto& l) -> std::shared_ptr<const Hypernetwork<B>> {
                if constexpr (requires { l.moe(); }) return l.shared_hypernetwork();
                else return nullptr;
            },
            layer_);
    }

    /// The HyperExpert cache of a HyperMoE block (null otherwise).
    [[nodiscard]] HyperExpertCache<B>* hyper_cache() const {
        return std::visit(
            [](const auto& l) -> HyperExpertCache<B>* {
                if constexpr (requires { l.moe(); }) return &l.cache();
                else return nullptr;
            },
            layer_);
    }

    /// The HyperExpert term alone (HyperMoE blocks only).
    void hyper_term(ConstMatrixView<float> x, const RoutingPlan& plan, MatrixView<float> out, Workspace& ws) const {
        std::visit(
            [&](const auto& l) {
                if constexpr (requires { l.moe(); }) l.hyper_term(x, plan, out, ws);
                else throw config_error("LoadedMoeBlock::hyper_term: not a HyperMoE block");
            },
            layer_);
    }

    /// Calls f with the block's MoeLayer (for HyperMoE: the MoE part).
    template <class F>
    decltype(auto) visit_moe(F&& f) const {
        return std::visit(
            [&](const auto& l) -> decltype(auto) {
                if constexpr (requires { l.moe(); }) return f(l.moe());
                else return f(l);
            },
            layer_);
    }

private:
    Layer layer_;
    ModelInfo info_;
    MoeBlockRef block_;
};

namespace detail {

/// The views of n GLU experts' weights under `prefix`<e>.<name>.
inline std::vector<GluWeights> glu_weights(TensorBinder& t, const std::string& prefix, index_t n, index_t d, index_t ff,
                                           const char* gate, const char* up, const char* down) {
    std::vector<GluWeights> w;
    for (index_t e = 0; e < n; ++e) {
        const std::string p = prefix + std::to_string(e) + ".";
        w.push_back({t.matrix(p + gate, ff, d), t.matrix(p + up, ff, d), t.matrix(p + down, d, ff)});
    }
    return w;
}

template <class E, class W>
std::vector<E> build_experts(const std::vector<W>& weights, dtype storage) {
    std::vector<E> out;
    out.reserve(weights.size());
    for (const auto& w : weights) out.emplace_back(w, ExpertOptions{.storage = storage});
    return out;
}

/// The views of a stack's hypernetwork weights under `p` (the reference code's `param_gen.`).
inline HypernetworkWeights hypernetwork_weights(TensorBinder& t, const std::string& p, index_t layers, index_t dl, index_t q,
                                                index_t h, index_t d, index_t r) {
    return {t.matrix(p + "layer_embed.weight", layers, dl),
            t.matrix(p + "decoder.linear1.weight", h, q + dl), t.vector(p + "decoder.linear1.bias", h),
            t.matrix(p + "decoder.weight_down.weight", d * r, h), t.vector(p + "decoder.weight_down.bias", d * r),
            t.matrix(p + "decoder.weight_up.weight", r * d, h), t.vector(p + "decoder.weight_up.bias", r * d),
            t.matrix(p + "decoder.bias_down.weight", r, h), t.vector(p + "decoder.bias_down.bias", r),
            t.matrix(p + "decoder.bias_up.weight", d, h), t.vector(p + "decoder.bias_up.bias", d)};
}

} // namespace detail

namespace detail {

/// A config_error naming the model's MoE blocks unless `ref` is one of them.
inline void check_moe_block(const std::string& dir, const ModelInfo& info, const MoeBlockRef& ref) {
    if (std::find(info.moe_blocks.begin(), info.moe_blocks.end(), ref) != info.moe_blocks.end()) return;
    std::string list;
    for (const auto& b : info.moe_blocks)
        list += (list.empty() ? "" : ", ") + (b.stack.empty() ? "" : b.stack + " ") + std::to_string(b.layer);
    throw config_error(detail::concat(dir, ": block ", ref.stack.empty() ? "" : ref.stack + " ", ref.layer,
                                      " is not an MoE block; MoE blocks: ", list.empty() ? "none" : list));
}

/// Builds MoE block `layer` of `stack` from a checkpoint whose config was described once as
/// `info`. A HyperMoE block uses `hypernetwork` when given (its tensors are then not bound again),
/// else loads its stack's.
template <Backend B>
[[nodiscard]] LoadedMoeBlock<B> load_block(const Checkpoint& ck, ModelInfo info, index_t layer, std::string stack,
                                           const LoadOptions& opt, std::shared_ptr<const Hypernetwork<B>> hypernetwork) {
    const std::string file = ck.dir() + "/config.json";
    const ConfigReader c(ck.config(), file);
    const bool two_stacks = info.family == Family::switch_transformers || info.family == Family::hypermoe_switch;
    if (two_stacks && stack.empty()) stack = "encoder";
    if (!two_stacks && !stack.empty())
        throw config_error(detail::concat(file, ": stack \"", stack, "\" given, but ", to_string(info.family),
                                          " has a single stack"));
    if (two_stacks && stack != "encoder" && stack != "decoder")
        throw config_error(detail::concat("stack is \"", stack, "\", expected encoder or decoder"));
    const MoeBlockRef ref{layer, stack};
    check_moe_block(ck.dir(), info, ref);
    const index_t d = info.d_model, ff = info.d_ff, e = info.experts, k = info.top_k;
    TensorBinder t(ck, detail::concat(to_string(info.family), " block ", stack.empty() ? "" : stack + " ", layer));
    using L = LoadedMoeBlock<B>;
    const std::string layer_s = std::to_string(layer);

    switch (info.family) {
    case Family::mixtral: {
        c.expect_string("hidden_act", "silu", {"silu"});
        const std::string p = "model.layers." + layer_s + ".block_sparse_moe.";
        const WeightView gate = t.matrix(p + "gate.weight", e, d);
        const auto w = detail::glu_weights(t, p + "experts.", e, d, ff, "w1.weight", "w3.weight", "w2.weight");
        t.finish();
        return L(typename L::Mixtral(gate, TopKRouter(e, TopK{k}, {.weighting = {.renormalize = true}}),
                                     detail::build_experts<typename L::Glu>(w, opt.storage)),
                 std::move(info), ref);
    }
    case Family::qwen2_moe:
    case Family::olmoe: {
        c.expect_string("hidden_act", "silu", {"silu"});
        const std::string p = "model.layers." + layer_s + ".mlp.";
        const WeightView gate = t.matrix(p + "gate.weight", e, d);
        const auto w = detail::glu_weights(t, p + "experts.", e, d, ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        const TopKRouter router(e, TopK{k}, {.weighting = {.renormalize = c.boolean_or("norm_topk_prob", false)}});
        if (info.family == Family::olmoe || info.shared_ff == 0) {
            t.finish();
            return L(typename L::Mixtral(gate, router, detail::build_experts<typename L::Glu>(w, opt.storage)), std::move(info), ref);
        }
        const index_t sf = info.shared_ff;
        const GluWeights sw{t.matrix(p + "shared_expert.gate_proj.weight", sf, d), t.matrix(p + "shared_expert.up_proj.weight", sf, d),
                            t.matrix(p + "shared_expert.down_proj.weight", d, sf)};
        const WeightView shared_gate = t.matrix(p + "shared_expert_gate.weight", 1, d);
        t.finish();
        return L(typename L::Qwen(gate, router, detail::build_experts<typename L::Glu>(w, opt.storage),
                                  SharedExpert<typename L::Glu>(typename L::Glu(sw, {.storage = opt.storage}), shared_gate)),
                 std::move(info), ref);
    }
    case Family::deepseek_v3: {
        c.expect_string("hidden_act", "silu", {"silu"});
        c.expect_string("scoring_func", "sigmoid", {"sigmoid"});
        c.expect_string("topk_method", "noaux_tc", {"noaux_tc"});
        const std::string p = "model.layers." + layer_s + ".mlp.";
        const WeightView gate = t.matrix(p + "gate.weight", e, d);
        const auto bias = t.vector(p + "gate.e_score_correction_bias", e);
        const auto w = detail::glu_weights(t, p + "experts.", e, d, ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        const index_t sf = info.shared_ff;
        if (sf == 0) throw config_error(detail::concat(file, ": n_shared_experts is 0; deepseek_v3 blocks have shared experts"));
        const GluWeights sw{t.matrix(p + "shared_experts.gate_proj.weight", sf, d),
                            t.matrix(p + "shared_experts.up_proj.weight", sf, d),
                            t.matrix(p + "shared_experts.down_proj.weight", d, sf)};
        t.finish();
        const DeepSeekRouter router(
            e, GroupLimitedTopK{.k = k, .n_group = c.integer("n_group", 1), .topk_group = c.integer("topk_group", 1)},
            {.weighting = {.renormalize = c.boolean_or("norm_topk_prob", false), .epsilon = 1e-20,
                           .scale = float(c.number_or("routed_scaling_factor", 1.0))},
             .selection_bias = {bias.begin(), bias.end()}});
        return L(typename L::DeepSeek(gate, router, detail::build_experts<typename L::Glu>(w, opt.storage),
                                      SharedExpert<typename L::Glu>(typename L::Glu(sw, {.storage = opt.storage}))),
                 std::move(info), ref);
    }
    case Family::switch_transformers:
    case Family::hypermoe_switch: {
        c.expect_string("dense_act_fn", "relu", {"relu"});
        const bool dec = stack == "decoder";
        const std::string p = stack + ".block." + layer_s + (dec ? ".layer.2.mlp." : ".layer.1.mlp.");
        const WeightView gate = t.matrix(p + "router.classifier.weight", e, d);
        std::vector<FfnWeights> w;
        for (index_t x = 0; x < e; ++x) {
            const std::string q = p + "experts.expert_" + std::to_string(x) + ".";
            w.push_back({t.matrix(q + "wi.weight", ff, d), t.matrix(q + "wo.weight", d, ff)});
        }
        const SwitchRouter router(e, Top1Capacity{c.integer("expert_capacity", 1)});
        if (info.family == Family::switch_transformers) {
            t.finish();
            return L(typename L::Switch(gate, router, detail::build_experts<FfnExpert<B, Relu>>(w, opt.storage), NoSharedExpert{},
                                        {.dropped = opt.dropped}),
                     std::move(info), ref);
        }
        const index_t de = c.integer("experts_embedding_dim", 1), pd = c.integer("process_dim", 1), q = c.integer("hypernet_input", 1);
        const index_t h = c.integer("hypernetwork_bottleneck", 1), dl = c.integer("layer_emb_dim", 1), r = info.adapter_rank;
        const index_t layers = dec ? c.integer_or("num_decoder_layers", c.integer("num_layers", 1)) : c.integer("num_layers", 1);
        const WeightView emb = t.matrix(p + "n_experts_embedding.weight", e, de);
        const ProjectorWeights pw{t.matrix(p + "embedding_process.0.weight", pd, de), t.vector(p + "embedding_process.0.bias", pd),
                                  t.matrix(p + "embedding_process.2.weight", q, pd), t.vector(p + "embedding_process.2.bias", q)};
        std::optional<HypernetworkWeights> hw;
        if (!hypernetwork) hw = detail::hypernetwork_weights(t, stack + ".param_gen.", layers, dl, q, h, d, r);
        t.finish();
        auto hyper = hypernetwork ? hypernetwork : std::make_shared<const Hypernetwork<B>>(*hw);
        return L(typename L::HyperSwitch(typename L::Switch(gate, router, detail::build_experts<FfnExpert<B, Relu>>(w, opt.storage),
                                                            NoSharedExpert{}, {.dropped = opt.dropped}),
                                         layer, ExpertEmbedding(emb), Projector<B>(pw), std::move(hyper), opt.hyper),
                 std::move(info), ref);
    }
    case Family::hypermoe_gpt2: {
        c.expect_string("activation_function", "gelu_new", {"gelu_new"});
        const std::string p = "transformer.h." + layer_s + ".mlp.";
        const WeightView gate = t.matrix(p + "w_gate", e, d, /*transpose=*/true);
        std::vector<FfnWeights> w;
        for (index_t x = 0; x < e; ++x) {
            const std::string q = p + "experts.expert_" + std::to_string(x) + ".";
            w.push_back({t.matrix(q + "c_fc.weight", ff, d, true), t.matrix(q + "c_proj.weight", d, ff, true),
                         t.vector(q + "c_fc.bias", ff), t.vector(q + "c_proj.bias", d)});
        }
        const index_t de = c.integer("experts_embedding_dim", 1), pd = c.integer("process_dim", 1), q = c.integer("hypernet_input", 1);
        const index_t h = c.integer("hypernetwork_bottleneck", 1), dl = c.integer("layer_emb_dim", 1), r = info.adapter_rank;
        const WeightView emb = t.matrix(p + "n_experts_embedding.weight", e, de);
        const ProjectorWeights pw{t.matrix(p + "embedding_process.0.weight", pd, de), t.vector(p + "embedding_process.0.bias", pd),
                                  t.matrix(p + "embedding_process.2.weight", q, pd), t.vector(p + "embedding_process.2.bias", q)};
        std::optional<HypernetworkWeights> hw;
        if (!hypernetwork) hw = detail::hypernetwork_weights(t, "transformer.param_gen.", c.integer("n_layer", 1), dl, q, h, d, r);
        t.finish();
        auto hyper = hypernetwork ? hypernetwork : std::make_shared<const Hypernetwork<B>>(*hw);
        const TopKRouter router(e, TopK{k}, {.weighting = {.renormalize = true}});
        return L(typename L::HyperGpt2(MoeLayer(gate, router, detail::build_experts<FfnExpert<B, GeluTanh>>(w, opt.storage)), layer,
                                       ExpertEmbedding(emb), Projector<B>(pw), std::move(hyper), opt.hyper),
                 std::move(info), ref);
    }
    }
    throw config_error("load_moe_block: unknown family");
}

} // namespace detail

/// Builds MoE block `layer` (of `stack`, for the encoder-decoder families) of a checkpoint.
/// HyperMoE blocks of one stack should share one hypernetwork: pass the one an earlier block of
/// the same stack holds (`shared_hypernetwork()`) as `hypernetwork`, or load the whole model
/// with load_model(), which does; by default each block loads its own copy.
template <Backend B>
[[nodiscard]] LoadedMoeBlock<B> load_moe_block(const Checkpoint& ck, index_t layer, std::string stack = "",
                                               const LoadOptions& opt = {},
                                               std::shared_ptr<const Hypernetwork<B>> hypernetwork = nullptr) {
    return detail::load_block<B>(ck, describe(ck), layer, std::move(stack), opt, std::move(hypernetwork));
}

/// Every MoE block of a checkpoint (both stacks of the encoder-decoder families, in describe()'s
/// order), loaded at once: the config is described once, each tensor is bound once, and the
/// HyperMoE blocks of a stack share one hypernetwork. Each block is a Layer (a stack can hold
/// it); copies of the model share its weights.
template <Backend B>
class LoadedModel {
public:
    LoadedModel(std::string dir, ModelInfo info, std::vector<LoadedMoeBlock<B>> blocks)
        : dir_(std::move(dir)), info_(std::move(info)), blocks_(std::move(blocks)) {}

    /// The checkpoint directory it was loaded from.
    [[nodiscard]] const std::string& dir() const noexcept { return dir_; }
    [[nodiscard]] const ModelInfo& info() const noexcept { return info_; }
    [[nodiscard]] std::size_t size() const noexcept { return blocks_.size(); }
    [[nodiscard]] const std::vector<LoadedMoeBlock<B>>& blocks() const noexcept { return blocks_; }
    [[nodiscard]] auto begin() const noexcept { return blocks_.begin(); }
    [[nodiscard]] auto end() const noexcept { return blocks_.end(); }

    /// MoE block `layer` of `stack` ("" = the only stack, or the encoder of the encoder-decoder
    /// families); the same config_error as load_moe_block when it is not an MoE block.
    [[nodiscard]] const LoadedMoeBlock<B>& block(index_t layer, std::string stack = "") const {
        if (stack.empty() && !info_.moe_blocks.empty() && !info_.moe_blocks.front().stack.empty()) stack = "encoder";
        const MoeBlockRef ref{layer, stack};
        detail::check_moe_block(dir_, info_, ref);
        return *std::find_if(blocks_.begin(), blocks_.end(), [&](const auto& b) { return b.block() == ref; });
    }

private:
    std::string dir_;
    ModelInfo info_;
    std::vector<LoadedMoeBlock<B>> blocks_;
};

/// Loads every MoE block of `ck` (see LoadedModel).
template <Backend B>
[[nodiscard]] LoadedModel<B> load_model(const Checkpoint& ck, const LoadOptions& opt = {}) {
    ModelInfo info = describe(ck);
    std::vector<LoadedMoeBlock<B>> blocks;
    blocks.reserve(info.moe_blocks.size());
    std::shared_ptr<const Hypernetwork<B>> hyper; // the current stack's
    std::string hyper_stack;
    for (const MoeBlockRef& ref : info.moe_blocks) {
        if (ref.stack != hyper_stack) hyper.reset(), hyper_stack = ref.stack;
        blocks.push_back(detail::load_block<B>(ck, info, ref.layer, ref.stack, opt, hyper));
        if (!hyper) hyper = blocks.back().shared_hypernetwork();
    }
    return LoadedModel<B>(ck.dir(), std::move(info), std::move(blocks));
}

} // namespace hypermoe
