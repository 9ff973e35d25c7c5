#pragma once
// What a checkpoint's config says about its MoE blocks (ModelInfo), which family it is (Family),
// and how to load its blocks (LoadOptions). The families themselves are in io/family/, listed
// once in io/families.hpp.

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/hyper/hyper_moe_layer.hpp"
#include "hypermoe/layer/moe_layer.hpp"

namespace hypermoe {

/// A model family: its position in FamilyList (io/families.hpp). Name one with
/// family("mixtral") (checked at compile time) or find_family(name) (at run time), and print it
/// with to_string(f).
class Family {
public:
    constexpr Family() noexcept = default;
    constexpr explicit Family(std::size_t index) noexcept : index_(static_cast<std::uint8_t>(index)) {}
    [[nodiscard]] constexpr std::size_t index() const noexcept { return index_; }
    friend constexpr bool operator==(Family, Family) noexcept = default;

private:
    std::uint8_t index_ = 0;
};

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

/// How to load a block.
struct LoadOptions {
    /// dtype the expert weights are kept in; default: f32 (bf16 checkpoints are widened, exactly).
    dtype storage = dtype::f32;
    /// Keep each expert weight matrix stored in a format a layer holds as stored (BF16, Q8_0,
    /// Q4_0, MXFP4, Q4_K) in that format, and convert only the others into `storage` (a GLU
    /// expert's gate and up stay as stored when both are in the same such format). With
    /// Checkpoint::expert_storage(true) as the storage, a mixed file (llama.cpp's Q4_K_M: Q4_K
    /// and Q6_K experts) keeps its Q4_K experts in their 4.5 bits a weight and holds only its
    /// Q6_K ones requantised (q8_0). `hypermoe`'s default.
    bool keep_stored = false;
    /// How q8_0 / q4_0 / mxfp4 / q4_k experts compute: `exact` or `fast` (core/dtype.hpp).
    precision prec = precision::exact;
    HyperOptions hyper = {};
    /// What a token dropped by capacity outputs (Switch families).
    DroppedTokens dropped = DroppedTokens::scaled_input;
    /// Route as the HyperMoE reference code trains (hypermoe_gpt2, whose checkpoints hold the
    /// noise weight `w_noise`): noisy top-k with the learned noise scale softplus(x w_noise) +
    /// 1e-2 (NoisyTopK::learned_scale), the gate being w_gate over w_noise, so a backward gives
    /// w_noise a gradient. A context with router_noise = false routes as the clean softmax
    /// top-k. A config_error for a family without noise weights.
    bool noisy_gating = false;
};

} // namespace hypermoe
