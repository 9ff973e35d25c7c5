#pragma once
// The oneDNN backend (opt-in: include this header and link libdnnl; oneDNN 2.6 as Debian
// ships it). oneDNN's fast matmul (brgemm) needs the row count M and the row strides fixed when
// the primitive is created, and serves any run-time M only through `gemm:jit`, which is up to
// 1.5x slower at M = 4-32 because it cannot use brgemm's blocked weight layout. So every
// (K, N, epilogue) gets one fixed-M primitive per entry of `onednn_row_buckets` (1, 2, 3, 4, 6,
// ... 256 rows: about 13 ms of creation in all, at construction, shared through a process-wide
// cache). They all take the weights in the same blocked layout (checked at creation), so each
// linear stores its weights once. A call with M rows runs as 256-row pieces and a remainder
// padded up to its bucket (at most 15 rows of padding). A padded or strided piece goes through
// workspace scratch.
//
// Concurrency: a oneDNN primitive is immutable once created, but in oneDNN's default scratchpad
// mode it owns one scratchpad that two concurrent executions would share. Every primitive here
// is created in user scratchpad mode and each call passes scratch taken from the caller's
// Workspace, so one const linear serves any number of threads at once. A primitive also fixes
// at creation how many threads it splits its work over; running it with fewer (another
// omp_set_num_threads, a Workspace thread budget, a call from inside a parallel region) would
// leave work undone. So the thread count a call will run with is part of what selects its
// primitives: a linear holds one set per thread count it has run at, the first call at a new
// count creates that set (once per process and shape, through the same cache).
//
// Two limits of oneDNN 2.6 shape the code:
//  * a combination that lands on the `ref` implementation (~0.1 GFLOP/s) is re-created without
//    post-ops, and the epilogue then runs in our own pass;
//  * bf16 matmul is emulated without avx512_bf16 (about 55 GFLOP/s vs 300 f32 here) and always
//    rounds activations to bf16, so bf16 weights are held once, as bf16 panels (panels.hpp, 2
//    bytes per weight), and every call runs that kernel (`exact`: the weights widened in
//    registers, within 1.1x of the f32 primitive at 64 and 512 rows and twice as fast at a few
//    rows, where reading the weights is the cost; `fast`: bf16 activations on VDPBF16PS where the
//    CPU has it, 1.8x the f32 primitive; docs/design.md). The one exception: where oneDNN runs its
//    bf16 matmul on AMX (onednn_bf16_primitive), bf16 `fast` weights are held once in that
//    primitive's layout and run through the same bucket primitives as f32, on activations
//    rounded to bf16 as our kernel rounds them;
//  * brgemm, the matmul that takes fixed M and a scratchpad, needs AVX-512. Below it (an AVX2
//    CPU, or DNNL_MAX_CPU_ISA=AVX2) every f32 matmul is `gemm:jit`, which allocates its packing
//    buffers on every call and splits K across threads at small M, so its results change with
//    the thread count. There f32 weights are held as our own f32 panels too (panels.hpp), so a
//    linear keeps its promises (nothing allocated per call, the same bits at any thread count)
//    on every CPU (onednn_f32_brgemm).

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/panels.hpp"
#include "hypermoe/backend/block_linear.hpp"
#include "hypermoe/backend/linear_spec.hpp"

namespace hypermoe {

namespace detail {

inline const dnnl::engine& onednn_engine() {
    static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

/// One stream per thread: oneDNN CPU streams are cheap, and not to be shared between threads.
inline dnnl::stream& onednn_stream() {
    thread_local dnnl::stream stream(onednn_engine());
    return stream;
}

/// Which argument of an execution a memory object is for: one object per role, so the source
/// and destination of a square matrix never share one. The panel roles are a (K, N) weight laid
/// out as our f32 panels (onednn_panel_desc).
enum class OnednnRole { source, source_bf16, destination, bias, scratchpad, panels_of_w, panels_of_wt };

/// The memory desc of a (K, N) f32 weight tensor (the primitives' W^T) laid out as the panel
/// kernels read weights (pack_f32_panels): with `role` panels_of_wt, B = W^T, whose N columns go
/// in panels of 16 (the layout WeightPanels holds: offset (n / 16) 16 K + 16 k + n % 16); with
/// panels_of_w, B = W, whose K columns go in panels (offset (k / 16) 16 N + 16 n + k % 16). The
/// panelled dimension is padded to a multiple of 16, which a reorder fills with zeros.
[[nodiscard]] inline dnnl::memory::desc onednn_panel_desc(index_t k, index_t n, OnednnRole role) {
    using dt = dnnl::memory::data_type;
    dnnl::memory::desc desc({k, n}, dt::f32, {n, 1});
    const int along = role == OnednnRole::panels_of_w ? 0 : 1; // the dimension cut into panels
    const index_t other = along == 0 ? n : k;
    dnnl_memory_desc_t& d = desc.data;
    d.padded_dims[along] = (d.dims[along] + 15) / 16 * 16;
    d.format_desc.blocking.strides[along] = 16 * other; // from one panel to the next
    d.format_desc.blocking.strides[1 - along] = 16;      // from one row of a panel to the next
    d.format_desc.blocking.inner_nblks = 1;
    d.format_desc.blocking.inner_blks[0] = 16;
    d.format_desc.blocking.inner_idxs[0] = along;
    return desc;
}

/// A memory object of a dense (rows, cols) f32 matrix (bf16 for source_bf16), of `rows` bytes (the scratchpad), or of a
/// (rows = K, cols = N) weight as panels (the panel roles), for the calling thread and `role`,
/// pointed at `data`: made on first use of that shape by the thread, then only repointed, so
/// executing a primitive does not create memory objects. Not shared between threads: a call
/// runs on its caller's thread.
inline const dnnl::memory& onednn_thread_memory(OnednnRole role, index_t rows, index_t cols, void* data) {
    using dt = dnnl::memory::data_type;
    thread_local std::map<std::tuple<OnednnRole, index_t, index_t>, dnnl::memory> memories;
    auto& m = memories[{role, rows, cols}];
    if (!m) {
        const auto& engine = onednn_engine();
        switch (role) {
        case OnednnRole::source:
        case OnednnRole::bias:
        case OnednnRole::destination: m = dnnl::memory({{rows, cols}, dt::f32, {cols, 1}}, engine, DNNL_MEMORY_NONE); break;
        case OnednnRole::source_bf16: m = dnnl::memory({{rows, cols}, dt::bf16, {cols, 1}}, engine, DNNL_MEMORY_NONE); break;
        case OnednnRole::scratchpad: m = dnnl::memory({{rows}, dt::u8, {1}}, engine, DNNL_MEMORY_NONE); break;
        case OnednnRole::panels_of_w:
        case OnednnRole::panels_of_wt: m = dnnl::memory(onednn_panel_desc(rows, cols, role), engine, DNNL_MEMORY_NONE); break;
        }
    }
    m.set_data_handle(data);
    return m;
}

/// Row counts that get a primitive of their own (ascending): dense at the small end, then steps
/// of 8 up to 64 and of 16 up to 256, so that padding a call up to its bucket never costs more
/// than about 16 rows of compute.
inline constexpr std::array<index_t, 26> onednn_row_buckets{1,   2,   3,   4,   6,   8,   12,  16,  24,
                                                            32,  40,  48,  56,  64,  80,  96,  112, 128,
                                                            144, 160, 176, 192, 208, 224, 240, 256};

/// One piece of a call: `rows` of the remaining rows, run by the primitive of bucket `index`.
struct OnednnPiece {
    index_t rows;
    std::size_t index;
};

/// The next piece of a call with `remaining` (> 0) rows left: 256 rows, or all that remain,
/// padded up to the next bucket. Padding by at most 15 rows is cheaper than splitting, which
/// reads the weights once more (on this machine one pass over the weights costs about as much as
/// computing 18 rows: 2 x 240 GFLOP/s / 27 GB/s).
[[nodiscard]] constexpr OnednnPiece onednn_next_piece(index_t remaining) noexcept {
    const auto& b = onednn_row_buckets;
    if (remaining >= b.back()) return {b.back(), b.size() - 1};
    std::size_t up = 0;
    while (b[up] < remaining) ++up;
    return {remaining, up};
}

/// The largest bucket any piece of an M-row call uses (0 for M = 0).
[[nodiscard]] constexpr index_t onednn_largest_piece(index_t rows) noexcept {
    return rows <= 0 ? 0 : onednn_row_buckets[onednn_next_piece(rows).index];
}

/// The fixed-M matmul primitives of one (K, N, epilogue, source type), one per row bucket, and
/// the post-ops they fuse.
struct OnednnMatmul {
    std::vector<dnnl::matmul> primitives; ///< primitives[i] runs onednn_row_buckets[i] rows
    dnnl::memory::desc weights;           ///< the layout all of them take the weights in
    std::string impl;                     ///< oneDNN's implementation name, e.g. "brg:avx512_core"
    bool fused_activation = false;        ///< Act runs inside the primitive.
    bool fused_sum = false;               ///< C += runs inside the primitive.
    int threads = 1;                      ///< the OpenMP thread count the primitives were made for
    std::vector<std::size_t> scratchpad;  ///< scratchpad bytes of each bucket's primitive
    index_t columns = 0;                  ///< N, the outputs they compute
};

inline void append_activation(dnnl::post_ops& po, activation_kind kind) {
    using alg = dnnl::algorithm;
    switch (kind) {
    case activation_kind::identity: break;
    case activation_kind::relu: po.append_eltwise(1.f, alg::eltwise_relu, 0.f, 0.f); break;
    case activation_kind::gelu: po.append_eltwise(1.f, alg::eltwise_gelu_erf, 0.f, 0.f); break;
    case activation_kind::gelu_tanh: po.append_eltwise(1.f, alg::eltwise_gelu_tanh, 0.f, 0.f); break;
    case activation_kind::silu: po.append_eltwise(1.f, alg::eltwise_swish, 1.f, 0.f); break;
    case activation_kind::relu2:
        po.append_eltwise(1.f, alg::eltwise_relu, 0.f, 0.f);
        po.append_eltwise(1.f, alg::eltwise_square, 0.f, 0.f);
        break;
    }
}

/// oneDNN's plan for a matmul of M rows by a (K, N) weight whose layout oneDNN chooses, A and W
/// of type `source` (f32 or bf16), C f32, in user scratchpad mode, for the calling thread's
/// OpenMP thread count.
[[nodiscard]] inline dnnl::matmul::primitive_desc onednn_plan(index_t m, index_t k, index_t n,
                                                              dnnl::memory::data_type source = dnnl::memory::data_type::f32) {
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc a({m, k}, source, {k, 1}), c({m, n}, dt::f32, {n, 1});
    const dnnl::memory::desc w({k, n}, source, dnnl::memory::format_tag::any);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, w, c), attr, onednn_engine());
}

/// The weight layout of (K, N): the one oneDNN prefers for the largest bucket at `threads`
/// threads. Every bucket, at every thread count, is then created for this layout, so a linear
/// stores its weights once (left to choose, oneDNN 2.6 picks other blockings for some buckets
/// at 3 or more threads).
[[nodiscard]] inline dnnl::memory::desc onednn_weight_layout(index_t k, index_t n, int threads, dnnl::memory::data_type source) {
    const ThreadCountScope thread_count(threads);
    try {
        return onednn_plan(onednn_row_buckets.back(), k, n, source).weights_desc();
    } catch (const dnnl::error& e) {
        throw backend_error(concat("onednn: cannot create a matmul for K = ", k, ", N = ", n, ": ", e.what()));
    }
}

/// Whether oneDNN's f32 matmul is brgemm here (decided once per process from a probe primitive;
/// DNNL_MAX_CPU_ISA caps it). Only then do f32 weights go to oneDNN primitives (file comment).
[[nodiscard]] inline bool onednn_f32_brgemm() {
    static const bool brgemm = [] {
        try {
            return std::string_view(onednn_plan(64, 256, 256).impl_info_str()).starts_with("brg");
        } catch (const dnnl::error&) {
            return false;
        }
    }();
    return brgemm;
}

/// What runs the oneDNN backend's f32 linears here: "onednn" (its brgemm primitives) or the
/// instructions of our f32 panel kernels (backend/panels.hpp) where oneDNN has no brgemm.
[[nodiscard]] inline std::string_view onednn_f32_kernel_name() {
    return onednn_f32_brgemm() ? std::string_view("onednn") : to_string(vector_kernel());
}

/// oneDNN's implementation of a bf16 matmul here (e.g. "brg:avx512_core_amx"), from a probe
/// primitive made once per process; empty if oneDNN cannot make one.
[[nodiscard]] inline const std::string& onednn_bf16_impl() {
    static const std::string impl = [] {
        try {
            return std::string(onednn_plan(64, 256, 256, dnnl::memory::data_type::bf16).impl_info_str());
        } catch (const dnnl::error&) {
            return std::string();
        }
    }();
    return impl;
}

/// Whether bf16 weights of precision `fast` go to oneDNN's bf16 matmul (held once, in its
/// layout) instead of our VDPBF16PS panels: where oneDNN runs it on AMX (the CPU's tile
/// registers: oneDNN's brgemm on AMX, which our panel kernels do not use) and HYPERMOE_ISA does
/// not cap our kernels below AVX-512 BF16. Decided once per process. HYPERMOE_ONEDNN_BF16 forces
/// the choice, so that every CPU tests both paths: `primitive` (wherever oneDNN has a bf16 matmul
/// other than its reference one: on AVX-512 BF16 brgemm, on plain AVX-512 `gemm:jit`) or
/// `panels`; any other value is the default.
[[nodiscard]] inline bool onednn_bf16_primitive() {
    static const bool use = [] {
        const char* env = std::getenv("HYPERMOE_ONEDNN_BF16");
        const std::string_view choice = env != nullptr ? env : "";
        const std::string& impl = onednn_bf16_impl();
        if (choice == "panels" || impl.empty() || impl.starts_with("ref")) return false;
        if (choice == "primitive") return true;
        return cpu_isa().bf16 && impl.find("amx") != std::string::npos;
    }();
    return use;
}

/// The reorders of a (K, N) weight from the primitives' layout `w` into our f32 panels, each in
/// user scratchpad mode: what a backward's products read (onednn::linear::backward).
struct OnednnPanelReorders {
    dnnl::reorder to_w, to_wt;    ///< into OnednnRole::panels_of_w and panels_of_wt
    std::size_t scratchpad = 0;   ///< bytes: the larger of their scratchpads
    /// The layout is brgemm's f32 BA16a64b without padding (onednn_is_ba16a64b): dz W then
    /// transposes W's blocks into panels group by group (onednn_pack_w_panels) instead of
    /// reordering all of W first.
    bool ba16a64b = false;
};

/// Whether the (K, N) layout `w` is f32 BA16a64b without padding, as oneDNN 2.6's brgemm matmul
/// holds f32 weights on AVX-512: element (k, n) at (k / 16) 1024 + (n / 64) 64 K + (k % 16) 64 +
/// n % 64 floats, i.e. for each 64 columns n, K rows of 64 floats.
[[nodiscard]] inline bool onednn_is_ba16a64b(const dnnl::memory::desc& w, index_t k, index_t n) {
    const dnnl_memory_desc_t& d = w.data;
    if (d.format_kind != dnnl_blocked || d.ndims != 2 || d.data_type != dnnl_f32 || d.offset0 != 0) return false;
    if (k <= 0 || n <= 0 || k % 16 != 0 || n % 64 != 0 || d.dims[0] != k || d.dims[1] != n || d.padded_dims[0] != k ||
        d.padded_dims[1] != n)
        return false;
    const auto& b = d.format_desc.blocking;
    return b.inner_nblks == 2 && b.inner_blks[0] == 16 && b.inner_idxs[0] == 0 && b.inner_blks[1] == 64 && b.inner_idxs[1] == 1 &&
           b.strides[0] == 16 * 64 && b.strides[1] == 64 * k;
}

/// Panels [q0, q0 + count) of W as OnednnRole::panels_of_w lays them out (panel q: inputs
/// 16 q .. 16 q + 15 as its lanes, N rows), from W^T (K, N) held in BA16a64b at `w`: each
/// 16 x 64 block's four 16 x 16 blocks transposed. The same floats as the reorder writes.
inline void onednn_pack_w_panels(kernel_isa isa, const float* w, index_t k, index_t n, index_t q0, index_t count, float* out) {
    for (index_t q = q0; q < q0 + count; ++q, out += n * 16)
        for (index_t nb = 0; nb < n / 64; ++nb) {
            const float* block = w + q * 16 * 64 + nb * 64 * k; // rows k = 16 q .., 64 columns n = 64 nb ..
            for (index_t s = 0; s < 4; ++s) transpose16(isa, block + 16 * s, 64, out + (64 * nb + 16 * s) * 16);
        }
}

/// Panels [p0, p0 + count) of W^T as OnednnRole::panels_of_wt lays them out (panel p: outputs
/// 16 p .. 16 p + 15 as its lanes, K rows), from W^T (K, N) held in BA16a64b at `w`: each row of
/// a panel is 16 consecutive floats there. The same floats as the reorder writes.
inline void onednn_pack_wt_panels(const float* w, index_t k, index_t p0, index_t count, float* out) noexcept {
    for (index_t p = p0; p < p0 + count; ++p, out += k * 16) {
        const float* strip = w + (p / 4) * 64 * k + (p % 4) * 16; // columns n = 16 p .., rows k = 0 ..
        for (index_t i = 0; i < k; ++i) std::memcpy(out + i * 16, strip + (i / 16) * 1024 + (i % 16) * 64, 16 * sizeof(float));
    }
}

/// The panel reorders of (K, N) from layout `w`: made once per process, (K, N) and layout (a
/// linear's layout is decided once per (K, N)), so that a backward neither creates a primitive
/// nor takes a lock.
[[nodiscard]] inline const OnednnPanelReorders* onednn_panel_reorders(index_t k, index_t n, const dnnl::memory::desc& w) {
    using Entry = std::pair<dnnl::memory::desc, std::unique_ptr<const OnednnPanelReorders>>;
    static std::mutex mutex;
    static std::map<std::pair<index_t, index_t>, std::vector<Entry>> cache; // descs have == only
    const std::lock_guard lock(mutex);
    auto& entries = cache[{k, n}];
    for (const auto& [layout, reorders] : entries)
        if (layout == w) return reorders.get();
    try {
        dnnl::primitive_attr attr;
        attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
        const auto& engine = onednn_engine();
        const dnnl::reorder::primitive_desc w_pd(engine, w, engine, onednn_panel_desc(k, n, OnednnRole::panels_of_w), attr);
        const dnnl::reorder::primitive_desc wt_pd(engine, w, engine, onednn_panel_desc(k, n, OnednnRole::panels_of_wt), attr);
        entries.emplace_back(w, std::make_unique<const OnednnPanelReorders>(OnednnPanelReorders{
                                    dnnl::reorder(w_pd), dnnl::reorder(wt_pd),
                                    std::max(w_pd.scratchpad_desc().get_size(), wt_pd.scratchpad_desc().get_size()),
                                    onednn_is_ba16a64b(w, k, n)}));
    } catch (const dnnl::error& e) {
        throw backend_error(concat("onednn: cannot create the weight reorders into panels for K = ", k, ", N = ", n, ": ", e.what()));
    }
    return entries.back().second.get();
}

/// The (K, N) weight `from` (in the layout `reorders` were made for) into `out` as the panels of
/// `role` (onednn_panel_desc; f32_panel_floats(N, K) or (K, N) floats): one execution, with the
/// reorder's scratchpad from `ws`. Errors name `who`.
inline void onednn_reorder_into_panels(const OnednnPanelReorders& reorders, const dnnl::memory& from, index_t k, index_t n,
                                       OnednnRole role, float* out, Workspace& ws, std::string_view who) {
    Workspace::Scope scope(ws, padded_bytes<std::byte>(index_t(reorders.scratchpad)));
    const auto scratchpad = ws.take<std::byte>(index_t(reorders.scratchpad));
    try {
        const auto& to = onednn_thread_memory(role, k, n, out);
        std::array<dnnl_exec_arg_t, 3> args{{{DNNL_ARG_FROM, from.get()}, {DNNL_ARG_TO, to.get()}}};
        int nargs = 2;
        if (!scratchpad.empty()) {
            const auto& sm = onednn_thread_memory(OnednnRole::scratchpad, index_t(scratchpad.size()), 0, scratchpad.data());
            args[std::size_t(nargs++)] = {DNNL_ARG_SCRATCHPAD, sm.get()};
        }
        const auto& reorder = role == OnednnRole::panels_of_w ? reorders.to_w : reorders.to_wt;
        const auto status = dnnl_primitive_execute(reorder.get(), onednn_stream().get(), nargs, args.data());
        if (status != dnnl_success)
            throw backend_error(concat(who, ": oneDNN weight reorder into panels failed with status ", static_cast<int>(status)));
        onednn_stream().wait();
    } catch (const dnnl::error& e) {
        throw backend_error(concat(who, ": oneDNN weight reorder into panels failed: ", e.what()));
    }
}

/// The bucket primitives of one (K, N, epilogue) for `threads` OpenMP threads and the weight
/// layout `w`, each in user scratchpad mode.
[[nodiscard]] inline std::shared_ptr<const OnednnMatmul> make_onednn_matmul(index_t k, index_t n, bool bias,
                                                                          activation_kind act, bool accumulate,
                                                                          int threads, const dnnl::memory::desc& w,
                                                                          dnnl::memory::data_type source) {
    // oneDNN plans a primitive for the calling thread's thread count at creation.
    const ThreadCountScope thread_count(threads);
    using dt = dnnl::memory::data_type;
    const auto is_ref = [](const dnnl::matmul::primitive_desc& pd) {
        return std::string_view(pd.impl_info_str()).starts_with("ref");
    };
    try {
        const dnnl::memory::desc b({1, n}, dt::f32, {n, 1});
        const auto create = [&](index_t m, bool with_act, bool with_sum) {
            const dnnl::memory::desc a({m, k}, source, {k, 1});
            const dnnl::memory::desc c({m, n}, dt::f32, {n, 1});
            dnnl::post_ops po;
            if (with_act) append_activation(po, act);
            if (with_sum) po.append_sum(1.f);
            dnnl::primitive_attr attr;
            attr.set_post_ops(po);
            attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
            auto desc = bias ? dnnl::matmul::desc(a, w, b, c) : dnnl::matmul::desc(a, w, c);
            return dnnl::matmul::primitive_desc(desc, attr, onednn_engine());
        };
        const bool sum = accumulate && act == activation_kind::identity;
        // All buckets fused if every one of them avoids `ref`, else all without post-ops.
        const auto create_all = [&](bool fused) {
            std::vector<dnnl::matmul::primitive_desc> pds;
            for (const index_t m : onednn_row_buckets) pds.push_back(create(m, fused, fused && sum));
            return pds;
        };
        auto pds = create_all(true);
        bool fused = std::none_of(pds.begin(), pds.end(), is_ref);
        if (!fused) pds = create_all(false);
        auto result = std::make_shared<OnednnMatmul>();
        result->weights = w;
        result->impl = pds.front().impl_info_str();
        result->fused_activation = fused;
        result->fused_sum = fused && sum;
        result->threads = threads;
        result->columns = n;
        for (std::size_t i = 0; i < pds.size(); ++i) {
            if (is_ref(pds[i]))
                throw backend_error(concat("onednn: no optimised matmul for M = ", onednn_row_buckets[i], ", K = ",
                                           k, ", N = ", n, " (got ", pds[i].impl_info_str(), ")"));
            if (pds[i].weights_desc() != result->weights)
                throw backend_error(concat("onednn: the matmul for M = ", onednn_row_buckets[i], ", K = ", k,
                                           ", N = ", n, " does not take the layout chosen for the weights"));
            result->primitives.emplace_back(pds[i]);
            result->scratchpad.push_back(pds[i].scratchpad_desc().get_size());
        }
        return result;
    } catch (const dnnl::error& e) {
        throw backend_error(concat("onednn: cannot create a matmul for K = ", k, ", N = ", n, ": ", e.what()));
    }
}

/// Process-wide cache: one set of bucket primitives per (K, N, bias, activation, accumulate,
/// threads, source type). Entries live as long as the process, so a pointer to one stays valid.
/// Only the first use of a shape at a thread count takes the lock; linears remember what they got.
[[nodiscard]] inline const OnednnMatmul* onednn_matmul(index_t k, index_t n, bool bias, activation_kind act,
                                                       bool accumulate, int threads,
                                                       dnnl::memory::data_type source = dnnl::memory::data_type::f32) {
    using Key = std::tuple<index_t, index_t, bool, activation_kind, bool, int, dnnl::memory::data_type>;
    static std::mutex mutex;
    static std::map<Key, std::shared_ptr<const OnednnMatmul>> cache;
    // decided once per (K, N, source type)
    static std::map<std::tuple<index_t, index_t, dnnl::memory::data_type>, dnnl::memory::desc> layouts;
    const std::lock_guard lock(mutex);
    auto& entry = cache[Key{k, n, bias, act, accumulate, threads, source}];
    if (!entry) {
        auto layout = layouts.find({k, n, source});
        if (layout == layouts.end())
            layout = layouts.emplace(std::tuple{k, n, source}, onednn_weight_layout(k, n, threads, source)).first;
        entry = make_onednn_matmul(k, n, bias, act, accumulate, threads, layout->second, source);
    }
    return entry.get();
}

/// Columns a tile of a (K, N) weight in the blocked layout `w` can start at: the product of
/// N's inner blocks (64 in brgemm's BA16a64b), so that a tile's first element starts a block;
/// 0 if `w` is not a blocked layout.
[[nodiscard]] inline index_t onednn_column_block(const dnnl::memory::desc& w) {
    const dnnl_memory_desc_t& d = w.data;
    if (d.format_kind != dnnl_blocked || d.ndims != 2) return 0;
    index_t block = 1;
    for (int i = 0; i < d.format_desc.blocking.inner_nblks; ++i)
        if (d.format_desc.blocking.inner_idxs[i] == 1) block *= d.format_desc.blocking.inner_blks[i];
    return block;
}

/// Columns [n0, n0 + width) of a (K, N) weight laid out as `w` (n0 a multiple of
/// onednn_column_block(w)): the same layout over (K, width), whose elements start
/// onednn_column_offset(w, n0) elements into the whole's. Where N's blocks are outermost
/// (BA16a64b), a tile is a contiguous run of the whole.
[[nodiscard]] inline dnnl::memory::desc onednn_column_tile(const dnnl::memory::desc& w, index_t width) {
    dnnl::memory::desc tile = w;
    const index_t block = onednn_column_block(w);
    tile.data.dims[1] = width;
    tile.data.padded_dims[1] = (width + block - 1) / block * block;
    return tile;
}
[[nodiscard]] inline index_t onednn_column_offset(const dnnl::memory::desc& w, index_t n0) {
    return n0 / onednn_column_block(w) * index_t(w.data.format_desc.blocking.strides[1]);
}

/// The bucket primitives of columns tiles `width` wide of a (K, N) weight laid out as `w`, for
/// one thread (a tile is a pool's work item), from a process-wide cache as onednn_matmul's.
[[nodiscard]] inline const OnednnMatmul* onednn_tile_matmul(index_t k, index_t n, index_t width, bool bias, activation_kind act,
                                                            bool accumulate, const dnnl::memory::desc& w,
                                                            dnnl::memory::data_type source) {
    using Key = std::tuple<index_t, index_t, index_t, bool, activation_kind, bool, dnnl::memory::data_type>;
    static std::mutex mutex;
    static std::map<Key, std::shared_ptr<const OnednnMatmul>> cache;
    const std::lock_guard lock(mutex);
    auto& entry = cache[Key{k, n, width, bias, act, accumulate, source}];
    if (!entry) entry = make_onednn_matmul(k, width, bias, act, accumulate, 1, onednn_column_tile(w, width), source);
    return entry.get();
}

/// A memory object of the columns tile `width` wide of a (K, N) weight laid out as `w`, for the
/// calling thread, pointed at `data`: made on first use, then only repointed (onednn_thread_memory).
inline const dnnl::memory& onednn_thread_tile_memory(const dnnl::memory::desc& w, index_t width, void* data) {
    thread_local std::map<std::tuple<index_t, index_t, index_t, int>, dnnl::memory> memories;
    auto& m = memories[{index_t(w.data.dims[0]), index_t(w.data.dims[1]), width, int(w.data.data_type)}];
    if (!m) m = dnnl::memory(onednn_column_tile(w, width), onednn_engine(), DNNL_MEMORY_NONE);
    m.set_data_handle(data);
    return m;
}

/// What a linear remembers of the cache: its primitives for each thread count it ran at, read
/// without a lock (counts above `slots` go through the cache's lock every call).
class OnednnMatmulTable {
public:
    static constexpr int slots = 256;
    OnednnMatmulTable() {
        for (auto& s : by_threads_) s.store(nullptr, std::memory_order_relaxed);
    }
    [[nodiscard]] const OnednnMatmul* find(int threads) const noexcept {
        return threads < slots ? by_threads_[std::size_t(threads)].load(std::memory_order_acquire) : nullptr;
    }
    void remember(int threads, const OnednnMatmul* m) noexcept {
        if (threads < slots) by_threads_[std::size_t(threads)].store(m, std::memory_order_release);
    }

private:
    std::array<std::atomic<const OnednnMatmul*>, slots> by_threads_;
};

/// What a linear remembers of its forward_columns tiles' primitives (onednn_tile_matmul): a few
/// widths, read without a lock (a width beyond them goes through the cache's lock every call).
class OnednnTileTable {
public:
    static constexpr int slots = 8;
    OnednnTileTable() {
        for (auto& s : sets_) s.store(nullptr, std::memory_order_relaxed);
    }
    [[nodiscard]] const OnednnMatmul* find(index_t columns) const noexcept {
        for (const auto& s : sets_)
            if (const OnednnMatmul* m = s.load(std::memory_order_acquire); m == nullptr || m->columns == columns) return m;
        return nullptr;
    }
    void remember(const OnednnMatmul* m) noexcept {
        for (auto& s : sets_) {
            const OnednnMatmul* expected = nullptr;
            if (s.compare_exchange_strong(expected, m, std::memory_order_acq_rel) || expected->columns == m->columns) return;
        }
    }

private:
    std::array<std::atomic<const OnednnMatmul*>, slots> sets_;
};

} // namespace detail

struct onednn {
    static constexpr std::string_view name = "onednn";

    template <class Act>
    class linear : public detail::LinearBase {
    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              has_bias_(!bias.empty()), table_(std::make_shared<detail::OnednnMatmulTable>()),
              tiles_(std::make_shared<detail::OnednnTileTable>()) {
            if (is_block_format(storage_)) { // held as blocks only; no primitive
                blocks_.emplace(w, bias, storage_, prec_, name_, accumulate_);
                return;
            }
            bias_f32_.assign(bias.begin(), bias.end());
            // Held once, as panels, where every call runs our own kernel: bf16 unless `fast` goes
            // to oneDNN's bf16 matmul (onednn_bf16_primitive: AMX), f32 where oneDNN has no
            // brgemm (file comment).
            using dt = dnnl::memory::data_type;
            const bool bf16 = storage_ == dtype::bf16;
            if (bf16 ? !(prec_ == precision::fast && detail::onednn_bf16_primitive()) : !detail::onednn_f32_brgemm()) {
                if (k_ > 0 && n_ > 0) panels_ = detail::WeightPanels(w, storage_, prec_);
                return;
            }
            if (k_ > 0 && n_ > 0) matmul_ = lookup(detail::current_threads());
            // Source weights as the (K, N) matrix W^T, then one reorder into the primitive's layout.
            // Weights already of the storage type are read in place (W, N x K with row stride s,
            // is W^T with strides {1, s}); others are converted into a plain f32 copy first (f32
            // weights stored as bf16: rounded to bf16 there, then reordered exactly).
            if (!matmul_) return; // K = 0 or N = 0: A W^T is zero, only the bias remains
            const auto& engine = detail::onednn_engine();
            std::vector<float> wt;
            const bool in_place = w.type() == storage_; // f32 into f32, bf16 into bf16 (`fast` on AMX)
            if (!in_place) {
                wt.resize(static_cast<std::size_t>(k_ * n_));
                for (index_t r = 0; r < n_; ++r)
                    for (index_t c = 0; c < k_; ++c)
                        wt[static_cast<std::size_t>(c * n_ + r)] = detail::stored_value(w.at(r, c), storage_);
            }
            if (!bf16) reorders_ = detail::onednn_panel_reorders(k_, n_, matmul_->weights); // backward is f32 only
            try {
                dnnl::memory src = in_place ? dnnl::memory({{k_, n_}, source(), {1, w.stride()}}, engine,
                                                           const_cast<std::byte*>(w.row_bytes(0)))
                                            : dnnl::memory({{k_, n_}, dt::f32, {n_, 1}}, engine, wt.data());
                // In our own buffer, so that a rebuild in a BufferReuse scope takes the old one's pages.
                weight_buffer_ = detail::aligned_array<std::byte>(matmul_->weights.get_size());
                weights_ = dnnl::memory(matmul_->weights, engine, weight_buffer_.get());
                dnnl::reorder(src, weights_).execute(detail::onednn_stream(), src, weights_);
                if (!bias.empty()) {
                    bias_ = dnnl::memory({{1, n_}, dt::f32, {n_, 1}}, engine);
                    std::copy(bias.begin(), bias.end(), static_cast<float*>(bias_.get_data_handle()));
                }
                detail::onednn_stream().wait();
            } catch (const dnnl::error& e) {
                throw backend_error(detail::concat(name_, ": oneDNN weight reorder failed: ", e.what()));
            }
        }

        /// What runs this linear's forward: oneDNN's implementation of its primitives (e.g.
        /// "brg:avx512_core" for f32, "brg:avx512_core_amx" for bf16 `fast` on AMX), or "panels"
        /// (our panel kernels, panels.hpp), "blocks" (q8_0 / q4_0 / mxfp4 / q4_k, block_linear.hpp), "none"
        /// (K = 0 or N = 0).
        [[nodiscard]] std::string_view kernel() const noexcept {
            if (blocks_) return "blocks";
            if (!panels_.empty()) return "panels";
            return matmul_ != nullptr ? std::string_view(matmul_->impl) : std::string_view("none");
        }

        /// Scratch of a call with `rows` rows at the calling thread's current thread count (the
        /// first query at a new count creates that count's primitives).
        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const {
            if (blocks_) return blocks_->workspace_bytes(rows);
            if (!panels_.empty()) return panels_.workspace_bytes(rows, accumulate_);
            if (!matmul_ || rows <= 0) return 0;
            // A padded or strided piece needs (bucket, K) and (bucket, N) scratch; every piece
            // needs its primitive's scratchpad.
            const index_t piece = detail::onednn_largest_piece(rows);
            const std::size_t pieces = detail::padded_bytes<float>(piece, k_) + detail::padded_bytes<float>(piece, n_);
            const std::size_t rounded = storage_ == dtype::bf16 ? detail::padded_bytes<std::uint16_t>(rows, k_) : 0;
            return (accumulate_ ? detail::padded_bytes<float>(rows, n_) : 0) + rounded + pieces + scratchpad_bytes(rows);
        }

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            check_call(a, c);
            if (a.rows() == 0) return;
            if (blocks_) return (*blocks_)(a, c, ws, scale);
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            const float* bias = bias_f32_.empty() ? nullptr : bias_f32_.data();
            if (!panels_.empty()) // bf16 storage, or f32 without brgemm
                return panels_.apply<Act>(a, c, ws, bias, scale, accumulate_);
            if (!matmul_) {
                detail::epilogue_bias_only<Act>(c, bias_f32_.empty() ? nullptr : bias_f32_.data(), scale, accumulate_);
                return;
            }
            const Operands whole = whole_operands(current());
            if (storage_ == dtype::bf16) // `fast` (exact is on the panels): A rounded to bf16 once, as they round it
                return apply(whole, prepare(a, ws).rounded, c, ws, scale);
            apply(whole, a, c, ws, scale);
        }

        /// Bytes prepare() takes for `rows` rows: the rows rounded to bf16 (bf16 `fast`) or
        /// quantised (`fast` blocks).
        [[nodiscard]] std::size_t prepared_bytes(index_t rows) const noexcept {
            if (blocks_) return blocks_->prepared_bytes(rows);
            if (!panels_.empty()) return panels_.prepared_bytes(rows);
            return matmul_ != nullptr && storage_ == dtype::bf16 && rows > 0 ? detail::padded_bytes<std::uint16_t>(rows, k_) : 0;
        }
        /// The input as every forward_columns tile reads it (PreparedInput), in `ws`.
        [[nodiscard]] PreparedInput prepare(ConstMatrixView<float> a, Workspace& ws) const {
            if (blocks_) return blocks_->prepare(a, ws);
            if (!panels_.empty()) return panels_.prepare(a, ws);
            PreparedInput p{a, {}, {}, {}};
            if (matmul_ != nullptr && storage_ == dtype::bf16 && a.rows() > 0) { // rounded as our kernel rounds them
                const MatrixView<std::uint16_t> a16 = ws.take_matrix<std::uint16_t>(a.rows(), k_);
                detail::bf16_round_rows(a, a16.data(), a16.stride(), detail::cpu_isa().bf16);
                p.rounded = a16;
            }
            return p;
        }

        /// Scratch of forward_columns for `rows` rows and `columns` columns (the first call for
        /// a tile width creates that width's primitives).
        [[nodiscard]] std::size_t forward_columns_workspace_bytes(index_t rows, index_t columns) const {
            if (blocks_) return blocks_->columns_workspace_bytes(rows, columns);
            if (!panels_.empty()) return detail::WeightPanels::columns_workspace_bytes(rows, columns, accumulate_);
            if (!matmul_ || rows <= 0 || columns <= 0) return 0;
            const index_t piece = detail::onednn_largest_piece(rows);
            return (accumulate_ ? detail::padded_bytes<float>(rows, columns) : 0) + detail::padded_bytes<float>(piece, k_) +
                   detail::padded_bytes<float>(piece, columns) + scratchpad_bytes(column_primitives(columns), rows);
        }

        /// Columns [n0, n0 + c.cols()) of operator()'s c, from prepare(a)'s input, on the calling
        /// thread. oneDNN's f32 (and AMX bf16) matmul runs on primitives made for the tile's
        /// width, on the weights' columns where they are (brgemm's BA16a64b holds 64 columns
        /// after another: a tile at a multiple of 64 is a valid weight at an offset), into a
        /// contiguous scratch (with a strided output oneDNN 2.6 leaves brgemm); each output is
        /// then summed as the whole call sums it (probed, docs/design.md; tested per shape).
        void forward_columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, float scale = 1.0f) const {
            check_forward_columns(p.a, c, n0, forward_column_unit());
            const index_t m = p.a.rows();
            if (m == 0 || c.cols() == 0) return;
            if (blocks_) return blocks_->columns(p, c, n0, ws, scale);
            Workspace::Scope scope(ws, forward_columns_workspace_bytes(m, c.cols()));
            const detail::ThreadCountScope one(1); // after the scope, which may apply ws's thread budget
            const float* bias = bias_f32_.empty() ? nullptr : bias_f32_.data();
            if (!panels_.empty()) return panels_.apply_columns<Act>(p, c, n0, ws, bias, scale, accumulate_);
            if (!matmul_) return detail::epilogue_bias_only<Act>(c, bias != nullptr ? bias + n0 : nullptr, scale, accumulate_);
            const Operands o = column_operands(n0, c.cols());
            if (storage_ == dtype::bf16) return apply(o, p.rounded, c, ws, scale);
            apply(o, p.a, c, ws, scale);
        }

        /// Scratch of backward() for `rows` rows: the gradient of Z (Z itself when recomputed, on
        /// W^T reordered into panels where oneDNN holds the weights), then the larger of
        /// backward_input's and weight_gradient's.
        [[nodiscard]] std::size_t backward_workspace_bytes(index_t rows) const noexcept {
            if (storage_ != dtype::f32) return 0; // backward() refuses them before taking scratch
            return affine_gradient_bytes(rows) + std::max({affine_columns_workspace_bytes(rows, n_), backward_input_workspace_bytes(rows, k_),
                                                           weight_gradient_workspace_bytes(rows, n_, k_)});
        }

        /// The backward of operator()(a, c, ws, scale) given dc = dL/dC: da [+]= dz W,
        /// g.weight += dz^T a, g.bias += the column sums of dz, where dz = scale * dc * Act'(Z)
        /// is the gradient of Z = A W^T + b (recomputed when Act is not the identity), through
        /// backward_input and weight_gradient. The products run on our panel kernels
        /// (detail::PanelKernels, as the f32 panels' forward): no allocation, and the same bits
        /// at every thread count (oneDNN's run-time-shaped `gemm:jit` allocated on every call and
        /// split K across threads). f32 storage only.
        void backward(ConstMatrixView<float> a, ConstMatrixView<float> dc, MatrixView<float> da, const LinearGrads& g, Workspace& ws,
                      bool accumulate_input = false, float scale = 1.0f) const {
            check_backward(a, dc, da, g);
            const index_t m = a.rows();
            if (m == 0) return;
            Workspace::Scope scope(ws, backward_workspace_bytes(m));
            const ConstMatrixView<float> dz =
                affine_gradient<Act>(dc, scale, ws, [&](MatrixView<float> z) { affine_columns(a, z, 0, ws); });
            backward_input(dz, da, 0, ws, accumulate_input);
            weight_gradient(a, dz, g.weight, ws);
            detail::add_column_sums(dz, g.bias);
        }

        /// Columns a forward_columns or affine_columns tile is made of: 64 where oneDNN holds
        /// f32 weights as brgemm's BA16a64b (its column blocks, and 4 of affine_columns' panels),
        /// the column block of the AMX bf16 primitives' layout, 16 on our panels, 32 in blocks;
        /// all of N where oneDNN's layout cannot be cut into columns (affine_columns reorders it
        /// into panels whole first).
        [[nodiscard]] index_t forward_column_unit() const noexcept {
            if (blocks_) return detail::BlockWeights::tile;
            if (matmul_ == nullptr) return detail::PanelKernels::panel;
            const index_t block = detail::onednn_column_block(matmul_->weights);
            const bool cut = storage_ == dtype::bf16 ? block > 1 : reorders_->ba16a64b;
            return cut ? std::lcm(block, detail::PanelKernels::panel) : std::max<index_t>(n_, 1);
        }

        /// Scratch of affine_columns at the calling thread's thread count: W^T's panels (from
        /// BA16a64b each thread's 4 at a time; from another oneDNN layout all of them, through a
        /// reorder; our f32 panels are read as held).
        [[nodiscard]] std::size_t affine_columns_workspace_bytes(index_t /*rows*/, index_t /*columns*/) const noexcept {
            if (storage_ != dtype::f32 || matmul_ == nullptr) return 0;
            if (reorders_->ba16a64b)
                return detail::padded_bytes<float>(detail::PanelKernels::packed_scratch_floats(k_, detail::current_threads()));
            return detail::padded_bytes<float>(detail::f32_panel_floats(k_, n_)) + detail::padded_bytes<std::byte>(index_t(reorders_->scratchpad));
        }

        /// Columns [n0, n0 + z.cols()) of Z = a W^T + b, the pre-activation a backward
        /// recomputes, on our panel kernels (the same sums as the forward on our panels).
        /// f32 storage only.
        void affine_columns(ConstMatrixView<float> a, MatrixView<float> z, index_t n0, Workspace& ws) const {
            check_affine_columns(a, z, n0, forward_column_unit());
            const index_t m = a.rows();
            if (m == 0 || z.cols() == 0) return;
            Workspace::Scope scope(ws, affine_columns_workspace_bytes(m, z.cols()));
            constexpr index_t panel = detail::PanelKernels::panel;
            const index_t p_begin = n0 / panel, p_end = (n0 + z.cols() + panel - 1) / panel;
            const detail::PanelKernels kernels(detail::vector_kernel());
            if (matmul_ != nullptr && reorders_->ba16a64b) {
                float* scratch = ws.take<float>(detail::PanelKernels::packed_scratch_floats(k_, detail::current_threads())).data();
                const float* w = static_cast<const float*>(weights_.get_data_handle());
                kernels.multiply_packed(
                    k_, n_, a.data(), a.stride(), m, z.data(), z.stride(), false, scratch,
                    [&](index_t p0, index_t count, float* out) { detail::onednn_pack_wt_panels(w, k_, p0, count, out); }, p_begin, p_end);
            } else if (matmul_ != nullptr) {
                float* wt_panels = ws.take<float>(detail::f32_panel_floats(k_, n_)).data();
                detail::onednn_reorder_into_panels(*reorders_, weights_, k_, n_, detail::OnednnRole::panels_of_wt, wt_panels, ws, name_);
                kernels.multiply(wt_panels, k_ * panel, k_, n_, a.data(), a.stride(), m, z.data(), z.stride(), false, p_begin, p_end);
            } else if (!panels_.empty()) {
                panels_.multiply_columns(a.data(), a.stride(), m, z.data(), z.stride(), p_begin, p_end);
            } else {
                for (index_t r = 0; r < m; ++r) std::fill_n(z.row(r).data(), z.cols(), 0.0f);
            }
            if (!bias_f32_.empty())
                for (index_t r = 0; r < m; ++r)
                    for (index_t c = 0; c < z.cols(); ++c) z(r, c) += bias_f32_[std::size_t(n0 + c)];
        }

        /// Columns a backward_input tile is made of: a panel (16) where dz W reads W a few
        /// panels at a time, all of K where oneDNN's layout is first reordered into panels whole.
        [[nodiscard]] index_t backward_column_unit() const noexcept {
            return matmul_ != nullptr && !reorders_->ba16a64b ? std::max<index_t>(k_, 1) : detail::PanelKernels::panel;
        }

        /// Scratch of backward_input at the calling thread's thread count: W's panels for the
        /// call (from brgemm's BA16a64b or our panels: each thread's 4 panels at a time; from
        /// another oneDNN layout: all of W, through a reorder).
        [[nodiscard]] std::size_t backward_input_workspace_bytes(index_t /*rows*/, index_t /*columns*/) const noexcept {
            if (storage_ != dtype::f32) return 0;
            if (matmul_ == nullptr) return panels_.empty() ? 0 : panels_.transposed_workspace_bytes(detail::current_threads());
            if (reorders_->ba16a64b)
                return detail::padded_bytes<float>(detail::PanelKernels::packed_scratch_floats(n_, detail::current_threads()));
            return detail::padded_bytes<float>(detail::f32_panel_floats(n_, k_)) + detail::padded_bytes<std::byte>(index_t(reorders_->scratchpad));
        }

        /// The input gradient's columns [k0, k0 + da.cols()) alone: da [+]= dz W[:, k0 ..] for
        /// dz = dL/dZ (M, N), with the bits backward() gives them. dz W reads W from our f32
        /// panels 4 transposed panels at a time (WeightPanels::multiply_transposed), or from the
        /// primitives' blocked layout: brgemm's BA16a64b 4 panels at a time too, its 16 x 16
        /// blocks transposed by each thread just before it multiplies them (onednn_pack_w_panels:
        /// where reordering all of W first wrote 23 MB for a 5632 x 1024 weight and read it back,
        /// the Mixtral-like layer's kept backward at T = 512 took 125-137 instead of 117 ms on a
        /// 2-core Zen 5, docs/training.md); other layouts through one oneDNN reorder into panels.
        void backward_input(ConstMatrixView<float> dz, MatrixView<float> da, index_t k0, Workspace& ws, bool accumulate = false) const {
            check_backward_input(dz, da, k0, backward_column_unit());
            const index_t m = dz.rows();
            if (m == 0 || da.cols() == 0) return;
            Workspace::Scope scope(ws, backward_input_workspace_bytes(m, da.cols()));
            const detail::kernel_isa isa = detail::vector_kernel();
            constexpr index_t panel = detail::PanelKernels::panel;
            const index_t p_begin = k0 / panel, p_end = (k0 + da.cols() + panel - 1) / panel;
            if (matmul_ != nullptr && reorders_->ba16a64b) {
                float* scratch = ws.take<float>(detail::PanelKernels::packed_scratch_floats(n_, detail::current_threads())).data();
                const float* w = static_cast<const float*>(weights_.get_data_handle());
                detail::PanelKernels(isa).multiply_packed(
                    n_, k_, dz.data(), dz.stride(), m, da.data(), da.stride(), accumulate, scratch,
                    [&](index_t q0, index_t count, float* out) { detail::onednn_pack_w_panels(isa, w, k_, n_, q0, count, out); }, p_begin,
                    p_end);
            } else if (matmul_ != nullptr) {
                float* w_panels = ws.take<float>(detail::f32_panel_floats(n_, k_)).data(); // W as B (N, K) in panels
                detail::onednn_reorder_into_panels(*reorders_, weights_, k_, n_, detail::OnednnRole::panels_of_w, w_panels, ws, name_);
                detail::PanelKernels(isa).multiply(w_panels, n_ * panel, n_, k_, dz.data(), dz.stride(), m, da.data(), da.stride(),
                                                   accumulate, p_begin, p_end);
            } else if (!panels_.empty()) {
                panels_.multiply_transposed(dz.data(), dz.stride(), m, da.data(), da.stride(), accumulate, ws, p_begin, p_end);
            } else if (!accumulate) { // K = 0 or N = 0
                for (index_t r = 0; r < m; ++r) std::fill_n(da.row(r).data(), da.cols(), 0.0f);
            }
        }

        /// Scratch of weight_gradient: dz^T and the packed input block.
        [[nodiscard]] std::size_t weight_gradient_workspace_bytes(index_t rows, index_t n, index_t k) const noexcept {
            return detail::padded_bytes<float>(n, rows) + detail::panel_gemm_bytes(rows, k);
        }

        /// A block of the weight gradient: dw (n, k) += dz^T a for dz (M, n) the gradient of
        /// outputs [n0, n0 + n) and a (M, k) the inputs [k0, k0 + k), dw the gradient's block at
        /// (n0, k0): dz transposed (16 x 16 blocks at a time), then our panel kernels
        /// (panel_gemm), each element summed in token order.
        void weight_gradient(ConstMatrixView<float> a, ConstMatrixView<float> dz, MatrixView<float> dw, Workspace& ws) const {
            check_weight_gradient(a, dz, dw);
            const index_t m = a.rows(), n = dz.cols();
            if (m == 0 || n == 0) return;
            Workspace::Scope scope(ws, weight_gradient_workspace_bytes(m, n, a.cols()));
            const MatrixView<float> dzt = ws.take_matrix<float>(n, m);
            detail::transpose_matrix(detail::vector_kernel(), dz, dzt);
            detail::panel_gemm(detail::vector_kernel(), n, a.cols(), m, dzt.data(), dzt.stride(), a.data(), a.stride(), false, dw.data(),
                               dw.stride(), true, ws);
        }

    private:
        /// The type of the primitives' A and W: bf16 for bf16 storage (which reaches the
        /// primitives only as `fast` on AMX), else f32.
        [[nodiscard]] dnnl::memory::data_type source() const noexcept {
            return storage_ == dtype::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
        }

        /// The primitives for `threads` threads: remembered, or from the process-wide cache.
        [[nodiscard]] const detail::OnednnMatmul* lookup(int threads) const {
            if (const auto* m = table_->find(threads)) return m;
            const auto* m = detail::onednn_matmul(k_, n_, has_bias_, Act::kind, accumulate_, threads, source());
            if (matmul_ != nullptr && m->weights != matmul_->weights)
                throw backend_error(detail::concat(name_, ": oneDNN wants another weight layout at ", threads,
                                                   " threads than at ", matmul_->threads, " (K = ", k_, ", N = ", n_, ")"));
            table_->remember(threads, m);
            return m;
        }
        /// The primitives for the thread count this call will run with.
        [[nodiscard]] const detail::OnednnMatmul& current() const { return *lookup(detail::current_threads()); }

        /// The largest scratchpad of the buckets an M-row call runs (on `m`, or on the primitives
        /// of the calling thread's thread count).
        [[nodiscard]] std::size_t scratchpad_bytes(index_t rows) const { return scratchpad_bytes(current(), rows); }
        [[nodiscard]] static std::size_t scratchpad_bytes(const detail::OnednnMatmul& m, index_t rows) {
            const std::size_t last = detail::onednn_next_piece(std::min(rows, detail::onednn_row_buckets.back())).index;
            std::size_t bytes = 0;
            for (std::size_t i = 0; i <= last; ++i) bytes = std::max(bytes, m.scratchpad[i]);
            return detail::padded_bytes<std::byte>(static_cast<index_t>(bytes));
        }

        /// What a product runs on: its primitives, its output width, and its weights' and
        /// bias's memory objects (the whole linear's, or a tile's at an offset into them).
        struct Operands {
            const detail::OnednnMatmul& m;
            index_t n;
            const dnnl::memory& w;
            const dnnl::memory* bias; ///< or null
        };
        [[nodiscard]] Operands whole_operands(const detail::OnednnMatmul& m) const { return {m, n_, weights_, bias_ ? &bias_ : nullptr}; }

        /// The primitives of a forward_columns tile `width` wide: made for one thread, for the
        /// weights' columns at an offset (all of them: the 1-thread whole set).
        [[nodiscard]] const detail::OnednnMatmul& column_primitives(index_t width) const {
            if (width == n_) return *lookup(1);
            if (const auto* m = tiles_->find(width)) return *m;
            const auto* m = detail::onednn_tile_matmul(k_, n_, width, has_bias_, Act::kind, accumulate_, matmul_->weights, source());
            tiles_->remember(m);
            return *m;
        }
        /// The operands of columns [n0, n0 + width) on the calling thread.
        [[nodiscard]] Operands column_operands(index_t n0, index_t width) const {
            const detail::OnednnMatmul& m = column_primitives(width);
            if (width == n_) return whole_operands(m);
            const std::size_t element = storage_ == dtype::bf16 ? sizeof(std::uint16_t) : sizeof(float);
            std::byte* w = static_cast<std::byte*>(weights_.get_data_handle()) +
                           std::size_t(detail::onednn_column_offset(matmul_->weights, n0)) * element;
            const dnnl::memory* bias = nullptr;
            if (has_bias_) // oneDNN takes a non-const handle; the bias is only read
                bias = &detail::onednn_thread_memory(detail::OnednnRole::bias, 1, width, const_cast<float*>(bias_f32_.data() + n0));
            return {m, width, detail::onednn_thread_tile_memory(matmul_->weights, width, w), bias};
        }

        /// c [+]= scale * Act(A W^T + b) from A in the primitives' source type (f32, or bf16 bits):
        /// the primitive always adds the bias; it applies Act and C += only where fused.
        template <class T>
        void apply(const Operands& o, ConstMatrixView<T> a, MatrixView<float> c, Workspace& ws, float scale) const {
            const bool sum_in_primitive = accumulate_ && o.m.fused_sum && scale == 1.0f;
            if (!accumulate_ || sum_in_primitive) {
                run(o, a, c, ws);
                // The activation, unless fused, then the scale (epilogue_in_place returns at once
                // for Identity with scale 1)
                if (!o.m.fused_activation) detail::epilogue_in_place<Act>(c, nullptr, scale);
                else detail::epilogue_in_place<Identity>(c, nullptr, scale);
                return;
            }
            MatrixView<float> t = ws.take_matrix<float>(a.rows(), o.n);
            if (o.m.fused_sum) std::fill_n(t.data(), t.rows() * t.cols(), 0.0f); // the fused C += adds to 0
            run(o, a, t, ws);
            if (o.m.fused_activation || o.m.fused_sum) detail::epilogue_accumulate<Identity>(t, c, nullptr, scale);
            else detail::epilogue_accumulate<Act>(t, c, nullptr, scale);
        }

        /// out = A W^T + b with the primitives' fused post-ops (C += where fused_sum), piece by piece.
        template <class T>
        void run(const Operands& o, ConstMatrixView<T> a, MatrixView<float> out, Workspace& ws) const {
            const index_t n = o.n;
            for (index_t row = 0; row < a.rows();) {
                const auto piece = detail::onednn_next_piece(a.rows() - row);
                const index_t bucket = detail::onednn_row_buckets[piece.index];
                const auto& primitive = o.m.primitives[piece.index];
                const std::size_t scratch_bytes = o.m.scratchpad[piece.index];
                const ConstMatrixView<T> as = a.row_block(row, piece.rows);
                const MatrixView<float> os = out.row_block(row, piece.rows);
                const bool dense = piece.rows == 1 || (as.stride() == k_ && os.stride() == n);
                if (piece.rows == bucket && dense) {
                    Workspace::Scope scope(ws, detail::padded_bytes<std::byte>(index_t(scratch_bytes)));
                    execute(o, primitive, bucket, as.data(), os.data(), ws.take<std::byte>(index_t(scratch_bytes)));
                } else { // padded to the bucket's rows, or strided: through scratch
                    Workspace::Scope scope(ws, detail::padded_bytes<T>(bucket, k_) +
                                                   detail::padded_bytes<float>(bucket, n) +
                                                   detail::padded_bytes<std::byte>(index_t(scratch_bytes)));
                    MatrixView<T> sa = ws.take_matrix<T>(bucket, k_);
                    MatrixView<float> sc = ws.take_matrix<float>(bucket, n);
                    const auto scratchpad = ws.take<std::byte>(index_t(scratch_bytes));
                    for (index_t i = 0; i < piece.rows; ++i) std::ranges::copy(as.row(i), sa.row(i).begin());
                    std::fill(sa.data() + piece.rows * k_, sa.data() + bucket * k_, T{});
                    if (o.m.fused_sum) { // C += reads C: the rows, then zeros in the padding
                        for (index_t i = 0; i < piece.rows; ++i) std::ranges::copy(os.row(i), sc.row(i).begin());
                        std::fill(sc.data() + piece.rows * n, sc.data() + bucket * n, 0.0f);
                    }
                    execute(o, primitive, bucket, sa.data(), sc.data(), scratchpad);
                    for (index_t i = 0; i < piece.rows; ++i) std::ranges::copy(sc.row(i), os.row(i).begin());
                }
                row += piece.rows;
            }
        }

        /// One primitive on dense (bucket, K) and (bucket, N) buffers, with its scratchpad.
        template <class T>
        void execute(const Operands& o, const dnnl::matmul& primitive, index_t rows, const T* a, float* c,
                     std::span<std::byte> scratchpad) const {
            static_assert(std::is_same_v<T, float> || std::is_same_v<T, std::uint16_t>, "f32, or bf16 bits");
            constexpr auto role = std::is_same_v<T, float> ? detail::OnednnRole::source : detail::OnednnRole::source_bf16;
            try {
                // oneDNN takes a non-const handle; the source is only read.
                const auto& am = detail::onednn_thread_memory(role, rows, k_, const_cast<T*>(a));
                const auto& cm = detail::onednn_thread_memory(detail::OnednnRole::destination, rows, o.n, c);
                std::array<dnnl_exec_arg_t, 5> args{{{DNNL_ARG_SRC, am.get()},
                                                     {DNNL_ARG_WEIGHTS, o.w.get()},
                                                     {DNNL_ARG_DST, cm.get()}}};
                int nargs = 3;
                if (o.bias != nullptr) args[std::size_t(nargs++)] = {DNNL_ARG_BIAS, o.bias->get()};
                if (!scratchpad.empty()) {
                    const auto& sm = detail::onednn_thread_memory(detail::OnednnRole::scratchpad,
                                                                 index_t(scratchpad.size()), 0, scratchpad.data());
                    args[std::size_t(nargs++)] = {DNNL_ARG_SCRATCHPAD, sm.get()};
                }
                const auto status =
                    dnnl_primitive_execute(primitive.get(), detail::onednn_stream().get(), nargs, args.data());
                if (status != dnnl_success)
                    throw backend_error(detail::concat(name_, ": oneDNN matmul failed with status ",
                                                       static_cast<int>(status)));
                detail::onednn_stream().wait();
            } catch (const dnnl::error& e) {
                throw backend_error(detail::concat(name_, ": oneDNN matmul failed: ", e.what()));
            }
        }

        bool has_bias_ = false;
        std::shared_ptr<detail::OnednnMatmulTable> table_;  ///< stays put when the linear moves
        std::shared_ptr<detail::OnednnTileTable> tiles_;    ///< likewise
        const detail::OnednnMatmul* matmul_ = nullptr;      ///< the construction's; null when K = 0 or N = 0
        const detail::OnednnPanelReorders* reorders_ = nullptr; ///< for backward; set with matmul_ for f32
        std::shared_ptr<std::byte[]> weight_buffer_; ///< weights_'s bytes (copies of this map share them)
        dnnl::memory weights_;
        dnnl::memory bias_;
        std::vector<float> bias_f32_;  ///< the bias, for our own epilogues
        detail::WeightPanels panels_;  ///< bf16 storage (but `fast` on AMX), or f32 without brgemm: the only copy of the weights
        std::optional<detail::BlockLinear<Act>> blocks_; ///< q8_0 / q4_0 / mxfp4 / q4_k storage: the only copy of the weights
    };
};

static_assert(Backend<onednn>);

} // namespace hypermoe
