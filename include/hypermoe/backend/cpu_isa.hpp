#pragma once
// The instructions our own kernels (the block formats' in block_linear.hpp, bf16's in
// panels.hpp) may use, found once per process from CPUID: every path is compiled into every
// build (through `target` attributes), and which one a call runs is chosen here, at run time.
// The tiers: portable C++, AVX2 (with FMA and F16C: most laptops' and desktops' CPUs, and every
// x86 server of the last ten years), AVX-512 F + BW, and AVX-512 with VNNI or BF16.
// The environment variable HYPERMOE_ISA caps the choice so that the tests run every kernel a CPU
// can run: `portable` (plain C++ only), `avx2` (no AVX-512) or `avx512` (AVX-512 F + BW, no VNNI
// and no BF16).

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "hypermoe/core/dtype.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HYPERMOE_X86_KERNELS 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define HYPERMOE_X86_KERNELS 0
#endif

// A header with AVX-512 intrinsics puts its kernels between these two. GCC 12 flags the
// intrinsics' own _mm512_undefined_* start values as (maybe) uninitialised once they are inlined
// (GCC bug 105593, fixed in 13); the warnings are false.
#if defined(__GNUC__) && !defined(__clang__)
#define HYPERMOE_INTRINSICS_BEGIN                                                                                      \
    _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                       \
        _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define HYPERMOE_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#define HYPERMOE_INTRINSICS_BEGIN
#define HYPERMOE_INTRINSICS_END
#endif

namespace hypermoe::detail {

/// The instruction set a kernel runs on.
enum class kernel_isa : std::uint8_t { portable, avx2, avx512, avx512_vnni, avx512_bf16 };

[[nodiscard]] constexpr std::string_view to_string(kernel_isa i) noexcept {
    constexpr std::string_view names[] = {"portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};
    return names[static_cast<int>(i)];
}

#if HYPERMOE_X86_KERNELS
/// F16C (VCVTPH2PS), which clang 14's __builtin_cpu_supports does not name: CPUID leaf 1.
[[nodiscard]] inline bool has_f16c() noexcept {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

/// The lanes of an AVX2 mask load / store that bits [0, 8) of `bits` select (the AVX2 kernels'
/// partial tiles).
__attribute__((target("avx2"))) inline __m256i avx2_lane_mask(unsigned bits) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}

/// The 8 floats at p in the lanes `lanes` selects (avx2_lane_mask; the rest read as 0), or all
/// 8 with `full`: plain moves where every lane is in range, as VMASKMOVPS is slow on AMD (Zen 3).
__attribute__((target("avx2"))) inline __m256 avx2_load_lanes(const float* p, __m256i lanes, bool full) {
    return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes);
}
/// Stores v's lanes that `lanes` selects at p, or all 8 with `full` (as avx2_load_lanes).
__attribute__((target("avx2"))) inline void avx2_store_lanes(float* p, __m256i lanes, bool full, __m256 v) {
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes, v);
}
#endif

/// What this CPU offers our kernels (after the HYPERMOE_ISA cap).
struct cpu_features {
    bool avx2 = false;   ///< AVX2, FMA and F16C
    bool avx512 = false; ///< AVX-512 F and BW (with AVX2 and F16C: every CPU that has it)
    bool vnni = false;   ///< and VL + VNNI (VPDPBUSD)
    bool bf16 = false;   ///< and VL + BF16 (VDPBF16PS)
};

[[nodiscard]] inline cpu_features cpu_isa() {
    static const cpu_features cpu = [] {
        cpu_features f;
#if HYPERMOE_X86_KERNELS
        __builtin_cpu_init();
        f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
        f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
        const bool vl = f.avx512 && __builtin_cpu_supports("avx512vl");
        f.vnni = vl && __builtin_cpu_supports("avx512vnni");
        f.bf16 = vl && __builtin_cpu_supports("avx512bf16");
        if (const char* cap = std::getenv("HYPERMOE_ISA"); cap != nullptr) {
            const std::string_view c(cap);
            if (c == "portable") f = cpu_features{};
            else if (c == "avx2") f.avx512 = f.vnni = f.bf16 = false;
            else if (c == "avx512") f.vnni = f.bf16 = false;
        }
#endif
        return f;
    }();
    return cpu;
}

/// This CPU's features as `hypermoe inspect` prints them, e.g. "avx512 vnni bf16".
[[nodiscard]] inline std::string cpu_isa_names() {
    const cpu_features f = cpu_isa();
    if (!f.avx512) return f.avx2 ? "avx2" : "portable";
    return std::string("avx512") + (f.vnni ? " vnni" : "") + (f.bf16 ? " bf16" : "");
}

/// The widest of AVX-512, AVX2 and portable code this CPU runs.
[[nodiscard]] inline kernel_isa vector_kernel() {
    const cpu_features f = cpu_isa();
    return f.avx512 ? kernel_isa::avx512 : f.avx2 ? kernel_isa::avx2 : kernel_isa::portable;
}

/// The kernel a block-format (q8_0 / q4_0) linear of precision `p` runs: `exact` on AVX-512 F + BW
/// or AVX2 where present; `fast` on VNNI where present, else on VPMADDUBSW (AVX-512 BW's or
/// AVX2's), else the portable integer kernel (the same block dots, so results differ between
/// CPUs only in f32 summation order).
[[nodiscard]] inline kernel_isa block_kernel(precision p) {
    if (p == precision::fast && cpu_isa().vnni) return kernel_isa::avx512_vnni;
    return vector_kernel();
}

/// The kernel a bf16 linear of precision `p` runs: `exact` widens the weights (AVX-512 F or AVX2
/// where present); `fast` multiplies bf16 activations by bf16 weights with VDPBF16PS where present,
/// else runs the exact kernel on the activations rounded to bf16 (the same products, which are
/// exact in f32).
[[nodiscard]] inline kernel_isa bf16_kernel(precision p) {
    if (p == precision::fast && cpu_isa().bf16) return kernel_isa::avx512_bf16;
    return vector_kernel();
}

/// The name of the kernel weights stored as `t` run on with precision `p` (f32: the backend's own
/// dispatch, named by the caller).
[[nodiscard]] inline std::string_view kernel_isa_name(dtype t, precision p = precision::exact) {
    if (is_block_format(t)) return to_string(block_kernel(p));
    return to_string(bf16_kernel(p));
}

} // namespace hypermoe::detail
