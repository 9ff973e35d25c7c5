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
