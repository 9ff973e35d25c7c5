#pragma once
// MoeLayer: router GEMM -> Router -> RoutingPlan -> gather -> one GEMM chain per non-empty
// expert on its contiguous rows (or, where the experts do not balance across the threads, a
// pool of (expert, tile) items per stage) -> combine in a fixed order -> (+ shared expert).
//
// Everything after routing reads only the RoutingPlan, so any router runs on identical expert
// kernels. Combine writes each output row once, summing the token's slots in slot order, so the
// result does not depend on thread count or on how experts were scheduled (no atomics).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/expert/expert_concept.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/layer/shared_expert.hpp"
#include "hypermoe/router/losses.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/scored_router.hpp"

namespace hypermoe {

namespace detail {
/// An expert whose backward runs as work items (GluExpert::backward_tile).
template <class E>
concept TiledBackward = requires { typename E::BackwardTile; } &&
    requires(const E& e, const typename E::BackwardTile& t, typename E::gradients_type& g, Workspace& w) {
        e.backward_tile(1, index_t{0}, t, g, w);
    };
/// An expert whose forward runs as work items (GluExpert::forward_tile).
template <class E>
concept TiledForward = requires { typename E::ForwardTile; } &&
    requires(const E& e, const typename E::ForwardTile& t, const PreparedInput& in, Workspace& w) {
        { e.forward_prepare(1, t, w) } -> std::same_as<PreparedInput>;
        e.forward_tile(1, index_t{0}, t, in, w);
    };
} // namespace detail

/// What a token that capacity dropped outputs.
enum class DroppedTokens {
    scaled_input, ///< w * x: the input passes through, scaled (Switch in Hugging Face transformers)
    zero,         ///< 0 (the residual alone carries the token)
};

struct MoeOptions {
    DroppedTokens dropped = DroppedTokens::scaled_input;
};

namespace detail {
/// Whether a router has a backward pass (ScoredRouter with a policy whose weights are its
/// scores or constant): an MoeLayer with it has one too.
template <class R>
concept router_has_backward = requires(const R& r, ConstMatrixView<float> logits, const RoutingPlan& plan, MatrixView<float> d,
                                       Workspace& ws) { r.backward(logits, plan, logits, d, ws); };
} // namespace detail

/// Gradients of an MoeLayer's parameters, zeroed at creation (MoeLayer::make_gradients);
/// backward adds to them.
template <class ExpertGradients, class SharedGradients>
struct MoeGradients {
    Matrix<float> gate;                    ///< (logit columns, d_model): the router weight
    std::vector<float> gate_bias;          ///< logit columns: the router's bias (empty without one)
    std::vector<ExpertGradients> experts;  ///< one per expert, in expert order
    SharedGradients shared;                ///< the shared expert's (empty without one)
};

/// What MoeLayer::forward(x, y, ws, kept, ctx) keeps for backward(kept, ...), so the backward
/// neither routes again nor recomputes the experts: the plan, the router logits, the experts'
/// gathered inputs and outputs, and each expert's hidden activations (Expert::kept_width()
/// columns a row: GLU's [gate | up] pre-activations, FFN's hidden activations). The caller owns
/// it, one per call in flight (a layer stays const and shared); its buffers grow to the largest
/// call and are then reused, so a training loop allocates nothing in the steady state. Valid
/// until the next forward into it.
struct MoeActivations {
    RoutingPlan plan;
    std::vector<float> logits; ///< (tokens, logit columns)
    std::vector<float> in;     ///< (plan rows, d_model): x's rows grouped by expert
    std::vector<float> out;    ///< (plan rows, d_model): the experts' outputs
    std::vector<float> hidden; ///< (plan rows, kept width)
    index_t tokens = 0;          ///< rows of the forward's x
    const void* layer = nullptr; ///< the layer that kept them (checked by backward; its widths give the shapes)
};

template <Expert E, Router R, class Shared = NoSharedExpert>
class MoeLayer {
public:
    using expert_type = E;
    using router_type = R;
    using backend_type = typename E::backend_type;
    static constexpr index_t static_in_width = E::static_d_model;
    static constexpr index_t static_out_width = E::static_d_model;

    /// gate: the router weight (logit columns, d_model), nn.Linear layout, no bias: one row per
    /// expert, then any logits the router reads beside them (a noisy top-k router with a learned
    /// noise scale: W_noise's E rows below W_g's). Held as f32 (a bf16 router is widened exactly:
    /// it is small, and backward needs f32).
    MoeLayer(WeightView gate, R router, std::vector<E> experts, Shared shared = {}, MoeOptions options = {})
        : MoeLayer(gate, {}, std::move(router), std::move(experts), std::move(shared), options) {}

    /// The same with a bias of the router logits, logits = x W_g^T + gate_bias (gpt-oss's
    /// router; empty = none): one value per logit column, held as f32 with the gate, and
    /// given a gradient (MoeGradients::gate_bias).
    MoeLayer(WeightView gate, std::span<const float> gate_bias, R router, std::vector<E> experts, Shared shared = {},
             MoeOptions options = {})
        : router_(std::move(router)), experts_(std::move(experts)), shared_(std::move(shared)), options_(options),
          gate_(std::in_place, checked_gate(gate, router_, experts_), checked_gate_bias(gate_bias, router_),
                LinearOptions{"MoeLayer weight 'gate'", false, dtype::f32}),
          gate_bias_(!gate_bias.empty()) {}

    [[nodiscard]] index_t in_width() const noexcept { return experts_.front().d_model(); }
    [[nodiscard]] index_t out_width() const noexcept { return in_width(); }
    [[nodiscard]] index_t num_experts() const noexcept { return static_cast<index_t>(experts_.size()); }
    /// Columns of the router logits (rows of the gate weight): num_experts(), plus the router's
    /// noise logits if it learns its noise scale.
    [[nodiscard]] index_t logit_columns() const noexcept { return detail::router_logit_columns(router_); }
    [[nodiscard]] const R& router() const noexcept { return router_; }
    /// Replaces the router's selection-only bias (E values; ScoredRouter::set_selection_bias),
    /// as auxiliary-loss-free balancing does between steps (router/bias_balancer.hpp). Not to
    /// run concurrently with a forward or backward call on this layer.
    void set_selection_bias(std::span<const float> bias)
        requires requires(R& r) { r.set_selection_bias(std::vector<float>{}); }
    {
        router_.set_selection_bias(std::vector<float>(bias.begin(), bias.end()));
    }
    [[nodiscard]] const E& expert(index_t e) const noexcept { return experts_[std::size_t(e)]; }
    [[nodiscard]] const Shared& shared() const noexcept { return shared_; }
    [[nodiscard]] const MoeOptions& options() const noexcept { return options_; }

    [[nodiscard]] std::size_t route_workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, logit_columns()) +
               std::max(gate_->workspace_bytes(rows), router_.workspace_bytes(rows));
    }
    /// Scratch of apply() for `rows` tokens whose plan has `packed` assignments (the layer's own
    /// router makes at most rows x slots; a plan from another router may make more).
    [[nodiscard]] std::size_t apply_workspace_bytes(index_t rows, index_t packed) const {
        std::size_t inner = 0;
        for (const auto& e : experts_) inner = std::max(inner, e.workspace_bytes(rows));
        if constexpr (Shared::present) inner = std::max(inner, shared_.workspace_bytes(rows));
        return 2 * detail::padded_bytes<float>(packed, in_width()) + std::max(inner, experts_workspace_bytes(rows, packed));
    }
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return std::max(route_workspace_bytes(rows), apply_workspace_bytes(rows, max_assignments(rows)));
    }

    /// The most assignments the layer's router makes for `rows` tokens (its per-policy maximum).
    [[nodiscard]] index_t max_assignments(index_t rows) const noexcept {
        if constexpr (requires { router_.max_assignments(rows); }) return router_.max_assignments(rows);
        else return detail::saturating_mul(rows, router_.slots());
    }

    /// The router logits x W_g^T (T, logit_columns()), e.g. to route with another router and apply() the plan.
    void router_logits(ConstMatrixView<float> x, MatrixView<float> logits, Workspace& ws) const {
        check_input(x);
        gate_(x, logits, ws);
    }

    /// Router logits (x W_g^T) and routing of x (T, d_model) into `plan`; the plan and logits go
    /// to the context's routing sink, if any. A router that ignores logits (hash routing) is given
    /// zeros, and the gate GEMM is skipped.
    void route(ConstMatrixView<float> x, const Context& context, RoutingPlan& plan, Workspace& ws) const {
        check_input(x);
        Workspace::Scope scope(ws, route_workspace_bytes(x.rows()));
        route_into(x, context, plan, ws.take_matrix<float>(x.rows(), logit_columns()), ws, true);
    }

    /// y (T, d_model) from x and a plan made for x (by route(), or by any router over the same
    /// experts).
    void apply(ConstMatrixView<float> x, const RoutingPlan& plan, MatrixView<float> y, Workspace& ws) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "MoeLayer");
        if (plan.tokens() != x.rows() || plan.experts() != num_experts())
            throw shape_error(detail::concat("MoeLayer::apply: the plan routes ", plan.tokens(), " tokens over ",
                                             plan.experts(), " experts, expected ", x.rows(), " over ", num_experts()));
        const index_t d = in_width(), rows = plan.rows();
        Workspace::Scope scope(ws, apply_workspace_bytes(x.rows(), rows));
        MatrixView<float> in = ws.take_matrix<float>(rows, d);  // (rows, d): tokens grouped by expert
        MatrixView<float> out = ws.take_matrix<float>(rows, d); // (rows, d)
        apply_into(x, plan, y, in, out, {}, ws);
    }

    /// The Layer entry point: routes with a per-thread plan that keeps its capacity.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& context = {}) const {
        thread_local RoutingPlan plan;
        forward(x, y, ws, plan, context);
    }

    /// Routes into `plan` (which the caller may then inspect) and computes y.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, RoutingPlan& plan,
                 const Context& context = {}) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "MoeLayer");
        route(x, context, plan, ws);
        apply(x, plan, y, ws);
    }

    /// The same, keeping in `kept` what backward(kept, ...) needs (MoeActivations). The routing
    /// sink, if any, is called as by the other forwards.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, MoeActivations& kept,
                 const Context& context = {}) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "MoeLayer");
        check_input(x);
        const index_t tokens = x.rows(), d = in_width(), kw = kept_width();
        kept.layer = nullptr; // invalid until complete
        kept.logits.resize(std::size_t(tokens * logit_columns()));
        {
            Workspace::Scope scope(ws, route_workspace_bytes(tokens));
            route_into(x, context, kept.plan, MatrixView<float>(kept.logits.data(), tokens, logit_columns()), ws, true);
        }
        const index_t rows = kept.plan.rows();
        kept.in.resize(std::size_t(detail::checked_elements(rows, d, sizeof(float), "MoeLayer: kept inputs")));
        kept.out.resize(kept.in.size());
        kept.hidden.resize(std::size_t(detail::checked_elements(rows, kw, sizeof(float), "MoeLayer: kept activations")));
        Workspace::Scope scope(ws, apply_workspace_bytes(tokens, rows));
        apply_into(x, kept.plan, y, MatrixView<float>(kept.in.data(), rows, d), MatrixView<float>(kept.out.data(), rows, d),
                   MatrixView<float>(kept.hidden.data(), rows, kw), ws);
        kept.tokens = tokens;
        kept.layer = this;
    }

    /// Floats per plan row that the experts keep (the widest expert's kept_width()).
    [[nodiscard]] index_t kept_width() const noexcept {
        index_t w = 0;
        for (const auto& e : experts_) w = std::max(w, e.kept_width());
        return w;
    }

    /// Zeroed gradients of the router weight, every expert and the shared expert.
    [[nodiscard]] auto make_gradients() const
        requires requires(const E& e) { e.make_gradients(); }
    {
        using G = MoeGradients<decltype(experts_.front().make_gradients()), decltype(shared_.make_gradients())>;
        G g{Matrix<float>(logit_columns(), in_width()), std::vector<float>(gate_bias_ ? std::size_t(logit_columns()) : 0, 0.0f), {},
            shared_.make_gradients()};
        g.experts.reserve(experts_.size());
        for (const auto& e : experts_) g.experts.push_back(e.make_gradients());
        return g;
    }

    /// Scratch of backward() for `rows` tokens.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const
        requires detail::TiledBackward<E>
    {
        const index_t d = in_width(), packed = max_assignments(rows), slots = router_.slots();
        std::size_t inner = std::max(gate_->workspace_bytes(rows), gate_->backward_workspace_bytes(rows));
        const std::size_t balancing = 2 * detail::padded_bytes<double>(num_experts()) + detail::padded_bytes<float>(num_experts());
        if constexpr (detail::is_noisy_router<R>) inner = std::max(inner, smooth_load_loss_workspace_bytes(router_));
        inner = std::max({inner, router_.workspace_bytes(rows), router_.backward_workspace_bytes(), balancing,
                          apply_workspace_bytes(rows, packed)});
        inner = std::max(inner, tiles_workspace_bytes(rows, packed));
        if constexpr (Shared::present) inner = std::max(inner, shared_.backward_workspace_bytes(rows));
        return 2 * detail::padded_bytes<float>(rows, logit_columns()) + detail::padded_bytes<float>(rows, slots) +
               4 * detail::padded_bytes<float>(packed, d) + inner;
    }

    /// The backward of forward(x, y, ctx): dx = dL/dx from dy = dL/dy, and the parameter
    /// gradients added to `g`. It routes x again (with the same context, so the same plan;
    /// nothing goes to the routing sink), and the experts' forward runs again, keeping its hidden
    /// activations and giving its outputs (for the combine weights): nothing is kept between
    /// forward and backward. The experts' backward runs as one pool of (expert, tile) items per
    /// stage (GluExpert::backward_tile, FfnExpert::backward_tile). The routing is piecewise constant: gradient reaches the
    /// router through the combine weights only (ScoredRouter::backward). A token that capacity
    /// dropped passes w x (DroppedTokens::scaled_input), so its dx gets w dy and its weights
    /// dy . x. The auxiliary losses the context names (Context::aux_losses) are added, with
    /// their coefficients, through the router logits. dx is summed per token in slot order (no atomics), and
    /// every element by one item: the same bits at every thread count (tests/test_backward.cpp,
    /// tests/test_determinism.cpp). Expert weights must be stored as f32 (config_error otherwise).
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                  const Context& context = {}) const
        requires detail::router_has_backward<R> && detail::TiledBackward<E>
    {
        thread_local RoutingPlan plan;
        backward(x, dy, dx, g, ws, plan, context);
    }

    /// The same, routing into `plan` (which the caller may then use, as HyperMoeLayer does).
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                  RoutingPlan& plan, const Context& context = {}) const
        requires detail::router_has_backward<R> && detail::TiledBackward<E>
    {
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "MoeLayer");
        check_input(x);
        check_gradients(g, context);
        const index_t tokens = x.rows(), d = in_width();
        Workspace::Scope scope(ws, backward_workspace_bytes(tokens));
        MatrixView<float> logits = ws.take_matrix<float>(tokens, logit_columns());
        route_into(x, context, plan, logits, ws, false);
        const index_t rows = plan.rows();
        MatrixView<float> in = ws.take_matrix<float>(rows, d), out = ws.take_matrix<float>(rows, d);
        gather(x, plan, in);
        backward_through(x, dy, dx, g, ws, plan, logits, in, out, {}, context);
    }

    /// The backward of forward(x, y, ws, kept, ctx) from what that forward kept: the same
    /// gradients as backward(x, dy, ...) without routing again or recomputing the experts'
    /// hidden activations (for a GluExpert, 6 products against the forward's 3, where
    /// backward(x, ...) makes 9). `x` and `context` must be the forward's.
    template <class G>
    void backward(const MoeActivations& kept, ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g,
                  Workspace& ws, const Context& context = {}) const
        requires detail::router_has_backward<R> && detail::TiledBackward<E>
    {
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "MoeLayer");
        check_gradients(g, context);
        if (kept.layer != this || kept.tokens != x.rows())
            throw shape_error(detail::concat("MoeLayer::backward: the kept activations are for ", kept.tokens, " tokens",
                                             kept.layer == this ? "" : " of another layer (or incomplete)", ", expected ",
                                             x.rows(), " tokens of this layer (pass what forward(x, y, ws, kept) kept)"));
        const index_t rows = kept.plan.rows(), d = in_width();
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const auto view = [](const std::vector<float>& v, index_t r, index_t c) { return ConstMatrixView<float>(v.data(), r, c); };
        backward_through(x, dy, dx, g, ws, kept.plan, view(kept.logits, x.rows(), logit_columns()), view(kept.in, rows, d),
                         view(kept.out, rows, d), view(kept.hidden, rows, kept_width()), context);
    }

private:
    /// Checks gradients made by make_gradients(), and that the context's auxiliary losses suit
    /// this layer's router.
    template <class G>
    void check_gradients(const G& g, const Context& context) const {
        if (context.aux_losses.load != 0 && !detail::is_noisy_router<R>)
            throw config_error(detail::concat("MoeLayer::backward: Context::aux_losses.load is ", context.aux_losses.load,
                                              ", expected 0: Shazeer's smooth load loss needs a noisy top-k router "
                                              "(NoisyTopKRouter), which this layer's router is not"));
        if (g.gate.rows() != logit_columns() || g.gate.cols() != in_width() || index_t(g.experts.size()) != num_experts())
            throw shape_error(detail::concat("MoeLayer::backward: gradients for a gate of shape ",
                                             detail::shape_str(g.gate.rows(), g.gate.cols()), " and ", g.experts.size(),
                                             " experts, expected ", detail::shape_str(logit_columns(), in_width()), " and ",
                                             num_experts(), " (use make_gradients())"));
        if (index_t(g.gate_bias.size()) != (gate_bias_ ? logit_columns() : 0))
            throw shape_error(detail::concat("MoeLayer::backward: gradients for a gate bias of ", g.gate_bias.size(),
                                             " values, expected ", gate_bias_ ? logit_columns() : 0, " (use make_gradients())"));
    }

    /// The backward from the routing on: `in` holds x's rows grouped by expert; `out` is written
    /// with the experts' outputs by their backward (`hidden` empty: recomputed), or holds them
    /// with the experts' kept activations in `hidden`. Its scratch is within
    /// backward_workspace_bytes(x.rows()).
    template <class G, class Out>
    void backward_through(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                          const RoutingPlan& plan, ConstMatrixView<float> logits, ConstMatrixView<float> in, Out out,
                          ConstMatrixView<float> hidden, const Context& context) const {
        const index_t tokens = x.rows(), d = in_width(), slots = router_.slots(), rows = plan.rows();
        MatrixView<float> dlogits = ws.take_matrix<float>(tokens, logit_columns());
        MatrixView<float> dweights = ws.take_matrix<float>(tokens, slots);
        MatrixView<float> dout = ws.take_matrix<float>(rows, d), din = ws.take_matrix<float>(rows, d);
        const auto row_tokens = plan.row_tokens(), row_slots = plan.row_slots();
        // dout = w dy per (token, slot) row; without kept activations the experts' backward also
        // gives their outputs (from the activations it recomputes anyway), which the combine
        // weights' gradient reads.
        // These per-row and per-token steps run on every thread (each row or token written by
        // one: the same bits at any thread count); serial they took 1.8 of the Mixtral-like
        // layer's 110 ms backward at T = 512 with the other core idle.
        detail::parallel_for(rows, rows * d, [&](index_t r) {
            const index_t t = row_tokens[std::size_t(r)];
            const float w = plan.weights(t)[std::size_t(row_slots[std::size_t(r)])];
            for (index_t c = 0; c < d; ++c) dout(r, c) = w * dy(t, c);
        });
        // Each expert writes only its own rows and gradients, as items of one pool per stage.
        backward_tiles(plan, in, dout, din, out, hidden, g, ws);
        // dweights = dy . out (kept tokens), dy . x (tokens passed through as w x).
        detail::parallel_for(tokens, tokens * slots * d, [&](index_t t) {
            const auto ids = plan.ids(t);
            const bool passed = !plan.kept(t) && options_.dropped == DroppedTokens::scaled_input;
            for (index_t j = 0; j < slots; ++j) {
                double dot = 0;
                if (ids[std::size_t(j)] >= 0) {
                    const index_t r = plan.position(t, j);
                    const auto src = r >= 0 ? out.row(r) : passed ? x.row(t) : std::span<const float>{};
                    for (std::size_t c = 0; c < src.size(); ++c) dot += double(dy(t, index_t(c))) * src[c];
                }
                dweights(t, j) = float(dot);
            }
        });
        // dx: each token's expert rows in slot order (or w dy for a token passed through).
        detail::parallel_for(tokens, tokens * slots * d, [&](index_t t) {
            const auto dxr = dx.row(t);
            std::fill(dxr.begin(), dxr.end(), 0.0f);
            if (!plan.kept(t)) {
                const float sum = passed_weight(plan, t);
                for (index_t c = 0; c < d; ++c) dxr[std::size_t(c)] = sum * dy(t, c);
                return;
            }
            for (index_t j = 0; j < slots; ++j)
                if (const index_t r = plan.position(t, j); r >= 0)
                    for (index_t c = 0; c < d; ++c) dxr[std::size_t(c)] += din(r, c);
        });
        if constexpr (detail::router_uses_logits<R>) {
            const AuxLossWeights& aux = context.aux_losses;
            if (aux.importance != 0) importance_loss_backward(plan, dweights, aux.importance, ws);
            router_.backward(logits, plan, dweights, dlogits, ws, context);
            // The experts' logits (the noise logits, if any, follow them): what these losses read.
            const auto clean = logits.col_block(0, num_experts());
            const auto dclean = dlogits.col_block(0, num_experts());
            if (aux.load_balancing != 0)
                load_balancing_loss_backward(plan, clean, dclean, aux.load_balancing, ws, load_balancing_options(context));
            if (aux.z_loss != 0) router_z_loss_backward(clean, dclean, aux.z_loss);
            if constexpr (detail::is_noisy_router<R>)
                if (aux.load != 0) smooth_load_loss_backward(router_, logits, context, dlogits, aux.load, ws);
            gate_->backward(x, dlogits, dx, LinearGrads{g.gate.view(), g.gate_bias}, ws, true);
        }
        if constexpr (Shared::present) shared_.backward(x, dy, dx, g.shared, ws);
    }

    /// Router logits of x into `logits` (zeros for a router that ignores them: the gate GEMM is
    /// skipped) and the routing into `plan`; with `record`, the plan and logits go to the
    /// context's routing sink. Within route_workspace_bytes(x.rows()) less the logits.
    void route_into(ConstMatrixView<float> x, const Context& context, RoutingPlan& plan, MatrixView<float> logits, Workspace& ws,
                    bool record) const {
        if constexpr (detail::router_uses_logits<R>) gate_(x, logits, ws);
        else std::fill_n(logits.data(), logits.rows() * logits.cols(), 0.0f);
        router_.route(logits, context, plan, ws);
        if (record && context.routing_sink != nullptr) context.routing_sink->record(plan, logits.col_block(0, num_experts()));
    }

    /// y from x and its plan through `in` and `out` (plan rows x d_model): gather, the experts
    /// (keeping their activations in a non-empty `hidden`), combine, the shared expert.
    void apply_into(ConstMatrixView<float> x, const RoutingPlan& plan, MatrixView<float> y, MatrixView<float> in,
                    MatrixView<float> out, MatrixView<float> hidden, Workspace& ws) const {
        gather(x, plan, in);
        run_experts(plan, in, out, ws, hidden);
        detail::parallel_for(x.rows(), x.rows() * in_width() * plan.slots(), [&](index_t t) { combine(x, plan, out, y, t); });
        if constexpr (Shared::present) shared_.add_to(x, y, ws);
    }

    /// What routing requires of x: d_model columns, all finite.
    void check_input(ConstMatrixView<float> x) const {
        if (x.cols() != in_width())
            throw shape_error(detail::concat("MoeLayer::route: input x has ", x.cols(), " columns, expected ", in_width()));
        check_finite(x, "MoeLayer: input x");
    }

    /// Scratch of backward_tiles for `rows` tokens whose plan has `packed` rows.
    [[nodiscard]] std::size_t tiles_workspace_bytes(index_t rows, index_t packed) const {
        index_t kept = 0, scratch = 0, items = 0;
        std::size_t slice = 0, forward = experts_workspace_bytes(rows, packed);
        for (const auto& e : experts_) {
            kept = std::max(kept, e.kept_width());
            scratch = std::max(scratch, e.backward_scratch_width());
            items = std::max(items, e.backward_tiles(1) + e.backward_tiles(2));
            slice = std::max(slice, e.backward_tile_workspace_bytes(rows));
            forward = std::max(forward, e.workspace_bytes(rows));
        }
        return detail::padded_bytes<float>(packed, kept) + detail::padded_bytes<float>(packed, scratch) +
               detail::padded_bytes<TileItem>(detail::saturating_mul(num_experts(), items)) +
               std::max(forward, detail::task_pool_bytes(detail::current_threads(), slice));
    }

    /// The experts' backward as work items of their tiles (backward_tile), largest first: where
    /// the experts balance across the threads, one item per expert (all its tiles in order);
    /// otherwise (more threads than active experts, or one expert holding most rows) one pool of
    /// (expert, tile) items per stage, whose tail is one tile, not one expert's whole backward
    /// (docs/design.md). Without kept activations (`Out` a view to write), the experts' forward
    /// first keeps them, in scratch, and gives their outputs.
    template <class G, class Out>
    void backward_tiles(const RoutingPlan& plan, ConstMatrixView<float> in, ConstMatrixView<float> dout, MatrixView<float> din, Out out,
                        ConstMatrixView<float> hidden, G& g, Workspace& ws) const {
        for (index_t e = 0; e < num_experts(); ++e) experts_[std::size_t(e)].check_gradients(g.experts[std::size_t(e)]);
        const index_t rows = plan.rows();
        Workspace::Scope scope(ws, tiles_workspace_bytes(plan.tokens(), rows));
        index_t scratch_width = 0, most = 0;
        for (const auto& e : experts_) {
            scratch_width = std::max(scratch_width, e.backward_scratch_width());
            most = std::max(most, e.backward_tiles(1) + e.backward_tiles(2));
        }
        if constexpr (std::is_same_v<Out, MatrixView<float>>) {
            const MatrixView<float> kept = ws.take_matrix<float>(rows, kept_width());
            run_experts(plan, in, out, ws, kept);
            hidden = kept;
        }
        const MatrixView<float> scratch = ws.take_matrix<float>(rows, scratch_width);
        const auto offsets = plan.offsets();
        const auto tile = [&](index_t e) {
            const index_t n = plan.rows_of(e), first = offsets[std::size_t(e)];
            const auto& expert = experts_[std::size_t(e)];
            return typename E::BackwardTile{in.row_block(first, n), dout.row_block(first, n),
                                            hidden.row_block(first, n).col_block(0, expert.kept_width()),
                                            scratch.row_block(first, n).col_block(0, expert.backward_scratch_width()),
                                            din.row_block(first, n), false};
        };
        std::size_t slice = 0;
        for (const auto& e : experts_) slice = std::max(slice, e.backward_tile_workspace_bytes(plan.tokens()));
        const std::span<TileItem> items = ws.take<TileItem>(detail::saturating_mul(num_experts(), most));
        const int threads = detail::current_threads();
        if (experts_balance(plan, threads)) {
            // One item per expert, its stage 1 tiles then its stage 2 tiles on one thread: dz is
            // still in cache when stage 2 reads it. The two pools below instead made an FFN
            // layer's backward 5-8% slower here (design.md), and a GLU layer's no faster.
            std::size_t count = 0;
            for (index_t e = 0; e < num_experts(); ++e)
                if (plan.rows_of(e) > 0) items[count++] = {plan.rows_of(e), std::int32_t(e), 0};
            sort_items(items.first(count));
            detail::run_task_pool(ws, index_t(count), threads, slice, [&](index_t item, Workspace& w) {
                const index_t e = items[std::size_t(item)].expert;
                const auto& expert = experts_[std::size_t(e)];
                for (const int stage : {1, 2})
                    for (index_t i = 0; i < expert.backward_tiles(stage); ++i) expert.backward_tile(stage, i, tile(e), g.experts[std::size_t(e)], w);
            });
            return;
        }
        for (const int stage : {1, 2}) {
            std::size_t count = 0;
            for (index_t e = 0; e < num_experts(); ++e)
                for (index_t i = 0; plan.rows_of(e) > 0 && i < experts_[std::size_t(e)].backward_tiles(stage); ++i)
                    items[count++] = {plan.rows_of(e) * experts_[std::size_t(e)].backward_tile_columns(stage, i).second, std::int32_t(e),
                                      std::int32_t(i)};
            sort_items(items.first(count));
            detail::run_task_pool(ws, index_t(count), threads, slice, [&](index_t item, Workspace& w) {
                const TileItem& it = items[std::size_t(item)];
                experts_[std::size_t(it.expert)].backward_tile(stage, it.tile, tile(it.expert), g.experts[std::size_t(it.expert)], w);
            });
        }
    }

    /// Whether the plan's experts balance across `threads` threads as whole-expert tasks: every
    /// thread gets work and no expert is much more than its share of the rows.
    [[nodiscard]] bool experts_balance(const RoutingPlan& plan, int threads) const noexcept {
        index_t active = 0, largest = 0;
        for (index_t e = 0; e < num_experts(); ++e)
            if (const index_t n = plan.rows_of(e); n > 0) ++active, largest = std::max(largest, n);
        return threads > 1 && active >= threads && largest * threads <= plan.rows() * 5 / 4 + threads;
    }

    /// A work item of backward_tiles and forward_pool: (expert, tile) and its cost, rows x columns.
    struct TileItem {
        index_t cost;
        std::int32_t expert, tile;
    };
    /// Most rows x columns first; ties in expert, then tile order (a total order: the same
    /// schedule every call; std::sort sorts in place, no allocation).
    static void sort_items(std::span<TileItem> items) {
        std::sort(items.begin(), items.end(), [](const TileItem& a, const TileItem& b) {
            return a.cost != b.cost ? a.cost > b.cost : a.expert != b.expert ? a.expert < b.expert : a.tile < b.tile;
        });
    }

    /// Scratch of one expert's forward run as a task (single-threaded: nested inside the tasks'
    /// region).
    [[nodiscard]] std::size_t task_workspace_bytes(index_t rows) const {
        const detail::ThreadCountScope one(1);
        std::size_t bytes = 0;
        for (const auto& e : experts_) bytes = std::max(bytes, e.workspace_bytes(rows));
        return detail::padded_bytes<std::byte>(index_t(bytes));
    }
    /// Scratch of for_each_expert's tasks for `rows` tokens.
    [[nodiscard]] std::size_t tasks_workspace_bytes(index_t rows) const {
        const int threads = detail::current_threads();
        if (threads <= 1) return 0;
        return detail::padded_bytes<std::int32_t>(num_experts()) + detail::saturating_bytes(threads, task_workspace_bytes(rows));
    }

    /// Every non-empty expert's forward on its rows: fn(e, ws) with the scratch to use. When
    /// the experts balance across the threads, they run as tasks in ONE parallel region, each
    /// single-threaded on a scratch slice of its thread (largest first, to whichever thread is
    /// free): a forward then opens a handful of parallel regions instead of several per expert,
    /// which is what keeps it from collapsing when another process takes a core (each region
    /// ends in a barrier). Otherwise they run one after another, each GEMM threaded by the
    /// backend: on one thread, with one active expert, and for experts without forward tiles
    /// (run_experts takes the others to its pool). Every way gives the same bits
    /// (tests/test_determinism.cpp, tests/test_backward.cpp).
    template <class Fn>
    void for_each_expert(const RoutingPlan& plan, Workspace& ws, Fn&& fn) const {
        const int threads = detail::current_threads();
        if (!experts_balance(plan, threads)) {
            for (index_t e = 0; e < num_experts(); ++e)
                if (plan.rows_of(e) > 0) fn(e, ws);
            return;
        }
        // The largest T an expert may get is plan.tokens() (one row per token per expert).
        const std::size_t slice = task_workspace_bytes(plan.tokens());
        Workspace::Scope scope(ws, tasks_workspace_bytes(plan.tokens()));
        const auto order = ws.take<std::int32_t>(num_experts());
        index_t count = 0;
        for (index_t e = 0; e < num_experts(); ++e)
            if (plan.rows_of(e) > 0) order[std::size_t(count++)] = std::int32_t(e);
        // Most rows first, ties in expert order: an insertion sort (E is small, and
        // std::stable_sort would allocate a buffer).
        for (index_t i = 1; i < count; ++i) {
            const std::int32_t e = order[std::size_t(i)];
            index_t j = i;
            for (; j > 0 && plan.rows_of(order[std::size_t(j - 1)]) < plan.rows_of(e); --j)
                order[std::size_t(j)] = order[std::size_t(j - 1)];
            order[std::size_t(j)] = e;
        }
        detail::run_task_pool(ws, count, threads, slice, [&](index_t i, Workspace& mine) { fn(order[std::size_t(i)], mine); });
    }

    /// Scratch of run_experts for `rows` tokens whose plan has `packed` rows: the experts as
    /// tasks (a list of experts and one scratch slice per thread), or as the forward pool.
    [[nodiscard]] std::size_t experts_workspace_bytes(index_t rows, index_t packed) const {
        std::size_t bytes = tasks_workspace_bytes(rows);
        if constexpr (detail::TiledForward<E>) // never on one thread (the first query makes oneDNN's tile primitives)
            if (detail::current_threads() > 1) bytes = std::max(bytes, forward_pool_bytes(rows, packed));
        return bytes;
    }

    /// The experts' forward. With a non-empty `hidden` (rows, kept_width()), each expert keeps
    /// its activations in its rows of it. Where whole experts balance across the threads, on one
    /// thread, or with one active expert, as for_each_expert runs them; otherwise (more threads
    /// than active experts, or one expert holding most rows) as the forward pool of (expert,
    /// tile) items.
    void run_experts(const RoutingPlan& plan, ConstMatrixView<float> in, MatrixView<float> out, Workspace& ws,
                     MatrixView<float> hidden = {}) const {
        if constexpr (detail::TiledForward<E>) {
            const int threads = detail::current_threads();
            index_t active = 0;
            for (index_t e = 0; e < num_experts(); ++e) active += plan.rows_of(e) > 0;
            // One active expert: its products, threaded by the backend, are its tiles already
            // (2 threads, T = 1, top-1, f32: a pool of its 11 + 4 tiles of 256 columns took
            // 0.37-0.44 ms where the threaded products took 0.27-0.36).
            if (threads > 1 && active > 1 && !experts_balance(plan, threads)) return forward_pool(plan, in, out, ws, hidden);
        }
        const auto offsets = plan.offsets();
        for_each_expert(plan, ws, [&](index_t e, Workspace& w) {
            const index_t n = plan.rows_of(e), first = offsets[std::size_t(e)];
            const auto& expert = experts_[std::size_t(e)];
            const MatrixView<float> keep =
                hidden.data() != nullptr ? hidden.row_block(first, n).col_block(0, expert.kept_width()) : MatrixView<float>{};
            expert.forward(in.row_block(first, n), out.row_block(first, n), w, {}, keep);
        });
    }

    /// Scratch of forward_pool for `rows` tokens whose plan has `packed` rows: every expert's
    /// hidden activations, its prepared inputs (the largest stage's; an expert's rows are at
    /// most `rows`, and all of them `packed`), the items, and the pool's slices.
    [[nodiscard]] std::size_t forward_pool_bytes(index_t rows, index_t packed) const {
        index_t ff = 0, items = 0;
        std::size_t prepared = 0, slice = 0;
        for (const auto& e : experts_) {
            ff = std::max(ff, e.d_ff());
            items = std::max(items, std::max(e.forward_tiles(1), e.forward_tiles(2)));
            for (const int stage : {1, 2}) prepared = std::max(prepared, e.forward_prepared_bytes(stage, std::min(rows, packed)));
            slice = std::max(slice, e.forward_tile_workspace_bytes(rows));
        }
        // Each expert's prepared rows are padded apart: at most 4 buffers' alignment each.
        const std::size_t pad = detail::saturating_bytes(4 * num_experts(), buffer_alignment);
        const std::size_t all_prepared = packed > rows ? detail::saturating_bytes((packed + rows - 1) / std::max<index_t>(rows, 1), prepared)
                                                       : prepared;
        return detail::padded_bytes<float>(packed, ff) + detail::padded_bytes<PreparedInput>(num_experts()) +
               detail::padded_bytes<TileItem>(detail::saturating_mul(num_experts(), items)) + all_prepared + pad +
               detail::task_pool_bytes(detail::current_threads(), detail::padded_bytes<std::byte>(index_t(slice)));
    }

    /// The experts' forward as one pool of (expert, tile) items per stage across every active
    /// expert (GluExpert::forward_tile), the largest (rows x columns) first: each expert's
    /// product inputs are prepared (quantised or rounded for `fast`) once per stage, in
    /// parallel over its rows; then stage 1's items write every expert's hidden activations,
    /// and stage 2's items their outputs. The tail of a stage is one tile, not one expert, and
    /// each output has the bits of the expert's forward() (tests/test_layer.cpp).
    void forward_pool(const RoutingPlan& plan, ConstMatrixView<float> in, MatrixView<float> out, Workspace& ws,
                      MatrixView<float> hidden) const {
        const index_t rows = plan.rows();
        Workspace::Scope scope(ws, forward_pool_bytes(plan.tokens(), rows));
        index_t ff = 0, most = 0;
        for (const auto& e : experts_) ff = std::max(ff, e.d_ff()), most = std::max({most, e.forward_tiles(1), e.forward_tiles(2)});
        const MatrixView<float> act = ws.take_matrix<float>(rows, ff);
        const std::span<PreparedInput> prepared = ws.take<PreparedInput>(num_experts());
        const std::span<TileItem> items = ws.take<TileItem>(detail::saturating_mul(num_experts(), most));
        std::size_t slice = 0;
        for (const auto& e : experts_) slice = std::max(slice, e.forward_tile_workspace_bytes(plan.tokens()));
        slice = detail::padded_bytes<std::byte>(index_t(slice));
        const auto offsets = plan.offsets();
        const auto tile = [&](index_t e) {
            const index_t n = plan.rows_of(e), first = offsets[std::size_t(e)];
            const auto& expert = experts_[std::size_t(e)];
            return typename E::ForwardTile{in.row_block(first, n), out.row_block(first, n),
                                           act.row_block(first, n).col_block(0, expert.d_ff()),
                                           hidden.data() != nullptr ? hidden.row_block(first, n).col_block(0, expert.kept_width())
                                                                    : MatrixView<float>{}};
        };
        const int threads = detail::current_threads();
        for (const int stage : {1, 2}) {
            Workspace::Scope prepared_scope(ws, 0);
            std::size_t count = 0;
            for (index_t e = 0; e < num_experts(); ++e) {
                if (plan.rows_of(e) == 0) continue;
                const auto& expert = experts_[std::size_t(e)];
                std::construct_at(&prepared[std::size_t(e)], expert.forward_prepare(stage, tile(e), ws));
                for (index_t i = 0; i < expert.forward_tiles(stage); ++i)
                    items[count++] = {plan.rows_of(e) * expert.forward_tile_columns(stage, i).second, std::int32_t(e), std::int32_t(i)};
            }
            sort_items(items.first(count));
            detail::run_task_pool(ws, index_t(count), threads, slice, [&](index_t item, Workspace& w) {
                const TileItem& it = items[std::size_t(item)];
                experts_[std::size_t(it.expert)].forward_tile(stage, it.tile, tile(it.expert), prepared[std::size_t(it.expert)], w);
            });
        }
    }

    static WeightView checked_gate(WeightView gate, const R& router, const std::vector<E>& experts) {
        if (experts.empty()) throw config_error("MoeLayer: no experts, expected at least one");
        if (router.experts() != static_cast<index_t>(experts.size()))
            throw config_error(detail::concat("MoeLayer: the router routes over ", router.experts(), " experts, but ",
                                              experts.size(), " experts were given"));
        const index_t d = experts.front().d_model();
        for (std::size_t e = 1; e < experts.size(); ++e)
            if (experts[e].d_model() != d)
                throw shape_error(detail::concat("MoeLayer: expert ", e, " has d_model = ", experts[e].d_model(),
                                                  ", expected ", d, " (expert 0's)"));
        const index_t columns = detail::router_logit_columns(router), e = router.experts();
        if (columns != e && (gate.rows() != columns || gate.cols() != d))
            throw shape_error(detail::concat("MoeLayer: weight 'gate' has shape ", detail::shape_str(gate.rows(), gate.cols()),
                                             ", expected ", detail::shape_str(columns, d), ": ", e, " experts' rows, then ",
                                             columns - e, " noise rows (the router learns its noise scale)"));
        detail::check_weight_shape(gate, columns, d, "MoeLayer", "gate");
        return gate;
    }

    static std::span<const float> checked_gate_bias(std::span<const float> bias, const R& router) {
        const index_t columns = detail::router_logit_columns(router);
        if (!bias.empty() && index_t(bias.size()) != columns)
            throw shape_error(detail::concat("MoeLayer: bias 'gate' has ", bias.size(), " values, expected ", columns,
                                             " (one per router logit)"));
        return bias;
    }

    /// in (rows, d): x's rows in the plan's row order (tokens grouped by expert).
    static void gather(ConstMatrixView<float> x, const RoutingPlan& plan, MatrixView<float> in) {
        const auto tokens = plan.row_tokens();
        detail::parallel_for(plan.rows(), plan.rows() * x.cols(), [&](index_t r) {
            const auto src = x.row(tokens[std::size_t(r)]);
            std::copy(src.begin(), src.end(), in.row(r).begin());
        });
    }

    /// What a token that capacity dropped passes on: y = this * x (the sum of its weights with
    /// DroppedTokens::scaled_input; 0 with DroppedTokens::zero).
    [[nodiscard]] float passed_weight(const RoutingPlan& plan, index_t t) const noexcept {
        if (options_.dropped == DroppedTokens::zero) return 0.0f;
        const auto ids = plan.ids(t);
        const auto w = plan.weights(t);
        float sum = 0;
        for (std::size_t j = 0; j < ids.size(); ++j)
            if (ids[j] >= 0) sum += w[j];
        return sum;
    }

    void combine(ConstMatrixView<float> x, const RoutingPlan& plan, ConstMatrixView<float> out, MatrixView<float> y,
                 index_t t) const {
        const auto yr = y.row(t);
        std::fill(yr.begin(), yr.end(), 0.0f);
        const auto w = plan.weights(t);
        if (!plan.kept(t)) {
            const float sum = passed_weight(plan, t);
            const auto xr = x.row(t);
            HYPERMOE_SIMD
            for (std::size_t c = 0; c < yr.size(); ++c) yr[c] = sum * xr[c];
            return;
        }
        for (index_t j = 0; j < plan.slots(); ++j) {
            const index_t r = plan.position(t, j);
            if (r < 0) continue;
            const float wj = w[std::size_t(j)];
            const auto src = out.row(r);
            HYPERMOE_SIMD
            for (std::size_t c = 0; c < yr.size(); ++c) yr[c] += wj * src[c];
        }
    }

    R router_;
    std::vector<E> experts_;
    Shared shared_;
    MoeOptions options_;
    detail::Shared<typename backend_type::template linear<Identity>> gate_; // shared by copies, as the experts' maps
    bool gate_bias_ = false;                                                // the gate has a bias
};

} // namespace hypermoe
