#pragma once
// The Eigen backend (opt-in: include this header and depend on Eigen 3.4). f32 weights are kept
// as a row-major (N, K) matrix for Eigen's GEMM; bf16 weights stay bf16, held once as panels and
// multiplied by the shared panel kernel (panels.hpp, the oneDNN backend's too); q8_0 / q4_0 / mxfp4
// / q4_k go to the shared block kernels (block_linear.hpp).
//
// Threading is ours, not Eigen's: N is cut into fixed blocks of `column_block` outputs, one
// single-threaded Eigen GEMM (and its epilogue, while C is in cache) per block, blocks spread
// over OpenMP threads. Eigen's own parallel GEMM splits rows by thread count, which changed the
// summation order (measured: 1 vs 2 threads not bitwise equal at d = 256); with fixed blocks
// every output element is computed the same way for any thread count.
//
// Memory: Eigen's GEMM packs its operands into buffers it allocates on every call (about 0.5 MB
// per block at K = 1024). We call its GEMM kernel with a blocking whose buffers come from the
// caller's Workspace, one pair per thread, so a call allocates nothing. That uses
// Eigen::internal (general_matrix_matrix_product, level3_blocking), stable across Eigen 3.3-3.4.

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/panels.hpp"
#include "hypermoe/backend/block_linear.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/parallel.hpp"

namespace hypermoe {

namespace detail {

/// Eigen's blocking of one (M, nb, K) product, with its packing buffers supplied by the caller.
/// The product runs transposed inside Eigen (row-major result), so Eigen's "rows" are our nb
/// outputs and its "cols" our M rows, as in its own gemm_blocking_space.
///
/// The buffers are sized kc x nb and kc x M, not Eigen's kc x mc and kc x nc: mc <= nb and
/// nc <= M always, and kc depends on K and the L1 size only, so these sizes never shrink as M
/// grows, which Eigen's do (it evens out the last block: with this Zen 3's caches nc fell from
/// 40 to 24 as M went from 40 to 41, so a workspace sized for more rows was too small for fewer).
class EigenBlocking : public Eigen::internal::level3_blocking<float, float> {
public:
    EigenBlocking(index_t rows, index_t outputs, index_t depth) : rows_(rows), outputs_(outputs) {
        m_mc = outputs;
        m_nc = rows;
        m_kc = depth;
        Eigen::internal::computeProductBlockingSizes<float, float, 1>(m_kc, m_mc, m_nc, Eigen::Index(1));
    }
    /// (Saturating: a caller may ask for any row count, and gets unreal_bytes back for an absurd one.)
    [[nodiscard]] std::size_t a_elements() const noexcept { return std::size_t(saturating_mul(m_kc, std::max<index_t>(outputs_, m_mc))); }
    [[nodiscard]] std::size_t b_elements() const noexcept { return std::size_t(saturating_mul(m_kc, std::max<index_t>(rows_, m_nc))); }
    void set_buffers(float* a, float* b) noexcept {
        m_blockA = a;
        m_blockB = b;
    }

private:
    index_t rows_, outputs_;
};

/// res (m, n, row-major) += lhs (m, k) * rhs (k, n), each operand row- or column-major (with its
/// outer stride), with Eigen's kernel: in blocks of `block` result columns over at most
/// `threads` threads, packing buffers from the workspace (eigen_gemm_bytes). Each result
/// element is computed by one thread in one order, so the bits do not depend on the thread
/// count. The backward passes' products (dZ W, dZ^T A) run through it.
struct EigenGemm {
    static constexpr index_t block = 128;
    index_t m, n, k;
    int threads;

    [[nodiscard]] int slices() const noexcept {
        return int(std::min<index_t>({(n + block - 1) / block, index_t(std::max(threads, 1)), 256}));
    }
    /// Elements of one slice's two packing buffers (the largest block's).
    [[nodiscard]] std::pair<std::size_t, std::size_t> buffer_elements() const noexcept {
        const EigenBlocking b(m, std::min(block, n), k);
        std::size_t a = b.a_elements(), bb = b.b_elements();
        if (const index_t last = n % block; last != 0 && n > block) {
            const EigenBlocking t(m, last, k);
            a = std::max(a, t.a_elements());
            bb = std::max(bb, t.b_elements());
        }
        return {a, bb};
    }
    [[nodiscard]] std::size_t workspace_bytes() const noexcept {
        if (m <= 0 || n <= 0 || k <= 0) return 0;
        const auto [a, b] = buffer_elements();
        return std::size_t(slices()) * (padded_bytes<float>(index_t(a)) + padded_bytes<float>(index_t(b)));
    }
    template <int LhsOrder, int RhsOrder>
    void add(const float* lhs, index_t lhs_stride, const float* rhs, index_t rhs_stride, float* res, index_t res_stride,
             Workspace& ws) const {
        if (m <= 0 || n <= 0 || k <= 0) return;
        Workspace::Scope scope(ws, workspace_bytes());
        const int used = slices();
        const auto [a, bb] = buffer_elements();
        float* slots[2 * 256];
        for (int i = 0; i < used; ++i) {
            slots[2 * i] = ws.take<float>(index_t(a)).data();
            slots[2 * i + 1] = ws.take<float>(index_t(bb)).data();
        }
        const index_t blocks = (n + block - 1) / block;
        const auto run = [&](index_t b, int slice) {
            const index_t n0 = b * block, nb = std::min(block, n - n0);
            EigenBlocking blocking(m, nb, k);
            blocking.set_buffers(slots[2 * slice], slots[2 * slice + 1]);
            const float* r = RhsOrder == Eigen::RowMajor ? rhs + n0 : rhs + n0 * rhs_stride;
            Eigen::internal::general_matrix_matrix_product<Eigen::Index, float, LhsOrder, false, float, RhsOrder, false,
                                                          Eigen::RowMajor, 1>::run(m, nb, k, lhs, lhs_stride, r, rhs_stride,
                                                                                   res + n0, 1, res_stride, 1.0f, blocking, nullptr);
        };
#if defined(_OPENMP)
        if (used > 1) {
#pragma omp parallel for schedule(static) num_threads(used)
            for (index_t b = 0; b < blocks; ++b) run(b, omp_get_thread_num());
            return;
        }
#endif
        for (index_t b = 0; b < blocks; ++b) run(b, 0);
    }
};

} // namespace detail

struct eigen {
    static constexpr std::string_view name = "eigen";

    template <class Act>
    class linear : public detail::LinearBase {
        using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        using ConstMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
        using Map = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              bias_(bias.begin(), bias.end()), w_(storage_ == dtype::f32 ? n_ : 0, storage_ == dtype::f32 ? k_ : 0) {
            if (is_block_format(storage_)) {
                blocks_.emplace(w, bias, storage_, prec_, name_, accumulate_);
                return;
            }
            if (storage_ == dtype::bf16) { // held once, as bf16 panels (the oneDNN backend's kernel too)
                if (k_ > 0 && n_ > 0) panels_ = detail::WeightPanels(w, dtype::bf16, prec_);
                return;
            }
            for (index_t r = 0; r < n_ && k_ > 0; ++r) { // (K = 0: no storage, nothing to copy)
                float* row = w_.data() + r * k_;
                if (w.type() == dtype::f32) { // f32 rows as they are
                    std::memcpy(row, w.row_bytes(r), std::size_t(k_) * sizeof(float));
                    continue;
                }
                for (index_t c = 0; c < k_; ++c) row[c] = detail::stored_value(w.at(r, c), storage_);
            }
        }

        /// C for accumulating calls, and one pair of packing buffers per thread that runs a block.
        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
            if (blocks_) return blocks_->workspace_bytes(rows);
            if (rows <= 0 || n_ == 0) return 0;
            if (storage_ == dtype::bf16) return panels_.workspace_bytes(rows, accumulate_);
            const Packing p = packing(rows);
            return (accumulate_ ? detail::padded_bytes<float>(rows, n_) : 0) +
                   std::size_t(slices()) * (detail::padded_bytes<float>(p.a) + detail::padded_bytes<float>(p.b));
        }

        /// Outputs per block: a multiple of the AVX-512 width, small enough to give both cores
        /// work at N = 1024.
        static constexpr index_t column_block = 128;

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            check_call(a, c);
            if (a.rows() == 0 || n_ == 0) return;
            if (blocks_) return (*blocks_)(a, c, ws, scale);
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            if (storage_ == dtype::bf16) {
                const float* bias = bias_.empty() ? nullptr : bias_.data();
                if (panels_.empty()) return detail::epilogue_bias_only<Act>(c, bias, scale, accumulate_); // K = 0
                return panels_.apply<Act>(a, c, ws, bias, scale, accumulate_);
            }
            const index_t m = a.rows();
            const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(m, n_) : c;
            const Packing p = packing(m);
            const int slices_used = slices();
            float* buffers[2 * max_slices];
            for (int i = 0; i < slices_used; ++i) {
                buffers[2 * i] = ws.take<float>(index_t(p.a)).data();
                buffers[2 * i + 1] = ws.take<float>(index_t(p.b)).data();
            }
            const index_t blocks = (n_ + column_block - 1) / column_block;
            const auto block = [&](index_t b, int slice) {
                f32_block(a, t, c, b * column_block, 0, buffers[2 * slice], buffers[2 * slice + 1], scale);
            };
#if defined(_OPENMP)
            if (slices_used > 1) {
#pragma omp parallel for schedule(static) num_threads(slices_used)
                for (index_t b = 0; b < blocks; ++b) block(b, omp_get_thread_num());
                return;
            }
#endif
            for (index_t b = 0; b < blocks; ++b) block(b, 0);
        }

        /// Bytes prepare() takes: the rows rounded to bf16 (bf16 `fast`) or quantised (`fast`
        /// blocks).
        [[nodiscard]] std::size_t prepared_bytes(index_t rows) const noexcept {
            if (blocks_) return blocks_->prepared_bytes(rows);
            return panels_.empty() ? 0 : panels_.prepared_bytes(rows);
        }
        /// The input as every forward_columns tile reads it (PreparedInput), in `ws`.
        [[nodiscard]] PreparedInput prepare(ConstMatrixView<float> a, Workspace& ws) const {
            if (blocks_) return blocks_->prepare(a, ws);
            if (!panels_.empty()) return panels_.prepare(a, ws);
            return PreparedInput{a, {}, {}, {}};
        }
        /// Scratch of forward_columns: the product apart when accumulating, and one block's
        /// packing buffers (f32).
        [[nodiscard]] std::size_t forward_columns_workspace_bytes(index_t rows, index_t columns) const noexcept {
            if (blocks_) return blocks_->columns_workspace_bytes(rows, columns);
            if (storage_ == dtype::bf16) return detail::WeightPanels::columns_workspace_bytes(rows, columns, accumulate_);
            if (rows <= 0) return 0;
            const Packing p = packing(rows);
            return (accumulate_ ? detail::padded_bytes<float>(rows, columns) : 0) + detail::padded_bytes<float>(p.a) +
                   detail::padded_bytes<float>(p.b);
        }
        /// Columns [n0, n0 + c.cols()) of operator()'s c from prepare(a)'s input, on the calling
        /// thread: the blocks operator() computes there, so the same bits.
        void forward_columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, float scale = 1.0f) const {
            check_forward_columns(p.a, c, n0, forward_column_unit());
            const index_t m = p.a.rows();
            if (m == 0 || c.cols() == 0) return;
            if (blocks_) return blocks_->columns(p, c, n0, ws, scale);
            Workspace::Scope scope(ws, forward_columns_workspace_bytes(m, c.cols()));
            const detail::ThreadCountScope one(1); // after the scope, which may apply ws's thread budget
            const float* bias = bias_.empty() ? nullptr : bias_.data();
            if (storage_ == dtype::bf16) {
                if (panels_.empty()) return detail::epilogue_bias_only<Act>(c, bias != nullptr ? bias + n0 : nullptr, scale, accumulate_);
                return panels_.apply_columns<Act>(p, c, n0, ws, bias, scale, accumulate_);
            }
            const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(m, c.cols()) : c;
            const Packing pk = packing(m);
            float* pack_a = ws.take<float>(index_t(pk.a)).data();
            float* pack_b = ws.take<float>(index_t(pk.b)).data();
            for (index_t n = n0; n < n0 + c.cols(); n += column_block) f32_block(p.a, t, c, n, n0, pack_a, pack_b, scale);
        }

        /// Scratch of backward() for `rows` rows: Z and its gradient, and the packing buffers of
        /// its products.
        [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const noexcept {
            return affine_gradient_bytes(rows) + std::max({affine_columns_workspace_bytes(rows, n_),
                                                           backward_input_workspace_bytes(rows, k_),
                                                           weight_gradient_workspace_bytes(rows, n_, k_)});
        }

        /// The backward of operator()(a, c, ws, scale) given dc = dL/dC: da [+]= dz W,
        /// g.weight += dz^T a, g.bias += the column sums of dz, where dz = scale * dc * Act'(Z)
        /// is the gradient of Z = A W^T + b (recomputed when Act is not the identity). f32
        /// storage only.
        void backward(ConstMatrixView<float> a, ConstMatrixView<float> dc, MatrixView<float> da, const LinearGrads& g, Workspace& ws,
                      bool accumulate_input = false, float scale = 1.0f) const {
            check_backward(a, dc, da, g);
            const index_t m = a.rows();
            Workspace::Scope scope(ws, backward_workspace_bytes(m));
            const ConstMatrixView<float> dz =
                affine_gradient<Act>(dc, scale, ws, [&](MatrixView<float> z) { affine_columns(a, z, 0, ws); });
            backward_input(dz, da, 0, ws, accumulate_input);
            weight_gradient(a, dz, g.weight, ws);
            detail::add_column_sums(dz, g.bias);
        }

        /// Columns an affine_columns tile is made of: Eigen's blocks of result columns, so that
        /// a tile's bits are the whole product's.
        [[nodiscard]] index_t forward_column_unit() const noexcept {
            if (blocks_) return detail::BlockWeights::tile;
            return storage_ == dtype::bf16 ? detail::WeightPanels::panel : column_block;
        }
        [[nodiscard]] std::size_t affine_columns_workspace_bytes(index_t rows, index_t columns) const noexcept {
            return detail::EigenGemm{rows, columns, k_, detail::current_threads()}.workspace_bytes();
        }

        /// Columns [n0, n0 + z.cols()) of Z = a W^T + b, the pre-activation a backward
        /// recomputes. f32 storage only.
        void affine_columns(ConstMatrixView<float> a, MatrixView<float> z, index_t n0, Workspace& ws) const {
            check_affine_columns(a, z, n0, forward_column_unit());
            const index_t m = a.rows();
            for (index_t r = 0; r < m; ++r) std::fill_n(z.row(r).data(), z.cols(), 0.0f);
            // Z (m, columns) = a (m, K) W[n0 ..]^T (K, columns: rows of w_ from n0, read column-major) + b
            detail::EigenGemm{m, z.cols(), k_, detail::current_threads()}.add<Eigen::RowMajor, Eigen::ColMajor>(
                a.data(), a.stride(), w_.data() + n0 * k_, k_, z.data(), z.stride(), ws);
            if (!bias_.empty())
                for (index_t r = 0; r < m; ++r)
                    for (index_t c = 0; c < z.cols(); ++c) z(r, c) += bias_[std::size_t(n0 + c)];
        }

        /// Columns a backward_input tile is made of: Eigen's blocks of result columns, so that a
        /// tile's bits are the whole product's.
        [[nodiscard]] index_t backward_column_unit() const noexcept { return detail::EigenGemm::block; }
        [[nodiscard]] std::size_t backward_input_workspace_bytes(index_t rows, index_t columns) const noexcept {
            return detail::EigenGemm{rows, columns, n_, detail::current_threads()}.workspace_bytes();
        }

        /// The input gradient's columns [k0, k0 + da.cols()) alone: da [+]= dz W[:, k0 ..] for
        /// dz = dL/dZ (M, N).
        void backward_input(ConstMatrixView<float> dz, MatrixView<float> da, index_t k0, Workspace& ws, bool accumulate = false) const {
            check_backward_input(dz, da, k0, backward_column_unit());
            if (!accumulate)
                for (index_t r = 0; r < da.rows(); ++r) std::fill_n(da.row(r).data(), da.cols(), 0.0f);
            // da (m, columns) += dz (m, N) W[:, k0 ..] (N, columns: rows of w_ from column k0)
            detail::EigenGemm{dz.rows(), da.cols(), n_, detail::current_threads()}.add<Eigen::RowMajor, Eigen::RowMajor>(
                dz.data(), dz.stride(), w_.data() + k0, k_, da.data(), da.stride(), ws);
        }

        [[nodiscard]] std::size_t weight_gradient_workspace_bytes(index_t rows, index_t n, index_t k) const noexcept {
            return detail::EigenGemm{n, k, rows, detail::current_threads()}.workspace_bytes();
        }

        /// A block of the weight gradient: dw (n, k) += dz^T a for dz (M, n) the gradient of
        /// outputs [n0, n0 + n) and a (M, k) the inputs [k0, k0 + k), dw the gradient's block at
        /// (n0, k0).
        void weight_gradient(ConstMatrixView<float> a, ConstMatrixView<float> dz, MatrixView<float> dw, Workspace& ws) const {
            check_weight_gradient(a, dz, dw);
            // dw (n, k) += dz^T (n, m): dz read column-major, times a (m, k)
            detail::EigenGemm{dw.rows(), dw.cols(), a.rows(), detail::current_threads()}.add<Eigen::ColMajor, Eigen::RowMajor>(
                dz.data(), dz.stride(), a.data(), a.stride(), dw.data(), dw.stride(), ws);
        }

    private:
        /// Outputs [n0, n0 + 128) (fewer at N) of c [+]= scale * Act(a W^T + b), into t's and c's
        /// columns from n0 - base (t: c itself unless accumulating), packing in pack_a / pack_b.
        void f32_block(ConstMatrixView<float> a, MatrixView<float> t, MatrixView<float> c, index_t n0, index_t base, float* pack_a,
                       float* pack_b, float scale) const {
            const index_t m = a.rows(), nb = std::min(column_block, n_ - n0), at = n0 - base;
            const MatrixView<float> tb = t.col_block(at, nb);
            for (index_t r = 0; r < m; ++r) std::fill_n(tb.row(r).data(), nb, 0.0f);
            if (k_ > 0) {
                detail::EigenBlocking blocking(m, nb, k_);
                blocking.set_buffers(pack_a, pack_b);
                // tb += A W_b^T: A (m, K) row-major, W_b^T (K, nb) column-major, tb row-major.
                Eigen::internal::general_matrix_matrix_product<Eigen::Index, float, Eigen::RowMajor, false, float, Eigen::ColMajor, false,
                                                              Eigen::RowMajor, 1>::run(m, nb, k_, a.data(), a.stride(),
                                                                                       w_.data() + n0 * k_, k_, tb.data(), 1, tb.stride(),
                                                                                       1.0f, blocking, nullptr);
            }
            const float* bias = bias_.empty() ? nullptr : bias_.data() + n0;
            if (accumulate_) detail::epilogue_accumulate<Act>(tb, c.col_block(at, nb), bias, scale);
            else detail::epilogue_in_place<Act>(tb, bias, scale);
        }

        /// At most this many threads run blocks of one call (each needs its own buffers).
        static constexpr int max_slices = 256;

        /// Elements of the packing buffers of one block (the largest block's).
        struct Packing {
            std::size_t a, b;
        };
        [[nodiscard]] Packing packing(index_t rows) const noexcept {
            if (k_ == 0 || rows <= 0) return {0, 0}; // A W^T is zero: no product runs
            const detail::EigenBlocking full(rows, std::min(column_block, n_), k_);
            Packing p{full.a_elements(), full.b_elements()};
            if (const index_t last = n_ % column_block; last != 0 && n_ > column_block) {
                const detail::EigenBlocking tail(rows, last, k_);
                p.a = std::max(p.a, tail.a_elements());
                p.b = std::max(p.b, tail.b_elements());
            }
            return p;
        }
        /// Threads that run blocks of a call made now: one per block, at most the thread count.
        [[nodiscard]] int slices() const noexcept {
            const index_t blocks = (n_ + column_block - 1) / column_block;
            return int(std::min<index_t>({blocks, detail::current_threads(), max_slices}));
        }

        std::vector<float> bias_;
        Matrix<float> w_; ///< f32 storage only (an aligned_array: a trainer's rebuild reuses it, core/matrix.hpp's BufferReuse)
        std::optional<detail::BlockLinear<Act>> blocks_; ///< q8_0 / q4_0 / mxfp4 / q4_k weights, held only as blocks
        detail::WeightPanels panels_;                     ///< bf16 weights, held only as panels
    };
};

static_assert(Backend<eigen>);

} // namespace hypermoe
