#pragma once
// Linear maps over weights stored in the q8_0 / q4_0 block formats (core/quant.hpp), shared by
// every backend: a backend's linear whose storage is a block format holds a BlockLinear and
// forwards to it, so the weights are held once, as blocks (34 or 18 bytes per 32 weights), never
// widened. Arithmetic is `exact`: f32 on the weights' exact values. Each output row's blocks are
// dequantised once per group of up to 4 activation rows (q * d is exact in f32: at most 8 + 11
// significant bits), and the products are summed in f32.

#include <algorithm>
#include <array>
#include <cstddef>
#include <span>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"

namespace hypermoe::detail {

/// An (N, K) weight as N rows of ceil(K / 32) blocks of one format.
class BlockWeights {
public:
    BlockWeights() = default;
    BlockWeights(const WeightView& w, dtype format, const std::string& name)
        : format_(format), n_(w.rows()), k_(w.cols()), blocks_per_row_((w.cols() + quant_block - 1) / quant_block) {
        std::vector<float> row(static_cast<std::size_t>(k_));
        if (format == dtype::q8_0) q8_.resize(std::size_t(n_ * blocks_per_row_));
        else q4_.resize(std::size_t(n_ * blocks_per_row_));
        for (index_t r = 0; r < n_; ++r) {
            for (index_t c = 0; c < k_; ++c) row[std::size_t(c)] = w.at(r, c);
            const std::string what = concat(name, " row ", r);
            if (format == dtype::q8_0) quantize_row<BlockQ8_0>(row, std::span(q8_).subspan(std::size_t(r * blocks_per_row_), std::size_t(blocks_per_row_)), what);
            else quantize_row<BlockQ4_0>(row, std::span(q4_).subspan(std::size_t(r * blocks_per_row_), std::size_t(blocks_per_row_)), what);
        }
    }

    [[nodiscard]] dtype format() const noexcept { return format_; }
    [[nodiscard]] index_t blocks_per_row() const noexcept { return blocks_per_row_; }
    /// Bytes held: the blocks, scales included.
    [[nodiscard]] std::size_t bytes() const noexcept { return q8_.size() * sizeof(BlockQ8_0) + q4_.size() * sizeof(BlockQ4_0); }
    [[nodiscard]] std::span<const BlockQ8_0> q8_0() const noexcept { return q8_; }
    [[nodiscard]] std::span<const BlockQ4_0> q4_0() const noexcept { return q4_; }

    /// The 32 values of block b of row n.
    void dequantize_block(index_t n, index_t b, std::span<float, 32> out) const noexcept {
        const auto i = std::size_t(n * blocks_per_row_ + b);
        if (format_ == dtype::q8_0) dequantize(q8_[i], out);
        else dequantize(q4_[i], out);
    }
    /// Weight (n, k), exactly.
    [[nodiscard]] float at(index_t n, index_t k) const noexcept {
        std::array<float, 32> v;
        dequantize_block(n, k / quant_block, v);
        return v[std::size_t(k % quant_block)];
    }

private:
    dtype format_ = dtype::q8_0;
    index_t n_ = 0, k_ = 0, blocks_per_row_ = 0;
    std::vector<BlockQ8_0> q8_;
    std::vector<BlockQ4_0> q4_;
};

/// c = [c +] scale * Act(a W^T + b) with W in a block format; see the file comment.
template <class Act>
class BlockLinear {
public:
    BlockLinear(const WeightView& w, std::span<const float> bias, dtype format, const std::string& name, bool accumulate)
        : w_(w, format, name), bias_(bias.begin(), bias.end()), n_(w.rows()), k_(w.cols()), accumulate_(accumulate) {}

    [[nodiscard]] const BlockWeights& weights() const noexcept { return w_; }

    void operator()(ConstMatrixView<float> a, MatrixView<float> c, float scale) const {
        const index_t row_groups = (a.rows() + group_rows - 1) / group_rows;
        const index_t col_tiles = (n_ + tile - 1) / tile;
        parallel_for(row_groups * col_tiles, a.rows() * k_ * n_, [&](index_t item) {
            const index_t r0 = item / col_tiles * group_rows, j0 = item % col_tiles * tile;
            run(a, c, r0, std::min(group_rows, a.rows() - r0), j0, std::min(tile, n_ - j0), scale);
        });
    }

private:
    static constexpr index_t group_rows = 4; ///< activation rows that share one dequantised block
    static constexpr index_t tile = 32;      ///< outputs per work item

    void run(ConstMatrixView<float> a, MatrixView<float> c, index_t r0, index_t rows, index_t j0, index_t cols,
             float scale) const {
        const index_t blocks = w_.blocks_per_row();
        std::array<float, 32> x_pad{};
        for (index_t j = j0; j < j0 + cols; ++j) {
            float acc[group_rows] = {};
            for (index_t b = 0; b < blocks; ++b) {
                alignas(64) std::array<float, 32> wv;
                w_.dequantize_block(j, b, wv);
                const index_t k0 = b * quant_block, count = std::min(quant_block, k_ - k0);
                for (index_t r = 0; r < rows; ++r) {
                    const float* x = a.row(r0 + r).data() + k0;
                    if (count < quant_block) { // the zero-padded last block: read only the row's K values
                        std::copy_n(x, count, x_pad.begin());
                        x = x_pad.data();
                    }
                    float s = 0.0f;
                    for (index_t i = 0; i < quant_block; ++i) s += wv[std::size_t(i)] * x[i];
                    acc[r] += s;
                }
            }
            for (index_t r = 0; r < rows; ++r) {
                const float v = scale * Act::apply(acc[r] + (bias_.empty() ? 0.0f : bias_[std::size_t(j)]));
                float& out = c(r0 + r, j);
                out = accumulate_ ? out + v : v;
            }
        }
    }

    BlockWeights w_;
    std::vector<float> bias_;
    index_t n_, k_;
    bool accumulate_;
};

} // namespace hypermoe::detail
