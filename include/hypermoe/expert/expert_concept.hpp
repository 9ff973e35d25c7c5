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

/// What both expert kinds share: their types, static widths and width getters.
template <class B, class Act, index_t D, index_t FF>
class ExpertWidths {
public:
    using backend_type = B;
    using activation_type = Act;
    static constexpr index_t static_d_model = D;
    static constexpr index_t static_d_ff = FF;
    static constexpr index_t static_in_width = D;
    static constexpr index_t static_out_width = D;

    [[nodiscard]] index_t d_model() const noexcept { return extents_.extent(0); }
    [[nodiscard]] index_t d_ff() const noexcept { return extents_.extent(1); }
    [[nodiscard]] index_t in_width() const noexcept { return d_model(); }
    [[nodiscard]] index_t out_width() const noexcept { return d_model(); }
    [[nodiscard]] const extents<D, FF>& widths() const noexcept { return extents_; }

protected:
    explicit ExpertWidths(extents<D, FF> e) : extents_(e) {}

private:
    extents<D, FF> extents_;
};

} // namespace detail
} // namespace hypermoe
