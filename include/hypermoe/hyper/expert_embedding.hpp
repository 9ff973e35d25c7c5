#pragma once
// ExpertEmbedding (per layer): one d_e-vector per expert. HyperMoE conditions its hypernetwork
// on the sum of the UNselected experts' embeddings, s = sum_{j not in S} emb[j], computed here
// as total - sum_{j in S} emb[j]: O(k) instead of O(E), in double, so it matches the plain
// sum to float rounding.

#include <span>
#include <vector>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/finite.hpp"

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

private:
    index_t experts_, dim_;
    std::vector<double> table_;
    std::vector<double> total_;
};

} // namespace hypermoe
