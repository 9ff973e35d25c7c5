#pragma once
// The instructions our own kernels (the block formats' in block_linear.hpp, bf16's in
// panels.hpp) may use, found once per process from CPUID (x86) or the kernel's HWCAP bits
// (AArch64 Linux): every path is compiled into every build (through `target` attributes), and
// which one a call runs is chosen here, at run time.
// The x86 tiers: portable C++, AVX2 (with FMA and F16C: most laptops' and desktops' CPUs, and
// every x86 server of the last ten years), AVX-512 F + BW, AVX-512 with VNNI or BF16, and
// AMX-INT8 (the tile registers of Intel's Sapphire Rapids and later, where the OS lets the process
// use them). On AArch64 the block formats' `fast` kernel has two: NEON's widening multiplies
// (every AArch64 CPU) and SDOT (ARMv8.2's dot product: Cortex-A55/A76 and later, Neoverse, Apple
// M); the rest is portable C++, which the compiler vectorises for NEON.
// The environment variable HYPERMOE_ISA caps the choice so that the tests run every kernel a CPU
// can run: `portable` (plain C++ only), `avx2` (no AVX-512), `avx512` (AVX-512 F + BW, no VNNI,
// no BF16 and no AMX), `avx512_vnni` (no AMX) or, on AArch64, `neon` (no SDOT). HYPERMOE_AMX=emulate runs the AMX-INT8 block
// kernel on a CPU with AVX-512 VNNI but no AMX, its tile instructions emulated in C++ (slowly),
// so that the kernel's own logic is tested on every such CPU (block_linear.hpp, AmxTiles).
// Other CPUs and compilers compile the portable code only (HYPERMOE_X86_KERNELS and
// HYPERMOE_NEON_KERNELS 0); defining HYPERMOE_NO_X86_KERNELS makes an x86 build do the same,
// which is how CI checks that such a build still compiles.

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "hypermoe/core/dtype.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(HYPERMOE_NO_X86_KERNELS)
#define HYPERMOE_X86_KERNELS 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define HYPERMOE_X86_KERNELS 0
#endif

// The NEON kernels on AArch64 (GCC and Clang). The SDOT one: GCC compiles it into every build,
// through a `target` attribute (HYPERMOE_TARGET_DOTPROD, which the NEON kernel's instantiations
// share: CI runs that one on an ARMv8.0 CPU model, where an SDOT would trap); Clang 14's
// arm_neon.h offers the dot product intrinsics only to builds for a CPU that has them
// (-march=armv8.2-a+dotprod and later, Apple's default), so with Clang it is there in those.
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define HYPERMOE_NEON_KERNELS 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#define HYPERMOE_NEON_SDOT 1
#define HYPERMOE_TARGET_DOTPROD
#elif !defined(__clang__)
#define HYPERMOE_NEON_SDOT 1
#define HYPERMOE_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define HYPERMOE_NEON_SDOT 0
#define HYPERMOE_TARGET_DOTPROD
#endif
#else
#define HYPERMOE_NEON_KERNELS 0
#define HYPERMOE_NEON_SDOT 0
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

// Before each loop of a kernel over its registers (compile-time bounds): unrolled completely at
// -O2 too, where GCC 12 unrolls only what does not grow the code and leaves arrays of
// accumulators in memory (at -O2 the kernels took 1.3-3.1x as long as at -O3; benchmarks.md).
// Clang gets nothing: it fully unrolls such loops itself, and warns (-Wpass-failed) where a
// request cannot be met, as for loops around a runtime one at -O1. Nor does GCC at -O0, where
// it ignores the request and says so ("ignoring loop annotation"), an error under -Werror.
#if defined(__clang__) || !defined(__OPTIMIZE__)
#define HYPERMOE_UNROLL
#else
#define HYPERMOE_UNROLL _Pragma("GCC unroll 16")
#endif

namespace hypermoe::detail {

/// The instruction set a kernel runs on.
enum class kernel_isa : std::uint8_t { portable, avx2, avx512, avx512_vnni, avx512_bf16, amx_int8, neon, neon_dotprod };

[[nodiscard]] constexpr std::string_view to_string(kernel_isa i) noexcept {
    constexpr std::string_view names[] = {"portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8", "neon", "neon_dotprod"};
    return names[static_cast<int>(i)];
}

#if HYPERMOE_X86_KERNELS
/// F16C (VCVTPH2PS), which clang 14's __builtin_cpu_supports does not name: CPUID leaf 1.
[[nodiscard]] inline bool has_f16c() noexcept {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24 and 25) and the OS lets
/// this process use the tile registers: Linux (5.16 and later) enables them per process on
/// request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), which is asked here, once.
[[nodiscard]] inline bool amx_int8_usable() noexcept {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0 || (edx & (1u << 24)) == 0 || (edx & (1u << 25)) == 0) return false;
#if defined(__linux__)
    constexpr long get_permission = 0x1022, request_permission = 0x1023, xtiledata = 18;
    if (syscall(SYS_arch_prctl, request_permission, xtiledata) != 0) return false;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, get_permission, &granted) == 0 && (granted & (1ul << xtiledata)) != 0;
#else
    return false; // our kernels ask for the tiles the Linux way only
#endif
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
    bool amx_int8 = false;    ///< and AMX-TILE + AMX-INT8, usable by this process (or emulated)
    bool amx_emulated = false; ///< amx_int8 is HYPERMOE_AMX=emulate's C++ tiles, not the CPU's
    bool neon = false;    ///< AArch64's NEON (AdvSIMD, on every AArch64 CPU), with GCC or Clang
    bool dotprod = false; ///< and SDOT (FEAT_DotProd), in a build with the kernel that uses it
};

#if HYPERMOE_NEON_SDOT
/// Whether this AArch64 CPU has SDOT: always in a build for such CPUs, else from Linux's HWCAP
/// bits (other systems: no).
[[nodiscard]] inline bool has_dotprod() noexcept {
#if defined(__ARM_FEATURE_DOTPROD)
    return true;
#elif defined(__linux__)
    constexpr unsigned long asimddp = 1ul << 20; // HWCAP_ASIMDDP (asm/hwcap.h)
    return (getauxval(AT_HWCAP) & asimddp) != 0;
#else
    return false;
#endif
}
#endif

[[nodiscard]] inline cpu_features cpu_isa() {
    static const cpu_features cpu = [] {
        cpu_features f;
        [[maybe_unused]] const char* cap = std::getenv("HYPERMOE_ISA");
        [[maybe_unused]] const std::string_view c(cap != nullptr ? cap : "");
#if HYPERMOE_NEON_KERNELS
        f.neon = c != "portable";
#endif
#if HYPERMOE_NEON_SDOT
        f.dotprod = f.neon && c != "neon" && has_dotprod();
#endif
#if HYPERMOE_X86_KERNELS
        __builtin_cpu_init();
        f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
        f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
        const bool vl = f.avx512 && __builtin_cpu_supports("avx512vl");
        f.vnni = vl && __builtin_cpu_supports("avx512vnni");
        f.bf16 = vl && __builtin_cpu_supports("avx512bf16");
        if (c == "portable") f = cpu_features{};
        else if (c == "avx2") f.avx512 = f.vnni = f.bf16 = false;
        else if (c == "avx512") f.vnni = f.bf16 = false;
        // The AMX kernel falls back to the VNNI one for few rows, so it needs VNNI too (every AMX
        // CPU has it). The OS is asked for the tiles only where they would be used.
        if (f.vnni && c != "avx512_vnni") {
            const char* amx = std::getenv("HYPERMOE_AMX");
            f.amx_emulated = amx != nullptr && std::string_view(amx) == "emulate";
            f.amx_int8 = f.amx_emulated || amx_int8_usable();
        }
#endif
        return f;
    }();
    return cpu;
}

/// This CPU's features as `hypermoe inspect` prints them, e.g. "avx512 vnni bf16" (AArch64:
/// "neon dotprod", "neon" or "portable").
[[nodiscard]] inline std::string cpu_isa_names() {
    const cpu_features f = cpu_isa();
    if (f.neon) return f.dotprod ? "neon dotprod" : "neon";
    if (!f.avx512) return f.avx2 ? "avx2" : "portable";
    return std::string("avx512") + (f.vnni ? " vnni" : "") + (f.bf16 ? " bf16" : "") +
           (f.amx_int8 ? f.amx_emulated ? " amx_int8(emulated)" : " amx_int8" : "");
}

/// The widest of AVX-512, AVX2 and portable code this CPU runs.
[[nodiscard]] inline kernel_isa vector_kernel() {
    const cpu_features f = cpu_isa();
    return f.avx512 ? kernel_isa::avx512 : f.avx2 ? kernel_isa::avx2 : kernel_isa::portable;
}

/// The fewest rows a block-format `fast` call must have to take the AMX-INT8 kernel (a tile
/// register's rows; BlockLinear::amx_rows): fewer run on VNNI.
inline constexpr int amx_min_rows = 16;

/// The kernel a block-format (q8_0 / q4_0 / mxfp4 / q4_k) linear of precision `p` runs: `exact` on
/// AVX-512 F + BW or AVX2 where present; `fast` on AMX-INT8 where present (calls of at least
/// amx_min_rows rows; fewer on VNNI), else on VNNI, else on VPMADDUBSW (AVX-512 BW's or
/// AVX2's), else on AArch64's SDOT, else NEON's, else the portable integer kernel (the same block dots, so
/// results differ between CPUs only in f32 summation order; AMX and VNNI give the same bits).
[[nodiscard]] inline kernel_isa block_kernel(precision p) {
    if (p == precision::fast && cpu_isa().neon) return cpu_isa().dotprod ? kernel_isa::neon_dotprod : kernel_isa::neon;
    if (p == precision::fast && cpu_isa().amx_int8) return kernel_isa::amx_int8;
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
    if (is_block_format(t)) {
        const kernel_isa k = block_kernel(p);
        static_assert(amx_min_rows == 16, "the names below give the AMX kernel's row threshold");
        if (k == kernel_isa::amx_int8)
            return cpu_isa().amx_emulated ? "amx_int8 emulated (avx512_vnni below 16 rows)" : "amx_int8 (avx512_vnni below 16 rows)";
        return to_string(k);
    }
    return to_string(bf16_kernel(p));
}

} // namespace hypermoe::detail
