#pragma once
// The reference backend: plain loops, accumulation and activation in double. It is the oracle
// every other backend is tested against, not a fast path. bf16 weights stay bf16 in memory;
// q8_0 / q4_0 / mxfp4 / q4_k weights stay in their blocks, each output row dequantised exactly when used
// (`exact`), or, with `fast`, each block's integer dot with the activations quantised as the
// fast kernels quantise them (backend/block_linear.hpp), scaled and summed in double; bf16
// weights with `fast` multiply the activations rounded to bf16, as the fast kernel does.

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include <algorithm>
#include <array>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/block_linear.hpp"
#include "hypermoe/backend/linear_spec.hpp"

namespace hypermoe {

struct reference {
    static constexpr std::string_view name = "reference";

    template <class Act>
    class linear : public detail::LinearBase {
    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              bias_(bias.begin(), bias.end()) {
            const auto count = static_cast<std::size_t>(n_ * k_);
            if (is_block_format(storage_)) {
                blocks_ = detail::BlockWeights(w, storage_, name_);
                return;
            }
            if (storage_ == dtype::f32) w_f32_.resize(count);
            else w_bf16_.resize(count);
            for (index_t r = 0; r < n_; ++r)
                for (index_t c = 0; c < k_; ++c) {
                    const auto i = static_cast<std::size_t>(r * k_ + c);
                    if (storage_ == dtype::f32) w_f32_[i] = w.at(r, c);
                    else w_bf16_[i] = bf16::from_float(w.at(r, c));
                }
        }

        /// The quantised activations (`fast` blocks), and one output's K weights, widened.
        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
            return prepared_bytes(rows) + forward_columns_workspace_bytes(rows, n_);
        }

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            check_call(a, c);
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            columns(prepare(a, ws), c, 0, ws, scale);
        }

        /// Bytes prepare() takes: the activations quantised as the fast kernels quantise them,
        /// for `fast` blocks.
        [[nodiscard]] std::size_t prepared_bytes(index_t rows) const noexcept {
            return fast_blocks() ? detail::QuantizedRows::bytes(rows, blocks_.blocks_per_row()) : 0;
        }
        /// The input as forward_columns reads it: quantised for `fast` blocks (bf16 `fast`
        /// rounds each input as it multiplies it).
        [[nodiscard]] PreparedInput prepare(ConstMatrixView<float> a, Workspace& ws) const {
            PreparedInput p{a, {}, {}, {}};
            if (fast_blocks()) p.quantized.emplace(a, blocks_.blocks_per_row(), ws);
            return p;
        }
        /// One output's K weights, widened.
        [[nodiscard]] std::size_t forward_columns_workspace_bytes(index_t /*rows*/, index_t /*columns*/) const noexcept {
            return detail::padded_bytes<float>(k_);
        }
        /// Columns [n0, n0 + c.cols()) of operator()'s c: the same sums, column by column.
        void forward_columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, float scale = 1.0f) const {
            check_forward_columns(p.a, c, n0, forward_column_unit());
            Workspace::Scope scope(ws, forward_columns_workspace_bytes(p.a.rows(), c.cols()));
            columns(p, c, n0, ws, scale);
        }

        [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const noexcept { return affine_gradient_bytes(rows); }

        /// The backward of operator()(a, c, ws, scale) given dc = dL/dC: da [+]= dz W,
        /// g.weight += dz^T a, g.bias += the column sums of dz, where dz = scale * dc * Act'(Z)
        /// is the gradient of Z = A W^T + b (recomputed when Act is not the identity); every sum
        /// in double. f32 storage only.
        void backward(ConstMatrixView<float> a, ConstMatrixView<float> dc, MatrixView<float> da, const LinearGrads& g, Workspace& ws,
                      bool accumulate_input = false, float scale = 1.0f) const {
            check_backward(a, dc, da, g);
            Workspace::Scope scope(ws, backward_workspace_bytes(a.rows()));
            const ConstMatrixView<float> dz =
                affine_gradient<Act>(dc, scale, ws, [&](MatrixView<float> z) { affine_columns(a, z, 0, ws); });
            backward_input(dz, da, 0, ws, accumulate_input);
            weight_gradient(a, dz, g.weight, ws);
            detail::add_column_sums(dz, g.bias);
        }

        /// Columns an affine_columns tile is made of: any.
        [[nodiscard]] index_t forward_column_unit() const noexcept { return 1; }
        [[nodiscard]] std::size_t affine_columns_workspace_bytes(index_t /*rows*/, index_t /*columns*/) const noexcept { return 0; }

        /// Columns [n0, n0 + z.cols()) of Z = a W^T + b, the pre-activation a backward
        /// recomputes; each sum in double. f32 storage only.
        void affine_columns(ConstMatrixView<float> a, MatrixView<float> z, index_t n0, Workspace& /*ws*/) const {
            check_affine_columns(a, z, n0, forward_column_unit());
            for (index_t m = 0; m < a.rows(); ++m)
                for (index_t j = 0; j < z.cols(); ++j) {
                    const index_t n = n0 + j;
                    double acc = bias_.empty() ? 0.0 : bias_[std::size_t(n)];
                    for (index_t k = 0; k < k_; ++k) acc += double(a(m, k)) * double(w_f32_[std::size_t(n * k_ + k)]);
                    z(m, j) = float(acc);
                }
        }

        /// Columns a backward_input tile is made of: any.
        [[nodiscard]] index_t backward_column_unit() const noexcept { return 1; }
        [[nodiscard]] std::size_t backward_input_workspace_bytes(index_t /*rows*/, index_t /*columns*/) const noexcept { return 0; }

        /// The input gradient's columns [k0, k0 + da.cols()) alone: da [+]= dz W[:, k0 ..] for
        /// dz = dL/dZ (M, N); each sum in double, as backward() makes it.
        void backward_input(ConstMatrixView<float> dz, MatrixView<float> da, index_t k0, Workspace& /*ws*/,
                            bool accumulate = false) const {
            check_backward_input(dz, da, k0, backward_column_unit());
            for (index_t m = 0; m < dz.rows(); ++m)
                for (index_t j = 0; j < da.cols(); ++j) {
                    double acc = accumulate ? da(m, j) : 0.0;
                    for (index_t n = 0; n < n_; ++n) acc += double(dz(m, n)) * double(w_f32_[std::size_t(n * k_ + k0 + j)]);
                    da(m, j) = float(acc);
                }
        }

        [[nodiscard]] std::size_t weight_gradient_workspace_bytes(index_t /*rows*/, index_t /*n*/, index_t /*k*/) const noexcept {
            return 0;
        }

        /// A block of the weight gradient: dw (n, k) += dz^T a for dz (M, n) the gradient of
        /// outputs [n0, n0 + n) and a (M, k) the inputs [k0, k0 + k), dw the gradient's block at
        /// (n0, k0); each sum in double.
        void weight_gradient(ConstMatrixView<float> a, ConstMatrixView<float> dz, MatrixView<float> dw, Workspace& /*ws*/) const {
            check_weight_gradient(a, dz, dw);
            for (index_t n = 0; n < dw.rows(); ++n)
                for (index_t k = 0; k < dw.cols(); ++k) {
                    double acc = dw(n, k);
                    for (index_t m = 0; m < a.rows(); ++m) acc += double(dz(m, n)) * double(a(m, k));
                    dw(n, k) = float(acc);
                }
        }

    private:
        [[nodiscard]] bool fast_blocks() const noexcept { return is_block_format(storage_) && prec_ == precision::fast; }

        /// Columns [n0, n0 + c.cols()) of c [+]= scale * Act(a W^T + b), each output's sum in
        /// double; the scratch of forward_columns_workspace_bytes taken from `ws`.
        void columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, float scale) const {
            const ConstMatrixView<float> a = p.a;
            if (fast_blocks()) {
                detail::with_block(storage_, [&]<class Block>() { fast<Block>(p, c, n0, scale); });
                return;
            }
            const std::span<float> w = ws.take<float>(k_);
            const bool round_inputs = storage_ == dtype::bf16 && prec_ == precision::fast; // as the fast kernels do
            for (index_t j = n0; j < n0 + c.cols(); ++j) {
                weight_row(j, w);
                for (index_t m = 0; m < a.rows(); ++m) {
                    double acc = bias_.empty() ? 0.0 : bias_[static_cast<std::size_t>(j)];
                    for (index_t k = 0; k < k_; ++k) {
                        const float x = round_inputs ? bf16::from_float(a(m, k)).to_float() : a(m, k);
                        acc += double(x) * double(w[static_cast<std::size_t>(k)]);
                    }
                    const auto v = static_cast<float>(double(scale) * Act::apply(acc));
                    c(m, j - n0) = accumulate_ ? c(m, j - n0) + v : v;
                }
            }
        }

        /// `fast` over blocks: integer block dots with the activations quantised as the fast
        /// kernels quantise them, scaled and summed in double.
        template <class Block>
        void fast(const PreparedInput& p, MatrixView<float> c, index_t n0, float scale) const {
            const index_t per_row = blocks_.blocks_per_row();
            const detail::QuantizedRows& xq = *p.quantized;
            for (index_t j = n0; j < n0 + c.cols(); ++j)
                for (index_t m = 0; m < p.a.rows(); ++m) {
                    double acc = bias_.empty() ? 0.0 : bias_[static_cast<std::size_t>(j)];
                    for (index_t b = 0; b < per_row; ++b) {
                        const Block blk = blocks_.block<Block>(j, b);
                        const std::int32_t dot = detail::block_int_dot<Block>(reinterpret_cast<const std::uint8_t*>(blk.qs.data()),
                                                                              xq.q_row(m) + b * quant_block, xq.sum_row(m)[b]);
                        acc += double(block_scale(blk)) * double(xq.d_row(m)[b]) * double(dot);
                        if constexpr (detail::has_min<Block>) // q4_k: less its min times the activations' sum
                            acc -= double(block_min(blk)) * double(xq.d_row(m)[b]) * double(xq.sum_row(m)[b]);
                    }
                    const auto v = static_cast<float>(double(scale) * Act::apply(acc));
                    c(m, j - n0) = accumulate_ ? c(m, j - n0) + v : v;
                }
        }

        /// Output n's K weights, widened exactly.
        void weight_row(index_t n, std::span<float> out) const noexcept {
            if (!is_block_format(storage_)) {
                for (index_t k = 0; k < k_; ++k) {
                    const auto i = static_cast<std::size_t>(n * k_ + k);
                    out[std::size_t(k)] = storage_ == dtype::f32 ? w_f32_[i] : w_bf16_[i].to_float();
                }
                return;
            }
            std::array<float, 32> block;
            for (index_t b = 0; b < blocks_.blocks_per_row(); ++b) {
                blocks_.dequantize_block(n, b, block);
                const index_t k0 = b * quant_block;
                std::copy_n(block.begin(), std::min(quant_block, k_ - k0), out.begin() + k0);
            }
        }

        std::vector<float> bias_;
        std::vector<float> w_f32_;
        std::vector<bf16> w_bf16_;
        detail::BlockWeights blocks_;
    };
};

static_assert(Backend<reference>);

} // namespace hypermoe
