#pragma once
// An Expert is a Layer of width d_model -> d_model with a hidden width d_ff. Experts check
// shapes but not finiteness: the layer that owns them checks its input once.

#include <concepts>
#include <string_view>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/layer/layer_concept.hpp"

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

/// Checks a weight's shape against (rows, cols) and that it agrees with the type's static widths.
inline void check_weight_shape(const WeightView& w, index_t rows, index_t cols, std::string_view who,
                               std::string_view what) {
    if (w.rows() != rows || w.cols() != cols)
        throw weight_error(concat(who, ": weight '", what, "' has shape ", shape_str(w.rows(), w.cols()),
                                  ", expected ", shape_str(rows, cols)));
}

/// A width read off a weight must agree with the type's static width: a weight_error otherwise.
inline void check_weight_width(index_t static_value, index_t from_weight, std::string_view who,
                               std::string_view width, std::string_view what) {
    if (static_value != dynamic && static_value != from_weight)
        throw weight_error(concat(who, ": weight '", what, "' gives ", width, " = ", from_weight,
                                  ", but the type fixes ", width, " = ", static_value));
}

} // namespace detail
} // namespace hypermoe
