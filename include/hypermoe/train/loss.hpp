#pragma once
// Losses a trainer differentiates: mean squared error against target rows, and softmax
// cross-entropy over classes. Each returns the loss and, when given a dy of y's shape, writes
// dy = dL/dy (the upstream gradient a stack's backward takes). Sums run in double, row by row in
// order, so the result does not depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// L = mean over every element of (y - target)^2; dy = 2 (y - target) / (rows * cols) when dy is
/// given (not a default MatrixView). target and dy must have y's shape (shape_error naming the argument and both
/// shapes); a target with a NaN or infinity is a numeric_error.
inline double mse_loss(ConstMatrixView<float> y, ConstMatrixView<float> target, MatrixView<float> dy = {}) {
    check_shape(target, y.rows(), y.cols(), "mse_loss", "target");
    const bool grad = dy.data() != nullptr;
    if (grad) check_shape(dy, y.rows(), y.cols(), "mse_loss", "dy");
    check_finite(target, "mse_loss: target");
    const double n = double(y.rows()) * double(y.cols());
    double sum = 0;
    for (index_t r = 0; r < y.rows(); ++r)
        for (index_t c = 0; c < y.cols(); ++c) {
            const double diff = double(y(r, c)) - double(target(r, c));
            sum += diff * diff;
            if (grad) dy(r, c) = float(2.0 * diff / n);
        }
    return n > 0 ? sum / n : 0.0;
}

/// What cross_entropy_loss measured.
struct CrossEntropy {
    double loss = 0;     ///< mean over rows of -log softmax(logits)[label]
    index_t correct = 0; ///< rows whose largest logit (the first on ties) is the label's
};

/// Softmax cross-entropy with the first `classes` columns of y as each row's logits (a stack
/// whose output is wider than the class count reads its first `classes` features), mean over
/// rows. dy (y's shape, when given) gets (softmax - onehot(label)) / rows in those columns
/// and 0 in the rest. Errors: classes outside [2, y.cols()] (config_error); labels.size() !=
/// y.rows() (shape_error); a label outside [0, classes) (config_error naming the row).
inline CrossEntropy cross_entropy_loss(ConstMatrixView<float> y, std::span<const std::int32_t> labels, index_t classes,
                                       MatrixView<float> dy = {}) {
    if (classes < 2 || classes > y.cols())
        throw config_error(detail::concat("cross_entropy_loss: classes is ", classes, ", expected 2 <= classes <= ", y.cols(),
                                          " (the output's width)"));
    if (index_t(labels.size()) != y.rows())
        throw shape_error(detail::concat("cross_entropy_loss: ", labels.size(), " labels for ", y.rows(), " rows of logits"));
    const bool grad = dy.data() != nullptr;
    if (grad) check_shape(dy, y.rows(), y.cols(), "cross_entropy_loss", "dy");
    for (index_t r = 0; r < y.rows(); ++r)
        if (labels[std::size_t(r)] < 0 || labels[std::size_t(r)] >= classes)
            throw config_error(detail::concat("cross_entropy_loss: label of row ", r, " is ", labels[std::size_t(r)], ", expected 0 <= label < ",
                                              classes));
    CrossEntropy out;
    const double rows = double(y.rows());
    for (index_t r = 0; r < y.rows(); ++r) {
        const auto z = y.row(r).first(std::size_t(classes));
        const auto best = std::max_element(z.begin(), z.end());
        const double top = *best;
        double sum = 0;
        for (const float v : z) sum += std::exp(double(v) - top);
        const double log_sum = top + std::log(sum);
        const std::int32_t label = labels[std::size_t(r)];
        out.loss += log_sum - double(z[std::size_t(label)]);
        out.correct += index_t(best - z.begin()) == label;
        if (!grad) continue;
        for (index_t c = 0; c < y.cols(); ++c)
            dy(r, c) = c < classes ? float((std::exp(double(z[std::size_t(c)]) - log_sum) - (c == label ? 1.0 : 0.0)) / rows) : 0.0f;
    }
    if (y.rows() > 0) out.loss /= rows;
    return out;
}

} // namespace hypermoe
