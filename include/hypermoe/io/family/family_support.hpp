#pragma once
// What every family adapter (io/family/<name>.hpp) is written with:
// - BlockSource<B>: the checkpoint, its config, the block being loaded and the options; a
//   family's load() binds every tensor it needs through `tensors`, calls tensors.finish() (which
//   reports all problems at once), and only then builds its layer.
// - The shared pieces of several families: GLU experts' tensors, HyperMoE's per-block parts and
//   its stack-wide hypernetwork.
// - SyntheticModel and SyntheticWriter: a family's write_synthetic() writes random weights under
//   the same names its load() reads (io/synthetic.hpp).
//
// A family adapter is a struct with (see io/family/mixtral.hpp, the smallest one):
//   static constexpr std::string_view name;            the name users type (--family, errors)
//   static constexpr bool two_stacks;                   encoder and decoder stacks
//   static bool matches(const ConfigReader&);           is this config of this family?
//   static void describe(const ConfigReader&, ModelInfo&);   sizes, routing, MoE blocks
//   template <Backend B> using layers = type_list<...>;      the layer types load() returns
//   template <class Out, Backend B> static Out load(BlockSource<B>&);
//   static void write_synthetic(const SyntheticModel&, detail::SyntheticWriter&, nlohmann::json& config);

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/detail/type_list.hpp"
#include "hypermoe/expert/expert.hpp"
#include "hypermoe/hyper/hyper.hpp"
#include "hypermoe/io/checkpoint.hpp"
#include "hypermoe/io/config_reader.hpp"
#include "hypermoe/io/model_info.hpp"
#include "hypermoe/io/parameter_names.hpp"
#include "hypermoe/io/safetensors.hpp"
#include "hypermoe/io/tensor_binder.hpp"
#include "hypermoe/layer/moe_layer.hpp"
#include "hypermoe/router/hash_routing.hpp"
#include "hypermoe/router/router.hpp"

namespace hypermoe {

/// What a family's load() reads from: one MoE block of a checkpoint.
template <Backend B>
struct BlockSource {
    const ConfigReader& config;
    const ModelInfo& info;
    const MoeBlockRef& block;
    TensorBinder& tensors;
    const LoadOptions& options;
    /// The stack's hypernetwork when another block already holds it (HyperMoE families: then its
    /// tensors are not bound again); null = load it.
    std::shared_ptr<const Hypernetwork<B>> hypernetwork;
    /// Where load() records the checkpoint name of every tensor it binds, by role
    /// (io/parameter_names.hpp): the names the block's gradients are written under.
    BlockParameterNames names = {};

    [[nodiscard]] std::string layer() const { return std::to_string(block.layer); }

    /// tensors.matrix(name, ...), with the name recorded in `slot`.
    WeightView bind_matrix(TensorName& slot, std::string name, index_t rows, index_t cols, bool transpose = false) {
        slot = {std::move(name), transpose};
        return tensors.matrix(slot.name, rows, cols, transpose);
    }
    /// tensors.deferred_matrix(name, ...) (a routed expert's weight, converted into the storage
    /// type when build_experts packs its expert), with the name recorded in `slot`.
    WeightView bind_expert_matrix(TensorName& slot, std::string name, index_t rows, index_t cols) {
        slot = {std::move(name), false};
        return tensors.deferred_matrix(slot.name, rows, cols, options.storage, options.keep_stored);
    }
    /// tensors.deferred_stack(top, bottom, ...) (a routed GLU expert's gate and up, converted into
    /// one [gate; up] buffer when build_experts packs its expert), with the names recorded.
    std::pair<WeightView, WeightView> bind_expert_stack(TensorName& top_slot, std::string top, TensorName& bottom_slot, std::string bottom,
                                                        index_t rows, index_t cols) {
        top_slot = {std::move(top), false}, bottom_slot = {std::move(bottom), false};
        return tensors.deferred_stack(top_slot.name, bottom_slot.name, rows, cols, options.storage, options.keep_stored);
    }
    /// tensors.vector(name, n), with the name recorded in `slot`.
    std::span<const float> bind_vector(TensorName& slot, std::string name, index_t n) {
        slot = {std::move(name), false};
        return tensors.vector(slot.name, n);
    }
};

/// Sizes of a synthetic checkpoint (io/synthetic.hpp).
struct SyntheticModel {
    Family family{};             ///< e.g. family("mixtral")
    index_t d_model = 64, d_ff = 128, experts = 8, top_k = 2, layers = 2;
    index_t capacity = 64;       ///< Switch families: expert_capacity
    index_t adapter_rank = 8;    ///< HyperMoE: r
    index_t hyper_dim = 16;      ///< HyperMoE: d_e = p = q = h
    index_t layer_dim = 4;       ///< HyperMoE: d_l
    std::uint64_t seed = 1;
    dtype weights = dtype::f32;  ///< F32 or BF16 tensors
};

/// The SwiGLU expert of the decoder-only families, and their MoE layer with softmax top-k routing.
template <Backend B>
using SwiGluExpert = GluExpert<B, Silu>;
template <Backend B>
using SwiGluTopKLayer = MoeLayer<SwiGluExpert<B>, TopKRouter>;

namespace detail {

/// The sizes and routing of the families of SwiGLU experts with softmax top-k, renormalised
/// when norm_topk_prob (OLMoE, Qwen2-MoE, Qwen3-MoE), their experts' width under `ff_key`.
inline void describe_swiglu_top_k(const ConfigReader& c, ModelInfo& m, const char* ff_key) {
    m.d_model = c.integer("hidden_size", 1), m.d_ff = c.integer(ff_key, 1);
    m.experts = c.integer("num_experts", 1), m.top_k = c.integer("num_experts_per_tok", 1);
    m.expert_kind = "SwiGLU";
    m.routing = std::string("softmax, top-k, ") + (c.boolean_or("norm_topk_prob", false) ? "renormalised" : "not renormalised");
}

/// The Qwen MoE families' blocks (Qwen2-MoE, Qwen3-MoE): layer l is an MoE block unless it is in
/// mlp_only_layers or (l + 1) is not a multiple of decoder_sparse_step (then a dense MLP).
inline void qwen_moe_blocks(const ConfigReader& c, ModelInfo& m) {
    const auto only = c.integers_or_empty("mlp_only_layers");
    const index_t step = c.integer_or("decoder_sparse_step", 1, 1);
    for (index_t i = 0; i < c.integer("num_hidden_layers", 1); ++i)
        if (std::find(only.begin(), only.end(), i) == only.end() && (i + 1) % step == 0) m.moe_blocks.push_back({i, ""});
}

/// One GLU expert's weights under `prefix`<name>, the names recorded in `n`; a routed one's
/// (`routed`) bound for build_experts to convert one expert at a time.
template <Backend B>
GluWeights bind_glu(BlockSource<B>& s, ExpertTensorNames& n, const std::string& prefix, index_t d, index_t ff, const char* gate,
                    const char* up, const char* down, bool routed) {
    if (!routed)
        return {s.bind_matrix(n.gate, prefix + gate, ff, d), s.bind_matrix(n.up, prefix + up, ff, d), s.bind_matrix(n.down, prefix + down, d, ff)};
    const auto [g, u] = s.bind_expert_stack(n.gate, prefix + gate, n.up, prefix + up, ff, d);
    return {g, u, s.bind_expert_matrix(n.down, prefix + down, d, ff)};
}

/// The views of n routed GLU experts' weights under `prefix`<e>.<name> (names recorded as the
/// experts'), for build_experts.
template <Backend B>
std::vector<GluWeights> glu_weights(BlockSource<B>& s, const std::string& prefix, index_t n, index_t d, index_t ff, const char* gate,
                                    const char* up, const char* down) {
    std::vector<GluWeights> w;
    s.names.experts.resize(std::size_t(n));
    for (index_t e = 0; e < n; ++e)
        w.push_back(bind_glu(s, s.names.experts[std::size_t(e)], prefix + std::to_string(e) + ".", d, ff, gate, up, down, true));
    return w;
}

/// The shared expert's weights under `prefix` (gate_proj, up_proj, down_proj; names recorded as
/// the shared expert's).
template <Backend B>
GluWeights shared_glu_weights(BlockSource<B>& s, const std::string& prefix, index_t d, index_t ff) {
    return bind_glu(s, s.names.shared.emplace(), prefix, d, ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight", false);
}

/// How the experts of a loaded block are stored and compute.
[[nodiscard]] inline ExpertOptions expert_options(const LoadOptions& o) {
    return {.storage = o.storage, .prec = o.prec, .keep_stored = o.keep_stored};
}

/// An expert's weight matrices converted where they were bound deferred (TensorBinder::materialise).
inline void materialise_source(TensorBinder& t, const GluWeights& w) { t.materialise(w.gate), t.materialise(w.up), t.materialise(w.down); }
inline void materialise_source(TensorBinder& t, const FfnWeights& w) { t.materialise(w.up), t.materialise(w.down); }
/// The pages of an expert's weight matrices, released from the checkpoint's mapping once packed
/// (and their converted copies freed).
inline void release_source(TensorBinder& t, const GluWeights& w) noexcept { t.release(w.gate), t.release(w.up), t.release(w.down); }
inline void release_source(TensorBinder& t, const FfnWeights& w) noexcept { t.release(w.up), t.release(w.down); }

/// The routed experts of block `s`, each converted where its tensors need it, built (packed into
/// its backend's storage) and then its source released, so the checkpoint's bytes (or their f32
/// conversion) and the packed ones are not resident together beyond one expert's.
template <class E, class W, class Source>
std::vector<E> build_experts(const std::vector<W>& weights, const Source& s) {
    std::vector<E> out;
    out.reserve(weights.size());
    for (const auto& w : weights) {
        materialise_source(s.tensors, w);
        out.emplace_back(w, expert_options(s.options));
        release_source(s.tensors, w);
    }
    return out;
}

/// The block of the families whose MoE MLP is model.layers.<l>.mlp.{gate.weight,
/// experts.<e>.{gate,up,down}_proj.weight}: SwiGLU experts, softmax top-k renormalised when
/// norm_topk_prob (OLMoE, Qwen3-MoE).
template <class Out, Backend B>
Out load_mlp_top_k(BlockSource<B>& s) {
    s.config.expect_string("hidden_act", "silu", {"silu"});
    const index_t d = s.info.d_model, e = s.info.experts;
    const std::string p = "model.layers." + s.layer() + ".mlp.";
    const WeightView gate = s.bind_matrix(s.names.router, p + "gate.weight", e, d);
    const auto w = glu_weights(s, p + "experts.", e, d, s.info.d_ff, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
    s.tensors.finish();
    const TopKRouter router(e, TopK{s.info.top_k}, {.weighting = {.renormalize = s.config.boolean_or("norm_topk_prob", false)}});
    return Out(SwiGluTopKLayer<B>(gate, router, build_experts<SwiGluExpert<B>>(w, s)));
}

/// A HyperMoE block's own tensors (expert embeddings and projector) and, unless the stack's
/// hypernetwork is already loaded, the hypernetwork's: bound, not yet built.
struct HyperParts {
    WeightView embedding;
    ProjectorWeights projector;
    std::optional<HypernetworkWeights> hypernetwork;
};

/// Binds the HyperMoE parts of a block whose MLP tensors are under `mlp` and whose stack's
/// hypernetwork (the reference code's `param_gen.`) is under `gen`, for a stack of `layers` blocks.
template <Backend B>
HyperParts bind_hyper_parts(BlockSource<B>& s, const std::string& mlp, const std::string& gen, index_t layers) {
    const ConfigReader& c = s.config;
    TensorBinder& t = s.tensors;
    const index_t e = s.info.experts, d = s.info.d_model, r = s.info.adapter_rank;
    const index_t de = c.integer("experts_embedding_dim", 1), pd = c.integer("process_dim", 1), q = c.integer("hypernet_input", 1);
    const index_t h = c.integer("hypernetwork_bottleneck", 1), dl = c.integer("layer_emb_dim", 1);
    BlockParameterNames& n = s.names;
    HyperParts parts{s.bind_matrix(n.embedding, mlp + "n_experts_embedding.weight", e, de),
                     {s.bind_matrix(n.projector_first, mlp + "embedding_process.0.weight", pd, de),
                      s.bind_vector(n.projector_first_bias, mlp + "embedding_process.0.bias", pd),
                      s.bind_matrix(n.projector_second, mlp + "embedding_process.2.weight", q, pd),
                      s.bind_vector(n.projector_second_bias, mlp + "embedding_process.2.bias", q)},
                     std::nullopt};
    // The hypernetwork's names, recorded whether or not this block binds its tensors (a later
    // block of the stack shares the first one's).
    n.layer_embed = {gen + "layer_embed.weight"};
    n.trunk = {gen + "decoder.linear1.weight"}, n.trunk_bias = {gen + "decoder.linear1.bias"};
    n.down_weight = {gen + "decoder.weight_down.weight"}, n.down_weight_bias = {gen + "decoder.weight_down.bias"};
    n.up_weight = {gen + "decoder.weight_up.weight"}, n.up_weight_bias = {gen + "decoder.weight_up.bias"};
    n.down_bias = {gen + "decoder.bias_down.weight"}, n.down_bias_bias = {gen + "decoder.bias_down.bias"};
    n.up_bias = {gen + "decoder.bias_up.weight"}, n.up_bias_bias = {gen + "decoder.bias_up.bias"};
    if (!s.hypernetwork)
        parts.hypernetwork = HypernetworkWeights{
            t.matrix(n.layer_embed.name, layers, dl),
            t.matrix(n.trunk.name, h, q + dl), t.vector(n.trunk_bias.name, h),
            t.matrix(n.down_weight.name, d * r, h), t.vector(n.down_weight_bias.name, d * r),
            t.matrix(n.up_weight.name, r * d, h), t.vector(n.up_weight_bias.name, r * d),
            t.matrix(n.down_bias.name, r, h), t.vector(n.down_bias_bias.name, r),
            t.matrix(n.up_bias.name, d, h), t.vector(n.up_bias_bias.name, d)};
    return parts;
}

/// The HyperMoE layer around `moe` from parts bound (and checked by tensors.finish()) before.
template <Backend B, class Moe>
auto build_hyper_layer(BlockSource<B>& s, Moe moe, const HyperParts& parts) {
    auto hyper = s.hypernetwork ? s.hypernetwork : std::make_shared<const Hypernetwork<B>>(*parts.hypernetwork);
    return HyperMoeLayer(std::move(moe), s.block.layer, ExpertEmbedding(parts.embedding), Projector<B>(parts.projector),
                         std::move(hyper), s.options.hyper);
}

/// Random tensors for a synthetic checkpoint: uniform in +-scale from splitmix64 counters, F32 or BF16.
class SyntheticWriter {
public:
    SyntheticWriter(std::uint64_t seed, dtype type) : seed_(seed), type_(type) {}
    /// A (rows, cols) weight, uniform in +-1/sqrt(cols) (the fan-in), under `name`.
    void matrix(const std::string& name, index_t rows, index_t cols) { add(name, {rows, cols}, 1.0 / std::sqrt(double(cols))); }
    void vector(const std::string& name, index_t n, double scale = 0.02) { add(name, {n}, scale); }
    /// A GLU expert of width `ff` under `prefix`, with the family's names for its three matrices.
    void glu(const std::string& prefix, index_t d, index_t ff, const char* gate = "gate_proj.weight",
             const char* up = "up_proj.weight", const char* down = "down_proj.weight") {
        matrix(prefix + gate, ff, d);
        matrix(prefix + up, ff, d);
        matrix(prefix + down, d, ff);
    }
    /// The safetensors image of the tensors written, in their order: each drawn straight into its
    /// place (one buffer, touched once).
    [[nodiscard]] std::vector<std::byte> image() const {
        std::vector<TensorInfo> layout;
        for (const Drawn& d : drawn_) layout.push_back({d.name, type_ == dtype::f32 ? tensor_dtype::f32 : tensor_dtype::bf16, d.shape});
        SafetensorsImage image = safetensors_layout(std::move(layout), {{"format", "pt"}});
        for (std::size_t t = 0; t < drawn_.size(); ++t) {
            std::byte* out = image.data(t).data();
            const index_t n = image.tensors[t].numel();
            constexpr index_t chunk = 1 << 16; // each element from its own counter: any split gives the same bits
            detail::parallel_for((n + chunk - 1) / chunk, n * 8, [&](index_t c) {
                for (index_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) {
                    const std::uint64_t r = splitmix64(seed_ + drawn_[t].first + std::uint64_t(i));
                    const float v = float(drawn_[t].scale * (double(r >> 11) * 0x1.0p-53 * 2.0 - 1.0));
                    if (type_ == dtype::f32) std::memcpy(out + 4 * i, &v, 4);
                    else {
                        const bf16 b = bf16::from_float(v);
                        std::memcpy(out + 2 * i, &b.bits, 2);
                    }
                }
            });
        }
        return std::move(image.bytes);
    }

private:
    /// A tensor written: uniform in +-scale, element i from the counter first + i.
    struct Drawn {
        std::string name;
        std::vector<index_t> shape;
        double scale;
        std::uint64_t first;
    };
    void add(const std::string& name, std::vector<index_t> shape, double scale) {
        index_t n = 1;
        for (const index_t s : shape) n *= s;
        drawn_.push_back({name, std::move(shape), scale, counter_});
        counter_ += std::uint64_t(n);
    }
    std::uint64_t seed_, counter_ = 0;
    dtype type_;
    std::vector<Drawn> drawn_;
};

/// load_mlp_top_k's tensors, random, for every layer of `m`.
inline void write_mlp_top_k(const SyntheticModel& m, SyntheticWriter& w) {
    for (index_t l = 0; l < m.layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
        w.matrix(p + "gate.weight", m.experts, m.d_model);
        for (index_t x = 0; x < m.experts; ++x) w.glu(p + "experts." + std::to_string(x) + ".", m.d_model, m.d_ff);
    }
}

/// A synthetic HyperMoE block: its own tensors under `mlp` and, when `with_hypernetwork`, the
/// stack's hypernetwork under `gen`; every hyper width is m.hyper_dim. Sets the config keys.
inline void write_synthetic_hyper(const SyntheticModel& m, SyntheticWriter& w, nlohmann::json& c, const std::string& mlp,
                                  const std::string& gen, bool with_hypernetwork) {
    const index_t e = m.experts, h = m.hyper_dim, d = m.d_model, r = m.adapter_rank, dl = m.layer_dim;
    c.update({{"use_hypernet", true}, {"experts_embedding", true}, {"experts_embedding_dim", h}, {"process_dim", h},
              {"hypernet_input", h}, {"hypernetwork_bottleneck", h}, {"layer_emb_dim", dl}, {"adapter_dim", r}});
    w.matrix(mlp + "n_experts_embedding.weight", e, h);
    w.matrix(mlp + "embedding_process.0.weight", h, h);
    w.vector(mlp + "embedding_process.0.bias", h);
    w.matrix(mlp + "embedding_process.2.weight", h, h);
    w.vector(mlp + "embedding_process.2.bias", h);
    if (!with_hypernetwork) return;
    w.matrix(gen + "layer_embed.weight", m.layers, dl);
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
}

} // namespace detail
} // namespace hypermoe
