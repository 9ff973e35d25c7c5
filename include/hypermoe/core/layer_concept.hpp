#pragma once
// The Layer concept: a row-wise map from (M, in_width) to (M, out_width) activations. Widths
// are static (a compile-time constant) or `dynamic`; the row count M is always a run-time value.
// A layer reports the scratch it needs for M rows and takes it from the caller's Workspace, so a
// forward call allocates nothing once the workspace has grown (see core/workspace.hpp). Its
// forward takes the call's Context (core/context.hpp) and passes it to what it contains.
//
// Also here, below every part that builds layers: the shape checks they share.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>

#include "hypermoe/core/context.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/workspace.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

template <class L>
concept Layer = requires(const L& layer, ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, index_t rows,
                         const Context& ctx) {
    { L::static_in_width } -> std::convertible_to<index_t>;
    { L::static_out_width } -> std::convertible_to<index_t>;
    { layer.in_width() } -> std::same_as<index_t>;
    { layer.out_width() } -> std::same_as<index_t>;
    { layer.workspace_bytes(rows) } -> std::same_as<std::size_t>;
    layer.forward(x, y, ws, ctx);
    layer.forward(x, y, ws); // the context defaults to Context{}
};

/// The gradient type of a layer: what its make_gradients() returns.
template <class L>
using gradients_of = decltype(std::declval<const L&>().make_gradients());

/// A Layer with a backward pass: make_gradients() gives zeroed gradients of its parameters, and
/// backward(x, dy, dx, g, ws, ctx) writes dx = dL/dx from dy = dL/dy and adds the parameter
/// gradients to g, recomputing what it needs from x (docs/training.md).
template <class L>
concept TrainableLayer = Layer<L> && requires { typename gradients_of<L>; } &&
    requires(const L& layer, ConstMatrixView<float> x, MatrixView<float> dx, gradients_of<L>& g, Workspace& ws, index_t rows,
             const Context& ctx) {
        { layer.backward_workspace_bytes(rows) } -> std::same_as<std::size_t>;
        layer.backward(x, x, dx, g, ws, ctx);
    };

namespace detail {

/// Whether the memory two views span (first element to last) overlaps.
template <class A, class B>
[[nodiscard]] bool overlap(const MatrixView<A>& a, const MatrixView<B>& b) noexcept {
    if (a.rows() == 0 || a.cols() == 0 || b.rows() == 0 || b.cols() == 0) return false;
    const auto begin = [](const auto& m) { return reinterpret_cast<std::uintptr_t>(m.data()); };
    const auto end = [](const auto& m) {
        return reinterpret_cast<std::uintptr_t>(m.data() + (m.rows() - 1) * m.stride() + m.cols());
    };
    return begin(a) < end(b) && begin(b) < end(a);
}

/// Shape checks shared by every layer's forward: x is (M, in), y is (M, out), y not overlapping x.
inline void check_forward_shapes(ConstMatrixView<float> x, MatrixView<float> y, index_t in, index_t out,
                                 std::string_view who) {
    if (x.cols() != in)
        throw shape_error(concat(who, "::forward: input x has ", x.cols(), " columns, expected ", in));
    if (y.rows() != x.rows() || y.cols() != out)
        throw shape_error(concat(who, "::forward: output y has shape ", shape_str(y.rows(), y.cols()),
                                 ", expected ", shape_str(x.rows(), out)));
    if (overlap(x, y))
        throw shape_error(concat(who, "::forward: output y overlaps input x; in-place forward is not supported, "
                                      "expected separate buffers"));
}

/// Checks an optional buffer beside x (empty: none): (M, width) for x (M, .), apart from x.
/// `subject()` names it in the message (made only on an error: the checks run on every call and
/// allocate nothing); `plural` takes the verbs' plural form.
template <class Subject>
void check_beside_input(ConstMatrixView<float> x, ConstMatrixView<float> m, index_t width, Subject&& subject, bool plural) {
    if (m.data() == nullptr) return;
    if (m.rows() != x.rows() || m.cols() != width)
        throw shape_error(concat(subject(), plural ? " have shape " : " has shape ", shape_str(m.rows(), m.cols()), ", expected ",
                                 shape_str(x.rows(), width)));
    if (overlap(x, m)) throw shape_error(concat(subject(), plural ? " overlap" : " overlaps", " input x, expected separate buffers"));
}

/// Checks the forward output a backward was asked for (empty: none): y (M, out), apart from x.
inline void check_backward_output(ConstMatrixView<float> x, MatrixView<float> y, index_t out, std::string_view who) {
    check_beside_input(x, y, out, [&] { return concat(who, "::backward: output y"); }, false);
}

/// Checks activations a forward keeps for its backward, or a backward was given (empty: none):
/// (M, width) for x (M, .), apart from x.
inline void check_kept(ConstMatrixView<float> x, ConstMatrixView<float> kept, index_t width, std::string_view who,
                       std::string_view what) {
    check_beside_input(x, kept, width, [&] { return concat(who, ": kept activations '", what, "'"); }, true);
}

/// One gradient a backward was given: its name, shape, and the expected shape (a
/// vector as (n, 1), an absent bias as (0, 1)).
struct GradientShape {
    const char* name;
    index_t rows, cols, expected_rows, expected_cols;
};

/// A shape_error naming the first gradient whose shape is not the expected one.
inline void check_gradient_shapes(std::string_view who, std::initializer_list<GradientShape> shapes) {
    for (const auto& s : shapes) {
        if (s.rows == s.expected_rows && s.cols == s.expected_cols) continue;
        if (s.expected_cols == 1)
            throw shape_error(concat(who, "::backward: gradient '", s.name, "' has ", s.rows, " elements, expected ", s.expected_rows,
                                     " (use make_gradients())"));
        throw shape_error(concat(who, "::backward: gradient '", s.name, "' has shape ", shape_str(s.rows, s.cols), ", expected ",
                                 shape_str(s.expected_rows, s.expected_cols), " (use make_gradients())"));
    }
}

/// Checks the views of a backward call: x (M, in), dy (M, out), dx (M, in), dx overlapping
/// neither x nor dy.
inline void check_backward_shapes(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, index_t in,
                                  index_t out, std::string_view who) {
    if (x.cols() != in) throw shape_error(concat(who, "::backward: input x has ", x.cols(), " columns, expected ", in));
    if (dy.rows() != x.rows() || dy.cols() != out)
        throw shape_error(concat(who, "::backward: output gradient dy has shape ", shape_str(dy.rows(), dy.cols()),
                                 ", expected ", shape_str(x.rows(), out)));
    if (dx.rows() != x.rows() || dx.cols() != in)
        throw shape_error(concat(who, "::backward: input gradient dx has shape ", shape_str(dx.rows(), dx.cols()),
                                 ", expected ", shape_str(x.rows(), in)));
    if (overlap(x, dx) || overlap(dy, dx))
        throw shape_error(concat(who, "::backward: dx overlaps x or dy; expected separate buffers"));
}

/// Checks a weight's shape against (rows, cols) and that it agrees with the type's static widths.
template <class W> // WeightView, or any view with rows() and cols()
void check_weight_shape(const W& w, index_t rows, index_t cols, std::string_view who,
                               std::string_view what) {
    if (w.rows() != rows || w.cols() != cols)
        throw shape_error(concat(who, ": weight '", what, "' has shape ", shape_str(w.rows(), w.cols()),
                                  ", expected ", shape_str(rows, cols)));
}

/// A width read off a weight must agree with the type's static width. Every width mismatch, wherever
/// it is detected (a call's views, composed layers, a part's weights, a type's static width against
/// a weight or a config), is a shape_error.
inline void check_weight_width(index_t static_value, index_t from_weight, std::string_view who,
                               std::string_view width, std::string_view what) {
    if (static_value != dynamic && static_value != from_weight)
        throw shape_error(concat(who, ": weight '", what, "' gives ", width, " = ", from_weight,
                                  ", but the type fixes ", width, " = ", static_value));
}

} // namespace detail
} // namespace hypermoe
