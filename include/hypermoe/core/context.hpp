#pragma once
// Context: what a forward (or backward) call carries besides its activations. Routers read what
// they need from it (token ids for hash routing, the sequence layout for per-sequence capacity and
// for noise keyed by position, a per-call noise seed), every MoE block reports its routing to the
// optional sink, and a backward adds the auxiliary losses it names. Every layer takes one and passes it on unchanged (Sequential, Residual,
// DynamicStack, HyperMoE layers, loaded blocks), so a router deep inside a stack sees what the
// caller gave the stack. A Context is cheap to copy (spans and a pointer) and owns nothing.

#include <cstdint>
#include <span>

#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/matrix.hpp"

namespace hypermoe {

class RoutingPlan;

/// Receives the routing of every MoE block a forward call runs, in the order the blocks run
/// (e.g. stats/routing_sinks.hpp's RoutingRecorder). Called from the thread that called forward,
/// never concurrently within one call.
class RoutingSink {
public:
    virtual ~RoutingSink() = default;
    /// One MoE block's plan for the call's tokens, and its router logits (T, E).
    virtual void record(const RoutingPlan& plan, ConstMatrixView<float> logits) = 0;

protected:
    RoutingSink() = default;
    RoutingSink(const RoutingSink&) = default;
    RoutingSink& operator=(const RoutingSink&) = default;
};

/// Auxiliary routing losses a backward call adds, with these coefficients, to the loss it
/// differentiates (router/losses.hpp): their gradients reach each MoE block's router weight
/// through its logits. 0 = off. Forward calls ignore them.
struct AuxLossWeights {
    double load_balancing = 0; ///< load_balancing_loss
    double z_loss = 0;         ///< router_z_loss
    double importance = 0;     ///< cv_squared(importance(plan)) (Shazeer et al.), through the combine weights
    /// smooth_load_loss (Shazeer et al.'s load loss, cv^2 of the smooth load estimator): noisy
    /// top-k routers only (a config_error for any other).
    double load = 0;
    /// Load balancing per sequence of Context::sequence_length (Switch Transformers), instead of
    /// over the whole call (Hugging Face's top-k form).
    bool per_sequence = false;
    /// Count a token that capacity dropped for expert 0, as Hugging Face's SwitchTransformers does.
    bool dropped_as_first_expert = false;
};

struct Context {
    /// Token ids (T), for hash routing; empty otherwise.
    std::span<const std::int32_t> token_ids = {};
    /// Tokens per sequence: rows [i S, (i + 1) S) are sequence i (per-sequence capacity, noise
    /// positions). 0 = all rows form one sequence.
    index_t sequence_length = 0;
    /// Position of row 0 in its sequence: a batch that continues a sequence (decoding one token
    /// at a time, or a long sequence in chunks) passes where it starts, so position-keyed
    /// randomness does not depend on how the sequence was cut into calls.
    index_t first_position = 0;
    /// A per-call seed mixed into the noise of noisy routers (e.g. the training step); 0 = none.
    std::uint64_t noise_seed = 0;
    /// Whether noisy routers draw their noise; false: they rank the clean selection scores, as
    /// the HyperMoE reference code routes when not training (an evaluation's setting).
    bool router_noise = true;
    /// Where MoE blocks report their routing; null = nowhere.
    RoutingSink* routing_sink = nullptr;
    /// Auxiliary losses a backward call adds (none by default).
    AuxLossWeights aux_losses = {};

    /// The position of row t in its sequence.
    [[nodiscard]] constexpr index_t position(index_t t) const noexcept {
        return first_position + (sequence_length > 0 ? t % sequence_length : t);
    }
};

} // namespace hypermoe
