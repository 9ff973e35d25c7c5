#pragma once
// Optimisers for the parameters a backward pass differentiates: AdamW (decoupled weight decay,
// Loshchilov & Hutter 2019) and SGD with momentum, with the update rules of torch.optim (so a
// run here and one in PyTorch step the same way), parameter groups (e.g. no weight decay on
// norms and biases) and clipping by the global gradient norm (torch.nn.utils.clip_grad_norm_).
//
// An optimiser works on flat views: each Parameter is a tensor's values and its gradient, as
// spans into the caller's storage (a Matrix, a std::vector), and the index of its group. The
// state (moments) is allocated once, at construction; step() allocates nothing. Every element's
// update is computed element by element (in fixed chunks of elements on the library's threads),
// so the result does not depend on the thread count: AdamW's in float, as PyTorch updates float
// parameters (in double its divide and square root made it compute-bound, 2.5x the time of
// streaming its bytes), SGD's in double.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/backend/cpu_isa.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// One parameter tensor: its values, its gradient (same length) and its group.
struct Parameter {
    std::string name;          ///< for messages
    std::span<float> value;    ///< updated in place by step()
    std::span<float> grad;     ///< read by step(), scaled by clip_grad_norm()
    std::size_t group = 0;     ///< index into the optimiser's groups
};

namespace detail {

/// Checks a parameter list against `groups` groups: matching lengths, a valid group index.
inline void check_parameters(std::span<const Parameter> params, std::size_t groups, const char* who) {
    if (groups == 0) throw config_error(concat(who, ": no parameter groups, expected at least one"));
    for (const Parameter& p : params) {
        if (p.value.size() != p.grad.size())
            throw shape_error(concat(who, ": parameter '", p.name, "' has ", p.value.size(), " values but its gradient has ",
                                     p.grad.size(), " elements"));
        if (p.group >= groups)
            throw config_error(concat(who, ": parameter '", p.name, "' is in group ", p.group, ", expected a group below ", groups));
    }
}

inline void check_range(double v, double lo, double hi, bool hi_open, const char* who, const char* what) {
    if (!(v >= lo && (hi_open ? v < hi : v <= hi)))
        throw config_error(concat(who, ": ", what, " is ", v, ", expected ", lo, " <= ", what, hi_open ? " < " : " <= ", hi));
}

/// Elements per work item of the optimisers' loops.
inline constexpr std::size_t update_chunk = 16384;

/// fn(begin, end) over [0, n) in fixed chunks of update_chunk elements, on the library's threads
/// when there are several: for element-wise updates, which give the same bits at any thread count.
template <class Fn>
void for_each_chunk(std::size_t n, Fn&& fn) {
    constexpr std::size_t chunk = update_chunk;
    const auto chunks = index_t((n + chunk - 1) / chunk);
    parallel_for(chunks, index_t(n) * 16, [&](index_t c) { fn(std::size_t(c) * chunk, std::min(n, std::size_t(c + 1) * chunk)); });
}

/// A numeric_error naming the first parameter whose gradient has a NaN or infinity, and where;
/// checked before any update, so a failed step changes nothing. Each gradient is checked in
/// chunks on the library's threads (a vectorised pass); the first bad element is looked for only
/// when there is one.
inline void check_gradients_finite(std::span<const Parameter> params, const char* who) {
    for (const Parameter& p : params) {
        std::atomic<bool> bad{false};
        for_each_chunk(p.grad.size(), [&](std::size_t begin, std::size_t end) {
            if (!all_finite(std::span<const float>(p.grad).subspan(begin, end - begin))) bad.store(true, std::memory_order_relaxed);
        });
        if (!bad.load(std::memory_order_relaxed)) continue;
        const index_t i = find_non_finite(std::span<const float>(p.grad));
        throw numeric_error(concat(who, ": gradient of '", p.name, "' element ", i, " is ", p.grad[std::size_t(i)],
                                   ", expected a finite value"));
    }
}

/// What both optimisers share: the parameters, their groups (each checked by Derived::check),
/// the step count and the learning-rate setter.
template <class Derived, class Group>
class OptimizerBase {
public:
    [[nodiscard]] std::span<const Parameter> parameters() const noexcept { return params_; }
    [[nodiscard]] const Group& group(std::size_t i) const { return groups_.at(i); }
    /// Changes a group's learning rate (a schedule's step).
    void set_lr(std::size_t group, double lr) {
        Group g = groups_.at(group);
        g.lr = lr;
        Derived::check(g);
        groups_[group] = g;
    }
    [[nodiscard]] long long steps() const noexcept { return steps_; }

protected:
    OptimizerBase(std::vector<Parameter> params, std::vector<Group> groups, const char* who)
        : params_(std::move(params)), groups_(std::move(groups)) {
        check_parameters(params_, groups_.size(), who);
        for (const Group& g : groups_) Derived::check(g);
    }

    std::vector<Parameter> params_;
    std::vector<Group> groups_;
    long long steps_ = 0;
};

} // namespace detail

/// Scales every gradient by max_norm / (norm + 1e-6) when the global L2 norm of all of them
/// exceeds max_norm, as torch.nn.utils.clip_grad_norm_; returns the norm before clipping
/// (summed in double). A non-finite norm is a numeric_error (nothing is scaled).
inline double clip_grad_norm(std::span<const Parameter> params, double max_norm) {
    if (!(max_norm > 0) || !std::isfinite(max_norm))
        throw config_error(detail::concat("clip_grad_norm: max_norm is ", max_norm, ", expected a finite value > 0"));
    // Each parameter's sum of squares in fixed chunks (in parallel), added in chunk order: the
    // same bits at any thread count.
    double sum = 0;
    thread_local std::vector<double> partial; // reused: no allocation once it is large enough
    for (const Parameter& p : params) {
        partial.assign((p.grad.size() + detail::update_chunk - 1) / detail::update_chunk, 0.0);
        double* const out = partial.data(); // the calling thread's vector, written by every thread
        detail::for_each_chunk(p.grad.size(), [&](std::size_t begin, std::size_t end) {
            // 8 running sums (element j into sum j % 8), added at the end: independent sums that
            // compilers vectorise, where one sum in double is a chain of dependent adds.
            constexpr std::size_t lanes = 8;
            std::array<double, lanes> sums{};
            const float* g = p.grad.data();
            std::size_t j = begin;
            for (; j + lanes <= end; j += lanes)
                for (std::size_t l = 0; l < lanes; ++l) sums[l] += double(g[j + l]) * double(g[j + l]);
            for (std::size_t l = 0; j < end; ++j, ++l) sums[l] += double(g[j]) * double(g[j]);
            double s = 0;
            for (const double x : sums) s += x;
            out[begin / detail::update_chunk] = s;
        });
        for (const double s : partial) sum += s;
    }
    const double norm = std::sqrt(sum);
    if (!std::isfinite(norm)) {
        detail::check_gradients_finite(params, "clip_grad_norm");
        throw numeric_error(detail::concat("clip_grad_norm: the gradients' norm is ", norm, ", expected a finite value"));
    }
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1)
        for (const Parameter& p : params)
            detail::for_each_chunk(p.grad.size(), [&](std::size_t begin, std::size_t end) {
                for (std::size_t j = begin; j < end; ++j) p.grad[j] = float(double(p.grad[j]) * coef);
            });
    return norm;
}

namespace detail {

/// One AdamW step's constants for one group, in float (AdamW::step): the decay's lr x
/// weight_decay apart from the 1 it is taken from (1 - 1e-5 in float would be off by up to
/// 0.3%), and the bias corrections folded in: step = lr / (1 - beta1^t), inv_c2 =
/// 1 / sqrt(1 - beta2^t).
struct AdamWStep {
    float beta1, beta2, lr_decay, step, inv_c2, eps;
};

/// AdamW's update of n elements in float, as torch.optim.AdamW computes float parameters:
/// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p = p - (lr wd p + step m / (sqrt(v) inv_c2 + eps)).
inline void adamw_update_portable(const AdamWStep& u, float* value, const float* grad, float* m, float* v, std::size_t n) {
    const float one_b1 = 1 - u.beta1, one_b2 = 1 - u.beta2;
    for (std::size_t j = 0; j < n; ++j) {
        const float g = grad[j];
        const float mj = u.beta1 * m[j] + one_b1 * g;
        const float vj = u.beta2 * v[j] + one_b2 * g * g;
        m[j] = mj, v[j] = vj;
        value[j] = value[j] - (u.lr_decay * value[j] + u.step * mj / (std::sqrt(vj) * u.inv_c2 + u.eps));
    }
}

#if HYPERMOE_X86_KERNELS
/// The same, 8 elements at a time: std::sqrt may set errno, which keeps compilers from
/// vectorising the portable loop. The same operations in the same order, without FMAs, so the
/// two agree to the bit unless the compiler contracted the portable loop's multiply-adds (GCC's
/// GNU dialects, Clang's default): then by one rounding of a term.
__attribute__((target("avx2"))) inline void adamw_update_avx2(const AdamWStep& u, float* value, const float* grad, float* m, float* v,
                                                              std::size_t n) {
    const __m256 b1 = _mm256_set1_ps(u.beta1), b2 = _mm256_set1_ps(u.beta2), one_b1 = _mm256_set1_ps(1 - u.beta1),
                 one_b2 = _mm256_set1_ps(1 - u.beta2), lr_decay = _mm256_set1_ps(u.lr_decay), step = _mm256_set1_ps(u.step),
                 inv_c2 = _mm256_set1_ps(u.inv_c2), eps = _mm256_set1_ps(u.eps);
    std::size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 g = _mm256_loadu_ps(grad + j), p = _mm256_loadu_ps(value + j);
        const __m256 mj = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + j)), _mm256_mul_ps(one_b1, g));
        const __m256 vj = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + j)), _mm256_mul_ps(_mm256_mul_ps(one_b2, g), g));
        _mm256_storeu_ps(m + j, mj);
        _mm256_storeu_ps(v + j, vj);
        const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vj), inv_c2), eps);
        const __m256 change = _mm256_add_ps(_mm256_mul_ps(lr_decay, p), _mm256_div_ps(_mm256_mul_ps(step, mj), denom));
        _mm256_storeu_ps(value + j, _mm256_sub_ps(p, change));
    }
    adamw_update_portable(u, value + j, grad + j, m + j, v + j, n - j);
}
#endif

/// AdamW's update on the widest code this CPU runs (vector_kernel(); HYPERMOE_ISA=portable
/// keeps the plain loop).
inline void adamw_update(const AdamWStep& u, float* value, const float* grad, float* m, float* v, std::size_t n) {
#if HYPERMOE_X86_KERNELS
    if (vector_kernel() != kernel_isa::portable) return adamw_update_avx2(u, value, grad, m, v, n);
#endif
    adamw_update_portable(u, value, grad, m, v, n);
}

} // namespace detail

/// One AdamW parameter group's settings.
struct AdamWGroup {
    double lr = 1e-3;
    double beta1 = 0.9, beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2; ///< decoupled: p -= lr * weight_decay * p
};

/// AdamW as torch.optim.AdamW (amsgrad off): per step t, p -= lr wd p; m = b1 m + (1 - b1) g;
/// v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
class AdamW : public detail::OptimizerBase<AdamW, AdamWGroup> {
public:
    using Group = AdamWGroup;

    AdamW(std::vector<Parameter> params, std::vector<Group> groups) : OptimizerBase(std::move(params), std::move(groups), "AdamW") {
        for (const Parameter& p : params_) {
            m_.emplace_back(1, index_t(p.value.size())); // zeroed, in huge pages when large
            v_.emplace_back(1, index_t(p.value.size()));
        }
    }

    /// One update of every parameter from its gradient.
    void step() {
        detail::check_gradients_finite(params_, "AdamW::step");
        ++steps_;
        for (std::size_t i = 0; i < params_.size(); ++i) {
            const Parameter& p = params_[i];
            const Group& g = groups_[p.group];
            const double c1 = 1 - std::pow(g.beta1, double(steps_)), c2 = std::sqrt(1 - std::pow(g.beta2, double(steps_)));
            const detail::AdamWStep u{float(g.beta1), float(g.beta2), float(g.lr * g.weight_decay), float(g.lr / c1), float(1 / c2),
                                      float(g.eps)};
            float *value = p.value.data(), *m = m_[i].data(), *v = v_[i].data();
            const float* grad = p.grad.data();
            detail::for_each_chunk(p.value.size(), [&](std::size_t begin, std::size_t end) {
                detail::adamw_update(u, value + begin, grad + begin, m + begin, v + begin, end - begin);
            });
        }
    }

    /// A config_error naming the first setting out of range.
    static void check(const Group& g) {
        detail::check_range(g.lr, 0, 1e6, false, "AdamW", "lr");
        detail::check_range(g.beta1, 0, 1, true, "AdamW", "beta1");
        detail::check_range(g.beta2, 0, 1, true, "AdamW", "beta2");
        detail::check_range(g.eps, 1e-30, 1, false, "AdamW", "eps");
        detail::check_range(g.weight_decay, 0, 1e6, false, "AdamW", "weight_decay");
    }

private:
    std::vector<Matrix<float>> m_, v_; ///< each a flat (1, n) buffer
};

/// One SGD parameter group's settings.
struct SgdGroup {
    double lr = 1e-2;
    double momentum = 0;
    double dampening = 0;
    double weight_decay = 0; ///< coupled (added to the gradient), as torch.optim.SGD
    bool nesterov = false;
};

/// SGD with momentum as torch.optim.SGD: g += wd p (coupled L2); b = g on the first step, else
/// b = mu b + (1 - dampening) g; the step is g + mu b with Nesterov, else b; p -= lr step.
class Sgd : public detail::OptimizerBase<Sgd, SgdGroup> {
public:
    using Group = SgdGroup;

    Sgd(std::vector<Parameter> params, std::vector<Group> groups) : OptimizerBase(std::move(params), std::move(groups), "Sgd") {
        for (const Parameter& p : params_) buf_.emplace_back(1, index_t(p.value.size()));
    }

    void step() {
        detail::check_gradients_finite(params_, "Sgd::step");
        for (std::size_t i = 0; i < params_.size(); ++i) {
            const Parameter& p = params_[i];
            const Group& g = groups_[p.group];
            float* b = buf_[i].data();
            detail::for_each_chunk(p.value.size(), [&](std::size_t begin, std::size_t end) {
                for (std::size_t j = begin; j < end; ++j) {
                    double d = double(p.grad[j]) + g.weight_decay * p.value[j];
                    if (g.momentum != 0) {
                        const double bj = steps_ == 0 ? d : g.momentum * b[j] + (1 - g.dampening) * d;
                        b[j] = float(bj);
                        d = g.nesterov ? d + g.momentum * bj : bj;
                    }
                    p.value[j] = float(double(p.value[j]) - g.lr * d);
                }
            });
        }
        ++steps_;
    }

    /// A config_error naming the first setting out of range.
    static void check(const Group& g) {
        detail::check_range(g.lr, 0, 1e6, false, "Sgd", "lr");
        detail::check_range(g.momentum, 0, 1, false, "Sgd", "momentum");
        detail::check_range(g.dampening, 0, 1, false, "Sgd", "dampening");
        detail::check_range(g.weight_decay, 0, 1e6, false, "Sgd", "weight_decay");
        if (g.nesterov && (g.momentum == 0 || g.dampening != 0))
            throw config_error(detail::concat("Sgd: nesterov needs momentum > 0 and dampening = 0, but momentum is ", g.momentum,
                                              " and dampening is ", g.dampening));
    }

private:
    std::vector<Matrix<float>> buf_; ///< each a flat (1, n) buffer
};

} // namespace hypermoe
