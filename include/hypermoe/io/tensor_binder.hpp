#pragma once
// TensorBinder: fetches the tensors of one layer from a Checkpoint as WeightViews, checking each
// name, dtype and shape, and collecting EVERY problem before anything is built: finish() throws
// one weight_error that lists them all. F32 and BF16 tensors and Q8_0 / Q4_0 blocks (GGUF) are
// viewed in place in the mapping (when aligned); F16, F64, the other ggml quants (GGUF Q4_1,
// Q5_0, Q5_1, IQ4_NL, the K-quants Q2_K to Q6_K and IQ4_XS), misaligned and transposed tensors
// are converted into owned f32 storage (exactly: F16 and every block widen to f32 without
// rounding); a routed expert's, bound with deferred_matrix(),
// only when its expert is packed, and freed (with the source's mapped pages) after.

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/io/checkpoint.hpp"

namespace hypermoe {

class TensorBinder {
public:
    TensorBinder(const Checkpoint& checkpoint, std::string what) : ck_(checkpoint), what_(std::move(what)) {}

    /// A (rows, cols) weight. With transpose, the tensor is stored (cols, rows) (Conv1D, w_gate)
    /// and is transposed into owned storage.
    WeightView matrix(const std::string& name, index_t rows, index_t cols, bool transpose = false) {
        const Checkpoint::Ref r = fetch(name, transpose ? std::vector<index_t>{cols, rows} : std::vector<index_t>{rows, cols});
        if (r.info == nullptr) return placeholder();
        const TensorInfo& t = *r.info;
        if (!transpose) {
            if (const auto in_place = view_in_place(r, rows, cols)) return *in_place;
            return ConstMatrixView<float>(owned_.emplace_back(r.file->to_f32(t)).view());
        }
        Matrix<float>& m = owned_.emplace_back(rows, cols);
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) m(i, j) = float(r.file->element(t, j * rows + i));
        return ConstMatrixView<float>(m.view());
    }

    /// A routed expert's (rows, cols) weight: matrix() without transposing, checked now, but a
    /// tensor that needs converting (F16, F64, the other ggml quants, misaligned) is converted
    /// only by materialise(), right before its expert is packed, into a buffer that release() frees once
    /// the expert is packed (and the source's pages with it). So loading a block holds one expert's converted weights at a time,
    /// not all of them (the buffers are allocated here, untouched: address space, not memory).
    /// The view must not be read before materialise().
    WeightView deferred_matrix(const std::string& name, index_t rows, index_t cols) {
        const Checkpoint::Ref r = fetch(name, {rows, cols});
        if (r.info == nullptr) return placeholder();
        if (const auto in_place = view_in_place(r, rows, cols)) return *in_place;
        auto buffer = detail::aligned_array<float>(std::size_t(rows * cols));
        const float* data = buffer.get();
        deferred_.emplace(data, Deferred{r, std::move(buffer), false});
        return ConstMatrixView<float>(data, rows, cols);
    }

    /// Converts the tensor of a deferred_matrix() view into its buffer (once); any other view is
    /// left as it is.
    void materialise(const WeightView& w) {
        const auto it = deferred_.find(w.extent().data());
        if (it == deferred_.end() || it->second.filled) return;
        const TensorInfo& t = *it->second.source.info;
        it->second.source.file->convert_f32(t, {it->second.buffer.get(), std::size_t(t.numel())});
        it->second.filled = true;
    }

    /// Two weights of one width stacked into one, `top`'s rows then `bottom`'s, in owned f32
    /// storage (a router weight over its noise weight, so that one GEMM computes both); a
    /// placeholder when either is one (a missing tensor, already reported).
    WeightView stack_rows(const WeightView& top, const WeightView& bottom) {
        if (top.rows() * top.cols() == 0 || bottom.rows() * bottom.cols() == 0 || top.cols() != bottom.cols()) return placeholder();
        Matrix<float>& m = owned_.emplace_back(top.rows() + bottom.rows(), top.cols());
        for (index_t i = 0; i < m.rows(); ++i)
            for (index_t j = 0; j < m.cols(); ++j) m(i, j) = i < top.rows() ? top.at(i, j) : bottom.at(i - top.rows(), j);
        return ConstMatrixView<float>(m.view());
    }

    /// Once a weight is packed into a layer's own storage: drops its pages from memory if it is
    /// read in place from the checkpoint's mapping; if it is a deferred_matrix() one, frees its
    /// buffer and drops the pages of the tensor it was converted from (no-op for matrix()'s owned
    /// copies).
    void release(const WeightView& w) noexcept {
        ck_.release(w.extent());
        if (const auto it = deferred_.find(w.extent().data()); it != deferred_.end()) {
            ck_.release(it->second.source.file->data(*it->second.source.info));
            deferred_.erase(it);
        }
    }

    /// A vector of n floats (converted from its dtype).
    std::span<const float> vector(const std::string& name, index_t n) {
        const Checkpoint::Ref r = fetch(name, {n});
        if (r.info == nullptr) return {};
        std::vector<float>& v = vectors_.emplace_back(static_cast<std::size_t>(n));
        for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = float(r.file->element(*r.info, i));
        return v;
    }

    /// Whether the checkpoint has tensor `name` (for a family's optional tensors).
    [[nodiscard]] bool has(const std::string& name) const { return ck_.contains(name); }

    /// Throws one weight_error listing every problem found so far.
    void finish() const {
        if (problems_.empty()) return;
        std::string msg = detail::concat(ck_.dir(), ": ", what_, ": ", problems_.size(), " problem",
                                         problems_.size() > 1 ? "s" : "", " with its tensors:");
        for (const auto& p : problems_) msg += "\n  " + p;
        throw weight_error(msg);
    }

private:
    Checkpoint::Ref fetch(const std::string& name, const std::vector<index_t>& shape) {
        const Checkpoint::Ref r = ck_.find(name);
        if (r.info == nullptr) {
            const std::string from = ck_.source_of(name);
            problems_.push_back(detail::concat("missing tensor '", name, "'", from.empty() ? "" : " (" + from + ")"));
            return r;
        }
        const TensorInfo& t = *r.info;
        if (!is_floating_dtype(t.dtype)) {
            problems_.push_back(detail::concat(t.describe(), " in ", r.file->source(), " has dtype ", t.type_string(),
                                               ", expected F32, BF16, F16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or IQ4_XS"));
            return {nullptr, nullptr};
        }
        if (t.shape != shape) {
            TensorInfo want;
            want.shape = shape;
            problems_.push_back(detail::concat(t.describe(), " in ", r.file->source(), " has shape ", t.shape_string(),
                                               ", expected ", want.shape_string()));
            return {nullptr, nullptr};
        }
        return r;
    }

    static WeightView placeholder() noexcept { return ConstMatrixView<float>(); }

    /// A tensor the layer can read where it is in the mapping: aligned F32 or BF16, or Q8_0 /
    /// Q4_0 blocks; none otherwise.
    static std::optional<WeightView> view_in_place(const Checkpoint::Ref& r, index_t rows, index_t cols) {
        const TensorInfo& t = *r.info;
        if (const auto f = r.file->f32_in_place(t); !f.empty()) return ConstMatrixView<float>(f.data(), rows, cols);
        const auto bytes = r.file->data(t);
        if (t.dtype == tensor_dtype::bf16 && reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(bf16) == 0)
            return ConstMatrixView<bf16>(reinterpret_cast<const bf16*>(bytes.data()), rows, cols);
        if (is_block_dtype(t.dtype))
            return WeightView::blocks(bytes.data(), t.dtype == tensor_dtype::q8_0 ? dtype::q8_0 : dtype::q4_0, rows, cols);
        return std::nullopt;
    }

    /// A deferred_matrix() buffer and the tensor it is converted from.
    struct Deferred {
        Checkpoint::Ref source;
        std::unique_ptr<float[], detail::aligned_delete> buffer;
        bool filled;
    };

    const Checkpoint& ck_;
    std::string what_;
    std::vector<std::string> problems_;
    std::deque<Matrix<float>> owned_;
    std::map<const void*, Deferred> deferred_;
    std::deque<std::vector<float>> vectors_;
};

} // namespace hypermoe
