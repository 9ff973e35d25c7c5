#pragma once
// Residual<Inner>: y = x + Inner(x), for an inner layer whose output width equals its input width.

#include <utility>

#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/layer_concept.hpp"

namespace hypermoe {

template <Layer Inner>
class Residual {
    static_assert(detail::extent_compatible(Inner::static_in_width, Inner::static_out_width),
                  "Residual: the inner layer's static output width must equal its static input width.");

public:
    using inner_type = Inner;
    static constexpr index_t static_in_width =
        Inner::static_in_width != dynamic ? Inner::static_in_width : Inner::static_out_width;
    static constexpr index_t static_out_width = static_in_width;

    explicit Residual(Inner inner) : inner_(std::move(inner)) {
        if (inner_.in_width() != inner_.out_width())
            throw shape_error(detail::concat("Residual: the inner layer maps ", inner_.in_width(), " to ",
                                             inner_.out_width(), " columns, expected equal widths"));
    }

    [[nodiscard]] index_t in_width() const noexcept { return inner_.in_width(); }
    [[nodiscard]] index_t out_width() const noexcept { return inner_.out_width(); }
    [[nodiscard]] const Inner& inner() const noexcept { return inner_; }
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const { return inner_.workspace_bytes(rows); }

    /// x and y must not overlap.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx = {}) const {
        detail::check_forward_shapes(x, y, in_width(), out_width(), "Residual");
        inner_.forward(x, y, ws, ctx);
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t j = 0; j < x.cols(); ++j) y(r, j) += x(r, j);
    }

    /// The inner layer's gradients (`pool...`: what a stack passes down for HyperMoE layers that
    /// share a hypernetwork; see Sequential::make_gradients).
    template <class... Pool>
    [[nodiscard]] auto make_gradients(Pool&... pool) const
        requires requires(const Inner& i) { i.make_gradients(); }
    {
        if constexpr (requires { inner_.make_gradients(pool...); }) return inner_.make_gradients(pool...);
        else return inner_.make_gradients();
    }
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const
        requires TrainableLayer<Inner>
    {
        return inner_.backward_workspace_bytes(rows);
    }

    /// dx = dy + the inner layer's dx; its parameter gradients added to g.
    template <class G>
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, G& g, Workspace& ws,
                  const Context& ctx = {}) const
        requires TrainableLayer<Inner>
    {
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "Residual");
        inner_.backward(x, dy, dx, g, ws, ctx);
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t j = 0; j < x.cols(); ++j) dx(r, j) += dy(r, j);
    }

private:
    Inner inner_;
};

} // namespace hypermoe
