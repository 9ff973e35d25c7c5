#pragma once
// Scratch memory, sized up front (as CUTLASS's get_workspace_size): every component reports
// `workspace_bytes(rows)` and takes its temporaries from a Workspace with a stack discipline.
// The outermost forward call grows the arena when it is too small (that is the warm-up
// allocation); after that, forward calls with at most as many rows allocate nothing. A fixed
// workspace never grows: a call that needs more than its capacity is an error, so an embedder
// can hold exactly `workspace_bytes(max rows)` and know that nothing else is allocated.
//
// A workspace also carries the caller's thread budget: with set_threads(n), every forward call
// made with this workspace runs its parallel regions (the library's own and the backend's) on at
// most n OpenMP threads, without changing any other thread's setting.

#include <concepts>
#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <span>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

namespace detail {
/// Byte counts at or above this are not sizes of real memory; `padded_bytes` saturates here, so a
/// sum of a few of them still does not wrap, and `Workspace` rejects them with a typed error.
inline constexpr std::size_t unreal_bytes = std::size_t{1} << 56;

/// a * b, or `unreal_bytes` when either is negative or the product reaches it: for element and
/// assignment counts derived from a caller's token count, which may be anything.
[[nodiscard]] constexpr index_t saturating_mul(index_t a, index_t b) noexcept {
    constexpr auto cap = static_cast<index_t>(unreal_bytes);
    if (a < 0 || b < 0) return cap;
    if (a == 0 || b == 0) return 0;
    return a >= cap / b ? cap : a * b;
}

/// count * bytes, saturated at `unreal_bytes` (e.g. one scratch slice per thread).
[[nodiscard]] constexpr std::size_t saturating_bytes(index_t count, std::size_t bytes) noexcept {
    if (count < 0 || bytes >= unreal_bytes) return unreal_bytes;
    if (count == 0) return 0;
    return bytes >= unreal_bytes / static_cast<std::size_t>(count) ? unreal_bytes : static_cast<std::size_t>(count) * bytes;
}

/// Bytes that n0 * n1 * ... elements of T take in a workspace, rounded up to the buffer
/// alignment; `unreal_bytes` when a factor is negative or the product would overflow.
template <class T>
[[nodiscard]] constexpr std::size_t padded_bytes(index_t n0, std::integral auto... rest) noexcept {
    index_t n = n0;
    ((n = saturating_mul(n, static_cast<index_t>(rest))), ...);
    if (n < 0 || static_cast<std::size_t>(n) >= unreal_bytes / sizeof(T)) return unreal_bytes;
    const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
    return (bytes + buffer_alignment - 1) / buffer_alignment * buffer_alignment;
}
} // namespace detail

/// Whether a workspace may grow when a call needs more than it holds.
enum class WorkspaceGrowth {
    grow,  ///< the outermost scope of a call grows the arena (one allocation, kept)
    fixed, ///< never grows: a call that needs more is an error
};

/// A bump arena of 64-byte-aligned scratch buffers. Not thread-safe: one per thread.
class Workspace {
public:
    Workspace() = default;
    explicit Workspace(std::size_t bytes, WorkspaceGrowth growth = WorkspaceGrowth::grow) : growth_(growth) {
        grow_to(bytes);
    }
    /// A fixed workspace over memory the caller owns and keeps alive (e.g. one thread's slice of
    /// another workspace inside a parallel region). `memory` must be 64-byte aligned.
    explicit Workspace(std::span<std::byte> memory) noexcept
        : base_(memory.data()), capacity_(memory.size()), growth_(WorkspaceGrowth::fixed) {}

    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
    [[nodiscard]] std::size_t used() const noexcept { return used_; }
    [[nodiscard]] WorkspaceGrowth growth() const noexcept { return growth_; }

    /// Bounds the OpenMP threads of every call made with this workspace (0, the default: the
    /// calling thread's OpenMP setting). Only the calling thread's setting changes, and only for
    /// the duration of each call.
    void set_threads(int threads) {
        if (threads < 0) throw config_error(detail::concat("Workspace::set_threads: ", threads, ", expected >= 0"));
        threads_ = threads;
    }
    [[nodiscard]] int threads() const noexcept { return threads_; }

    /// Grows the arena to at least `bytes`. Only allowed while no buffer is taken, and not on a
    /// fixed workspace.
    void reserve(std::size_t bytes) {
        if (bytes <= capacity_) return;
        if (growth_ == WorkspaceGrowth::fixed)
            throw error(detail::concat("Workspace::reserve: ", bytes, " bytes needed, but this fixed workspace holds ",
                                       capacity_));
        if (used_ != 0)
            throw error(detail::concat("Workspace::reserve: cannot grow to ", bytes, " bytes while ",
                                       used_, " bytes are in use"));
        grow_to(bytes);
    }

    /// `n` elements of T, uninitialised, valid until the enclosing Scope ends.
    template <class T>
    [[nodiscard]] std::span<T> take(index_t n) {
        if (n < 0) throw shape_error(detail::concat("Workspace::take: ", n, " elements, expected >= 0"));
        const std::size_t bytes = detail::padded_bytes<T>(n);
        if (bytes > capacity_ - used_)
            throw error(detail::concat("Workspace::take: ", bytes, " bytes requested, ", capacity_ - used_,
                                       " of ", capacity_, " left (a workspace_bytes() underestimate)"));
        auto* p = reinterpret_cast<T*>(base_ + used_);
        used_ += bytes;
        return {p, static_cast<std::size_t>(n)};
    }

    /// A (rows, cols) row-major scratch matrix.
    template <class T>
    [[nodiscard]] MatrixView<T> take_matrix(index_t rows, index_t cols) {
        const std::size_t n = detail::checked_elements(rows, cols, sizeof(T), "Workspace::take_matrix");
        return {take<T>(static_cast<index_t>(n)).data(), rows, cols};
    }

    /// Releases everything taken after its construction. The outermost Scope may grow the arena
    /// to `bytes` and applies the workspace's thread budget for its lifetime; an inner one checks
    /// that `bytes` are left.
    class Scope {
    public:
        Scope(Workspace& ws, std::size_t bytes)
            : ws_(ws), mark_(ws.used_), threads_(ws.used_ == 0 ? ws.threads_ : 0) {
            if (mark_ == 0) ws.reserve(bytes);
            if (bytes > ws.capacity_ - mark_)
                throw error(detail::concat("Workspace::Scope: ", bytes, " bytes needed, ",
                                           ws.capacity_ - mark_, " left (a workspace_bytes() underestimate)"));
        }
        Scope(const Scope&) = delete;
        Scope& operator=(const Scope&) = delete;
        ~Scope() { ws_.used_ = mark_; }

    private:
        Workspace& ws_;
        std::size_t mark_;
        detail::ThreadCountScope threads_;
    };

private:
    void grow_to(std::size_t bytes) {
        if (bytes >= detail::unreal_bytes)
            throw error(detail::concat("Workspace: ", bytes, " bytes requested, more than any machine holds "
                                       "(a size overflowed)"));
        storage_.reset();
        base_ = nullptr;
        capacity_ = 0;
        storage_ = detail::aligned_array<std::byte>(bytes);
        base_ = storage_.get();
        capacity_ = bytes;
    }

    std::unique_ptr<std::byte[], detail::aligned_delete> storage_;
    std::byte* base_ = nullptr; ///< storage_, or the borrowed memory
    std::size_t capacity_ = 0;
    std::size_t used_ = 0;
    WorkspaceGrowth growth_ = WorkspaceGrowth::grow;
    int threads_ = 0;
};

namespace detail {

/// Scratch of run_task_pool on `threads` threads with `slice` bytes an item (a padded size).
[[nodiscard]] constexpr std::size_t task_pool_bytes(int threads, std::size_t slice) noexcept {
    return saturating_bytes(std::max(threads, 1), slice);
}

/// fn(item, ws) for item in [0, items) as tasks in one parallel region on up to `threads`
/// threads (parallel_tasks: items in the given order, to whichever thread is free), each item
/// on one thread with its thread's `slice` bytes of `ws` (a padded size, what one item takes
/// at one thread) as its workspace. With one thread or one item they run here, still each on
/// one thread. Within task_pool_bytes(threads, slice) of `ws`.
template <class Fn>
void run_task_pool(Workspace& ws, index_t items, int threads, std::size_t slice, Fn&& fn) {
    const int slots = int(std::min<index_t>(std::max(threads, 1), items));
    if (slots <= 0) return;
    Workspace::Scope scope(ws, task_pool_bytes(slots, slice));
    std::byte* slices = ws.take<std::byte>(index_t(slice) * slots).data();
    const ThreadCountScope one(slots == 1 ? 1 : 0); // nested regions are serial anyway
    parallel_tasks(items, slots, [&](index_t item, int slot) {
        Workspace mine(std::span<std::byte>(slices + std::size_t(slot) * slice, slice));
        fn(item, mine);
    });
}

} // namespace detail
} // namespace hypermoe
