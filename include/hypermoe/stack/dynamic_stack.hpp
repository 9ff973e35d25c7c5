#pragma once
// DynamicStack: layers chosen at run time (e.g. read from a checkpoint), type-erased once here
// so every other part of the library stays static. Widths are checked as layers are added;
// a mismatch is a shape_error naming the layer index.

#include <algorithm>
#include <any>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/stack/sequential.hpp" // detail::make_layer_gradients, HypernetworkGradientPool

namespace hypermoe {

class DynamicStack {
public:
    DynamicStack() = default;

    /// Appends a layer; its input width must equal the current output width.
    template <Layer L>
    DynamicStack& push_back(L layer) {
        if (!layers_.empty() && layer.in_width() != out_width())
            throw shape_error(detail::concat("DynamicStack: layer ", layers_.size(), " expects ", layer.in_width(),
                                             " columns, but layer ", layers_.size() - 1, " outputs ", out_width()));
        layers_.push_back(std::make_unique<Model<L>>(std::move(layer)));
        return *this;
    }

    [[nodiscard]] std::size_t size() const noexcept { return layers_.size(); }
    [[nodiscard]] bool empty() const noexcept { return layers_.empty(); }
    [[nodiscard]] index_t in_width() const noexcept { return layers_.empty() ? 0 : layers_.front()->in_width(); }
    [[nodiscard]] index_t out_width() const noexcept { return layers_.empty() ? 0 : layers_.back()->out_width(); }

    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
        std::size_t inner = 0;
        index_t hidden = 0;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            inner = std::max(inner, layers_[i]->workspace_bytes(rows));
            if (i + 1 < layers_.size()) hidden = std::max(hidden, layers_[i]->out_width());
        }
        return 2 * detail::padded_bytes<float>(rows, hidden) + inner;
    }

    /// Runs the layers in order; each gets `ctx` (token ids, sequence layout, routing sink).
    void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx = {}) const {
        if (layers_.empty()) throw shape_error("DynamicStack::forward: the stack has no layers");
        detail::check_forward_shapes(x, y, in_width(), out_width(), "DynamicStack");
        Workspace::Scope scope(ws, workspace_bytes(x.rows()));
        index_t hidden = 0;
        for (std::size_t i = 0; i + 1 < layers_.size(); ++i) hidden = std::max(hidden, layers_[i]->out_width());
        float* buffers[2] = {ws.take<float>(x.rows() * hidden).data(), ws.take<float>(x.rows() * hidden).data()};
        ConstMatrixView<float> in = x;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            if (i + 1 == layers_.size()) {
                layers_[i]->forward(in, y, ws, ctx);
            } else {
                MatrixView<float> out(buffers[i % 2], x.rows(), layers_[i]->out_width());
                layers_[i]->forward(in, out, ws, ctx);
                in = out;
            }
        }
    }

    /// Every layer's gradients, type-erased: element i holds layer i's (std::any_cast to its
    /// gradients_of<L>). HyperMoE layers that share a hypernetwork share one set of its
    /// gradients. A layer without a backward is a config_error naming its index.
    [[nodiscard]] std::vector<std::any> make_gradients() const {
        HypernetworkGradientPool pool;
        return make_gradients(pool);
    }
    [[nodiscard]] std::vector<std::any> make_gradients(HypernetworkGradientPool& pool) const {
        std::vector<std::any> g;
        for (std::size_t i = 0; i < layers_.size(); ++i) g.push_back(layers_[i]->make_gradients(pool, i));
        return g;
    }

    /// Scratch of backward(): the intermediate activations, two gradient buffers and the most
    /// any layer's forward or backward takes.
    [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const {
        std::size_t inner = 0, kept = 0;
        index_t widest = 0;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            inner = std::max({inner, layers_[i]->workspace_bytes(rows), layers_[i]->backward_workspace_bytes(rows)});
            if (i + 1 < layers_.size()) kept += detail::padded_bytes<float>(rows, layers_[i]->out_width());
            if (i > 0) widest = std::max(widest, layers_[i]->in_width());
        }
        return detail::padded_bytes<float*>(index_t(layers_.size())) + kept + 2 * detail::padded_bytes<float>(rows, widest) + inner;
    }

    /// The backward of forward(x, y, ctx), as Sequential::backward: the layers run forward once
    /// more keeping their outputs (the routing sink is not called again), then backward in
    /// reverse order. `g` must come from make_gradients().
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, std::vector<std::any>& g, Workspace& ws,
                  const Context& ctx = {}) const {
        if (layers_.empty()) throw shape_error("DynamicStack::backward: the stack has no layers");
        detail::check_backward_shapes(x, dy, dx, in_width(), out_width(), "DynamicStack");
        if (g.size() != layers_.size())
            throw shape_error(detail::concat("DynamicStack::backward: gradients for ", g.size(), " layers, expected ", layers_.size(),
                                             " (use make_gradients())"));
        const std::size_t n = layers_.size();
        const index_t rows = x.rows();
        Workspace::Scope scope(ws, backward_workspace_bytes(rows));
        Context quiet = ctx;
        quiet.routing_sink = nullptr;
        index_t widest = 0;
        for (std::size_t i = 1; i < n; ++i) widest = std::max(widest, layers_[i]->in_width());
        // Layer i's output (i < n - 1), kept for the backward pass.
        const std::span<float*> kept = ws.take<float*>(index_t(n - 1));
        for (std::size_t i = 0; i + 1 < n; ++i) kept[i] = ws.take_matrix<float>(rows, layers_[i]->out_width()).data();
        const auto act = [&](std::size_t i) { return MatrixView<float>(kept[i], rows, layers_[i]->out_width()); };
        float* grads[2] = {ws.take<float>(rows * widest).data(), ws.take<float>(rows * widest).data()};
        for (std::size_t i = 0; i + 1 < n; ++i) layers_[i]->forward(i == 0 ? x : ConstMatrixView<float>(act(i - 1)), act(i), ws, quiet);
        ConstMatrixView<float> dout = dy;
        for (std::size_t i = n; i-- > 0;) {
            const ConstMatrixView<float> in = i == 0 ? x : ConstMatrixView<float>(act(i - 1));
            const MatrixView<float> din = i == 0 ? dx : MatrixView<float>(grads[i % 2], rows, layers_[i]->in_width());
            layers_[i]->backward(in, dout, din, g[i], ws, quiet, i);
            dout = din;
        }
    }

private:
    struct Concept {
        virtual ~Concept() = default;
        [[nodiscard]] virtual index_t in_width() const noexcept = 0;
        [[nodiscard]] virtual index_t out_width() const noexcept = 0;
        [[nodiscard]] virtual std::size_t workspace_bytes(index_t rows) const = 0;
        virtual void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx) const = 0;
        [[nodiscard]] virtual std::any make_gradients(HypernetworkGradientPool& pool, std::size_t index) const = 0;
        [[nodiscard]] virtual std::size_t backward_workspace_bytes(index_t rows) const = 0;
        virtual void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, std::any& g, Workspace& ws,
                              const Context& ctx, std::size_t index) const = 0;
    };
    template <class L>
    struct Model final : Concept {
        explicit Model(L l) : layer(std::move(l)) {}
        [[nodiscard]] index_t in_width() const noexcept override { return layer.in_width(); }
        [[nodiscard]] index_t out_width() const noexcept override { return layer.out_width(); }
        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const override {
            return layer.workspace_bytes(rows);
        }
        void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx) const override {
            layer.forward(x, y, ws, ctx);
        }
        [[nodiscard]] std::any make_gradients(HypernetworkGradientPool& pool, std::size_t index) const override {
            if constexpr (TrainableLayer<L>) {
                (void)index;
                return detail::make_layer_gradients(layer, pool);
            } else {
                (void)pool;
                throw config_error(detail::concat("DynamicStack: layer ", index, " has no backward (it cannot be trained)"));
            }
        }
        [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const override {
            if constexpr (TrainableLayer<L>) return layer.backward_workspace_bytes(rows);
            else return 0;
        }
        void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx, std::any& g, Workspace& ws,
                      const Context& ctx, std::size_t index) const override {
            if constexpr (TrainableLayer<L>) {
                auto* grads = std::any_cast<gradients_of<L>>(&g);
                if (grads == nullptr)
                    throw shape_error(detail::concat("DynamicStack::backward: the gradients given for layer ", index,
                                                     " are not that layer's (use make_gradients())"));
                layer.backward(x, dy, dx, *grads, ws, ctx);
            } else {
                (void)x, (void)dy, (void)dx, (void)g, (void)ws, (void)ctx;
                throw config_error(detail::concat("DynamicStack: layer ", index, " has no backward (it cannot be trained)"));
            }
        }
        L layer;
    };

    std::vector<std::unique_ptr<Concept>> layers_;
};

} // namespace hypermoe
