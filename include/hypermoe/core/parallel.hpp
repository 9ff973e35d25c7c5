#pragma once
// The one place the library opens an OpenMP parallel region for its own element-wise work
// (GEMMs thread inside the backend), and what the library knows about OpenMP's thread count.
// Without OpenMP everything runs serially. Items are split statically, so which thread computes
// an item never changes a result.

#include <exception>

#include "hypermoe/core/extents.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

// Before an element-wise loop of a hot path: vectorised at -O2 too. GCC 12's -O2 vectorises
// only loops that need no scalar remainder (-fvect-cost-model=very-cheap), which left the GLU,
// the linears' epilogues and the layer's combine scalar (one GLU expert with q8_0 `fast`
// weights, 8 rows: 64 us at -O2 against 50 at -O3, Zen 5). An `omp simd` loop is vectorised
// at any cost model; only loops whose iterations are independent (no reductions, no overlap
// between what one writes and another reads) carry it, so the results are the scalar loop's.
// Nothing without OpenMP, and nothing for Clang, whose -O2 vectorises these loops itself and
// which warns (-Wpass-failed) where a forced loop is not vectorised, as at -O1.
#if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__)
#define HYPERMOE_SIMD _Pragma("omp simd")
#else
#define HYPERMOE_SIMD
#endif

namespace hypermoe::detail {

/// Below this many element operations a parallel region costs more than it saves.
inline constexpr index_t parallel_grain = 1 << 15;

/// The threads a parallel region opened now by the calling thread gets: 1 inside an active
/// parallel region (nested regions are serial), else the calling thread's OpenMP thread count
/// (its nthreads-var, which omp_set_num_threads and Workspace::set_threads change for the
/// calling thread only).
[[nodiscard]] inline int current_threads() noexcept {
#if defined(_OPENMP)
    return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

/// Sets the calling thread's OpenMP thread count for the scope's lifetime (`threads` <= 0:
/// leaves it alone). It changes the calling thread's nthreads-var only, not other threads'.
class ThreadCountScope {
public:
    explicit ThreadCountScope(int threads) noexcept {
#if defined(_OPENMP)
        if (threads > 0) {
            saved_ = omp_get_max_threads();
            if (saved_ != threads) omp_set_num_threads(threads);
            else saved_ = 0;
        }
#else
        (void)threads;
#endif
    }
    ThreadCountScope(const ThreadCountScope&) = delete;
    ThreadCountScope& operator=(const ThreadCountScope&) = delete;
    ~ThreadCountScope() {
#if defined(_OPENMP)
        if (saved_ > 0) omp_set_num_threads(saved_);
#endif
    }

private:
    [[maybe_unused]] int saved_ = 0; // unused without OpenMP
};

/// Runs fn(); an exception it throws is kept in `failure` (the first one of a region wins), so
/// that none escapes a parallel region. The region's caller rethrows it afterwards.
template <class Fn>
void keep_first_failure(std::exception_ptr& failure, Fn&& fn) noexcept {
    try {
        fn();
    } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(hypermoe_parallel_failure)
#endif
        if (!failure) failure = std::current_exception();
    }
}

/// fn(i) for i in [0, items); in parallel when `work` (element operations in all) is large.
/// An exception thrown by fn is rethrown on the calling thread (the first one caught), after
/// every thread finished; it never escapes a parallel region.
template <class Fn>
void parallel_for(index_t items, index_t work, Fn&& fn) {
#if defined(_OPENMP)
    if (work >= parallel_grain && items > 1 && current_threads() > 1) {
        std::exception_ptr failure;
#pragma omp parallel for schedule(static)
        for (index_t i = 0; i < items; ++i) keep_first_failure(failure, [&] { fn(i); });
        if (failure) std::rethrow_exception(failure);
        return;
    }
#else
    (void)work;
#endif
    for (index_t i = 0; i < items; ++i) fn(i);
}

/// fn(item, slot) for item in [0, items), as tasks on up to `slots` threads in one parallel
/// region: an item goes to whichever thread is free next (items in the given order), and `slot`
/// in [0, slots) names the thread, for per-thread scratch. Inside, nested regions (a backend's)
/// run on one thread. Exceptions are rethrown on the calling thread, as in parallel_for.
template <class Fn>
void parallel_tasks(index_t items, int slots, Fn&& fn) {
#if defined(_OPENMP)
    if (slots > 1 && items > 1) {
        std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1) num_threads(slots)
        for (index_t i = 0; i < items; ++i) keep_first_failure(failure, [&] { fn(i, omp_get_thread_num()); });
        if (failure) std::rethrow_exception(failure);
        return;
    }
#else
    (void)slots;
#endif
    for (index_t i = 0; i < items; ++i) fn(i, 0);
}

} // namespace hypermoe::detail
