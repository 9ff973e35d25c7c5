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
#include "hypermoe/hyper/hypernetwork.hpp"

namespace hypermoe {

namespace detail {
/// A layer's gradients, through `pool` where the layer takes one (HyperMoE layers, and
/// composites that pass it down).
template <class L>
[[nodiscard]] auto make_layer_gradients(const L& layer, HypernetworkGradientPool& pool) {
    if constexpr (requires { layer.make_gradients(pool); }) return layer.make_gradients(pool);
    else return layer.make_gradients();
}

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

    /// The gradients of every layer, in a tuple. HyperMoE layers that share a hypernetwork get
    /// one set of its gradients (through one HypernetworkGradientPool, or the caller's).
    [[nodiscard]] auto make_gradients() const
        requires(TrainableLayer<Ls> && ...)
    {
        HypernetworkGradientPool pool;
        return make_gradients(pool);
    }
    [[nodiscard]] auto make_gradients(HypernetworkGradientPool& pool) const
        requires(TrainableLayer<Ls> && ...)
    {
        return std::apply([&](const auto&... l) { return std::tuple{detail::make_layer_gradients(l, pool)...}; }, layers_);
    }

    /// Scratch of backward(): every intermediate activation (kept for the layers' backward),
    /// two gradient buffers, and the most any layer's forward or backward takes.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const
        requires(TrainableLayer<Ls> && ...)
    {
        std::size_t inner = 0, kept = 0;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((inner = std::max({inner, std::get<I>(layers_).workspace_bytes(rows), std::get<I>(layers_).backward_workspace_bytes(rows)}),
              kept += I + 1 < size ? detail::padded_bytes<float>(rows, std::get<I>(layers_).out_width()) : 0),
             ...);
        }(std::index_sequence_for<Ls...>{});
        return kept + 2 * detail::padded_bytes<float>(rows, max_in_width()) + inner;
    }

    /// The backward of forward(x, y, ctx): runs the layers forward once more, keeping every
    /// intermediate activation (the routing sink is not called again), then each layer's
    /// backward in reverse order; dx = dL/dx, the layers' gradients added to g.
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                  const Context& ctx = {}) const
        requires(TrainableLayer<Ls> && ...)
    {
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "Sequential");
        Workspace::Scope scope(ws, backward_workspace_bytes(x.rows()));
        Context quiet = ctx;
        quiet.routing_sink = nullptr;
        std::array<MatrixView<float>, size> acts{}; // acts[I]: layer I's output (I < size - 1)
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((acts[I] = I + 1 < size ? ws.take_matrix<float>(x.rows(), std::get<I>(layers_).out_width()) : MatrixView<float>{}), ...);
        }(std::index_sequence_for<Ls...>{});
        const index_t w = max_in_width();
        const std::array<float*, 2> grads{ws.take<float>(x.rows() * w).data(), ws.take<float>(x.rows() * w).data()};
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((I + 1 < size ? std::get<I>(layers_).forward(I == 0 ? x : ConstMatrixView<float>(acts[I == 0 ? 0 : I - 1]), acts[I], ws, quiet)
                           : void()),
             ...);
        }(std::index_sequence_for<Ls...>{});
        backward_from<size - 1>(x, dy, dx, g, ws, quiet, acts, grads);
    }

private:
    /// Widest input of any layer but the first (the gradient buffers' width).
    [[nodiscard]] index_t max_in_width() const noexcept {
        index_t w = 0;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((w = I > 0 ? std::max(w, std::get<I>(layers_).in_width()) : w), ...);
        }(std::index_sequence_for<Ls...>{});
        return w;
    }

    template <std::size_t I, class G>
    void backward_from(ConstMatrixView<float> x, ConstMatrixView<float> dout, MatrixView<float> dx, G& g, Workspace& ws,
                       const Context& ctx, const std::array<MatrixView<float>, size>& acts,
                       const std::array<float*, 2>& grads) const {
        const auto& l = std::get<I>(layers_);
        if constexpr (I == 0) {
            l.backward(x, dout, dx, std::get<0>(g), ws, ctx);
        } else {
            MatrixView<float> din(grads[I % 2], x.rows(), l.in_width());
            l.backward(acts[I - 1], dout, din, std::get<I>(g), ws, ctx);
            backward_from<I - 1>(x, din, dx, g, ws, ctx, acts, grads);
        }
    }

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
