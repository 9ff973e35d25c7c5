#pragma once
// Scratch memory, sized up front (as CUTLASS's get_workspace_size): every component reports
// `workspace_bytes(rows)` and takes its temporaries from a Workspace with a stack discipline.
// The outermost forward call grows the arena when it is too small (that is the warm-up
// allocation); after that, forward calls with at most as many rows allocate nothing.

#include <algorithm>
#include <cstddef>
#include <memory>
#include <span>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

namespace detail {
/// Bytes that `n` elements of T take in a workspace, rounded up to the buffer alignment.
template <class T>
[[nodiscard]] constexpr std::size_t padded_bytes(index_t n) noexcept {
    const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
    return (bytes + buffer_alignment - 1) / buffer_alignment * buffer_alignment;
}
} // namespace detail

/// A bump arena of 64-byte-aligned scratch buffers. Not thread-safe: one per thread.
class Workspace {
public:
    Workspace() = default;
    explicit Workspace(std::size_t bytes) { reserve(bytes); }

    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
    [[nodiscard]] std::size_t used() const noexcept { return used_; }

    /// Grows the arena to at least `bytes`. Only allowed while no buffer is taken.
    void reserve(std::size_t bytes) {
        if (bytes <= capacity_) return;
        if (used_ != 0)
            throw error(detail::concat("Workspace::reserve: cannot grow to ", bytes, " bytes while ",
                                       used_, " bytes are in use"));
        storage_ = detail::aligned_array<std::byte>(bytes);
        capacity_ = bytes;
    }

    /// `n` elements of T, uninitialised, valid until the enclosing Scope ends.
    template <class T>
    [[nodiscard]] std::span<T> take(index_t n) {
        const std::size_t bytes = detail::padded_bytes<T>(n);
        if (bytes > capacity_ - used_)
            throw error(detail::concat("Workspace::take: ", bytes, " bytes requested, ", capacity_ - used_,
                                       " of ", capacity_, " left (a workspace_bytes() underestimate)"));
        auto* p = reinterpret_cast<T*>(storage_.get() + used_);
        used_ += bytes;
        return {p, static_cast<std::size_t>(n)};
    }

    /// A (rows, cols) row-major scratch matrix.
    template <class T>
    [[nodiscard]] MatrixView<T> take_matrix(index_t rows, index_t cols) {
        return {take<T>(rows * cols).data(), rows, cols};
    }

    /// Releases everything taken after its construction. The outermost Scope may grow the arena
    /// to `bytes`; an inner one checks that `bytes` are left.
    class Scope {
    public:
        Scope(Workspace& ws, std::size_t bytes) : ws_(ws), mark_(ws.used_) {
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
    };

private:
    std::unique_ptr<std::byte[], detail::aligned_delete> storage_;
    std::size_t capacity_ = 0;
    std::size_t used_ = 0;
};

} // namespace hypermoe
