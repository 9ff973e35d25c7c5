#pragma once
// What every backend's `linear` is built from: a weight view in the nn.Linear layout (N x K,
// y = x W^T), an optional bias of N, and options. Validation is shared so that every backend
// rejects the same inputs with the same messages.

#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// A read-only weight matrix, row-major (N, K): row n holds output n's weights. Elements are f32
/// or bf16, or q8_0 / q4_0 / mxfp4 blocks of 32 (q4_k super-blocks of 256) along K in ggml's bytes
/// (as GGUF files hold them; K a multiple of 32, q4_k's last super-block zero-padded), which a
/// linear map stored in the same format keeps as they are.
class WeightView {
public:
    WeightView(ConstMatrixView<float> w) noexcept // NOLINT(google-explicit-constructor)
        : data_(w.data()), type_(dtype::f32), rows_(w.rows()), cols_(w.cols()), stride_(w.stride()) {}
    WeightView(ConstMatrixView<bf16> w) noexcept // NOLINT(google-explicit-constructor)
        : data_(w.data()), type_(dtype::bf16), rows_(w.rows()), cols_(w.cols()), stride_(w.stride()) {}

    /// (rows, cols) weights held as `format` blocks (q8_0, q4_0, mxfp4 or q4_k) at `blocks`, row
    /// after row (any alignment; weight_bytes(format, 1, cols) a row: q4_k's rows end in a
    /// zero-padded super-block unless cols is a multiple of 256). shape_error unless cols is a
    /// multiple of 32.
    [[nodiscard]] static WeightView blocks(const void* blocks, dtype format, index_t rows, index_t cols) {
        if (!is_block_format(format))
            throw config_error(detail::concat("WeightView::blocks: format is ", to_string(format), ", expected q8_0, q4_0, mxfp4 or q4_k"));
        if (cols % quant_block != 0)
            throw shape_error(detail::concat("WeightView::blocks: ", cols, " columns, expected a multiple of ", quant_block));
        WeightView w(ConstMatrixView<float>{});
        w.data_ = blocks, w.type_ = format, w.rows_ = rows, w.cols_ = cols;
        w.stride_ = index_t(weight_bytes(format, 1, std::size_t(cols))); // bytes per row
        return w;
    }

    /// (rows, cols) weights of any dtype packed row after row at `data` (weight_bytes(type, rows,
    /// cols) bytes; f32 and bf16 aligned for their type): the constructors above or blocks().
    [[nodiscard]] static WeightView packed(const void* data, dtype type, index_t rows, index_t cols) {
        if (is_block_format(type)) return blocks(data, type, rows, cols);
        if (type == dtype::bf16) return ConstMatrixView<bf16>(static_cast<const bf16*>(data), rows, cols);
        return ConstMatrixView<float>(static_cast<const float*>(data), rows, cols);
    }

    [[nodiscard]] dtype type() const noexcept { return type_; }
    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t cols() const noexcept { return cols_; }
    /// Elements between rows (f32, bf16); bytes per row for blocks.
    [[nodiscard]] index_t stride() const noexcept { return stride_; }
    /// The bytes the view spans in memory (from its first element to its last).
    [[nodiscard]] std::span<const std::byte> extent() const noexcept {
        if (rows_ == 0 || cols_ == 0) return {};
        if (is_block_format(type_)) return {static_cast<const std::byte*>(data_), std::size_t(rows_ * stride_)};
        const std::size_t elem = size_of(type_);
        return {static_cast<const std::byte*>(data_), std::size_t((rows_ - 1) * stride_ + cols_) * elem};
    }
    /// Row r's bytes: cols elements, or ceil(cols / block_width(type())) blocks in ggml's layout.
    [[nodiscard]] const std::byte* row_bytes(index_t r) const noexcept {
        return static_cast<const std::byte*>(data_) + std::size_t(r * stride_) * (is_block_format(type_) ? 1 : size_of(type_));
    }
    /// Element (r, c) widened to float (a block's element is its value).
    [[nodiscard]] float at(index_t r, index_t c) const noexcept {
        switch (type_) {
        case dtype::f32: return static_cast<const float*>(data_)[r * stride_ + c];
        case dtype::bf16: return static_cast<const bf16*>(data_)[r * stride_ + c].to_float();
        case dtype::q8_0: case dtype::q4_0: case dtype::mxfp4: case dtype::q4_k: break;
        }
        const auto width = index_t(block_width(type_));
        return stored_block_element(row_bytes(r) + weight_bytes(type_, 1, std::size_t(c / width * width)), type_, c % width);
    }

private:
    const void* data_;
    dtype type_;
    index_t rows_, cols_, stride_; ///< stride: elements between rows; bytes for blocks
};

/// Options of a linear map.
struct LinearOptions {
    /// Name used in error messages, e.g. "FfnExpert weight 'up'".
    std::string name = "linear";
    /// C += result instead of C = result.
    bool accumulate = false;
    /// dtype the weights are stored in; defaults to the source's. f32 -> bf16 rounds to nearest
    /// even; q8_0 / q4_0 / mxfp4 quantise blocks of 32 along K, q4_k super-blocks of 256
    /// (core/quant.hpp).
    std::optional<dtype> storage = std::nullopt;
    /// How q8_0 / q4_0 / mxfp4 / q4_k weights compute (core/dtype.hpp); f32 and bf16 storage compute exactly
    /// either way.
    precision prec = precision::exact;
    /// Weights given in bf16 or a block format stay in it (no conversion); `storage` applies to
    /// f32 ones only (kept_storage).
    bool keep_stored = false;
};

/// The dtype weights given as `source` are stored in for `storage` (the source's when unset),
/// unless keep_stored and they are bf16 or a block format, which then stay as they are.
[[nodiscard]] constexpr dtype kept_storage(dtype source, std::optional<dtype> storage, bool keep_stored) noexcept {
    return keep_stored && source != dtype::f32 ? source : storage.value_or(source);
}

/// Where a linear map's backward adds its parameter gradients: dW (N, K) and db (N, or empty
/// when the caller does not want it). Both are accumulated (+=), as gradients are across the
/// token groups of one step.
struct LinearGrads {
    MatrixView<float> weight;
    std::span<float> bias = {};
};

namespace detail {

/// The error for weight element (r, c) of linear map `name` being v, not finite.
[[nodiscard]] inline weight_error non_finite_weight(const std::string& name, index_t r, index_t c, float v) {
    return weight_error(concat(name, ": weight element (", r, ", ", c, ") is ", v, ", expected a finite value"));
}

/// Row r of weight `name` (its values) stored as `type` at `out` (weight_bytes(type, 1,
/// values.size()) bytes), as a linear map stored in that type converts f32 weights: f32 copied;
/// bf16 rounded; q8_0 / q4_0 / mxfp4 / q4_k quantised (values.size() a multiple of 32; q4_k's last
/// super-block zero-padded). Every value is checked
/// finite first (non_finite_weight) unless the type is f32, which validate_linear checks.
inline void store_row(std::span<const float> values, dtype type, std::byte* out, const std::string& name, index_t r) {
    if (type == dtype::f32) {
        std::memcpy(out, values.data(), values.size_bytes());
        return;
    }
    if (const index_t c = find_non_finite(values); c >= 0) throw non_finite_weight(name, r, c, values[std::size_t(c)]);
    const std::size_t blocks = (values.size() + block_width(type) - 1) / block_width(type);
    switch (type) {
    case dtype::bf16:
        for (std::size_t c = 0; c < values.size(); ++c) reinterpret_cast<bf16*>(out)[c] = bf16::from_float(values[c]);
        break;
    case dtype::q8_0: quantize_row(values, std::span(reinterpret_cast<BlockQ8_0*>(out), blocks), concat(name, " row ", r)); break;
    case dtype::q4_0: quantize_row(values, std::span(reinterpret_cast<BlockQ4_0*>(out), blocks), concat(name, " row ", r)); break;
    case dtype::mxfp4: quantize_row(values, std::span(reinterpret_cast<BlockMXFP4*>(out), blocks), concat(name, " row ", r)); break;
    case dtype::q4_k: quantize_row(values, std::span(reinterpret_cast<BlockQ4_K*>(out), blocks), concat(name, " row ", r)); break;
    case dtype::f32: break;
    }
}

/// Checks a weight and bias for a linear map and returns the storage dtype.
inline dtype validate_linear(const WeightView& w, std::span<const float> bias, const LinearOptions& opt) {
    if (!bias.empty() && static_cast<index_t>(bias.size()) != w.rows())
        throw shape_error(concat(opt.name, ": bias has ", bias.size(), " elements, expected ", w.rows(),
                                  " (the weight's rows)"));
    for (index_t r = 0; r < w.rows(); ++r) {
        // the row's first non-finite element: f32 and bf16 rows in place, vectorised; blocks by their scales
        index_t c = -1;
        if (w.type() == dtype::f32)
            c = find_non_finite(std::span<const float>(reinterpret_cast<const float*>(w.row_bytes(r)), std::size_t(w.cols())));
        else if (w.type() == dtype::bf16)
            c = find_non_finite(std::span<const bf16>(reinterpret_cast<const bf16*>(w.row_bytes(r)), std::size_t(w.cols())));
        else
            c = first_non_finite_in_blocks(w.row_bytes(r), w.type(), w.cols());
        if (c >= 0) throw non_finite_weight(opt.name, r, c, w.at(r, c));
    }
    if (const index_t i = find_non_finite(bias); i >= 0)
        throw weight_error(concat(opt.name, ": bias element ", i, " is ", bias[static_cast<std::size_t>(i)],
                                  ", expected a finite value"));
    return kept_storage(w.type(), opt.storage, opt.keep_stored);
}

/// The value a weight element has once stored in an element type (bf16 storage rounds); the
/// block formats are quantised a block at a time (backend/block_linear.hpp).
[[nodiscard]] inline float stored_value(float v, dtype storage) noexcept {
    return storage == dtype::bf16 ? bf16::from_float(v).to_float() : v;
}

/// Checks the activation and output views of a linear call.
inline void check_linear_call(ConstMatrixView<float> a, MatrixView<float> c, index_t k, index_t n,
                              const std::string& name) {
    if (a.cols() != k)
        throw shape_error(concat(name, ": input has ", a.cols(), " columns, expected ", k));
    if (c.rows() != a.rows() || c.cols() != n)
        throw shape_error(concat(name, ": output has shape ", shape_str(c.rows(), c.cols()), ", expected ",
                                 shape_str(a.rows(), n)));
}

/// bias += the column sums of dz, each summed in double in row order (no-op for an empty bias).
inline void add_column_sums(ConstMatrixView<float> dz, std::span<float> bias) {
    for (std::size_t n = 0; n < bias.size(); ++n) {
        double sum = 0;
        for (index_t r = 0; r < dz.rows(); ++r) sum += dz(r, index_t(n));
        bias[n] += float(sum);
    }
}

/// What every backend's linear map knows besides its weights: the name in messages, whether it
/// accumulates, K, N and the storage dtype, validated once. Backends derive from it.
class LinearBase {
public:
    [[nodiscard]] index_t in_features() const noexcept { return k_; }
    [[nodiscard]] index_t out_features() const noexcept { return n_; }
    [[nodiscard]] dtype storage() const noexcept { return storage_; }
    [[nodiscard]] precision prec() const noexcept { return prec_; }

    /// Checks f32 storage, which every backward needs: it computes with the weights as trained,
    /// so a linear stored as bf16 or in blocks (an inference copy) is refused (config_error).
    void check_trainable() const {
        if (storage_ != dtype::f32)
            throw config_error(concat(name_, ": backward needs f32 storage, but the weights are stored as ", to_string(storage_),
                                      " (load or build the layer with f32 storage to train it)"));
    }

    // A linear map is never copied: layers hold theirs through Shared (below), so a copied layer
    // shares its weights on every backend. Moving is allowed.
    LinearBase(const LinearBase&) = delete;
    LinearBase& operator=(const LinearBase&) = delete;
    LinearBase(LinearBase&&) = default;
    LinearBase& operator=(LinearBase&&) = default;
    ~LinearBase() = default;

protected:
    LinearBase(const WeightView& w, std::span<const float> bias, const LinearOptions& opt)
        : name_(opt.name), accumulate_(opt.accumulate), k_(w.cols()), n_(w.rows()), storage_(validate_linear(w, bias, opt)),
          prec_(opt.prec) {}

    /// Checks the views of a call: a (M, K), c (M, N).
    void check_call(ConstMatrixView<float> a, MatrixView<float> c) const { check_linear_call(a, c, k_, n_, name_); }

    /// The gradient of Z = A W^T + b from dc, the gradient of the call's output C = scale * Act(Z):
    /// dc itself for Identity with scale 1 (no copy); else scale * dc * Act'(Z) in scratch taken
    /// from `ws` (backward_scratch_bytes), where `compute_z(z)` first writes Z (each backend
    /// with its own product: the forward's activation is fused, so Z is recomputed).
    template <class Act, class ComputeZ>
    [[nodiscard]] ConstMatrixView<float> affine_gradient(ConstMatrixView<float> dc, float scale, Workspace& ws,
                                                         ComputeZ&& compute_z) const {
        if constexpr (std::is_same_v<Act, Identity>)
            if (scale == 1.0f) return dc;
        MatrixView<float> z = ws.take_matrix<float>(dc.rows(), n_);
        if constexpr (!std::is_same_v<Act, Identity>) compute_z(z);
        for (index_t r = 0; r < dc.rows(); ++r)
            for (index_t c = 0; c < n_; ++c) {
                const double d = std::is_same_v<Act, Identity> ? 1.0 : Act::derivative(double(z(r, c)));
                z(r, c) = float(double(scale) * dc(r, c) * d);
            }
        return z;
    }
    /// Scratch affine_gradient takes for `rows` rows.
    [[nodiscard]] std::size_t affine_gradient_bytes(index_t rows) const noexcept { return padded_bytes<float>(rows, n_); }

    /// Checks a backward call: a (M, K), dc (M, N), da (M, K), gradients (N, K) and N
    /// (or empty), and f32 storage: the backward computes with the weights as trained, so a
    /// linear stored as bf16 or in blocks (an inference copy) is refused; load with f32 storage.
    void check_backward(ConstMatrixView<float> a, ConstMatrixView<float> dc, MatrixView<float> da, const LinearGrads& g) const {
        const ConstMatrixView<float>& dz = dc;
        check_trainable();
        if (a.cols() != k_) throw shape_error(concat(name_, " backward: input has ", a.cols(), " columns, expected ", k_));
        if (dz.rows() != a.rows() || dz.cols() != n_)
            throw shape_error(concat(name_, " backward: output gradient has shape ", shape_str(dz.rows(), dz.cols()), ", expected ",
                                     shape_str(a.rows(), n_)));
        if (da.rows() != a.rows() || da.cols() != k_)
            throw shape_error(concat(name_, " backward: input gradient has shape ", shape_str(da.rows(), da.cols()), ", expected ",
                                     shape_str(a.rows(), k_)));
        if (g.weight.rows() != n_ || g.weight.cols() != k_)
            throw shape_error(concat(name_, " backward: weight gradient has shape ", shape_str(g.weight.rows(), g.weight.cols()),
                                     ", expected ", shape_str(n_, k_)));
        if (!g.bias.empty() && index_t(g.bias.size()) != n_)
            throw shape_error(concat(name_, " backward: bias gradient has ", g.bias.size(), " elements, expected ", n_));
    }

    /// Checks a backward_input call: dz (M, N), da (M, columns) for the input gradient's columns
    /// [k0, k0 + columns) within K, k0 a multiple of `unit` and columns one too unless the tile
    /// reaches K; f32 storage.
    void check_backward_input(ConstMatrixView<float> dz, MatrixView<float> da, index_t k0, index_t unit) const {
        check_trainable();
        if (dz.cols() != n_)
            throw shape_error(concat(name_, " backward_input: output gradient has ", dz.cols(), " columns, expected ", n_));
        if (da.rows() != dz.rows())
            throw shape_error(concat(name_, " backward_input: input gradient has ", da.rows(), " rows, expected ", dz.rows(),
                                     " (the output gradient's)"));
        if (k0 < 0 || da.cols() > k_ - k0)
            throw shape_error(concat(name_, " backward_input: columns [", k0, ", ", k0 + da.cols(), ") of the input gradient, expected ",
                                     "a range within [0, ", k_, ")"));
        if (k0 % unit != 0 || (da.cols() % unit != 0 && k0 + da.cols() != k_))
            throw shape_error(concat(name_, " backward_input: columns [", k0, ", ", k0 + da.cols(), ") of the input gradient, expected ",
                                     "multiples of ", unit, " (backward_column_unit()) or a range that ends at ", k_));
    }

    /// Checks an affine_columns call: a (M, K), z (M, columns) for Z's columns [n0, n0 + columns)
    /// within N, n0 a multiple of `unit` and columns one too unless the tile reaches N; f32
    /// storage.
    void check_affine_columns(ConstMatrixView<float> a, MatrixView<float> z, index_t n0, index_t unit) const {
        check_trainable();
        check_column_range("affine_columns", "Z", a, z, n0, unit);
    }

    /// Checks a forward_columns call: the prepared input (M, K), c (M, columns) for the output's
    /// columns [n0, n0 + columns) within N, n0 a multiple of `unit` and columns one too unless
    /// the tile reaches N.
    void check_forward_columns(ConstMatrixView<float> a, MatrixView<float> c, index_t n0, index_t unit) const {
        check_column_range("forward_columns", "the output", a, c, n0, unit);
    }

    /// Checks a weight_gradient call: a (M, k) and dz (M, n) with k <= K and n <= N, dw (n, k).
    void check_weight_gradient(ConstMatrixView<float> a, ConstMatrixView<float> dz, MatrixView<float> dw) const {
        check_trainable();
        if (a.cols() > k_ || dz.cols() > n_)
            throw shape_error(concat(name_, " weight_gradient: input block has ", a.cols(), " columns and output gradient block ",
                                     dz.cols(), ", expected at most ", k_, " and ", n_));
        if (dz.rows() != a.rows())
            throw shape_error(concat(name_, " weight_gradient: output gradient has ", dz.rows(), " rows, expected ", a.rows(),
                                     " (the input's)"));
        if (dw.rows() != dz.cols() || dw.cols() != a.cols())
            throw shape_error(concat(name_, " weight_gradient: weight gradient block has shape ", shape_str(dw.rows(), dw.cols()),
                                     ", expected ", shape_str(dz.cols(), a.cols())));
    }

    /// Checks a tile of a product's columns: a (M, K), z (M, columns) for `what`'s columns
    /// [n0, n0 + columns) within N, in multiples of `unit` (forward_column_unit()) unless the
    /// tile reaches N.
    void check_column_range(std::string_view call, std::string_view what, ConstMatrixView<float> a, MatrixView<float> z, index_t n0,
                            index_t unit) const {
        if (a.cols() != k_) throw shape_error(concat(name_, " ", call, ": input has ", a.cols(), " columns, expected ", k_));
        if (z.rows() != a.rows())
            throw shape_error(concat(name_, " ", call, ": output has ", z.rows(), " rows, expected ", a.rows(), " (the input's)"));
        if (n0 < 0 || z.cols() > n_ - n0)
            throw shape_error(concat(name_, " ", call, ": columns [", n0, ", ", n0 + z.cols(), ") of ", what,
                                     ", expected a range within [0, ", n_, ")"));
        if (n0 % unit != 0 || (z.cols() % unit != 0 && n0 + z.cols() != n_))
            throw shape_error(concat(name_, " ", call, ": columns [", n0, ", ", n0 + z.cols(), ") of ", what, ", expected multiples of ",
                                     unit, " (forward_column_unit()) or a range that ends at ", n_));
    }

    std::string name_;
    bool accumulate_;
    index_t k_, n_;
    dtype storage_;
    precision prec_;
};

/// A linear map in shared, immutable ownership. Every layer holds its linear maps this way, so
/// copying a layer (an expert, an MoE layer, a loaded block) is cheap and shares the weights,
/// the same on every backend; the weights are never written after construction, so copies used
/// from several threads at once are as safe as one layer is. To get separate memory, build or
/// load the layer again.
template <class L>
class Shared {
public:
    template <class... Args>
    explicit Shared(std::in_place_t, Args&&... args) : p_(std::make_shared<const L>(std::forward<Args>(args)...)) {}

    [[nodiscard]] const L& operator*() const noexcept { return *p_; }
    [[nodiscard]] const L* operator->() const noexcept { return p_.get(); }
    /// Calls the linear map.
    template <class... A>
    void operator()(A&&... args) const {
        (*p_)(std::forward<A>(args)...);
    }

private:
    std::shared_ptr<const L> p_;
};

/// c = scale * Act(c + bias), in place, row by row. With Identity, no bias and scale 1 that is c
/// as it is (the pass would only turn -0 into +0), so it returns without reading c.
template <class Act>
void epilogue_in_place(MatrixView<float> c, const float* bias, float scale) noexcept {
    if constexpr (std::is_same_v<Act, Identity>)
        if (bias == nullptr && scale == 1.0f) return;
    for (index_t r = 0; r < c.rows(); ++r) {
        float* row = c.row(r).data();
        HYPERMOE_SIMD
        for (index_t j = 0; j < c.cols(); ++j)
            row[j] = scale * Act::apply(row[j] + (bias != nullptr ? bias[j] : 0.0f));
    }
}

/// c += scale * Act(t + bias).
template <class Act>
void epilogue_accumulate(ConstMatrixView<float> t, MatrixView<float> c, const float* bias, float scale) noexcept {
    for (index_t r = 0; r < c.rows(); ++r) {
        const float* src = t.row(r).data();
        float* row = c.row(r).data();
        HYPERMOE_SIMD
        for (index_t j = 0; j < c.cols(); ++j)
            row[j] += scale * Act::apply(src[j] + (bias != nullptr ? bias[j] : 0.0f));
    }
}

/// c = [c +] scale * Act(bias), for K = 0, where A W^T is zero.
template <class Act>
void epilogue_bias_only(MatrixView<float> c, const float* bias, float scale, bool accumulate) noexcept {
    for (index_t r = 0; r < c.rows(); ++r)
        for (index_t j = 0; j < c.cols(); ++j) {
            const float v = scale * Act::apply(bias != nullptr ? bias[j] : 0.0f);
            c(r, j) = accumulate ? c(r, j) + v : v;
        }
}

} // namespace detail
} // namespace hypermoe
