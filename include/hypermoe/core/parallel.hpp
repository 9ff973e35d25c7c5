#pragma once
// The one place the library opens an OpenMP parallel region for its own element-wise work
// (GEMMs thread inside the backend). Without OpenMP it runs serially. Items are split
// statically, so which thread computes an item never changes a result.

#include "hypermoe/core/extents.hpp"

namespace hypermoe::detail {

/// Below this many element operations a parallel region costs more than it saves.
inline constexpr index_t parallel_grain = 1 << 15;

/// fn(i) for i in [0, items); in parallel when `work` (element operations in all) is large.
template <class Fn>
void parallel_for(index_t items, index_t work, Fn&& fn) {
#if defined(_OPENMP)
    if (work >= parallel_grain && items > 1) {
#pragma omp parallel for schedule(static)
        for (index_t i = 0; i < items; ++i) fn(i);
        return;
    }
#else
    (void)work;
#endif
    for (index_t i = 0; i < items; ++i) fn(i);
}

} // namespace hypermoe::detail
