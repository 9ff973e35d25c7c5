// Forward allocates nothing after warm-up: global operator new is replaced by a counting one.
// This executable holds only this test, as the replacement applies to the whole program.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "test_support.hpp"

// The replacements below pair malloc with free on purpose; g++ cannot see that they match.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
std::atomic<long> allocations{0};
std::atomic<long> allocated_bytes{0};
} // namespace

void* operator new(std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    allocated_bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    allocated_bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
    const auto al = static_cast<std::size_t>(a);
    if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace hypermoe;

TEST_CASE_TEMPLATE_DEFINE("forward allocates nothing after warm-up", B, no_alloc) {
    constexpr index_t d = 64, ff = 96;
    const Matrix<float> gate = test::random_matrix(ff, d, 1), up = test::random_matrix(ff, d, 2),
                        down = test::random_matrix(d, ff, 3);
    const auto norm_w = test::random_vector(d, 4);
    using Glu = GluExpert<B, Silu>;
    using Ffn = FfnExpert<B, Gelu>;
    const GluWeights gw{.gate = ConstMatrixView<float>(gate.view()), .up = ConstMatrixView<float>(up.view()),
                        .down = ConstMatrixView<float>(down.view())};
    const FfnWeights fw{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())};
    const auto stack = Sequential(RmsNorm<>(norm_w, 1e-6f), Residual(DenseFfn(Glu(gw))), DenseFfn(Ffn(fw)));
    const Matrix<float> x = test::random_matrix(33, d, 5);
    Matrix<float> y(33, d);
    Workspace ws;
    stack.forward(x.view(), y.view(), ws); // warm-up: the workspace grows here

    const long before = allocations.load(), before_bytes = allocated_bytes.load();
    for (int i = 0; i < 3; ++i) stack.forward(x.view(), y.view(), ws);
    // Fewer rows than the warm-up also fit.
    stack.forward(x.view().row_block(0, 7), y.view().row_block(0, 7), ws);
    const long count = allocations.load() - before, bytes = allocated_bytes.load() - before_bytes;
    MESSAGE(B::name, ": ", count, " allocations, ", bytes, " bytes in 4 forward calls after warm-up");
#if HYPERMOE_HAS_ONEDNN
    if constexpr (std::is_same_v<B, onednn>) {
        // Our code allocates nothing; oneDNN 2.6 itself builds small bookkeeping objects per
        // primitive execution (memory objects, an argument map). Bound them: at most 1 KiB per
        // execution, never a buffer that scales with the data. 4 GEMMs per forward, each one
        // primitive execution (33 and 7 rows are one piece each, see onednn_next_piece).
        static_assert(detail::onednn_next_piece(33).rows == 33 && detail::onednn_next_piece(7).rows == 7);
        constexpr long executions = 4 * 4;
        CHECK(bytes <= executions * 1024);
        return;
    }
#endif
    CHECK(count == 0);
}
TEST_CASE_TEMPLATE_APPLY(no_alloc, test::all_backends);
