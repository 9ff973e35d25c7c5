#pragma once
// TensorBinder: fetches the tensors of one layer from a Checkpoint as WeightViews, checking each
// name, dtype and shape, and collecting EVERY problem before anything is built: finish() throws
// one weight_error that lists them all. F32 and BF16 tensors and Q8_0 / Q4_0 / MXFP4 / Q4_K blocks
// (GGUF) are viewed in place in the mapping (when aligned); F16, F64, the other ggml quants (GGUF
// Q4_1, Q5_0, Q5_1, IQ4_NL, the K-quants Q2_K, Q3_K, Q5_K, Q6_K and IQ4_XS), misaligned and transposed tensors
// are converted into owned f32 storage (exactly: F16 and every block widen to f32 without
// rounding). A routed expert's weights, bound with deferred_matrix(), are converted into the type
// its expert stores only when that expert is packed (unless already in it), and freed after,
// the source's mapped pages dropped as they are converted.

#include <algorithm>
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

    /// A routed expert's (rows, cols) weight, to be stored as `storage` (LoadOptions::storage):
    /// matrix() without transposing, checked now. The type it is converted to is `storage` when
    /// that is bf16, or a block format (q8_0, q4_0, mxfp4, q4_k) and cols is a multiple of 32; else f32. A tensor already in
    /// that type, or one viewable in place when the type is f32 (the linear map widens it), is
    /// viewed in place; any other is converted only by materialise(), right before its expert is
    /// packed, into a buffer that release() frees once the expert is packed. So loading a block
    /// holds one expert's converted weights at a time, in the storage type, and not the source's
    /// bytes beside them: a Mixtral-class expert (3 x 4096 x 14336 weights) from bf16 or Q4_K
    /// into q4_0 takes 99 MB, where its f32 conversion took 705 MB and its bf16 pages 352 MB
    /// (the buffers are allocated here, untouched: address space, not memory). The view must not
    /// be read before materialise().
    /// With keep_stored, a tensor in a format a layer holds as stored (held_dtype: BF16, Q8_0,
    /// Q4_0, MXFP4, Q4_K) is taken in that format instead of `storage` (LoadOptions::keep_stored).
    WeightView deferred_matrix(const std::string& name, index_t rows, index_t cols, dtype storage = dtype::f32, bool keep_stored = false) {
        const Checkpoint::Ref r = fetch(name, {rows, cols});
        if (r.info == nullptr) return placeholder();
        const dtype type = converted_type(keep_stored ? kept_dtype(r.info->dtype).value_or(storage) : storage, cols);
        if (const auto in_place = view_in_place(r, rows, cols); in_place && (in_place->type() == type || type == dtype::f32))
            return *in_place;
        std::shared_ptr<std::byte[]> buffer = detail::aligned_array<std::byte>(weight_bytes(type, std::size_t(rows), std::size_t(cols)));
        return defer(r, buffer, buffer.get(), type, rows, cols);
    }

    /// A routed GLU expert's gate and up, (rows, cols) each, as deferred_matrix() binds them, but
    /// converted (or copied, when already in the type) into one buffer, `top`'s rows then
    /// `bottom`'s: the [gate; up] stack its fused linear map needs, which GluExpert then views in
    /// place instead of stacking a copy (it costs one copy either way; this one drops the
    /// source's pages as it goes). Two tensors already in the type with `bottom`'s bytes right
    /// after `top`'s are that stack as they are: viewed in place, not copied. Placeholders when
    /// either tensor is missing or wrong.
    std::pair<WeightView, WeightView> deferred_stack(const std::string& top, const std::string& bottom, index_t rows, index_t cols,
                                                     dtype storage, bool keep_stored = false) {
        const Checkpoint::Ref a = fetch(top, {rows, cols}), b = fetch(bottom, {rows, cols});
        if (a.info == nullptr || b.info == nullptr) return {placeholder(), placeholder()};
        // keep_stored: both in the format they share, when a layer holds it as stored
        const bool shared = keep_stored && a.info->dtype == b.info->dtype;
        const dtype type = converted_type(shared ? kept_dtype(a.info->dtype).value_or(storage) : storage, cols);
        const std::size_t bytes = weight_bytes(type, std::size_t(rows), std::size_t(cols));
        // Both already in the type, up's bytes right after gate's (as a trainer's ParameterStore
        // lays them out): they are the stack, viewed in place.
        const auto in_a = view_in_place(a, rows, cols), in_b = view_in_place(b, rows, cols);
        if (rows > 0 && in_a && in_b && in_a->type() == type && in_b->type() == type && in_b->row_bytes(0) == in_a->row_bytes(0) + bytes)
            return {*in_a, *in_b};
        std::shared_ptr<std::byte[]> buffer = detail::aligned_array<std::byte>(2 * bytes);
        return {defer(a, buffer, buffer.get(), type, rows, cols), defer(b, buffer, buffer.get() + bytes, type, rows, cols)};
    }

    /// Every expert's weights in a Hugging Face fused expert tensor (gpt-oss's experts.gate_up_proj
    /// and experts.down_proj), as deferred_stack() binds a routed expert's: for expert e,
    /// views e x pieces + i (i < pieces) of (rows, cols) in one buffer, piece i holding the
    /// expert's outputs i, i + pieces, i + 2 pieces, ... (gate_up_proj interleaves gate's and
    /// up's: pieces = 2 gives gate then up). Read from either
    /// - `name`, [experts, cols, pieces x rows] (dequantised: y = x W, so each output is a column), or
    /// - its MXFP4 blocks `name`_blocks [experts, pieces x rows, cols / 32, 16] (U8; element 2i of
    ///   a block in byte i's low nibble, 2i + 1 in its high one) with their E8M0 scales
    ///   `name`_scales [experts, pieces x rows, cols / 32] (U8): held as mxfp4 as they are (their
    ///   nibbles put in ggml's order), or converted from their values.
    /// Converted by materialise() like deferred_matrix()'s, one expert at a time; placeholders when
    /// a tensor is missing or wrong (reported once).
    std::vector<WeightView> deferred_fused(const std::string& name, index_t experts, index_t pieces, index_t rows, index_t cols, dtype storage,
                                           bool keep_stored = false) {
        Fused f{{nullptr, nullptr}, 0, pieces, 0};
        Checkpoint::Ref source{nullptr, nullptr};
        if (has(name + "_blocks")) {
            source = fetch_bytes(name + "_blocks", {experts, pieces * rows, cols / quant_block, 16});
            f.scales = fetch_bytes(name + "_scales", {experts, pieces * rows, cols / quant_block});
            if (cols % quant_block != 0)
                problems_.push_back(detail::concat("tensor '", name, "_blocks' holds rows of ", cols, " weights, not a multiple of ", quant_block));
            if (f.scales.info == nullptr || cols % quant_block != 0) source = {nullptr, nullptr};
        } else {
            source = fetch(name, {experts, cols, pieces * rows});
        }
        if (source.info == nullptr) return std::vector<WeightView>(std::size_t(experts * pieces), placeholder());
        const dtype type =
            converted_type(!keep_stored ? storage : f.scales.info != nullptr ? dtype::mxfp4 : kept_dtype(source.info->dtype).value_or(storage), cols);
        const std::size_t bytes = weight_bytes(type, std::size_t(rows), std::size_t(cols));
        std::vector<WeightView> out;
        for (index_t e = 0; e < experts; ++e) {
            std::shared_ptr<std::byte[]> buffer = detail::aligned_array<std::byte>(std::size_t(pieces) * bytes);
            for (index_t i = 0; i < pieces; ++i) {
                f.expert = e, f.first = i;
                out.push_back(defer(source, buffer, buffer.get() + std::size_t(i) * bytes, type, rows, cols, f));
            }
        }
        return out;
    }

    /// Converts the tensor of a deferred_matrix() view into its buffer (once), a row at a time,
    /// dropping the tensor's pages from memory as it goes (they are not read again); any other
    /// view is left as it is. Into bf16 / q8_0 / q4_0 / mxfp4 / q4_k through one row of f32, as the expert's
    /// linear map would convert f32 values (detail::store_row): the same bits, and a non-finite
    /// value is a weight_error naming the tensor and the element.
    void materialise(const WeightView& w) {
        const auto it = deferred_.find(w.extent().data());
        if (it == deferred_.end() || it->second.filled) return;
        Deferred& d = it->second;
        if (d.fused) return materialise_fused(d, w.rows(), w.cols());
        const TensorInfo& t = *d.source.info;
        const std::span<const std::byte> source = d.source.file->data(t);
        const bool copy = held_dtype(t.dtype) == d.type;
        const std::string name = detail::concat(t.describe(), " in ", d.source.file->source());
        const index_t rows = w.rows(), cols = w.cols();
        const std::size_t row = weight_bytes(d.type, 1, std::size_t(cols)), source_row = source.size() / std::size_t(std::max<index_t>(rows, 1));
        std::vector<float> values(d.type == dtype::f32 ? 0 : std::size_t(cols));
        std::size_t released = 0; // source bytes already dropped
        for (index_t r = 0; r < rows; ++r) {
            std::byte* out = d.data + std::size_t(r) * row;
            if (copy) { // already in the type: the bytes as they are (blocks not requantised)
                std::memcpy(out, source.data() + std::size_t(r) * source_row, row);
            } else if (d.type == dtype::f32) {
                d.source.file->convert_f32(t, {reinterpret_cast<float*>(out), std::size_t(cols)}, r * cols);
            } else {
                d.source.file->convert_f32(t, values, r * cols);
                detail::store_row(values, d.type, out, name, r);
            }
            if (const std::size_t done = std::size_t(r + 1) * source_row; done - released >= release_chunk) {
                ck_.release(source.subspan(released, done - released));
                released = done;
            }
        }
        ck_.release(source); // with the pages that straddle the chunks' edges
        d.filled = true;
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
    /// buffer (materialise() dropped the pages of the tensor it was converted from); no-op for
    /// matrix()'s owned copies.
    void release(const WeightView& w) noexcept {
        ck_.release(w.extent());
        deferred_.erase(w.extent().data());
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
                                               ", expected F32, BF16, F16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or IQ4_XS"));
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

    /// A tensor the layer can read where it is in the mapping: aligned F32 or BF16, or Q8_0,
    /// Q4_0, MXFP4 or Q4_K blocks; none otherwise.
    static std::optional<WeightView> view_in_place(const Checkpoint::Ref& r, index_t rows, index_t cols) {
        const TensorInfo& t = *r.info;
        if (const auto f = r.file->f32_in_place(t); !f.empty()) return ConstMatrixView<float>(f.data(), rows, cols);
        const auto bytes = r.file->data(t);
        if (t.dtype == tensor_dtype::bf16 && reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(bf16) == 0)
            return ConstMatrixView<bf16>(reinterpret_cast<const bf16*>(bytes.data()), rows, cols);
        if (is_block_dtype(t.dtype))
            return WeightView::blocks(bytes.data(), *held_dtype(t.dtype), rows, cols);
        return std::nullopt;
    }

    /// The type a routed expert's weight of `cols` columns is converted into for `storage`: the
    /// storage itself, unless it is a block format and cols not a multiple of 32 (then f32, which
    /// the linear map pads and quantises).
    static dtype converted_type(dtype storage, index_t cols) noexcept {
        return storage == dtype::bf16 || (is_block_format(storage) && cols % quant_block == 0) ? storage : dtype::f32;
    }

    /// A tensor of `shape` read as bytes (a fused expert tensor's MXFP4 blocks or scales: U8).
    Checkpoint::Ref fetch_bytes(const std::string& name, const std::vector<index_t>& shape) {
        const Checkpoint::Ref r = ck_.find(name);
        if (r.info == nullptr) {
            problems_.push_back(detail::concat("missing tensor '", name, "'"));
            return r;
        }
        TensorInfo want;
        want.shape = shape;
        if (r.info->dtype != tensor_dtype::u8 || r.info->shape != shape) {
            problems_.push_back(detail::concat(r.info->describe(), " in ", r.file->source(), " is ", r.info->type_string(), " ",
                                               r.info->shape_string(), ", expected U8 ", want.shape_string()));
            return {nullptr, nullptr};
        }
        return r;
    }

    /// Where a fused expert tensor's view reads from (deferred_fused): expert `expert`'s outputs
    /// first, first + pieces, ...; `scales` set for MXFP4 blocks.
    struct Fused {
        Checkpoint::Ref scales;
        index_t expert, pieces, first;
    };

    /// How many source bytes materialise() converts between releases of their pages.
    static constexpr std::size_t release_chunk = std::size_t{4} << 20;

    /// A deferred view's bytes (`data`, in `buffer`, which a deferred_stack() pair shares), the
    /// tensor it is converted from and the type it holds.
    struct Deferred {
        Checkpoint::Ref source;
        std::shared_ptr<std::byte[]> buffer;
        std::byte* data;
        dtype type;
        bool filled;
        std::optional<Fused> fused; ///< a deferred_fused() view's layout
    };

    /// Records a deferred view of `type` at `data` (in `buffer`) converted from `source` (with
    /// `fused`, a fused expert tensor's view).
    WeightView defer(const Checkpoint::Ref& source, const std::shared_ptr<std::byte[]>& buffer, std::byte* data, dtype type, index_t rows,
                     index_t cols, std::optional<Fused> fused = std::nullopt) {
        deferred_.emplace(data, Deferred{source, buffer, data, type, false, fused});
        return WeightView::packed(data, type, rows, cols);
    }

    /// materialise() of a deferred_fused() view: row r is the expert's output r x pieces + first.
    void materialise_fused(Deferred& d, index_t rows, index_t cols) {
        const Fused& f = *d.fused;
        const TensorInfo& t = *d.source.info;
        const std::span<const std::byte> source = d.source.file->data(t);
        const std::string name = detail::concat(t.describe(), " in ", d.source.file->source());
        const std::size_t row = weight_bytes(d.type, 1, std::size_t(cols));
        const index_t outputs = f.pieces * rows;
        std::span<const std::byte> expert_bytes; // the expert's slice of the source, released after
        if (f.scales.info != nullptr) {          // MXFP4 blocks [experts, outputs, cols / 32, 16]: HF's nibble order to ggml's
            const index_t nb = cols / quant_block;
            const std::span<const std::byte> scales = f.scales.file->data(*f.scales.info);
            expert_bytes = source.subspan(std::size_t(f.expert * outputs * nb) * 16, std::size_t(outputs * nb) * 16);
            std::vector<BlockMXFP4> blocks(static_cast<std::size_t>(nb));
            std::vector<float> values(static_cast<std::size_t>(cols));
            for (index_t r = 0; r < rows; ++r) {
                const std::size_t at = std::size_t(f.expert * outputs + r * f.pieces + f.first) * std::size_t(nb);
                for (index_t b = 0; b < nb; ++b) {
                    const auto* q = reinterpret_cast<const std::uint8_t*>(source.data() + (at + std::size_t(b)) * 16);
                    const auto nibble = [q](int k) { return (q[k / 2] >> (4 * (k % 2))) & 0xF; };
                    BlockMXFP4& blk = blocks[std::size_t(b)];
                    blk.e = std::to_integer<std::uint8_t>(scales[at + std::size_t(b)]);
                    for (int j = 0; j < 16; ++j) blk.qs[std::size_t(j)] = std::uint8_t(nibble(j) | nibble(j + 16) << 4);
                }
                std::byte* out = d.data + std::size_t(r) * row;
                if (d.type == dtype::mxfp4) { // held as they are
                    std::memcpy(out, blocks.data(), row);
                    continue;
                }
                for (index_t b = 0; b < nb; ++b)
                    dequantize(blocks[std::size_t(b)], std::span<float, quant_block>(values.data() + b * quant_block, quant_block));
                detail::store_row(values, d.type, out, name, r);
            }
        } else { // [experts, cols, outputs]: each output is a column; a tile of rows reads each source row once, in order
            expert_bytes = source.subspan(std::size_t(f.expert * cols * outputs) * size_of(t.dtype), std::size_t(cols * outputs) * size_of(t.dtype));
            constexpr index_t tile = 32;
            std::vector<float> values(static_cast<std::size_t>(tile * cols)), line(static_cast<std::size_t>(tile * f.pieces));
            for (index_t r0 = 0; r0 < rows; r0 += tile) {
                const index_t n = std::min(tile, rows - r0);
                for (index_t c = 0; c < cols; ++c) {
                    d.source.file->convert_f32(t, std::span(line).first(std::size_t(n * f.pieces)), (f.expert * cols + c) * outputs + r0 * f.pieces);
                    for (index_t i = 0; i < n; ++i) values[std::size_t(i * cols + c)] = line[std::size_t(i * f.pieces + f.first)];
                }
                for (index_t i = 0; i < n; ++i)
                    detail::store_row(std::span<const float>(values).subspan(std::size_t(i * cols), std::size_t(cols)), d.type,
                                      d.data + std::size_t(r0 + i) * row, name, r0 + i);
            }
        }
        ck_.release(expert_bytes);
        d.filled = true;
    }

    const Checkpoint& ck_;
    std::string what_;
    std::vector<std::string> problems_;
    std::deque<Matrix<float>> owned_;
    std::map<const void*, Deferred> deferred_;
    std::deque<std::vector<float>> vectors_;
};

} // namespace hypermoe
