#pragma once
// DynamicStack: layers chosen at run time (e.g. read from a checkpoint), type-erased once here
// so every other part of the library stays static. Widths are checked as layers are added;
// a mismatch is a shape_error naming the layer index.

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hypermoe/core/layer_concept.hpp"

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

private:
    struct Concept {
        virtual ~Concept() = default;
        [[nodiscard]] virtual index_t in_width() const noexcept = 0;
        [[nodiscard]] virtual index_t out_width() const noexcept = 0;
        [[nodiscard]] virtual std::size_t workspace_bytes(index_t rows) const = 0;
        virtual void forward(ConstMatrixView<float> x, MatrixView<float> y, Workspace& ws, const Context& ctx) const = 0;
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
        L layer;
    };

    std::vector<std::unique_ptr<Concept>> layers_;
};

} // namespace hypermoe
