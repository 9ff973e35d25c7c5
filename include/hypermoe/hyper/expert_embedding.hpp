#pragma once
// ExpertEmbedding (per layer): one d_e-vector per expert. HyperMoE conditions its hypernetwork
// on the sum of the UNselected experts' embeddings, s = sum_{j not in S} emb[j], computed here
// as total - sum_{j in S} emb[j]: O(k) instead of O(E), in double, so it matches the plain
// sum to float rounding.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"

namespace hypermoe {

class ExpertEmbedding {
public:
    /// table: (experts, d_e).
    explicit ExpertEmbedding(WeightView table) : experts_(table.rows()), dim_(table.cols()) {
        if (experts_ < 1 || dim_ < 1)
            throw weight_error(detail::concat("ExpertEmbedding: table has shape ", detail::shape_str(experts_, dim_),
                                              ", expected at least one expert and one column"));
        table_.resize(std::size_t(experts_ * dim_));
        total_.assign(std::size_t(dim_), 0.0);
        for (index_t e = 0; e < experts_; ++e)
            for (index_t c = 0; c < dim_; ++c) {
                const double v = table.at(e, c);
                if (!is_finite(float(v)))
                    throw weight_error(detail::concat("ExpertEmbedding: element (", e, ", ", c, ") is ", v,
                                                      ", expected a finite value"));
                table_[std::size_t(e * dim_ + c)] = v;
                total_[std::size_t(c)] += v;
            }
    }

    [[nodiscard]] index_t experts() const noexcept { return experts_; }
    [[nodiscard]] index_t dim() const noexcept { return dim_; }

    /// out (d_e) = sum of the embeddings of the experts NOT in `selected`.
    void unselected_sum(std::span<const std::int32_t> selected, std::span<float> out) const {
        for (index_t c = 0; c < dim_; ++c) {
            double v = total_[std::size_t(c)];
            for (const std::int32_t e : selected) v -= table_[std::size_t(e * dim_ + c)];
            out[std::size_t(c)] = float(v);
        }
    }

    /// The backward of unselected_sum for n selections: row i of `ds` (n, d_e) is the gradient
    /// of the sum for the sorted ids `selected_rows[i k .. i k + k)`; every expert NOT in that
    /// selection gets it added to its row of `dtable` (experts, d_e). Each element is summed in
    /// double over the selections in order.
    void backward(std::span<const std::int32_t> selected_rows, ConstMatrixView<float> ds, MatrixView<float> dtable) const {
        const index_t n = ds.rows();
        if (ds.cols() != dim_ || dtable.rows() != experts_ || dtable.cols() != dim_ || n < 0 ||
            (n > 0 && index_t(selected_rows.size()) % n != 0) || (n == 0 && !selected_rows.empty()))
            throw shape_error(detail::concat("ExpertEmbedding::backward: ds has shape ", detail::shape_str(ds.rows(), ds.cols()),
                                             " for ", selected_rows.size(), " selected ids and the gradient has shape ",
                                             detail::shape_str(dtable.rows(), dtable.cols()), ", expected ds (n, ", dim_,
                                             "), n k ids and a gradient of shape ", detail::shape_str(experts_, dim_)));
        const std::size_t k = n > 0 ? selected_rows.size() / std::size_t(n) : 0;
        const auto unselected = [&](index_t i, index_t e) {
            const auto sel = selected_rows.subspan(std::size_t(i) * k, k);
            return std::find(sel.begin(), sel.end(), std::int32_t(e)) == sel.end();
        };
        for (index_t e = 0; e < experts_; ++e)
            for (index_t c = 0; c < dim_; ++c) {
                double sum = 0;
                for (index_t i = 0; i < n; ++i)
                    if (unselected(i, e)) sum += ds(i, c);
                dtable(e, c) += float(sum);
            }
    }

private:
    index_t experts_, dim_;
    std::vector<double> table_;
    std::vector<double> total_;
};

} // namespace hypermoe
