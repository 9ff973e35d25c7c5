#pragma once
// FfnExpert: y = down(Act(up x + b_up)) + b_down, the feed-forward of GPT-2, T5/Switch and
// BERT-style models. up is (d_ff, d_model), down is (d_model, d_ff), nn.Linear layout; biases
// are optional. The activation runs fused in the up GEMM's epilogue.

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/expert/expert_concept.hpp"

namespace hypermoe {

/// Weights of an FfnExpert, borrowed for the constructor (which copies them into the backend).
struct FfnWeights {
    WeightView up;                        ///< (d_ff, d_model)
    WeightView down;                      ///< (d_model, d_ff)
    std::span<const float> up_bias = {};   ///< d_ff, or empty
    std::span<const float> down_bias = {}; ///< d_model, or empty
};

/// Options shared by the experts.
struct ExpertOptions {
    /// dtype the weights are stored in; defaults to the source's.
    std::optional<dtype> storage = std::nullopt;
    /// How block-format weights compute: `exact` or `fast` (core/dtype.hpp).
    precision prec = precision::exact;
    /// Weights given in bf16 or a block format stay in it; `storage` applies to f32 ones only
    /// (LinearOptions::keep_stored).
    bool keep_stored = false;
};

/// Gradients of an FfnExpert's parameters, zeroed at creation (FfnExpert::make_gradients);
/// backward adds to them.
struct FfnGradients {
    Matrix<float> up;             ///< (d_ff, d_model)
    Matrix<float> down;           ///< (d_model, d_ff)
    std::vector<float> up_bias;   ///< d_ff, or empty when the expert has no up bias
    std::vector<float> down_bias; ///< d_model, or empty
};

template <Backend B, Activation Act, index_t D = dynamic, index_t FF = dynamic>
class FfnExpert : public detail::ExpertWidths<B, Act, D, FF> {
    using Widths = detail::ExpertWidths<B, Act, D, FF>;

public:
    using Widths::d_ff;
    using Widths::d_model;

    using gradients_type = FfnGradients;

    explicit FfnExpert(const FfnWeights& w, const ExpertOptions& opt = {})
        : Widths(checked_extents(w)), up_bias_(!w.up_bias.empty()), down_bias_(!w.down_bias.empty()),
          up_(std::in_place, w.up, w.up_bias, LinearOptions{"FfnExpert weight 'up'", false, opt.storage, opt.prec, opt.keep_stored}),
          down_(std::in_place, w.down, w.down_bias, LinearOptions{"FfnExpert weight 'down'", false, opt.storage, opt.prec, opt.keep_stored}) {}

    /// The linear maps (shared by copies of this expert).
    [[nodiscard]] const typename B::template linear<Act>& up() const noexcept { return *up_; }
    [[nodiscard]] const typename B::template linear<Identity>& down() const noexcept { return *down_; }


    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        return detail::padded_bytes<float>(rows, d_ff()) + std::max(up_->workspace_bytes(rows), down_->workspace_bytes(rows));
    }

    /// Floats per row that a forward keeps for the backward (kept_width() columns of `keep`): the
    /// hidden activations h = Act(up x + b_up).
    [[nodiscard]] index_t kept_width() const noexcept { return d_ff(); }

    /// y = down(Act(up x + b_up)) + b_down for x (M, d_model), y (M, d_model). A non-empty
    /// `keep` (M, kept_width()) receives the hidden activations for the backward.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& /*ctx*/ = {},
                 MatrixView<float> keep = {}) const {
        detail::check_forward_shapes(x, y, d_model(), d_model(), "FfnExpert");
        detail::check_kept(x, keep, kept_width(), "FfnExpert", "keep");
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        MatrixView<float> h = keep.data() != nullptr ? keep : ws.take_matrix<float>(x.rows(), d_ff()); // (M, d_ff)
        up_(x, h, ws);
        down_(h, y, ws);
    }

    /// What a forward's tiles read and write.
    using ForwardTile = detail::ExpertForwardTile;

    /// The forward as work items, as GluExpert's: stage 1 tiles of d_ff, h's columns = Act(up x
    /// + b_up)'s (and keep's, when kept); stage 2 tiles of d_model, y's columns of h W_down^T +
    /// b_down. Each product reads its input as prepared once per stage (forward_prepare); the
    /// same bits as forward() (tests/test_expert.cpp).
    [[nodiscard]] index_t forward_tiles(int stage) const noexcept { return forward_tiling().tiles(stage); }
    /// The columns (of d_ff for stage 1, of d_model for stage 2) of item `tile`.
    [[nodiscard]] std::pair<index_t, index_t> forward_tile_columns(int stage, index_t tile) const noexcept {
        return forward_tiling().columns(stage, tile);
    }
    /// Bytes forward_prepare(stage, ...) takes for `rows` rows.
    [[nodiscard]] std::size_t forward_prepared_bytes(int stage, index_t rows) const {
        return stage == 1 ? up_->prepared_bytes(rows) : down_->prepared_bytes(rows);
    }
    /// The input of `stage`'s product made ready for its tiles (in `ws`, the caller's scope):
    /// t.x for up, t.hidden (every stage 1 item done) for down.
    [[nodiscard]] PreparedInput forward_prepare(int stage, const ForwardTile& t, Workspace& ws) const {
        detail::check_forward_tile("FfnExpert", stage, 0, 1, t, d_model(), d_ff(), kept_width());
        return stage == 1 ? up_->prepare(t.x, ws) : down_->prepare(t.hidden, ws);
    }
    /// Scratch of one item with `rows` rows (padded): the products'.
    [[nodiscard]] std::size_t forward_tile_workspace_bytes(index_t rows) const {
        const std::size_t bytes = forward_tiling().largest([&](int stage, index_t w) {
            return stage == 1 ? up_->forward_columns_workspace_bytes(rows, w) : down_->forward_columns_workspace_bytes(rows, w);
        });
        return detail::padded_bytes<std::byte>(index_t(bytes));
    }
    /// Item `tile` of `stage` (1 or 2) of the forward of t's rows, from `in` =
    /// forward_prepare(stage, t). A stage other than 1 or 2 is a config_error, a tile out of
    /// range or a view of the wrong shape a shape_error.
    void forward_tile(int stage, index_t tile, const ForwardTile& t, const PreparedInput& in, Workspace& ws) const {
        detail::check_forward_tile("FfnExpert", stage, tile, forward_tiles(stage), t, d_model(), d_ff(), kept_width());
        const auto [c0, w] = forward_tile_columns(stage, tile);
        if (stage == 2) return down_->forward_columns(in, t.y.col_block(c0, w), c0, ws);
        up_->forward_columns(in, t.hidden.col_block(c0, w), c0, ws);
        if (t.keep.data() != nullptr)
            for (index_t r = 0; r < t.x.rows(); ++r) std::copy_n(t.hidden.row(r).data() + c0, w, t.keep.row(r).data() + c0);
    }

    /// Zeroed gradients of this expert's parameters.
    [[nodiscard]] FfnGradients make_gradients() const {
        FfnGradients g{Matrix<float>(d_ff(), d_model()), Matrix<float>(d_model(), d_ff()), {}, {}};
        if (up_bias_) g.up_bias.assign(std::size_t(d_ff()), 0.0f);
        if (down_bias_) g.down_bias.assign(std::size_t(d_model()), 0.0f);
        return g;
    }

    /// Scratch of backward() for `rows` rows: the hidden activations (unless kept), the
    /// stages' scratch, and the larger of the forward products' (recomputing, or giving y) and
    /// the tiles' pool at the calling thread's thread count.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        const std::size_t pool = detail::task_pool_bytes(detail::current_threads(), backward_tile_workspace_bytes(rows));
        return detail::padded_bytes<float>(rows, d_ff()) + detail::padded_bytes<float>(rows, backward_scratch_width()) +
               std::max({up_->workspace_bytes(rows), down_->workspace_bytes(rows), pool});
    }

    /// The backward of forward(x): dx [+]= dL/dx from dy = dL/dy, and the parameter gradients
    /// added to `g`. It reads the hidden activations from `kept` (what a forward with `keep` wrote
    /// for this x), or recomputes them from x; each tile recomputes its columns of up's
    /// pre-activations (the forward fuses the activation). A non-empty `y` (M, d_model) also
    /// gets forward(x), from the hidden activations (one product instead of a forward call's
    /// two). It runs as two pools of tiles on the calling thread's threads (backward_tile). f32
    /// storage only (config_error otherwise).
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, FfnGradients& g, Workspace& ws,
                  bool accumulate_input = false, MatrixView<float> y = {}, ConstMatrixView<float> kept = {}) const {
        detail::check_backward_shapes(x, dy, dx, d_model(), d_model(), "FfnExpert");
        detail::check_backward_output(x, y, d_model(), "FfnExpert");
        detail::check_kept(x, kept, kept_width(), "FfnExpert", "kept");
        check_gradients(g);
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const index_t m = x.rows();
        MatrixView<float> recomputed = ws.take_matrix<float>(m, d_ff()); // Act(up x + b), unless kept
        const MatrixView<float> scratch = ws.take_matrix<float>(m, backward_scratch_width());
        if (kept.data() == nullptr) up_(x, recomputed, ws);
        const ConstMatrixView<float> h = kept.data() != nullptr ? kept : ConstMatrixView<float>(recomputed);
        detail::run_backward_tiles(*this, BackwardTile{x, dy, h, scratch, dx, accumulate_input}, g, ws, [&] {
            if (y.data() != nullptr) down_(h, y, ws);
        });
    }

    /// What a backward's tiles read and write; `kept` holds the hidden activations.
    using BackwardTile = detail::ExpertBackwardTile;

    /// The backward as work items, as GluExpert's: stage 1 items are tiles of d_ff (dh = dy
    /// W_down, dW_down's columns, up's pre-activations recomputed for the tile, dz = dh Act'(z),
    /// dW_up's rows and db_up's), stage 2 items tiles of d_model (dx's columns = dz W_up, and
    /// db_down's). Each element is summed as the whole products sum it.
    [[nodiscard]] index_t backward_tiles(int stage) const noexcept { return tiling().tiles(stage); }
    /// Floats per row that the stages share: dz (d_ff).
    [[nodiscard]] index_t backward_scratch_width() const noexcept { return d_ff(); }
    /// The columns (of d_ff for stage 1, of d_model for stage 2) of item `tile`.
    [[nodiscard]] std::pair<index_t, index_t> backward_tile_columns(int stage, index_t tile) const noexcept {
        return tiling().columns(stage, tile);
    }
    /// Scratch of one item with `rows` rows run on one thread (padded).
    [[nodiscard]] std::size_t backward_tile_workspace_bytes(index_t rows) const {
        const detail::ThreadCountScope one(1);
        const std::size_t bytes = tiling().largest([&](int stage, index_t w) {
            return stage == 1 ? detail::padded_bytes<float>(rows, w) +
                                 std::max({down_->backward_input_workspace_bytes(rows, w),
                                           down_->weight_gradient_workspace_bytes(rows, d_model(), w),
                                           up_->affine_columns_workspace_bytes(rows, w),
                                           up_->weight_gradient_workspace_bytes(rows, w, d_model())})
                           : up_->backward_input_workspace_bytes(rows, w);
        });
        return detail::padded_bytes<std::byte>(index_t(bytes));
    }

    /// Item `tile` of `stage` (1 or 2) of the backward of t's rows; g gets its tile of the
    /// gradients. Stage 2 items read what every stage 1 item of these rows wrote. A stage other
    /// than 1 or 2 is a config_error, a tile out of range or a view of the wrong shape a
    /// shape_error. g is checked by backward() (check_gradients), not per item.
    void backward_tile(int stage, index_t tile, const BackwardTile& t, FfnGradients& g, Workspace& ws) const {
        detail::check_backward_tile("FfnExpert", stage, tile, backward_tiles(stage), t, d_model(), kept_width(), backward_scratch_width());
        const auto [c0, w] = backward_tile_columns(stage, tile);
        if (stage == 2) {
            up_->backward_input(t.scratch, t.dx.col_block(c0, w), c0, ws, t.accumulate_input);
            if (!g.down_bias.empty()) detail::add_column_sums(t.dy.col_block(c0, w), std::span<float>(g.down_bias).subspan(std::size_t(c0), std::size_t(w)));
            return;
        }
        Workspace::Scope scope(ws, detail::padded_bytes<float>(t.x.rows(), w));
        const MatrixView<float> dz = t.scratch.col_block(c0, w), z = ws.take_matrix<float>(t.x.rows(), w);
        down_->backward_input(t.dy, dz, c0, ws); // dh
        down_->weight_gradient(t.kept.col_block(c0, w), t.dy, g.down.view().col_block(c0, w), ws);
        up_->affine_columns(t.x, z, c0, ws);
        for (index_t r = 0; r < z.rows(); ++r)
            for (index_t j = 0; j < w; ++j) dz(r, j) = float(double(dz(r, j)) * Act::derivative(double(z(r, j))));
        up_->weight_gradient(t.x, dz, g.up.view().row_block(c0, w), ws);
        if (!g.up_bias.empty()) detail::add_column_sums(dz, std::span<float>(g.up_bias).subspan(std::size_t(c0), std::size_t(w)));
    }

    /// Checks gradients made by make_gradients() and f32 weights (what a backward needs).
    void check_gradients(const FfnGradients& g) const {
        up_->check_trainable();
        down_->check_trainable();
        detail::check_gradient_shapes("FfnExpert", {{"up", g.up.rows(), g.up.cols(), d_ff(), d_model()},
                                                     {"down", g.down.rows(), g.down.cols(), d_model(), d_ff()},
                                                     {"up_bias", index_t(g.up_bias.size()), 1, up_bias_ ? d_ff() : 0, 1},
                                                     {"down_bias", index_t(g.down_bias.size()), 1, down_bias_ ? d_model() : 0, 1}});
    }

private:
    static extents<D, FF> checked_extents(const FfnWeights& w) {
        const index_t d = w.up.cols(), ff = w.up.rows();
        detail::check_weight_width(D, d, "FfnExpert", "d_model", "up");
        detail::check_weight_width(FF, ff, "FfnExpert", "d_ff", "up");
        detail::check_weight_shape(w.down, d, ff, "FfnExpert", "down");
        return extents<D, FF>(d, ff);
    }

    /// Columns of a backward tile, as GluExpert's: 512 of d_ff (a multiple of both the down
    /// product's backward_column_unit() and up's forward_column_unit()), 256 of d_model.
    [[nodiscard]] detail::StageTiling tiling() const noexcept { return {d_ff(), d_model(), tile_width(1), tile_width(2)}; }
    [[nodiscard]] index_t tile_width(int stage) const noexcept {
        return stage == 1 ? detail::stage_tile_width(d_ff(), 512, std::lcm(down_->backward_column_unit(), up_->forward_column_unit()))
                          : detail::stage_tile_width(d_model(), 256, up_->backward_column_unit());
    }

    /// Columns of a forward tile: 512 of d_ff, 256 of d_model (forward_tile_target), a multiple of
    /// the product's forward_column_unit().
    [[nodiscard]] detail::StageTiling forward_tiling() const noexcept {
        return {d_ff(), d_model(), detail::stage_tile_width(d_ff(), detail::forward_tile_target(1), up_->forward_column_unit()),
                detail::stage_tile_width(d_model(), detail::forward_tile_target(2), down_->forward_column_unit())};
    }

    bool up_bias_, down_bias_;
    detail::Shared<typename B::template linear<Act>> up_;
    detail::Shared<typename B::template linear<Identity>> down_;
};

} // namespace hypermoe
