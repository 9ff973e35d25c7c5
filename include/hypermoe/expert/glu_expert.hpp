#pragma once
// GluExpert: y = down(Act(gate x + b_g) * (up x + b_u)) + b_down, the gated feed-forward of
// Mixtral, Qwen2-MoE, OLMoE and DeepSeek (SwiGLU with Act = Silu; Shazeer, arXiv 2002.05202).
// Act may also combine g and u itself (a GatedActivation: gpt-oss's clamped SwiGluOai).
// gate and up run as ONE GEMM with N = 2 d_ff (their rows stacked at construction), which
// reads x once and halves the GEMM calls; Act(g) * u is one pass over that output.

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/expert/expert_concept.hpp"
#include "hypermoe/expert/ffn_expert.hpp"

namespace hypermoe {

/// Weights of a GluExpert, borrowed for the constructor.
struct GluWeights {
    WeightView gate;                         ///< (d_ff, d_model)
    WeightView up;                           ///< (d_ff, d_model)
    WeightView down;                         ///< (d_model, d_ff)
    std::span<const float> gate_bias = {};   ///< d_ff, or empty
    std::span<const float> up_bias = {};     ///< d_ff, or empty
    std::span<const float> down_bias = {};   ///< d_model, or empty
};

/// Gradients of a GluExpert's parameters, zeroed at creation (GluExpert::make_gradients);
/// backward adds to them. gate and up are one fused (2 d_ff, d_model) matrix, as the expert
/// computes them: gate() and up() are its two halves.
struct GluGradients {
    Matrix<float> gate_up;           ///< (2 d_ff, d_model)
    Matrix<float> down;              ///< (d_model, d_ff)
    std::vector<float> gate_up_bias; ///< 2 d_ff, or empty when the expert has no gate/up bias
    std::vector<float> down_bias;    ///< d_model, or empty

    [[nodiscard]] MatrixView<float> gate() noexcept { return gate_up.view().row_block(0, gate_up.rows() / 2); }
    [[nodiscard]] MatrixView<float> up() noexcept { return gate_up.view().row_block(gate_up.rows() / 2, gate_up.rows() / 2); }
    [[nodiscard]] ConstMatrixView<float> gate() const noexcept { return gate_up.view().row_block(0, gate_up.rows() / 2); }
    [[nodiscard]] ConstMatrixView<float> up() const noexcept { return gate_up.view().row_block(gate_up.rows() / 2, gate_up.rows() / 2); }
};

template <Backend B, GluActivation Act, index_t D = dynamic, index_t FF = dynamic>
class GluExpert : public detail::ExpertWidths<B, Act, D, FF> {
    using Widths = detail::ExpertWidths<B, Act, D, FF>;
    using Glu = gated_t<Act>; // h = Glu::apply(g, u)

public:
    using Widths::d_ff;
    using Widths::d_model;

    using gradients_type = GluGradients;

    explicit GluExpert(const GluWeights& w, const ExpertOptions& opt = {})
        : Widths(checked_extents(w)), gate_up_bias_(!w.gate_bias.empty() || !w.up_bias.empty()), down_bias_(!w.down_bias.empty()),
          gate_up_(fused_gate_up(w, opt)),
          down_(std::in_place, w.down, w.down_bias, LinearOptions{"GluExpert weight 'down'", false, opt.storage, opt.prec, opt.keep_stored}) {}

    /// The linear maps: [gate; up] fused, and down (shared by copies of this expert).
    [[nodiscard]] const typename B::template linear<Identity>& gate_up() const noexcept { return *gate_up_; }
    [[nodiscard]] const typename B::template linear<Identity>& down() const noexcept { return *down_; }


    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, 2, d_ff()) + detail::padded_bytes<float>(rows, d_ff()) +
               std::max(gate_up_->workspace_bytes(rows), down_->workspace_bytes(rows));
    }

    /// Floats per row that a forward keeps for the backward (kept_width() columns of `keep`):
    /// the [gate | up] pre-activations.
    [[nodiscard]] index_t kept_width() const noexcept { return 2 * d_ff(); }

    /// y (M, d_model) from x (M, d_model). A non-empty `keep` (M, kept_width()) receives what the
    /// backward would otherwise recompute (backward(..., kept = keep)).
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& /*ctx*/ = {},
                 MatrixView<float> keep = {}) const {
        detail::check_forward_shapes(x, y, d_model(), d_model(), "GluExpert");
        detail::check_kept(x, keep, kept_width(), "GluExpert", "keep");
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        const index_t ff = d_ff();
        // (M, 2 ff): [gate | up], kept or scratch
        MatrixView<float> gu = keep.data() != nullptr ? keep : ws.take_matrix<float>(x.rows(), 2 * ff);
        gate_up_(x, gu, ws);
        // h = Act(g) * u into its own contiguous buffer: the down GEMM reading h with stride
        // 2 ff instead measured 10-20% slower at M = 8. Split into (row, column block) items so
        // that both cores work at M = 1 too.
        MatrixView<float> h = ws.take_matrix<float>(x.rows(), ff); // (M, ff)
        constexpr index_t block = 512;
        const index_t blocks = (ff + block - 1) / block;
        detail::parallel_for(gu.rows() * blocks, gu.rows() * ff, [&](index_t item) {
            const index_t r = item / blocks, j0 = item % blocks * block, n = std::min(block, ff - j0);
            const float* __restrict g = gu.row(r).data() + j0;
            const float* __restrict u = g + ff;
            float* __restrict out = h.row(r).data() + j0;
            HYPERMOE_SIMD
            for (index_t j = 0; j < n; ++j) out[j] = Glu::apply(g[j], u[j]);
        });
        down_(h, y, ws);
    }

    /// What a forward's tiles read and write.
    using ForwardTile = detail::ExpertForwardTile;

    /// The forward as work items (an MoE layer runs every expert's items as one pool per stage
    /// where whole experts do not balance across its threads). Stage 1 items are tiles of d_ff:
    /// gate's and up's columns of the tile (into `keep`'s, or the item's scratch), then
    /// h = Act(g) * u on them; stage 2 items, after every stage 1 item of the expert, are tiles
    /// of d_model: y's columns of h W_down^T + b_down. Each product reads its input as prepared
    /// once per stage (forward_prepare: x for stage 1, h for stage 2), and each tile gives the
    /// columns the whole products give: forward()'s bits (tests/test_expert.cpp).
    [[nodiscard]] index_t forward_tiles(int stage) const noexcept { return forward_tiling().tiles(stage); }
    /// The columns (of d_ff for stage 1, of d_model for stage 2) of item `tile`.
    [[nodiscard]] std::pair<index_t, index_t> forward_tile_columns(int stage, index_t tile) const noexcept {
        return forward_tiling().columns(stage, tile);
    }
    /// Bytes forward_prepare(stage, ...) takes for `rows` rows.
    [[nodiscard]] std::size_t forward_prepared_bytes(int stage, index_t rows) const {
        return stage == 1 ? gate_up_->prepared_bytes(rows) : down_->prepared_bytes(rows);
    }
    /// The input of `stage`'s product made ready for its tiles (in `ws`, the caller's scope):
    /// t.x for gate|up, t.hidden (every stage 1 item done) for down.
    [[nodiscard]] PreparedInput forward_prepare(int stage, const ForwardTile& t, Workspace& ws) const {
        detail::check_forward_tile("GluExpert", stage, 0, 1, t, d_model(), d_ff(), kept_width());
        return stage == 1 ? gate_up_->prepare(t.x, ws) : down_->prepare(t.hidden, ws);
    }
    /// Scratch of one item with `rows` rows (padded): gate's and up's columns (unless kept),
    /// and the products'.
    [[nodiscard]] std::size_t forward_tile_workspace_bytes(index_t rows) const {
        const std::size_t bytes = forward_tiling().largest([&](int stage, index_t w) {
            return stage == 1 ? detail::padded_bytes<float>(rows, 2 * w) +
                                    gate_up_->forward_columns_workspace_bytes(rows, forward_tiles(1) == 1 ? 2 * w : w)
                              : down_->forward_columns_workspace_bytes(rows, w);
        });
        return detail::padded_bytes<std::byte>(index_t(bytes));
    }
    /// Item `tile` of `stage` (1 or 2) of the forward of t's rows, from `in` =
    /// forward_prepare(stage, t). A stage other than 1 or 2 is a config_error, a tile out of
    /// range or a view of the wrong shape a shape_error.
    void forward_tile(int stage, index_t tile, const ForwardTile& t, const PreparedInput& in, Workspace& ws) const {
        detail::check_forward_tile("GluExpert", stage, tile, forward_tiles(stage), t, d_model(), d_ff(), kept_width());
        const auto [c0, w] = forward_tile_columns(stage, tile);
        if (stage == 2) return down_->forward_columns(in, t.y.col_block(c0, w), c0, ws);
        const index_t ff = d_ff(), m = t.x.rows();
        Workspace::Scope scope(ws, forward_tile_workspace_bytes(m));
        const bool kept = t.keep.data() != nullptr;
        // [gate | up] of the tile's columns: kept ones in place, else side by side in scratch
        const MatrixView<float> scratch = kept ? MatrixView<float>{} : ws.take_matrix<float>(m, 2 * w);
        const MatrixView<float> gate = kept ? t.keep.col_block(c0, w) : scratch.col_block(0, w);
        const MatrixView<float> up = kept ? t.keep.col_block(ff + c0, w) : scratch.col_block(w, w);
        if (forward_tiles(1) == 1) { // one tile: the whole product, whatever gate|up's column unit
            gate_up_->forward_columns(in, kept ? t.keep : scratch, 0, ws);
        } else {
            gate_up_->forward_columns(in, gate, c0, ws);
            gate_up_->forward_columns(in, up, ff + c0, ws);
        }
        for (index_t r = 0; r < m; ++r) {
            const float* __restrict g = gate.row(r).data();
            const float* __restrict u = up.row(r).data();
            float* __restrict out = t.hidden.row(r).data() + c0;
            HYPERMOE_SIMD
            for (index_t j = 0; j < w; ++j) out[j] = Glu::apply(g[j], u[j]);
        }
    }

    /// Zeroed gradients of this expert's parameters.
    [[nodiscard]] GluGradients make_gradients() const {
        GluGradients g{Matrix<float>(2 * d_ff(), d_model()), Matrix<float>(d_model(), d_ff()), {}, {}};
        if (gate_up_bias_) g.gate_up_bias.assign(std::size_t(2 * d_ff()), 0.0f);
        if (down_bias_) g.down_bias.assign(std::size_t(d_model()), 0.0f);
        return g;
    }

    /// Scratch of backward() for `rows` rows: the [gate | up] pre-activations (unless kept), the
    /// stages' scratch, and the larger of the forward products' (recomputing, or giving y) and
    /// the tiles' pool at the calling thread's thread count.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        const std::size_t pool = detail::task_pool_bytes(detail::current_threads(), backward_tile_workspace_bytes(rows));
        return detail::padded_bytes<float>(rows, 2 * d_ff()) + detail::padded_bytes<float>(rows, backward_scratch_width()) +
               std::max({gate_up_->workspace_bytes(rows), down_->workspace_bytes(rows), pool});
    }

    /// The backward of forward(x): dx [+]= dL/dx from dy = dL/dy, and the parameter gradients
    /// added to `g`. It reads the [gate | up] pre-activations from `kept` (what a forward with
    /// `keep` wrote for this x), or recomputes them from x. A non-empty `y` (M, d_model) also gets
    /// forward(x), from the hidden activations: one product, where a forward call would recompute
    /// [gate | up] too (an MoE layer's backward needs the experts' outputs for its combine
    /// weights). It runs as two pools of tiles on the calling thread's threads (backward_tile).
    /// f32 storage only (config_error otherwise).
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, GluGradients& g, Workspace& ws,
                  bool accumulate_input = false, MatrixView<float> y = {}, ConstMatrixView<float> kept = {}) const {
        detail::check_backward_shapes(x, dy, dx, d_model(), d_model(), "GluExpert");
        detail::check_backward_output(x, y, d_model(), "GluExpert");
        detail::check_kept(x, kept, kept_width(), "GluExpert", "kept");
        check_gradients(g);
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const index_t m = x.rows();
        MatrixView<float> recomputed = ws.take_matrix<float>(m, 2 * d_ff()); // [gate | up] pre-activations, unless kept
        const MatrixView<float> scratch = ws.take_matrix<float>(m, backward_scratch_width());
        if (kept.data() == nullptr) gate_up_(x, recomputed, ws);
        const BackwardTile t{x, dy, kept.data() != nullptr ? kept : ConstMatrixView<float>(recomputed), scratch, dx, accumulate_input};
        detail::run_backward_tiles(*this, t, g, ws, [&] {
            if (y.data() != nullptr) down_(scratch.col_block(0, d_ff()), y, ws);
        });
    }

    /// What a backward's tiles read and write; `kept` holds the [gate | up] pre-activations.
    using BackwardTile = detail::ExpertBackwardTile;

    /// The backward as work items (an MoE layer runs every expert's items in one pool; tests/
    /// test_backward.cpp). Stage 1 items are tiles of d_ff: h = Act(g) * u, dh = dy W_down, the
    /// SwiGLU backward into d[gate | up], dW_down's columns and dW_gate|up's rows of the tile
    /// (everything but dx is local to a tile). Stage 2 items, after every stage 1 item of the
    /// expert, are tiles of d_model: dx's columns = d[gate | up] W_gate|up, and db_down's. Each
    /// element is summed by one item in the products' own order: the same bits as one thread.
    [[nodiscard]] index_t backward_tiles(int stage) const noexcept { return tiling().tiles(stage); }
    /// Floats per row that the stages share: h (d_ff) and d[gate | up] (2 d_ff).
    [[nodiscard]] index_t backward_scratch_width() const noexcept { return 3 * d_ff(); }
    /// The columns (of d_ff for stage 1, of d_model for stage 2) of item `tile`.
    [[nodiscard]] std::pair<index_t, index_t> backward_tile_columns(int stage, index_t tile) const noexcept {
        return tiling().columns(stage, tile);
    }
    /// Scratch of one item with `rows` rows run on one thread (padded).
    [[nodiscard]] std::size_t backward_tile_workspace_bytes(index_t rows) const {
        const detail::ThreadCountScope one(1);
        const std::size_t bytes = tiling().largest([&](int stage, index_t w) {
            return stage == 1 ? std::max({down_->backward_input_workspace_bytes(rows, w),
                                       down_->weight_gradient_workspace_bytes(rows, d_model(), w),
                                       gate_up_->weight_gradient_workspace_bytes(rows, w, d_model())})
                           : gate_up_->backward_input_workspace_bytes(rows, w);
        });
        return detail::padded_bytes<std::byte>(index_t(bytes));
    }

    /// Item `tile` of `stage` (1 or 2) of the backward of t's rows; g gets its tile of the
    /// gradients. Stage 2 items read what every stage 1 item of these rows wrote. A stage other
    /// than 1 or 2 is a config_error, a tile out of range or a view of the wrong shape a
    /// shape_error. g is checked by backward() (check_gradients), not per item.
    void backward_tile(int stage, index_t tile, const BackwardTile& t, GluGradients& g, Workspace& ws) const {
        const index_t ff = d_ff(), m = t.x.rows();
        detail::check_backward_tile("GluExpert", stage, tile, backward_tiles(stage), t, d_model(), kept_width(), backward_scratch_width());
        const auto [c0, w] = backward_tile_columns(stage, tile);
        const MatrixView<float> h = t.scratch.col_block(0, ff), dgu = t.scratch.col_block(ff, 2 * ff);
        if (stage == 2) {
            gate_up_->backward_input(dgu, t.dx.col_block(c0, w), c0, ws, t.accumulate_input);
            if (!g.down_bias.empty()) detail::add_column_sums(t.dy.col_block(c0, w), std::span<float>(g.down_bias).subspan(std::size_t(c0), std::size_t(w)));
            return;
        }
        for (index_t r = 0; r < m; ++r) {
            const float* __restrict gate = t.kept.row(r).data() + c0;
            const float* __restrict up = gate + ff;
            float* __restrict out = h.row(r).data() + c0;
            for (index_t j = 0; j < w; ++j) out[j] = Glu::apply(gate[j], up[j]);
        }
        // dh (the tile's columns) into d[up]'s, which the SwiGLU backward then overwrites
        down_->backward_input(t.dy, dgu.col_block(ff + c0, w), c0, ws);
        down_->weight_gradient(h.col_block(c0, w), t.dy, g.down.view().col_block(c0, w), ws);
        for (index_t r = 0; r < m; ++r) {
            const float* gu = t.kept.row(r).data();
            float* d = dgu.row(r).data();
            for (index_t j = c0; j < c0 + w; ++j) {
                const float gate = gu[j], up = gu[ff + j], dh = d[ff + j];
                d[j] = dh * Glu::gate_derivative(gate, up);
                d[ff + j] = dh * Glu::up_derivative(gate, up);
            }
        }
        for (const index_t half : {index_t(0), ff}) {
            gate_up_->weight_gradient(t.x, dgu.col_block(half + c0, w), g.gate_up.view().row_block(half + c0, w), ws);
            if (!g.gate_up_bias.empty())
                detail::add_column_sums(dgu.col_block(half + c0, w), std::span<float>(g.gate_up_bias).subspan(std::size_t(half + c0), std::size_t(w)));
        }
    }

    /// Checks gradients made by make_gradients() and f32 weights (what a backward needs).
    void check_gradients(const GluGradients& g) const {
        gate_up_->check_trainable();
        down_->check_trainable();
        detail::check_gradient_shapes("GluExpert", {{"gate_up", g.gate_up.rows(), g.gate_up.cols(), 2 * d_ff(), d_model()},
                                                     {"down", g.down.rows(), g.down.cols(), d_model(), d_ff()},
                                                     {"gate_up_bias", index_t(g.gate_up_bias.size()), 1, gate_up_bias_ ? 2 * d_ff() : 0, 1},
                                                     {"down_bias", index_t(g.down_bias.size()), 1, down_bias_ ? d_model() : 0, 1}});
    }

private:
    static extents<D, FF> checked_extents(const GluWeights& w) {
        const index_t d = w.gate.cols(), ff = w.gate.rows();
        detail::check_weight_width(D, d, "GluExpert", "d_model", "gate");
        detail::check_weight_width(FF, ff, "GluExpert", "d_ff", "gate");
        detail::check_weight_shape(w.up, ff, d, "GluExpert", "up");
        detail::check_weight_shape(w.down, d, ff, "GluExpert", "down");
        const auto check_bias = [](std::span<const float> b, index_t n, const char* what) {
            if (!b.empty() && static_cast<index_t>(b.size()) != n)
                throw shape_error(detail::concat("GluExpert: bias '", what, "' has ", b.size(),
                                                  " elements, expected ", n));
        };
        check_bias(w.gate_bias, ff, "gate");
        check_bias(w.up_bias, ff, "up");
        return extents<D, FF>(d, ff);
    }

    /// [gate; up] stacked as one (2 ff, d) weight, in the type the linear map stores: by default
    /// gate's and up's when they share one, else f32 (widened, exact); with keep_stored, that
    /// shared one unless it is f32, else the storage. Rows already in that type
    /// are copied as they are (bf16 and q8_0 / q4_0 blocks are not requantised), the others
    /// converted from their values as the linear map would convert them (finiteness checked
    /// first, with its message). So the stacked copy takes the storage's bytes, not f32's: 3.2 MB,
    /// not 23 MB, for a Mixtral-like expert's [gate; up] from f32 or K-quants into q4_0 (block
    /// storage of a d_model that is not a multiple of 32 stacks in f32). Gate and up already in
    /// that type with up's rows right after gate's (as the loader converts a routed expert's) are
    /// the stack: viewed as they are, no copy.
    static detail::Shared<typename B::template linear<Identity>> fused_gate_up(const GluWeights& w, const ExpertOptions& opt) {
        const index_t d = w.gate.cols(), ff = w.gate.rows();
        const dtype source = w.gate.type() == w.up.type() ? w.gate.type() : dtype::f32;
        const dtype storage = kept_storage(source, opt.storage, opt.keep_stored);
        // A block view holds whole blocks: other widths stack in f32, quantised by the linear map.
        const dtype type = is_block_format(storage) && d % quant_block != 0 ? dtype::f32 : storage;
        const std::string name = "GluExpert weight 'gate|up'";
        const std::size_t row = weight_bytes(type, 1, std::size_t(d));
        // Gate and up converted into one buffer (TensorBinder::deferred_stack) are the stack.
        const auto packed = [&](const WeightView& v) { return v.type() == type && (is_block_format(type) || v.stride() == d); };
        if (ff > 0 && packed(w.gate) && packed(w.up) && w.up.row_bytes(0) == w.gate.row_bytes(0) + std::size_t(ff) * row)
            return detail::Shared<typename B::template linear<Identity>>(std::in_place, WeightView::packed(w.gate.row_bytes(0), type, 2 * ff, d),
                                                                        fused_bias(w), LinearOptions{name, false, storage, opt.prec});
        std::vector<std::byte> stacked(std::size_t(2 * ff) * row);
        std::vector<float> values(std::size_t(d), 0.0f);
        for (index_t r = 0; r < 2 * ff; ++r) {
            const WeightView& src = r < ff ? w.gate : w.up;
            const index_t sr = r < ff ? r : r - ff;
            std::byte* out = stacked.data() + std::size_t(r) * row;
            if (src.type() == type) {
                std::memcpy(out, src.row_bytes(sr), row);
                continue;
            }
            for (index_t c = 0; c < d; ++c) values[std::size_t(c)] = src.at(sr, c);
            detail::store_row(values, type, out, name, r);
        }
        return detail::Shared<typename B::template linear<Identity>>(std::in_place, WeightView::packed(stacked.data(), type, 2 * ff, d),
                                                                    fused_bias(w), LinearOptions{name, false, storage, opt.prec});
    }

    /// [gate bias; up bias] for the fused map (empty when neither has one).
    static std::vector<float> fused_bias(const GluWeights& w) {
        std::vector<float> bias;
        if (!w.gate_bias.empty() || !w.up_bias.empty()) {
            const index_t ff = w.gate.rows();
            bias.assign(static_cast<std::size_t>(2 * ff), 0.0f);
            std::copy(w.gate_bias.begin(), w.gate_bias.end(), bias.begin());
            std::copy(w.up_bias.begin(), w.up_bias.end(), bias.begin() + ff);
        }
        return bias;
    }

    /// Columns of a backward tile: 512 of d_ff, 256 of d_model (several calls of every backend's
    /// kernels, and enough items: a Mixtral-like expert has 6 and 4), a multiple of the
    /// product's backward_column_unit(); all of them where that unit is the whole width. Each
    /// stage 1 item packs x and transposes dy for its weight gradients: with 256 columns of
    /// d_ff, 11 times an expert, the Mixtral-like layer's kept backward at T = 512 took 112-115
    /// ms where 512 took 110-112 (one process, 2-core Zen 5).
    [[nodiscard]] detail::StageTiling tiling() const noexcept { return {d_ff(), d_model(), tile_width(1), tile_width(2)}; }
    [[nodiscard]] index_t tile_width(int stage) const noexcept {
        return stage == 1 ? detail::stage_tile_width(d_ff(), 512, down_->backward_column_unit())
                          : detail::stage_tile_width(d_model(), 256, gate_up_->backward_column_unit());
    }

    /// Columns of a forward tile: 512 of d_ff, 256 of d_model (forward_tile_target), a multiple of
    /// the product's forward_column_unit(); all of d_ff where gate|up's unit does not divide
    /// d_ff (its tiles take gate's and up's columns at c0 and d_ff + c0).
    [[nodiscard]] detail::StageTiling forward_tiling() const noexcept {
        const index_t unit = gate_up_->forward_column_unit();
        const index_t hidden = d_ff() % unit == 0 ? detail::stage_tile_width(d_ff(), detail::forward_tile_target(1), unit) : d_ff();
        return {d_ff(), d_model(), std::max<index_t>(hidden, 1),
                detail::stage_tile_width(d_model(), detail::forward_tile_target(2), down_->forward_column_unit())};
    }

    bool gate_up_bias_, down_bias_;
    detail::Shared<typename B::template linear<Identity>> gate_up_;
    detail::Shared<typename B::template linear<Identity>> down_;
};

} // namespace hypermoe
