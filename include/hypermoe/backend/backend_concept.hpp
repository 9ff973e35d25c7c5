#pragma once
// The Backend concept. A backend is a tag type with a name and a class template
// `linear<Act>`: C = [C +] scale * Act(A W^T + b) for activations A (M x K, f32, M known only
// at run time) and weights W (N x K) prepared once, at construction, into the backend's
// preferred layout; and its backward, for weights stored as f32: from dC, dZ = scale dC
// Act'(Z), then dA [+]= dZ W, dW += dZ^T A, db += sums of dZ, whole or a tile at a time; the
// forward too runs whole or a tile of output columns at a time.
// Dispatch is hoisted: a component's backend is part of its type.

#include <concepts>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>

#include "hypermoe/backend/block_linear.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/workspace.hpp"

namespace hypermoe {

/// A prepared linear map of one backend.
template <class L>
concept LinearMap = std::constructible_from<L, WeightView, std::span<const float>, LinearOptions> &&
    requires(const L& l, ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, index_t m) {
        { l.in_features() } -> std::same_as<index_t>;
        { l.out_features() } -> std::same_as<index_t>;
        { l.storage() } -> std::same_as<dtype>;
        { l.workspace_bytes(m) } -> std::same_as<std::size_t>;
        l(a, c, ws, 1.0f);
        // The forward a tile at a time (for a pool of work items, MoeLayer's forward): the input
        // made ready once for all tiles (rounded or quantised for `fast`), then columns
        // [n0, n0 + c.cols()) of the call's c, in multiples of forward_column_unit(), on the
        // calling thread, with the bits of the whole call.
        { l.prepared_bytes(m) } -> std::same_as<std::size_t>;
        { l.prepare(a, ws) } -> std::same_as<PreparedInput>;
        { l.forward_columns_workspace_bytes(m, m) } -> std::same_as<std::size_t>;
        l.forward_columns(std::declval<const PreparedInput&>(), c, m, ws, 1.0f);
    } && requires(const L& l, ConstMatrixView<float> a, ConstMatrixView<float> dz, MatrixView<float> da, const LinearGrads& g,
                  Workspace& ws, index_t m) {
        // Backward of operator(): from dc = dL/dC, dz = scale dc Act'(Z) is the gradient of
        // Z = a W^T + b; da [+]= dz W, g.weight += dz^T a, g.bias += sums of dz.
        { l.backward_workspace_bytes(m) } -> std::same_as<std::size_t>;
        l.backward(a, dz, da, g, ws, false, 1.0f);
        // Its products a tile at a time (for a pool of work items, MoeLayer's backward):
        // columns [n0, n0 + c.cols()) of the pre-activation Z = a W^T + b, in multiples of
        // forward_column_unit(); columns [k0, k0 + da.cols()) of da [+]= dz W, in multiples of
        // backward_column_unit(); a block of g.weight += dz^T a from column blocks of dz and a.
        { l.forward_column_unit() } -> std::same_as<index_t>;
        { l.affine_columns_workspace_bytes(m, m) } -> std::same_as<std::size_t>;
        l.affine_columns(a, da, m, ws);
        { l.backward_column_unit() } -> std::same_as<index_t>;
        { l.backward_input_workspace_bytes(m, m) } -> std::same_as<std::size_t>;
        l.backward_input(dz, da, m, ws, false);
        { l.weight_gradient_workspace_bytes(m, m, m) } -> std::same_as<std::size_t>;
        l.weight_gradient(a, dz, da, ws);
    };

/// A compute backend: a tag with `name` and `linear<Act>` for every activation.
template <class B>
concept Backend = requires {
    { B::name } -> std::convertible_to<std::string_view>;
} && LinearMap<typename B::template linear<Identity>> && LinearMap<typename B::template linear<Relu>> &&
    LinearMap<typename B::template linear<Silu>>;

} // namespace hypermoe
