// Forward allocates nothing after warm-up, counted for real: malloc, calloc, realloc,
// posix_memalign, aligned_alloc and memalign are interposed (as are operator new and delete,
// which glibc's libstdc++ routes through malloc), for every thread of the process, libraries
// included. This executable holds only these tests, as the interposition applies to the whole
// program. Under AddressSanitizer, which interposes the same functions itself, the counting is
// compiled out and the tests are skipped (the other CI stages run them).
#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <new>
#include <string>

#include <unistd.h>

#include <omp.h>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define HYPERMOE_COUNT_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HYPERMOE_COUNT_ALLOCATIONS 0
#endif
#endif
#ifndef HYPERMOE_COUNT_ALLOCATIONS
#define HYPERMOE_COUNT_ALLOCATIONS 1
#endif

namespace {
std::atomic<long> allocations{0};
std::atomic<long> allocated_bytes{0};
[[maybe_unused]] void count(std::size_t n) noexcept { // unused under ASan, where counting is off
    allocations.fetch_add(1, std::memory_order_relaxed);
    allocated_bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
}
} // namespace

#if HYPERMOE_COUNT_ALLOCATIONS
// glibc's own entry points, which every allocation function below forwards to.
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) {
    count(n);
    return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
    count(a * b);
    return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
    count(n);
    return __libc_realloc(p, n);
}
void free(void* p) { __libc_free(p); }
void* memalign(std::size_t alignment, std::size_t n) {
    count(n);
    return __libc_memalign(alignment, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
    count(n);
    return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) {
    count(n);
    void* p = __libc_memalign(alignment, n);
    if (p == nullptr) return ENOMEM;
    *out = p;
    return 0;
}
}
#endif

using namespace hypermoe;

namespace {

/// Allocations and bytes counted while `fn` runs.
struct Counted {
    long count, bytes;
};
template <class Fn>
Counted counted(Fn&& fn) {
    const long before = allocations.load(), before_bytes = allocated_bytes.load();
    fn();
    return {allocations.load() - before, allocated_bytes.load() - before_bytes};
}

} // namespace

TEST_CASE("the counter sees malloc, calloc, realloc, posix_memalign, aligned_alloc and new" *
          doctest::skip(!HYPERMOE_COUNT_ALLOCATIONS)) {
    // Called through volatile pointers: a compiler may elide a malloc/free pair it can see.
    void* (*volatile m)(std::size_t) = std::malloc;
    void* (*volatile ca)(std::size_t, std::size_t) = std::calloc;
    void* (*volatile re)(void*, std::size_t) = std::realloc;
    int (*volatile pm)(void**, std::size_t, std::size_t) = posix_memalign;
    void* (*volatile al)(std::size_t, std::size_t) = std::aligned_alloc;
    void (*volatile fr)(void*) = std::free;
    const Counted c = counted([&] {
        void* a = m(10);
        void* b = ca(2, 8);
        a = re(a, 100);
        void* d = nullptr;
        REQUIRE(pm(&d, 64, 128) == 0);
        void* e = al(64, 128);
        void* f = ::operator new(16); // a new-expression could be elided, a call cannot
        ::operator delete(f);
        fr(e);
        fr(d);
        fr(b);
        fr(a);
    });
    CHECK(c.count == 6);
}

TEST_CASE_TEMPLATE_DEFINE("MoE layer forward allocates nothing after warm-up (d = 1024, ff = 2816, E = 8, k = 2)", B,
                          no_alloc) {
    if (!HYPERMOE_COUNT_ALLOCATIONS) return;
    constexpr index_t d = 1024, ff = 2816, e = 8;
    std::vector<GluExpert<B, Silu>> experts;
    for (index_t x = 0; x < e; ++x) {
        const Matrix<float> g = test::random_matrix(ff, d, std::uint32_t(3 * x + 1), 0.03f),
                            u = test::random_matrix(ff, d, std::uint32_t(3 * x + 2), 0.03f),
                            dn = test::random_matrix(d, ff, std::uint32_t(3 * x + 3), 0.02f);
        experts.emplace_back(GluWeights{.gate = ConstMatrixView<float>(g.view()), .up = ConstMatrixView<float>(u.view()),
                                        .down = ConstMatrixView<float>(dn.view())});
    }
    const Matrix<float> gate = test::random_matrix(e, d, 100);
    const MoeLayer layer(WeightView(ConstMatrixView<float>(gate.view())), TopKRouter(e, TopK{2}), std::move(experts));
    const auto norm_w = test::random_vector(d, 4);
    const auto stack = Sequential(RmsNorm<>(norm_w, 1e-6f), Residual(layer));
    // The reference backend (plain loops, ~1 GFLOP/s) runs fewer rows; it allocates nothing either way.
    constexpr bool slow = std::is_same_v<B, reference>;
    const index_t most = slow ? 8 : 40;
    const Matrix<float> x = test::random_matrix(most, d, 5);
    Matrix<float> y(most, d);
    Workspace ws;
    RoutingPlan plan;
    // Our code allocates nothing at any thread count; at one thread no OpenMP region opens, so
    // whatever the OpenMP runtime does, nothing may be allocated at all (oneDNN's bound aside).
    const int threads = omp_get_max_threads();
    const auto calls = [&] {
        for (const index_t rows : {most, index_t(1), index_t(7), most - 7}) {
            layer.forward(x.view().row_block(0, rows), y.view().row_block(0, rows), ws, plan);
            stack.forward(x.view().row_block(0, rows), y.view().row_block(0, rows), ws);
        }
    };
    // Warm-up: the workspace, the plan's vectors, and per thread the objects of each row count
    // (oneDNN memory objects are made once per thread and shape) grow here.
    calls();
    const Counted c = counted(calls);
    omp_set_num_threads(1);
    calls();
    const Counted one = counted(calls);
    omp_set_num_threads(threads);
    // LLVM's OpenMP runtime (libomp, which the clang build links) allocates in its fork/join
    // bookkeeping, about 30 blocks and 15-20 KB per forward at 2 threads (measured); GNU libgomp
    // (the g++ build, and oneDNN's runtime) allocates nothing. Bound libomp's share per forward.
#if defined(__clang__)
    constexpr long runtime_count = 8 * 64, runtime_bytes = 8 * 32768;
#else
    constexpr long runtime_count = 0, runtime_bytes = 0;
#endif
    MESSAGE(B::name, ": ", c.count, " allocations, ", c.bytes, " bytes in 8 forward calls after warm-up (",
            one.count, " and ", one.bytes, " at 1 thread)");
#if HYPERMOE_HAS_ONEDNN
    if constexpr (std::is_same_v<B, onednn>) {
        // Our code allocates nothing (memory objects are made once per thread and shape, and
        // repointed); oneDNN 2.6's dnnl_primitive_execute builds its argument map on the heap.
        // The bound (docs/threading.md): at most 8 allocations and 512 bytes per execution,
        // never a buffer that scales with the data (measured: 660 allocations and 31 KB in these
        // 8 forwards). A forward runs the router GEMM and 2 GEMMs per active expert: at most
        // 1 + 2 x 8 here.
        constexpr long executions = 8 * (1 + 2 * 8);
        CHECK(c.count <= executions * 8 + runtime_count);
        CHECK(c.bytes <= executions * 512 + runtime_bytes);
        CHECK(one.count <= executions * 8);
        CHECK(one.bytes <= executions * 512);
        return;
    }
#endif
    CHECK(c.count <= runtime_count);
    CHECK(c.bytes <= runtime_bytes);
    CHECK(one.count == 0);
}
TEST_CASE_TEMPLATE_APPLY(no_alloc, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("backward of a norm + residual MoE stack, an MoE layer's from kept activations and a noisy top-k layer's with the smooth load loss allocate nothing after warm-up", B, backward_no_alloc) {
    if (!HYPERMOE_COUNT_ALLOCATIONS) return;
    constexpr index_t d = 192, ff = 320;
    const auto layer = test::make_layer<B>(TopKRouter(8, TopK{2}, {.weighting = {.renormalize = true}}), d, ff);
    const auto norm_w = test::random_vector(d, 4);
    const auto stack = Sequential(RmsNorm<>(norm_w, 1e-6f), Residual(layer));
    const index_t most = 64;
    const Matrix<float> x = test::random_matrix(most, d, 5), dy = test::random_matrix(most, d, 6);
    Matrix<float> dx(most, d);
    Workspace ws;
    auto g = stack.make_gradients();
    auto gl = layer.make_gradients();
    const Context ctx{.aux_losses = {.load_balancing = 0.01, .z_loss = 0.001, .importance = 0.01}};
    // Noisy top-k with Shazeer's smooth load loss as well.
    const auto noisy = test::make_layer<B>(NoisyTopKRouter(8, NoisyTopK{.k = 2, .noise_std = 0.5f, .seed = 3}), d, ff);
    auto gn = noisy.make_gradients();
    const Context noisy_ctx{.noise_seed = 5, .aux_losses = {.importance = 0.01, .load = 0.01}};
    const int threads = omp_get_max_threads();
    MoeActivations kept; // grows to the largest call in the warm-up, then is reused
    Matrix<float> y(most, d);
    const auto calls = [&] {
        for (const index_t rows : {most, index_t(1), index_t(7)}) {
            const auto xs = x.view().row_block(0, rows), dys = dy.view().row_block(0, rows);
            layer.backward(xs, dys, dx.view().row_block(0, rows), gl, ws, ctx);
            stack.backward(xs, dys, dx.view().row_block(0, rows), g, ws, ctx);
            layer.forward(xs, y.view().row_block(0, rows), ws, kept, ctx);
            layer.backward(kept, xs, dys, dx.view().row_block(0, rows), gl, ws, ctx);
            noisy.backward(xs, dys, dx.view().row_block(0, rows), gn, ws, noisy_ctx);
        }
    };
    calls();
    const Counted c = counted(calls);
    omp_set_num_threads(1);
    calls();
    const Counted one = counted(calls);
    omp_set_num_threads(threads);
    MESSAGE(B::name, ": ", c.count, " allocations, ", c.bytes, " bytes in 12 backward calls and 3 forwards after warm-up (", one.count, " and ",
            one.bytes, " at 1 thread)");
#if defined(__clang__)
    // libomp's fork/join bookkeeping (see above); a backward opens more parallel regions than a
    // forward (measured: eigen about 150 blocks and 77 KB per call at 2 threads, none at 1).
    constexpr long runtime_count = 12 * 512, runtime_bytes = 12 * 262144;
#else
    constexpr long runtime_count = 0, runtime_bytes = 0;
#endif
#if HYPERMOE_HAS_ONEDNN
    if constexpr (std::is_same_v<B, onednn>) {
        if (detail::onednn_f32_brgemm()) {
            // With brgemm (AVX-512) the weights live in oneDNN's layout: the forwards (and the
            // backward calls' recomputed forwards) execute matmul primitives, and each linear's
            // backward one or two reorders into panels. oneDNN builds each execution's argument
            // map on the heap: the forward's bound per execution. Per round of calls: 3 row counts
            // x (4 forwards of at most 1 + 3 x 8 executions + 4 backward passes of at most
            // 2 x (1 + 3 x 8) reorders).
            constexpr long executions = 3 * (4 * 25 + 4 * 2 * 25);
            CHECK(c.count <= executions * 8 + runtime_count);
            CHECK(c.bytes <= executions * 512 + runtime_bytes);
            CHECK(one.count <= executions * 8);
            CHECK(one.bytes <= executions * 512);
            return;
        }
    }
#endif
    CHECK(c.count <= runtime_count);
    CHECK(c.bytes <= runtime_bytes);
    CHECK(one.count == 0);
}
TEST_CASE_TEMPLATE_APPLY(backward_no_alloc, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("q8_0, q4_0, mxfp4 and q4_k weights are held once, as blocks (counted in bytes)", B, blocks_held_once) {
    if (!HYPERMOE_COUNT_ALLOCATIONS) return;
    const index_t n = 512, k = 1024;
    const Matrix<float> w = test::random_matrix(n, k, 3, 0.1f);
    for (const dtype format : {dtype::q8_0, dtype::q4_0, dtype::mxfp4, dtype::q4_k}) {
        CAPTURE(to_string(format));
        const Counted c = counted([&] { const typename B::template linear<Identity> lin(w.view(), {}, {"w", false, format}); });
        const long blocks = long(weight_bytes(format, n, k));
        MESSAGE(B::name, " ", to_string(format), ": ", c.bytes, " bytes allocated for ", blocks, " bytes of blocks");
        // The blocks, one row of K floats while quantising, names and bookkeeping (q4_k: its
        // unpacked scales, 8 KiB more than ggml's here): no f32 copy (which alone would be 2 MiB).
        CHECK(c.bytes >= blocks);
        CHECK(c.bytes <= blocks + 64 * 1024);
    }
}
TEST_CASE_TEMPLATE_APPLY(blocks_held_once, test::all_backends);

TEST_CASE("load_model holds one hypernetwork per stack, not one per block (counted in bytes)" *
          doctest::skip(!HYPERMOE_COUNT_ALLOCATIONS)) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("hypermoe-alloc-model-" + std::to_string(::getpid()));
    const index_t d = 32, r = 8, h = 16, dl = 4, layers = 4;
    write_synthetic_checkpoint(dir.string(), {.family = family("hypermoe_gpt2"), .d_model = d, .experts = 4, .top_k = 2,
                                              .layers = layers, .adapter_rank = r, .hyper_dim = h, .layer_dim = dl});
    const Checkpoint ck(dir.string());
    // One hypernetwork's weights (f32): trunk, the two weight heads, the two bias heads.
    const long hyper_bytes = long(sizeof(float)) * long(h * (h + dl) + 2 * d * r * h + r * h + d * h);
    long before = allocated_bytes.load();
    { const auto model = load_model<reference>(ck); }
    const long whole = allocated_bytes.load() - before;
    before = allocated_bytes.load();
    for (index_t l = 0; l < layers; ++l) (void)load_moe_block<reference>(ck, l); // each its own hypernetwork
    const long separate = allocated_bytes.load() - before;
    MESSAGE("load_model: ", whole, " bytes allocated; block by block: ", separate, "; one hypernetwork: ", hyper_bytes);
    CHECK(separate - whole >= (layers - 1) * hyper_bytes);
    fs::remove_all(dir);
}
