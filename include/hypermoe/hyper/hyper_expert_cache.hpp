#pragma once
// HyperExpertCache (per layer): the generated adapter of each selection pattern, kept once. This is exact, not an approximation: the hypernetwork's
// input depends only on (layer, selected set), so every token of a pattern gets the very same
// weights the per-token computation would generate.
//
// Threading: entries live in a table indexed by pattern rank (C(E, k) slots of atomic
// pointers). A hit is one acquire load, no lock. A miss generates under a mutex, re-checks,
// and publishes with a release store. Entries are never freed while the cache lives, except by
// invalidate() and clear(), which must not run concurrently with forward calls.
//
// Budget: at most `budget_bytes` of prepared adapters are kept. Once full, a pattern that is
// not cached is generated for the call that needs it (once per pattern per forward call, into
// storage the call owns) and dropped afterwards: memory stays bounded, results stay identical,
// only the cost of those patterns rises to one generation per call.

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/hyper/pattern.hpp"

namespace hypermoe {

/// One pattern's generated adapter, kept in the layout the hypernetwork generates it in:
/// H(x) = relu(x D + bD) U + bU with D (d, r) and U (r, d) row-major.
struct HyperExpert {
    index_t d = 0, r = 0;
    std::vector<float> down;      ///< D (d, r)
    std::vector<float> down_bias; ///< bD (r)
    std::vector<float> up;        ///< U (r, d)
    std::vector<float> up_bias;   ///< bU (d)
    /// Bytes of the adapter's parameters (what the budget counts).
    [[nodiscard]] std::size_t bytes() const noexcept {
        return sizeof(float) * std::size_t(2 * d * r + r + d);
    }
};

namespace detail {

/// out (d) = relu(x D + bD) U + bU for one token; `hidden` (r) is scratch. Every element is
/// summed in a fixed order (over d, then over r, ascending), so the cached and per-token modes,
/// which both call this, give the same bits for the same adapter.
inline void apply_adapter(std::span<const float> x, const float* down, const float* down_bias, const float* up,
                          const float* up_bias, index_t d, index_t r, float* hidden, float* out) noexcept {
    for (index_t b = 0; b < r; ++b) hidden[b] = 0.0f;
    for (index_t a = 0; a < d; ++a) {
        const float xa = x[std::size_t(a)];
        const float* row = down + a * r;
        HYPERMOE_SIMD
        for (index_t b = 0; b < r; ++b) hidden[b] += xa * row[b];
    }
    for (index_t b = 0; b < r; ++b) {
        const float h = hidden[b] + down_bias[b];
        hidden[b] = h > 0.0f ? h : 0.0f;
    }
    for (index_t a = 0; a < d; ++a) out[a] = 0.0f;
    for (index_t b = 0; b < r; ++b) {
        const float hb = hidden[b];
        const float* row = up + b * d;
        HYPERMOE_SIMD
        for (index_t a = 0; a < d; ++a) out[a] += hb * row[a];
    }
    for (index_t a = 0; a < d; ++a) out[a] += up_bias[a];
}

inline void apply_adapter(std::span<const float> x, const HyperExpert& h, float* hidden, float* out) noexcept {
    apply_adapter(x, h.down.data(), h.down_bias.data(), h.up.data(), h.up_bias.data(), h.d, h.r, hidden, out);
}

/// The backward of apply_adapter for one token: from dy (d), adds the token's gradient to dx
/// (d) and to the adapter's gradients dD (d, r), dbD (r), dU (r, d), dbU (d). The hidden
/// pre-activations are recomputed with apply_adapter's sums; `pre` and `dpre` (r) are scratch.
/// relu'(0) = 0, as in PyTorch.
inline void adapter_backward(std::span<const float> x, std::span<const float> dy, const float* down, const float* down_bias,
                             const float* up, index_t d, index_t r, float* pre, float* dpre, std::span<float> dx, float* ddown,
                             float* ddown_bias, float* dup, float* dup_bias) noexcept {
    for (index_t b = 0; b < r; ++b) pre[b] = 0.0f;
    for (index_t a = 0; a < d; ++a) {
        const float xa = x[std::size_t(a)];
        const float* row = down + a * r;
        for (index_t b = 0; b < r; ++b) pre[b] += xa * row[b];
    }
    for (index_t b = 0; b < r; ++b) pre[b] += down_bias[b];
    for (index_t a = 0; a < d; ++a) dup_bias[a] += dy[std::size_t(a)];
    for (index_t b = 0; b < r; ++b) {
        const float hb = pre[b] > 0.0f ? pre[b] : 0.0f;
        const float* row = up + b * d;
        float* drow = dup + b * d;
        double dh = 0;
        for (index_t a = 0; a < d; ++a) {
            drow[a] += hb * dy[std::size_t(a)];
            dh += double(row[a]) * dy[std::size_t(a)];
        }
        dpre[b] = pre[b] > 0.0f ? float(dh) : 0.0f;
        ddown_bias[b] += dpre[b];
    }
    for (index_t a = 0; a < d; ++a) {
        const float xa = x[std::size_t(a)];
        const float* row = down + a * r;
        float* drow = ddown + a * r;
        double sum = 0;
        for (index_t b = 0; b < r; ++b) {
            drow[b] += xa * dpre[b];
            sum += double(row[b]) * dpre[b];
        }
        dx[std::size_t(a)] += float(sum);
    }
}

} // namespace detail

template <Backend B>
class HyperExpertCache {
public:
    /// Largest pattern table (slots); C(E, k) above it is a config_error.
    static constexpr index_t max_patterns = index_t{1} << 22;

    HyperExpertCache(index_t experts, index_t k, std::size_t budget_bytes = std::size_t{256} << 20)
        : patterns_(binomial(experts, k)), budget_(budget_bytes) {
        if (k < 1 || k > experts || patterns_ < 0 || patterns_ > max_patterns)
            throw config_error(detail::concat("HyperExpertCache: C(", experts, ", ", k, ") patterns, expected k in [1, ",
                                              experts, "] and at most ", max_patterns, " patterns"));
        slots_ = std::make_unique<std::atomic<const HyperExpert*>[]>(std::size_t(patterns_));
        for (index_t i = 0; i < patterns_; ++i) slots_[std::size_t(i)].store(nullptr, std::memory_order_relaxed);
    }

    [[nodiscard]] index_t patterns() const noexcept { return patterns_; }
    [[nodiscard]] std::size_t budget_bytes() const noexcept { return budget_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_.load(std::memory_order_relaxed); }
    [[nodiscard]] index_t size() const noexcept { return index_t(count_.load(std::memory_order_relaxed)); }
    [[nodiscard]] std::uint64_t hits() const noexcept { return hits_.load(std::memory_order_relaxed); }
    [[nodiscard]] std::uint64_t misses() const noexcept { return misses_.load(std::memory_order_relaxed); }
    /// The hypernetwork version the entries were generated with.
    [[nodiscard]] std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }

    /// The cached adapter of `pattern`, or null.
    [[nodiscard]] const HyperExpert* find(index_t pattern) const noexcept {
        const auto* e = slots_[std::size_t(pattern)].load(std::memory_order_acquire);
        if (e != nullptr) hits_.fetch_add(1, std::memory_order_relaxed);
        return e;
    }

    /// Stores a generated adapter unless another thread was first or the budget is full;
    /// returns the cached entry, or null when it was not stored (the caller keeps `made`).
    const HyperExpert* insert(index_t pattern, std::unique_ptr<HyperExpert>& made) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        const std::lock_guard lock(mutex_);
        if (const auto* e = slots_[std::size_t(pattern)].load(std::memory_order_acquire)) return e;
        const std::size_t b = made->bytes();
        if (bytes() + b > budget_) return nullptr;
        owned_.push_back(std::move(made));
        bytes_.fetch_add(b, std::memory_order_relaxed);
        count_.fetch_add(1, std::memory_order_relaxed);
        slots_[std::size_t(pattern)].store(owned_.back().get(), std::memory_order_release);
        return owned_.back().get();
    }

    /// Drops every entry if they were generated with another hypernetwork version.
    void sync_version(std::uint64_t hypernetwork_version) {
        if (version() == hypernetwork_version) return;
        const std::lock_guard lock(mutex_);
        if (version() == hypernetwork_version) return;
        clear_locked();
        version_.store(hypernetwork_version, std::memory_order_release);
    }

    /// Drops every entry. Not concurrent with forward calls.
    void clear() {
        const std::lock_guard lock(mutex_);
        clear_locked();
    }

private:
    void clear_locked() {
        for (index_t i = 0; i < patterns_; ++i) slots_[std::size_t(i)].store(nullptr, std::memory_order_relaxed);
        owned_.clear();
        bytes_.store(0, std::memory_order_relaxed);
        count_.store(0, std::memory_order_relaxed);
    }

    index_t patterns_;
    std::size_t budget_;
    std::unique_ptr<std::atomic<const HyperExpert*>[]> slots_;
    std::vector<std::unique_ptr<HyperExpert>> owned_;
    std::mutex mutex_;
    std::atomic<std::size_t> bytes_{0};
    std::atomic<std::size_t> count_{0};
    mutable std::atomic<std::uint64_t> hits_{0};
    std::atomic<std::uint64_t> misses_{0};
    std::atomic<std::uint64_t> version_{0};
};

} // namespace hypermoe
