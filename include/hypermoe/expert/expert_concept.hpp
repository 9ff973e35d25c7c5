#pragma once
// An Expert is a Layer of width d_model -> d_model with a hidden width d_ff. Experts check
// shapes but not finiteness: the layer that owns them checks its input once.

#include <concepts>
#include <initializer_list>
#include <string_view>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/layer_concept.hpp"

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

/// One gradient an expert's backward was given: its name, shape, and the expected shape (a
/// vector as (n, 1), an absent bias as (0, 1)).
struct GradientShape {
    const char* name;
    index_t rows, cols, expected_rows, expected_cols;
};

/// A shape_error naming the first gradient whose shape is not the expected one.
inline void check_expert_gradients(std::string_view who, std::initializer_list<GradientShape> shapes) {
    for (const auto& s : shapes) {
        if (s.rows == s.expected_rows && s.cols == s.expected_cols) continue;
        if (s.expected_cols == 1)
            throw shape_error(concat(who, "::backward: gradient '", s.name, "' has ", s.rows, " elements, expected ", s.expected_rows,
                                     " (use make_gradients())"));
        throw shape_error(concat(who, "::backward: gradient '", s.name, "' has shape ", shape_str(s.rows, s.cols), ", expected ",
                                 shape_str(s.expected_rows, s.expected_cols), " (use make_gradients())"));
    }
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
