#pragma once
// What the benchmarks share: fast deterministic data (splitmix64), so gigabytes of weights fill
// in seconds and every binary times the same numbers; and paired timing of two variants.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include <hypermoe/core/matrix.hpp>
#include <hypermoe/router/hash_routing.hpp>

namespace hypermoe::bench {

/// p[i] uniform in [-scale, scale), a pure function of (seed, i).
inline void fill(float* p, std::size_t n, std::uint64_t seed, float scale) {
    for (std::size_t i = 0; i < n; ++i)
        p[i] = scale * (float(detail::splitmix64(seed + i) >> 40) * 0x1.0p-23f - 1.0f);
}

inline Matrix<float> random_matrix(index_t rows, index_t cols, std::uint64_t seed, float scale) {
    Matrix<float> m(rows, cols);
    fill(m.data(), std::size_t(rows * cols), seed, scale);
    return m;
}

inline std::vector<float> random_vector(index_t n, std::uint64_t seed, float scale) {
    std::vector<float> v(static_cast<std::size_t>(n));
    fill(v.data(), v.size(), seed, scale);
    return v;
}

/// The machine's streaming read bandwidth, measured in the same run as what is held to it: a
/// 1 GiB f32 array summed by every OpenMP thread.
inline void BM_ReadBandwidth(benchmark::State& state) {
    const std::size_t n = std::size_t(1) << 28; // 1 GiB of floats
    std::vector<float> a(n);
    fill(a.data(), n, 5, 1.0f);
    for (auto _ : state) {
        // 64 independent partial sums per thread (four AVX-512 registers' worth): one running
        // float sum is bound by the add latency (~12 GB/s here), not by memory.
        float total = 0;
#if defined(_OPENMP)
#pragma omp parallel reduction(+ : total)
#endif
        {
            float acc[64] = {};
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
            for (std::size_t i = 0; i < n; i += 64)
                for (std::size_t j = 0; j < 64; ++j) acc[j] += a[i + j];
            for (const float v : acc) total += v;
        }
        benchmark::DoNotOptimize(total);
    }
    state.counters["GB/s"] = benchmark::Counter(double(n * sizeof(float)) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Calls `timed` then `other` in every iteration, so that the drifts of this shared machine hit
/// both alike; the iteration time is `timed`'s (register with UseManualTime). Returns
/// other's total time / timed's total time.
template <class Timed, class Other>
double run_paired(benchmark::State& state, Timed&& timed, Other&& other) {
    using clock = std::chrono::steady_clock;
    double timed_total = 0, other_total = 0;
    for (auto _ : state) {
        const auto t0 = clock::now();
        timed();
        const auto t1 = clock::now();
        other();
        const auto t2 = clock::now();
        const double a = std::chrono::duration<double>(t1 - t0).count();
        timed_total += a;
        other_total += std::chrono::duration<double>(t2 - t1).count();
        state.SetIterationTime(a);
    }
    return other_total / timed_total;
}

} // namespace hypermoe::bench
