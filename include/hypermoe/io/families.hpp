#pragma once
// The model families, listed once (FamilyList), and loading checkpoints through them.
//
// A family is one adapter type in its own header under io/family/ (config keys, tensor names,
// layer types, which blocks are MoE, synthetic weights); everything else is derived from
// FamilyList: Family and its names, supported_families, config detection, the variant of layer
// types a LoadedMoeBlock holds, and the synthetic checkpoints of io/synthetic.hpp. Adding a family
// is one header and one entry below (docs/checkpoints.md, "Adding a family").
//
// Loading: describe() reads a config once into a ModelInfo; load_model() loads every MoE block
// of a checkpoint, load_moe_block() one.

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <variant>
#include <vector>

#include "hypermoe/detail/type_list.hpp"
#include "hypermoe/io/family/deepseek_v3.hpp"
#include "hypermoe/io/family/gpt_oss.hpp"
#include "hypermoe/io/family/hypermoe_gpt2.hpp"
#include "hypermoe/io/family/hypermoe_switch.hpp"
#include "hypermoe/io/family/mixtral.hpp"
#include "hypermoe/io/family/olmoe.hpp"
#include "hypermoe/io/family/qwen2_moe.hpp"
#include "hypermoe/io/family/qwen3_moe.hpp"
#include "hypermoe/io/family/switch_transformers.hpp"

namespace hypermoe {

/// Every supported family, in the order inspect and errors list them.
using FamilyList = type_list<families::Mixtral, families::Qwen2Moe, families::Qwen3Moe, families::Olmoe, families::DeepSeekV3, families::GptOss,
                             families::SwitchTransformers, families::HyperMoeGpt2, families::HyperMoeSwitch>;

namespace detail {

template <class List>
struct family_names;
template <class... Fs>
struct family_names<type_list<Fs...>> {
    static constexpr std::array<std::string_view, sizeof...(Fs)> names = {Fs::name...};
    static constexpr std::size_t joined_size = ((Fs::name.size() + 2) + ...) - 2;
    /// The names joined by ", ".
    static constexpr std::array<char, joined_size> joined = [] {
        std::array<char, joined_size> out{};
        std::size_t i = 0;
        for (const std::string_view n : names) {
            if (i != 0) out[i++] = ',', out[i++] = ' ';
            for (const char ch : n) out[i++] = ch;
        }
        return out;
    }();
};

template <Backend B, class List>
struct family_layers_impl;
template <Backend B, class... Fs>
struct family_layers_impl<B, type_list<Fs...>> {
    using type = unite<typename Fs::template layers<B>...>;
};
/// The layer types of the families of List on backend B, each once.
template <Backend B, class List>
using family_layers = typename family_layers_impl<B, List>::type;

/// Not constexpr: calling it in family(name) makes an unknown name a compile error that says so.
inline void not_a_supported_family_name() {}

template <std::size_t I = 0, class Fn>
decltype(auto) visit_family_at(std::size_t index, Fn&& fn) {
    using F = type_at<I, FamilyList>;
    if constexpr (I + 1 == FamilyList::size) {
        return fn(std::type_identity<F>{});
    } else {
        if (index == I) return fn(std::type_identity<F>{});
        return visit_family_at<I + 1>(index, std::forward<Fn>(fn));
    }
}

} // namespace detail

/// The family of adapter F.
template <class F>
inline constexpr Family family_of = Family(detail::index_of<F, FamilyList>);

/// The family called `name`, at compile time: family("mixtral"); an unknown name does not compile.
[[nodiscard]] consteval Family family(std::string_view name) {
    const auto& names = detail::family_names<FamilyList>::names;
    for (std::size_t i = 0; i < names.size(); ++i)
        if (names[i] == name) return Family(i);
    detail::not_a_supported_family_name();
    return Family();
}

/// The family called `name`, at run time (nullopt when none is).
[[nodiscard]] constexpr std::optional<Family> find_family(std::string_view name) noexcept {
    const auto& names = detail::family_names<FamilyList>::names;
    for (std::size_t i = 0; i < names.size(); ++i)
        if (names[i] == name) return Family(i);
    return std::nullopt;
}

/// Every supported family, in FamilyList's order.
[[nodiscard]] constexpr std::array<Family, FamilyList::size> all_families() noexcept {
    std::array<Family, FamilyList::size> out{};
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = Family(i);
    return out;
}

[[nodiscard]] constexpr std::string_view to_string(Family f) noexcept { return detail::family_names<FamilyList>::names[f.index()]; }

/// "mixtral, qwen2_moe, ...": every family's name, for messages.
inline constexpr std::string_view supported_families{detail::family_names<FamilyList>::joined.data(),
                                                     detail::family_names<FamilyList>::joined_size};

/// Calls fn(std::type_identity<F>{}) with the adapter F of family f.
template <class Fn>
decltype(auto) visit_family(Family f, Fn&& fn) {
    return detail::visit_family_at(f.index(), std::forward<Fn>(fn));
}

/// Whether family f has an encoder and a decoder stack (blocks are then named by stack).
[[nodiscard]] inline bool has_two_stacks(Family f) {
    return visit_family(f, []<class F>(std::type_identity<F>) { return F::two_stacks; });
}

/// The family of a config: the first in FamilyList whose matches() accepts it.
[[nodiscard]] inline Family detect_family(const nlohmann::json& config, const std::string& file) {
    const ConfigReader c(config, file);
    for (const Family f : all_families())
        if (visit_family(f, [&]<class F>(std::type_identity<F>) { return F::matches(c); })) return f;
    throw config_error(detail::concat(file, ": model_type \"", c.string_or("model_type", ""),
                                      "\" is not a supported family; supported: ", supported_families));
}

/// What a config says (everything but the dtypes, which need the tensors); `file` names it in errors.
[[nodiscard]] inline ModelInfo describe(const nlohmann::json& config, const std::string& file) {
    if (!config.is_object()) throw config_error(detail::concat(file, ": not a JSON object"));
    const ConfigReader c(config, file);
    ModelInfo m;
    m.family = detect_family(config, file);
    visit_family(m.family, [&]<class F>(std::type_identity<F>) { F::describe(c, m); });
    if (m.top_k > m.experts)
        throw config_error(detail::concat(file, ": top-k is ", m.top_k, ", expected at most the ", m.experts, " experts"));
    return m;
}

[[nodiscard]] inline ModelInfo describe(const Checkpoint& ck) {
    ModelInfo m = describe(ck.config(), ck.config_source());
    m.dtypes = ck.dtypes();
    return m;
}

/// A block's gradients, kept between backward passes by whoever runs them (Trainer: one per
/// block), so that each pass reuses the buffers of the last instead of allocating fresh ones:
/// 277 MB for a Mixtral-like block (d = 1024, ff = 2816, E = 8), which a fresh allocation
/// zeroes page by page, faulting every page in, on every step. Holds whichever gradient type
/// the block's layer makes (LoadedMoeBlock::for_each_gradient): the same type again is zeroed
/// (detail::zero_gradients) and reused, another type replaces it. Buffers of another block of
/// the same type but other shapes are refused by the backward's shape checks.
class GradientBuffers {
public:
    /// The held gradients of type G, zeroed; or make()'s, held from now on.
    template <class G, class Make>
    G& get(Make&& make) {
        if (type_ == &typeid(G)) {
            G& g = *static_cast<G*>(held_.get());
            detail::zero_gradients(g);
            return g;
        }
        held_ = std::make_shared<G>(make());
        type_ = &typeid(G);
        return *static_cast<G*>(held_.get());
    }

private:
    std::shared_ptr<void> held_;
    const std::type_info* type_ = nullptr;
};

template <Backend B>
class LoadedMoeBlock {
public:
    /// The layer types of every family, each once (a closed set: no virtual dispatch).
    using Layer = detail::variant_of<detail::family_layers<B, FamilyList>>;
    // A Layer whose widths are read from the checkpoint.
    static constexpr index_t static_in_width = dynamic;
    static constexpr index_t static_out_width = dynamic;

    LoadedMoeBlock(Layer layer, ModelInfo info, MoeBlockRef block, BlockParameterNames names = {})
        : layer_(std::move(layer)), info_(std::move(info)), block_(std::move(block)), names_(std::move(names)) {}

    /// The checkpoint names of the block's tensors, by role, as its family's load() bound them.
    [[nodiscard]] const BlockParameterNames& parameter_names() const noexcept { return names_; }

    /// The backward of forward(x, y, ws, context): writes dx = dL/dx from dy = dL/dy and returns
    /// dL/d<tensor> for every tensor the block reads, as `d/<checkpoint name>` F32 tensors in the
    /// checkpoint's shapes (the fixtures' grads.safetensors layout). The block must hold its
    /// weights as f32 (LoadOptions::storage = dtype::f32; bf16 checkpoints widen exactly).
    /// With with_hyper = false, a HyperMoE block's backward is that of forward(..., with_hyper =
    /// false): its MoE part alone (and only the MoE part's tensors get gradients).
    [[nodiscard]] std::vector<TensorToWrite> gradients(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx,
                                                       Workspace& ws, const Context& context = {}, bool with_hyper = true) const {
        std::vector<TensorToWrite> out;
        visit_gradients(x, dy, dx, ws, context, with_hyper, nullptr, nullptr, [&](const auto& g) { out = named_gradients(names_, g); });
        return out;
    }

    /// The same backward, with each gradient given to fn(name, view, is_vector) in the block's
    /// layout (for_each_named_gradient) instead of copied out: what a trainer adds up.
    template <class Fn>
    void for_each_gradient(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, Workspace& ws,
                           const Context& context, bool with_hyper, Fn&& fn) const {
        visit_gradients(x, dy, dx, ws, context, with_hyper, nullptr, nullptr, [&](const auto& g) { for_each_named_gradient(names_, g, fn); });
    }
    /// The same from what forward(x, y, ws, kept, context, with_hyper) kept (MoeLayer's backward
    /// from kept activations: no second routing, no recomputed expert activations).
    template <class Fn>
    void for_each_gradient(const MoeActivations& kept, ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx,
                           Workspace& ws, const Context& context, bool with_hyper, Fn&& fn) const {
        visit_gradients(x, dy, dx, ws, context, with_hyper, &kept, nullptr, [&](const auto& g) { for_each_named_gradient(names_, g, fn); });
    }
    /// Both, into `buffers` (zeroed first; made there on the first call) instead of fresh
    /// gradients: from the second call on, the gradients take no new memory.
    template <class Fn>
    void for_each_gradient(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, Workspace& ws,
                           const Context& context, bool with_hyper, GradientBuffers& buffers, Fn&& fn) const {
        visit_gradients(x, dy, dx, ws, context, with_hyper, nullptr, &buffers, [&](const auto& g) { for_each_named_gradient(names_, g, fn); });
    }
    template <class Fn>
    void for_each_gradient(const MoeActivations& kept, ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx,
                           Workspace& ws, const Context& context, bool with_hyper, GradientBuffers& buffers, Fn&& fn) const {
        visit_gradients(x, dy, dx, ws, context, with_hyper, &kept, &buffers, [&](const auto& g) { for_each_named_gradient(names_, g, fn); });
    }

    /// Whether forward(x, y, ws, kept, ...) can keep activations for a backward: an MoE block, or
    /// a HyperMoE block run without its HyperExpert (its HyperExpert's backward recomputes).
    [[nodiscard]] bool keeps_activations(bool with_hyper) const noexcept { return !(with_hyper && is_hyper()); }

    /// y = block(x), keeping in `kept` what for_each_gradient(kept, ...) needs; a config_error
    /// where keeps_activations(with_hyper) is false.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, MoeActivations& kept, const Context& context = {},
                 bool with_hyper = true) const {
        if (!keeps_activations(with_hyper))
            throw config_error(detail::concat(to_string(info_.family), " block ", block_.layer,
                                              ": a HyperMoE block with its HyperExpert keeps no activations (use forward with a plan)"));
        visit_moe([&](const auto& m) { m.forward(x, y, ws, kept, context); });
    }

    /// Replaces the router's selection-only bias (E values; MoeLayer::set_selection_bias): what
    /// auxiliary-loss-free balancing moves. A config_error when the block's router has none to
    /// set (not a ScoredRouter).
    void set_selection_bias(std::span<const float> bias) {
        std::visit(
            [&](auto& l) {
                if constexpr (requires { l.set_selection_bias(bias); }) l.set_selection_bias(bias);
                else throw config_error(detail::concat(to_string(info_.family), " block ", block_.layer, ": its router has no selection bias to set"));
            },
            layer_);
    }

    [[nodiscard]] const ModelInfo& info() const noexcept { return info_; }
    [[nodiscard]] const MoeBlockRef& block() const noexcept { return block_; }
    [[nodiscard]] const Layer& layer() const noexcept { return layer_; }
    [[nodiscard]] index_t d_model() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t in_width() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t out_width() const noexcept { return info_.d_model; }
    [[nodiscard]] index_t slots() const noexcept { return visit_moe([](const auto& m) { return m.router().slots(); }); }
    /// Whether its router drops tokens beyond a per-sequence capacity (Context::sequence_length).
    [[nodiscard]] bool has_capacity() const noexcept {
        return visit_moe([](const auto& m) { return requires { m.router().selection().capacity; }; });
    }
    [[nodiscard]] bool is_hyper() const noexcept {
        return std::visit([](const auto& l) { return requires { l.moe(); }; }, layer_);
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

    /// The dtypes its routed and shared experts' weight matrices are held in (several with
    /// LoadOptions::keep_stored on a file of mixed formats).
    [[nodiscard]] std::set<dtype> expert_storages() const {
        std::set<dtype> out;
        for_each_expert_linear([&](const auto& lin) { out.insert(lin.storage()); });
        return out;
    }
    /// The bytes of its routed and shared experts' weight matrices in their storage, as ggml's
    /// layout of it takes them (weight_bytes; q4_k's unpacked scales take 2.8% more).
    [[nodiscard]] std::size_t expert_weight_bytes() const {
        std::size_t n = 0;
        for_each_expert_linear([&](const auto& lin) {
            n += weight_bytes(lin.storage(), std::size_t(lin.out_features()), std::size_t(lin.in_features()));
        });
        return n;
    }

    /// Calls f with each linear map of its routed and shared experts: a GLU expert's fused
    /// [gate; up] and down, an FFN expert's up and down.
    template <class F>
    void for_each_expert_linear(F&& f) const {
        visit_moe([&](const auto& m) {
            const auto each = [&](const auto& e) {
                if constexpr (requires { e.gate_up(); }) f(e.gate_up());
                else f(e.up());
                f(e.down());
            };
            for (index_t e = 0; e < m.num_experts(); ++e) each(m.expert(e));
            if constexpr (std::decay_t<decltype(m.shared())>::present) each(m.shared().expert());
        });
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
    /// Runs the backward into fresh gradients, or into `reuse`'s zeroed ones, and calls use(gradients).
    template <class Use>
    void visit_gradients(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, Workspace& ws,
                         const Context& context, bool with_hyper, const MoeActivations* kept, GradientBuffers* reuse, Use&& use) const {
        // backward(g) on the gradients make() makes, fresh or held by `reuse`, then use(g).
        const auto into = [&](const auto& make, const auto& backward) {
            using G = decltype(make());
            std::optional<G> fresh;
            G& g = reuse != nullptr ? reuse->get<G>(make) : fresh.emplace(make());
            backward(g);
            use(g);
        };
        std::visit(
            [&](const auto& l) {
                if constexpr (TrainableLayer<std::decay_t<decltype(l)>>) {
                    const auto moe_backward = [&](const auto& moe) {
                        into([&] { return moe.make_gradients(); }, [&](auto& g) {
                            if (kept != nullptr) moe.backward(*kept, x, dy, dx, g, ws, context);
                            else moe.backward(x, dy, dx, g, ws, context);
                        });
                    };
                    if constexpr (requires { l.moe(); }) {
                        if (!with_hyper) return moe_backward(l.moe());
                        if (kept != nullptr)
                            throw config_error(detail::concat(to_string(info_.family), " block ", block_.layer,
                                                              ": a HyperMoE block with its HyperExpert keeps no activations"));
                        into([&] { return l.make_gradients(); }, [&](auto& g) { l.backward(x, dy, dx, g, ws, context); });
                    } else {
                        moe_backward(l);
                    }
                } else {
                    throw config_error(detail::concat(to_string(info_.family), " block ", block_.layer, ": its router has no backward"));
                }
            },
            layer_);
    }

    Layer layer_;
    ModelInfo info_;
    MoeBlockRef block_;
    BlockParameterNames names_;
};

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
    const std::string file = ck.config_source();
    const ConfigReader c(ck.config(), file);
    const bool two_stacks = has_two_stacks(info.family);
    if (two_stacks && stack.empty()) stack = "encoder";
    if (!two_stacks && !stack.empty())
        throw config_error(detail::concat(file, ": stack \"", stack, "\" given, but ", to_string(info.family),
                                          " has a single stack"));
    if (two_stacks && stack != "encoder" && stack != "decoder")
        throw config_error(detail::concat(file, ": stack \"", stack, "\", expected encoder or decoder"));
    const MoeBlockRef ref{layer, stack};
    check_moe_block(ck.dir(), info, ref);
    if (opt.noisy_gating &&
        !visit_family(info.family, []<class F>(std::type_identity<F>) { return requires { F::has_noise_weights; }; }))
        throw config_error(detail::concat("LoadOptions::noisy_gating is set, but ", to_string(info.family),
                                          " checkpoints hold no noise weight (the HyperMoE reference code's w_noise; hypermoe_gpt2's do)"));
    TensorBinder t(ck, detail::concat(to_string(info.family), " block ", stack.empty() ? "" : stack + " ", layer));
    BlockSource<B> source{c, info, ref, t, opt, std::move(hypernetwork)};
    using Layer = typename LoadedMoeBlock<B>::Layer;
    Layer loaded = visit_family(info.family, [&]<class F>(std::type_identity<F>) { return F::template load<Layer>(source); });
    return LoadedMoeBlock<B>(std::move(loaded), std::move(info), ref, std::move(source.names));
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
    /// The blocks, to change a router's selection bias (LoadedMoeBlock::set_selection_bias).
    [[nodiscard]] std::vector<LoadedMoeBlock<B>>& blocks() noexcept { return blocks_; }
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
