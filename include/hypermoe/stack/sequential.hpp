#pragma once
// Sequential<Layers...>: layers applied in order, composed at compile time. Where two adjacent
// widths are both static they must agree (a compile error otherwise); where either is dynamic
// they are checked once, at construction. Intermediate activations ping-pong between two
// buffers taken from the workspace; the last layer writes straight into y.

#include <algorithm>
#include <array>
#include <cstddef>
#include <tuple>
#include <utility>

#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/layer_concept.hpp"

namespace hypermoe {

namespace detail {
template <class... Ls>
[[nodiscard]] constexpr bool adjacent_widths_compatible() noexcept {
    constexpr std::array<index_t, sizeof...(Ls)> in{Ls::static_in_width...};
    constexpr std::array<index_t, sizeof...(Ls)> out{Ls::static_out_width...};
    for (std::size_t i = 0; i + 1 < sizeof...(Ls); ++i)
        if (!extent_compatible(out[i], in[i + 1])) return false;
    return true;
}
} // namespace detail

template <Layer... Ls>
class Sequential {
    static_assert(sizeof...(Ls) > 0, "Sequential needs at least one layer.");
    static_assert(detail::adjacent_widths_compatible<Ls...>(),
                  "Sequential: a layer's static output width must equal the next layer's static input width.");

    using First = std::tuple_element_t<0, std::tuple<Ls...>>;
    using Last = std::tuple_element_t<sizeof...(Ls) - 1, std::tuple<Ls...>>;

public:
    static constexpr index_t static_in_width = First::static_in_width;
    static constexpr index_t static_out_width = Last::static_out_width;
    static constexpr std::size_t size = sizeof...(Ls);

    explicit Sequential(Ls... layers) : layers_(std::move(layers)...) {
        check_widths(std::index_sequence_for<Ls...>{});
    }

    [[nodiscard]] index_t in_width() const noexcept { return std::get<0>(layers_).in_width(); }
    [[nodiscard]] index_t out_width() const noexcept { return std::get<size - 1>(layers_).out_width(); }
    template <std::size_t I>
    [[nodiscard]] const auto& layer() const noexcept { return std::get<I>(layers_); }

    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        std::size_t inner = 0;
        std::apply([&](const auto&... l) { ((inner = std::max(inner, l.workspace_bytes(rows))), ...); }, layers_);
        return 2 * detail::padded_bytes<float>(rows, max_hidden_width()) + inner;
    }

    /// Runs the layers in order; each gets `ctx` (token ids, sequence layout, routing sink).
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx = {}) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "Sequential");
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        const index_t w = max_hidden_width();
        std::array<float*, 2> buffers{ws.take<float>(x.rows() * w).data(), ws.take<float>(x.rows() * w).data()};
        forward_from<0>(x, y, ws, ctx, buffers);
    }

private:
    template <std::size_t... I>
    void check_widths(std::index_sequence<I...>) const {
        (check_pair<I>(), ...);
    }
    template <std::size_t I>
    void check_pair() const {
        if constexpr (I + 1 < size) {
            const index_t out = std::get<I>(layers_).out_width(), in = std::get<I + 1>(layers_).in_width();
            if (out != in)
                throw shape_error(detail::concat("Sequential: layer ", I, " outputs ", out, " columns, but layer ",
                                                 I + 1, " expects ", in));
        }
    }

    /// Widest output of any layer but the last (the intermediates' buffer width).
    [[nodiscard]] index_t max_hidden_width() const noexcept {
        index_t w = 0;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((w = I + 1 < size ? std::max(w, std::get<I>(layers_).out_width()) : w), ...);
        }(std::index_sequence_for<Ls...>{});
        return w;
    }

    template <std::size_t I>
    void forward_from(ConstMatrixView<float> in, MatrixView<float> y, Workspace& ws, const Context& ctx,
                      const std::array<float*, 2>& buffers) const {
        const auto& l = std::get<I>(layers_);
        if constexpr (I + 1 == size) {
            l.forward(in, y, ws, ctx);
        } else {
            MatrixView<float> out(buffers[I % 2], in.rows(), l.out_width());
            l.forward(in, out, ws, ctx);
            forward_from<I + 1>(out, y, ws, ctx, buffers);
        }
    }

    std::tuple<Ls...> layers_;
};

} // namespace hypermoe
