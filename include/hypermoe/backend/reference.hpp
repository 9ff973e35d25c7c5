#pragma once
// The reference backend: plain loops, accumulation and activation in double. It is the oracle
// every other backend is tested against, not a fast path. bf16 weights stay bf16 in memory.

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/linear_spec.hpp"

namespace hypermoe {

struct reference {
    static constexpr std::string_view name = "reference";

    template <class Act>
    class linear : public detail::LinearBase {
    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              bias_(bias.begin(), bias.end()) {
            const auto count = static_cast<std::size_t>(n_ * k_);
            if (storage_ == dtype::f32) w_f32_.resize(count);
            else w_bf16_.resize(count);
            for (index_t r = 0; r < n_; ++r)
                for (index_t c = 0; c < k_; ++c) {
                    const auto i = static_cast<std::size_t>(r * k_ + c);
                    if (storage_ == dtype::f32) w_f32_[i] = w.at(r, c);
                    else w_bf16_[i] = bf16::from_float(w.at(r, c));
                }
        }

        [[nodiscard]] std::size_t workspace_bytes(index_t /*rows*/) const noexcept { return 0; }

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& /*ws*/, float scale = 1.0f) const {
            check_call(a, c);
            for (index_t m = 0; m < a.rows(); ++m)
                for (index_t j = 0; j < n_; ++j) {
                    double acc = bias_.empty() ? 0.0 : bias_[static_cast<std::size_t>(j)];
                    for (index_t k = 0; k < k_; ++k) acc += double(a(m, k)) * double(weight(j, k));
                    const auto v = static_cast<float>(double(scale) * Act::apply(acc));
                    c(m, j) = accumulate_ ? c(m, j) + v : v;
                }
        }

    private:
        [[nodiscard]] float weight(index_t n, index_t k) const noexcept {
            const auto i = static_cast<std::size_t>(n * k_ + k);
            return storage_ == dtype::f32 ? w_f32_[i] : w_bf16_[i].to_float();
        }

        std::vector<float> bias_;
        std::vector<float> w_f32_;
        std::vector<bf16> w_bf16_;
    };
};

static_assert(Backend<reference>);

} // namespace hypermoe
