#pragma once
// An Expert is a Layer of width d_model -> d_model with a hidden width d_ff. Experts check
// shapes but not finiteness: the layer that owns them checks its input once.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <initializer_list>
#include <string_view>
#include <utility>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/core/workspace.hpp"

namespace hypermoe {

template <class E>
concept Expert = Layer<E> && requires(const E& e) {
    typename E::backend_type;
    typename E::activation_type;
    { e.d_model() } -> std::same_as<index_t>;
    { e.d_ff() } -> std::same_as<index_t>;
    { E::static_d_model } -> std::convertible_to<index_t>;
    { E::static_d_ff } -> std::convertible_to<index_t>;
};

namespace detail {

/// What both expert kinds share: their types, static widths and width getters.
template <class B, class Act, index_t D, index_t FF>
class ExpertWidths {
public:
    using backend_type = B;
    using activation_type = Act;
    static constexpr index_t static_d_model = D;
    static constexpr index_t static_d_ff = FF;
    static constexpr index_t static_in_width = D;
    static constexpr index_t static_out_width = D;

    [[nodiscard]] index_t d_model() const noexcept { return extents_.extent(0); }
    [[nodiscard]] index_t d_ff() const noexcept { return extents_.extent(1); }
    [[nodiscard]] index_t in_width() const noexcept { return d_model(); }
    [[nodiscard]] index_t out_width() const noexcept { return d_model(); }
    [[nodiscard]] const extents<D, FF>& widths() const noexcept { return extents_; }

protected:
    explicit ExpertWidths(extents<D, FF> e) : extents_(e) {}

private:
    extents<D, FF> extents_;
};

/// What an expert's backward tiles (GluExpert, FfnExpert: backward_tile) read and write for one
/// expert's M rows: x, dy, what its forward kept (M, kept_width()), the stages' shared scratch
/// (M, backward_scratch_width()) and dx.
struct ExpertBackwardTile {
    ConstMatrixView<float> x, dy, kept;
    MatrixView<float> scratch, dx;
    bool accumulate_input = false;
};

/// Checks the stage (1 or 2) and tile of call `call` (backward_tile, forward_tile) of expert
/// `who` with `tiles` tiles in `stage`, and returns the check of its views: (M, want) for M the
/// rows of x (shape_error naming the view otherwise).
inline auto check_tile_call(std::string_view who, std::string_view call, int stage, index_t tile, index_t tiles, index_t m) {
    if (stage != 1 && stage != 2) throw config_error(concat(who, "::", call, ": stage ", stage, ", expected 1 or 2"));
    if (tile < 0 || tile >= tiles)
        throw shape_error(concat(who, "::", call, ": tile ", tile, " of stage ", stage, ", expected one of [0, ", tiles, ")"));
    return [who, call, m](index_t rows, index_t cols, index_t want, const char* what) {
        if (rows != m || cols != want)
            throw shape_error(concat(who, "::", call, ": ", what, " has shape ", shape_str(rows, cols), ", expected ", shape_str(m, want)));
    };
}

/// Checks a backward_tile call of expert `who` with `tiles` tiles in `stage`: the stage, the
/// tile, and t's views for d_model `d` (x, dy and dx (M, d); kept and scratch (M, their widths)).
inline void check_backward_tile(std::string_view who, int stage, index_t tile, index_t tiles, const ExpertBackwardTile& t, index_t d,
                                index_t kept_width, index_t scratch_width) {
    const auto check = check_tile_call(who, "backward_tile", stage, tile, tiles, t.x.rows());
    check(t.x.rows(), t.x.cols(), d, "x");
    check(t.dy.rows(), t.dy.cols(), d, "dy");
    check(t.kept.rows(), t.kept.cols(), kept_width, "kept");
    check(t.scratch.rows(), t.scratch.cols(), scratch_width, "scratch");
    check(t.dx.rows(), t.dx.cols(), d, "dx");
}

/// What an expert's forward tiles (GluExpert, FfnExpert: forward_tile) read and write for one
/// expert's M rows: x and y (M, d_model), the hidden activations (M, d_ff: stage 1 writes them,
/// stage 2 reads them), and what a forward with `keep` keeps (M, kept_width()), or empty.
struct ExpertForwardTile {
    ConstMatrixView<float> x;
    MatrixView<float> y, hidden, keep;
};

/// Checks a forward_tile (or forward_prepare) call of expert `who` with `tiles` tiles in
/// `stage`: the stage, the tile, and t's views for d_model `d` and d_ff `ff`.
inline void check_forward_tile(std::string_view who, int stage, index_t tile, index_t tiles, const ExpertForwardTile& t, index_t d,
                               index_t ff, index_t kept_width) {
    const auto check = check_tile_call(who, "forward_tile", stage, tile, tiles, t.x.rows());
    check(t.x.rows(), t.x.cols(), d, "x");
    check(t.y.rows(), t.y.cols(), d, "y");
    check(t.hidden.rows(), t.hidden.cols(), ff, "hidden");
    if (t.keep.data() != nullptr) check(t.keep.rows(), t.keep.cols(), kept_width, "keep");
}

/// Columns of a forward tile before rounding up to the product's unit: 512 of d_ff, 256 of
/// d_model (the Mixtral-like expert has 6 + 4 items). oneDNN's brgemm loses to narrow tiles:
/// gate|up (K = 1024) as tiles of 256 took 10-12% longer than the whole product at 32 and 128
/// rows, of 512 4-7%, of 1408 1-4% (1 thread, 2-core Zen 5).
inline constexpr index_t forward_tile_target(int stage) noexcept { return stage == 1 ? 512 : 256; }

/// An expert's backward as its own items: every stage 1 tile, then `between()`, then every
/// stage 2 tile, each stage a pool on the calling thread's threads (run_task_pool).
template <class E, class G, class Between>
void run_backward_tiles(const E& e, const ExpertBackwardTile& t, G& g, Workspace& ws, Between&& between) {
    const int threads = current_threads();
    const std::size_t slice = e.backward_tile_workspace_bytes(t.x.rows());
    run_task_pool(ws, e.backward_tiles(1), threads, slice, [&](index_t i, Workspace& w) { e.backward_tile(1, i, t, g, w); });
    between();
    run_task_pool(ws, e.backward_tiles(2), threads, slice, [&](index_t i, Workspace& w) { e.backward_tile(2, i, t, g, w); });
}

/// The tiles of an expert's backward (backward_tile) or forward (forward_tile): stage 1 over
/// d_ff in tiles of `hidden` columns, stage 2 over d_model in tiles of `model` columns, the last
/// tile of each narrower.
struct StageTiling {
    index_t d_ff, d_model, hidden, model;

    [[nodiscard]] index_t extent(int stage) const noexcept { return stage == 1 ? d_ff : d_model; }
    [[nodiscard]] index_t tiles(int stage) const noexcept {
        const index_t w = stage == 1 ? hidden : model;
        return extent(stage) == 0 ? 0 : (extent(stage) + w - 1) / w;
    }
    /// The first column and width of `tile`.
    [[nodiscard]] std::pair<index_t, index_t> columns(int stage, index_t tile) const noexcept {
        const index_t w = stage == 1 ? hidden : model, c0 = tile * w;
        return {c0, std::min(w, extent(stage) - c0)};
    }
    /// The largest of bytes(stage, width) over each stage's widths (a whole tile's, the last one's).
    template <class Bytes>
    [[nodiscard]] std::size_t largest(Bytes&& bytes) const {
        std::size_t most = 0;
        for (const int stage : {1, 2})
            for (const index_t tile : {index_t(0), tiles(stage) - 1})
                most = std::max(most, std::size_t(bytes(stage, columns(stage, std::max<index_t>(tile, 0)).second)));
        return most;
    }
};

/// Columns of a backward or forward tile: `target` rounded up to a multiple of `unit`, all of `extent` where
/// that is more; at least 1.
[[nodiscard]] inline index_t stage_tile_width(index_t extent, index_t target, index_t unit) noexcept {
    return std::max<index_t>(1, std::min(extent, (target + unit - 1) / unit * unit));
}

} // namespace detail
} // namespace hypermoe
