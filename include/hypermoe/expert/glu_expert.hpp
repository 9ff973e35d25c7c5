#pragma once
// GluExpert: y = down(Act(gate x + b_g) * (up x + b_u)) + b_down, the gated feed-forward of
// Mixtral, Qwen2-MoE, OLMoE and DeepSeek (SwiGLU with Act = Silu; Shazeer, arXiv 2002.05202).
// gate and up run as ONE GEMM with N = 2 d_ff (their rows stacked at construction), which
// reads x once and halves the GEMM calls; Act(g) * u is one pass over that output.

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <span>
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

template <Backend B, Activation Act, index_t D = dynamic, index_t FF = dynamic>
class GluExpert : public detail::ExpertWidths<B, Act, D, FF> {
    using Widths = detail::ExpertWidths<B, Act, D, FF>;

public:
    using Widths::d_ff;
    using Widths::d_model;

    using gradients_type = GluGradients;

    explicit GluExpert(const GluWeights& w, const ExpertOptions& opt = {})
        : Widths(checked_extents(w)), gate_up_bias_(!w.gate_bias.empty() || !w.up_bias.empty()), down_bias_(!w.down_bias.empty()),
          gate_up_(fused_gate_up(w, opt)),
          down_(std::in_place, w.down, w.down_bias, LinearOptions{"GluExpert weight 'down'", false, opt.storage, opt.prec}) {}

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
            for (index_t j = 0; j < n; ++j) out[j] = Act::apply(g[j]) * u[j];
        });
        down_(h, y, ws);
    }

    /// Zeroed gradients of this expert's parameters.
    [[nodiscard]] GluGradients make_gradients() const {
        GluGradients g{Matrix<float>(2 * d_ff(), d_model()), Matrix<float>(d_model(), d_ff()), {}, {}};
        if (gate_up_bias_) g.gate_up_bias.assign(std::size_t(2 * d_ff()), 0.0f);
        if (down_bias_) g.down_bias.assign(std::size_t(d_model()), 0.0f);
        return g;
    }

    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        return 2 * detail::padded_bytes<float>(rows, 2, d_ff()) + 2 * detail::padded_bytes<float>(rows, d_ff()) +
               std::max({gate_up_->workspace_bytes(rows), gate_up_->backward_workspace_bytes(rows), down_->workspace_bytes(rows),
                         down_->backward_workspace_bytes(rows)});
    }

    /// The backward of forward(x): dx [+]= dL/dx from dy = dL/dy, and the parameter gradients
    /// added to `g`. It reads the [gate | up] pre-activations from `kept` (what a forward with
    /// `keep` wrote for this x), or recomputes them from x. A non-empty `y` (M, d_model) also gets
    /// forward(x), from the hidden activations: one product, where a forward call would recompute
    /// [gate | up] too (an MoE layer's backward needs the experts' outputs for its combine
    /// weights). f32 storage only (config_error otherwise).
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, GluGradients& g, Workspace& ws,
                  bool accumulate_input = false, MatrixView<float> y = {}, ConstMatrixView<float> kept = {}) const {
        detail::check_backward_shapes(x, dy, dx, d_model(), d_model(), "GluExpert");
        detail::check_backward_output(x, y, d_model(), "GluExpert");
        detail::check_kept(x, kept, kept_width(), "GluExpert", "kept");
        detail::check_gradient_shapes("GluExpert", {{"gate_up", g.gate_up.rows(), g.gate_up.cols(), 2 * d_ff(), d_model()},
                                                     {"down", g.down.rows(), g.down.cols(), d_model(), d_ff()},
                                                     {"gate_up_bias", index_t(g.gate_up_bias.size()), 1, gate_up_bias_ ? 2 * d_ff() : 0, 1},
                                                     {"down_bias", index_t(g.down_bias.size()), 1, down_bias_ ? d_model() : 0, 1}});
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        const index_t ff = d_ff(), m = x.rows();
        MatrixView<float> scratch = ws.take_matrix<float>(m, 2 * ff); // [gate | up] pre-activations, unless kept
        MatrixView<float> h = ws.take_matrix<float>(m, ff);           // Act(g) * u
        MatrixView<float> dh = ws.take_matrix<float>(m, ff);          // dL/dh
        MatrixView<float> dgu = ws.take_matrix<float>(m, 2 * ff);     // dL/d[gate | up]
        if (kept.data() == nullptr) gate_up_(x, scratch, ws);
        const ConstMatrixView<float> gu = kept.data() != nullptr ? kept : ConstMatrixView<float>(scratch);
        // The element-wise steps row by row on every thread (each row written by one: the same
        // bits at any thread count).
        const index_t work = m * ff * 16; // an activation costs about an exp
        detail::parallel_for(m, work, [&](index_t r) {
            for (index_t j = 0; j < ff; ++j) h(r, j) = Act::apply(gu(r, j)) * gu(r, ff + j);
        });
        if (y.data() != nullptr) down_(h, y, ws);
        down_->backward(h, dy, dh, LinearGrads{g.down.view(), g.down_bias}, ws);
        detail::parallel_for(m, work, [&](index_t r) {
            for (index_t j = 0; j < ff; ++j) {
                const float gate = gu(r, j), up = gu(r, ff + j);
                dgu(r, j) = dh(r, j) * up * Act::derivative(gate);
                dgu(r, ff + j) = dh(r, j) * Act::apply(gate);
            }
        });
        gate_up_->backward(x, dgu, dx, LinearGrads{g.gate_up.view(), g.gate_up_bias}, ws, accumulate_input);
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

    /// [gate; up] stacked as one (2 ff, d) weight: row by row in their own type when they share
    /// one (bf16 and q8_0 / q4_0 blocks are kept as they are, not requantised), else widened to
    /// f32 (exact). Storage defaults to that type.
    static detail::Shared<typename B::template linear<Identity>> fused_gate_up(const GluWeights& w, const ExpertOptions& opt) {
        const index_t d = w.gate.cols(), ff = w.gate.rows();
        const bool same = w.gate.type() == w.up.type();
        const dtype type = same ? w.gate.type() : dtype::f32;
        const std::size_t row = weight_bytes(type, 1, std::size_t(d));
        std::vector<std::byte> stacked(std::size_t(2 * ff) * row);
        for (index_t r = 0; r < 2 * ff; ++r) {
            const WeightView& src = r < ff ? w.gate : w.up;
            const index_t sr = r < ff ? r : r - ff;
            std::byte* out = stacked.data() + std::size_t(r) * row;
            if (same) {
                std::memcpy(out, src.row_bytes(sr), row);
            } else {
                for (index_t c = 0; c < d; ++c) {
                    const float v = src.at(sr, c);
                    std::memcpy(out + std::size_t(c) * sizeof(float), &v, sizeof(float));
                }
            }
        }
        const WeightView view = is_block_format(type) ? WeightView::blocks(stacked.data(), type, 2 * ff, d)
                                : type == dtype::bf16 ? WeightView(ConstMatrixView<bf16>(reinterpret_cast<const bf16*>(stacked.data()), 2 * ff, d))
                                                      : WeightView(ConstMatrixView<float>(reinterpret_cast<const float*>(stacked.data()), 2 * ff, d));
        std::vector<float> bias;
        if (!w.gate_bias.empty() || !w.up_bias.empty()) {
            bias.assign(static_cast<std::size_t>(2 * ff), 0.0f);
            std::copy(w.gate_bias.begin(), w.gate_bias.end(), bias.begin());
            std::copy(w.up_bias.begin(), w.up_bias.end(), bias.begin() + ff);
        }
        return detail::Shared<typename B::template linear<Identity>>(std::in_place, view, bias,
                                                                    LinearOptions{"GluExpert weight 'gate|up'", false, opt.storage.value_or(type), opt.prec});
    }

    bool gate_up_bias_, down_bias_;
    detail::Shared<typename B::template linear<Identity>> gate_up_;
    detail::Shared<typename B::template linear<Identity>> down_;
};

} // namespace hypermoe
