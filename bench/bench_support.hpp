#pragma once
// What the benchmarks share: fast deterministic data (splitmix64), so gigabytes of weights fill
// in seconds and every binary times the same numbers.

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

} // namespace hypermoe::bench
