#pragma once
// Row-major matrices: a non-owning view (data, rows, cols, row stride) and an owning,
// 64-byte-aligned matrix. Rows are contiguous; the stride lets a view select columns
// [c0, c0 + n) of a wider buffer, e.g. the gate half of a fused gate|up GEMM output.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// Non-owning row-major view: element (r, c) is data[r * stride + c].
template <class T>
class MatrixView {
public:
    using element_type = T;

    constexpr MatrixView() noexcept = default;
    constexpr MatrixView(T* data, index_t rows, index_t cols) : MatrixView(data, rows, cols, cols) {}
    constexpr MatrixView(T* data, index_t rows, index_t cols, index_t stride)
        : data_(data), rows_(rows), cols_(cols), stride_(stride) {
        if (rows < 0 || cols < 0 || stride < cols)
            throw shape_error(detail::concat("MatrixView: shape ", detail::shape_str(rows, cols),
                                             " with row stride ", stride,
                                             ", expected non-negative sizes and stride >= cols"));
        if (data == nullptr && rows > 0 && cols > 0)
            throw shape_error(detail::concat("MatrixView: null data for shape ",
                                             detail::shape_str(rows, cols)));
    }

    /// A view of const elements converts from a view of mutable ones.
    template <class U>
        requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
    constexpr MatrixView(const MatrixView<U>& other) noexcept // NOLINT(google-explicit-constructor)
        : data_(other.data()), rows_(other.rows()), cols_(other.cols()), stride_(other.stride()) {}

    [[nodiscard]] constexpr T* data() const noexcept { return data_; }
    [[nodiscard]] constexpr index_t rows() const noexcept { return rows_; }
    [[nodiscard]] constexpr index_t cols() const noexcept { return cols_; }
    [[nodiscard]] constexpr index_t stride() const noexcept { return stride_; }
    [[nodiscard]] constexpr bool contiguous() const noexcept { return stride_ == cols_ || rows_ <= 1; }

    [[nodiscard]] constexpr T& operator()(index_t r, index_t c) const noexcept {
        return data_[r * stride_ + c];
    }
    [[nodiscard]] constexpr std::span<T> row(index_t r) const noexcept {
        return {data_ + r * stride_, static_cast<std::size_t>(cols_)};
    }
    /// Rows [first, first + count).
    [[nodiscard]] constexpr MatrixView row_block(index_t first, index_t count) const noexcept {
        return MatrixView(offset(first * stride_), count, cols_, stride_, unchecked{});
    }
    /// Columns [first, first + count).
    [[nodiscard]] constexpr MatrixView col_block(index_t first, index_t count) const noexcept {
        return MatrixView(offset(first), rows_, count, stride_, unchecked{});
    }

private:
    struct unchecked {};
    // An empty matrix may have no storage: a block of it is empty too, and null plus an offset is
    // undefined behaviour, so it stays null.
    [[nodiscard]] constexpr T* offset(index_t elements) const noexcept {
        return data_ == nullptr ? nullptr : data_ + elements;
    }
    constexpr MatrixView(T* data, index_t rows, index_t cols, index_t stride, unchecked) noexcept
        : data_(data), rows_(rows), cols_(cols), stride_(stride) {}

    T* data_ = nullptr;
    index_t rows_ = 0;
    index_t cols_ = 0;
    index_t stride_ = 0;
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

/// Throws shape_error unless `m` is (rows, cols); `who` and `what` name the caller and argument.
template <class T>
void check_shape(const MatrixView<T>& m, index_t rows, index_t cols, std::string_view who,
                 std::string_view what) {
    if (m.rows() != rows || m.cols() != cols)
        throw shape_error(detail::concat(who, ": ", what, " has shape ", detail::shape_str(m.rows(), m.cols()),
                                         ", expected ", detail::shape_str(rows, cols)));
}

/// Alignment of every buffer the library allocates: one cache line, one AVX-512 register.
inline constexpr std::size_t buffer_alignment = 64;

namespace detail {

/// rows * cols as a count of elements of `element_bytes` each, or shape_error (naming `who`) when
/// a size is negative or the product would not fit in memory (index_t or size_t overflow).
[[nodiscard]] inline std::size_t checked_elements(index_t rows, index_t cols, std::size_t element_bytes,
                                                  std::string_view who) {
    constexpr auto max_bytes = static_cast<std::size_t>(std::numeric_limits<index_t>::max());
    if (rows < 0 || cols < 0)
        throw shape_error(concat(who, ": shape ", shape_str(rows, cols), ", expected non-negative sizes"));
    if (cols != 0 && static_cast<std::size_t>(rows) > max_bytes / element_bytes / static_cast<std::size_t>(cols))
        throw shape_error(concat(who, ": shape ", shape_str(rows, cols), " of ", element_bytes,
                                 "-byte elements is larger than any address space"));
    return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
}

/// Buffers of at least this many bytes start at a 2 MiB boundary and, on Linux, their whole
/// 2 MiB pages are advised to the kernel as transparent huge pages (madvise MADV_HUGEPAGE; it
/// acts where /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`). A large
/// buffer is then faulted in 2 MiB at a time instead of 4 KiB: on this project's 2-core virtual
/// machines 277 MB of fresh weights took 720 ms to fault in page by page and 26 ms as huge
/// pages. Only whole huge pages inside the buffer are advised, so its resident bytes do not grow
/// past what it writes. HYPERMOE_HUGE_PAGES=off (read once) leaves every buffer to 4 KiB pages.
inline constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

[[nodiscard]] inline bool huge_pages_enabled() noexcept {
    static const bool on = [] {
        const char* v = std::getenv("HYPERMOE_HUGE_PAGES");
        return v == nullptr || std::string_view(v) != "off";
    }();
    return on;
}

/// The alignment of a buffer of `bytes` (allocate_buffer).
[[nodiscard]] constexpr std::size_t alignment_of_buffer(std::size_t bytes) noexcept {
    return bytes >= huge_page_bytes ? huge_page_bytes : buffer_alignment;
}

/// Fresh memory for a buffer of `bytes` (> 0), aligned by alignment_of_buffer, its whole huge
/// pages advised as such; std::bad_alloc when there is none.
[[nodiscard]] inline void* allocate_buffer(std::size_t bytes) {
    void* p = ::operator new(bytes, std::align_val_t{alignment_of_buffer(bytes)});
#if defined(__linux__)
    if (bytes >= huge_page_bytes && huge_pages_enabled())
        (void)::madvise(p, bytes / huge_page_bytes * huge_page_bytes, MADV_HUGEPAGE); // advice: a failure changes nothing
#endif
    return p;
}

/// Frees what allocate_buffer(bytes) gave.
inline void free_buffer(void* p, std::size_t bytes) noexcept { ::operator delete(p, std::align_val_t{alignment_of_buffer(bytes)}); }

/// While one is alive on a thread, the buffers of at least min_bytes that aligned_array's
/// deleter frees on that thread are kept, and an aligned_array of the same size on that thread
/// takes one back (the last kept first) instead of fresh memory; those left are freed when it
/// ends. Trainer::rebuild runs in one: the old blocks dropped, then the same blocks built
/// again, whose weights so land in pages already faulted in rather than in fresh ones, which the
/// allocator maps for every large buffer and the kernel faults in page by page (two blocks of
/// 8 experts, d 512, ff 1024: 100 MB of weights, about 27,000 faults a rebuild, most of its time
/// on this project's 2-core virtual machines; docs/training.md). Not copyable; nests (the
/// innermost one keeps and gives back).
class BufferReuse {
public:
    static constexpr std::size_t min_bytes = std::size_t{1} << 16;

    BufferReuse() noexcept : outer_(active_) { active_ = this; }
    BufferReuse(const BufferReuse&) = delete;
    BufferReuse& operator=(const BufferReuse&) = delete;
    ~BufferReuse() {
        active_ = outer_;
        for (const Kept& k : kept_) free_buffer(k.p, k.bytes);
    }

    /// A kept buffer of `bytes` from this thread's innermost scope, or nullptr.
    [[nodiscard]] static void* take(std::size_t bytes) noexcept {
        if (active_ == nullptr || bytes < min_bytes) return nullptr;
        auto& kept = active_->kept_;
        for (std::size_t i = kept.size(); i-- > 0;)
            if (kept[i].bytes == bytes) {
                void* p = kept[i].p;
                kept.erase(kept.begin() + std::ptrdiff_t(i));
                return p;
            }
        return nullptr;
    }
    /// Keeps p (`bytes` long) in this thread's innermost scope; false when there is none, the
    /// buffer is small, or keeping it fails (the caller frees it).
    [[nodiscard]] static bool keep(void* p, std::size_t bytes) noexcept {
        if (active_ == nullptr || bytes < min_bytes) return false;
        try {
            active_->kept_.push_back({p, bytes});
        } catch (...) {
            return false;
        }
        return true;
    }

private:
    struct Kept {
        void* p;
        std::size_t bytes;
    };
    static inline thread_local BufferReuse* active_ = nullptr;
    std::vector<Kept> kept_;
    BufferReuse* outer_;
};

/// Frees an aligned_array's buffer (of `bytes`), or keeps it in the thread's BufferReuse.
struct aligned_delete {
    std::size_t bytes = 0;
    void operator()(void* p) const noexcept {
        if (!BufferReuse::keep(p, bytes)) free_buffer(p, bytes);
    }
};

/// n elements of T, uninitialised, from allocate_buffer (at a buffer_alignment boundary, 2 MiB
/// ones from 2 MiB up), or from the thread's BufferReuse when one keeps a buffer of that size.
template <class T>
[[nodiscard]] std::unique_ptr<T[], aligned_delete> aligned_array(std::size_t n) {
    static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                  "aligned_array holds trivial element types only.");
    if (n == 0) return {};
    const std::size_t bytes = n * sizeof(T);
    void* p = BufferReuse::take(bytes);
    if (p == nullptr) p = allocate_buffer(bytes);
    return std::unique_ptr<T[], aligned_delete>(static_cast<T*>(p), aligned_delete{bytes});
}

} // namespace detail

/// Owning row-major matrix, 64-byte aligned, zero-initialised, rows contiguous.
template <class T>
class Matrix {
public:
    Matrix() = default;
    Matrix(index_t rows, index_t cols) : rows_(rows), cols_(cols) {
        const std::size_t n = detail::checked_elements(rows, cols, sizeof(T), "Matrix");
        data_ = detail::aligned_array<T>(n);
        for (std::size_t i = 0; i < n; ++i) data_[i] = T{};
    }
    Matrix(const Matrix& other) : Matrix(other.rows_, other.cols_) { copy_from(other.view()); }
    Matrix& operator=(const Matrix& other) {
        if (this != &other) *this = Matrix(other);
        return *this;
    }
    Matrix(Matrix&&) noexcept = default;
    Matrix& operator=(Matrix&&) noexcept = default;
    ~Matrix() = default;

    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t cols() const noexcept { return cols_; }
    [[nodiscard]] T* data() noexcept { return data_.get(); }
    [[nodiscard]] const T* data() const noexcept { return data_.get(); }
    [[nodiscard]] T& operator()(index_t r, index_t c) noexcept { return data_[r * cols_ + c]; }
    [[nodiscard]] const T& operator()(index_t r, index_t c) const noexcept { return data_[r * cols_ + c]; }

    /// The rows * cols elements, row after row, as one span (a Matrix(1, n) is a flat buffer of
    /// n zeroed, aligned elements).
    [[nodiscard]] std::span<T> elements() noexcept { return {data(), static_cast<std::size_t>(rows_ * cols_)}; }
    [[nodiscard]] std::span<const T> elements() const noexcept { return {data(), static_cast<std::size_t>(rows_ * cols_)}; }

    [[nodiscard]] MatrixView<T> view() noexcept { return {data(), rows_, cols_}; }
    [[nodiscard]] ConstMatrixView<T> view() const noexcept { return {data(), rows_, cols_}; }
    operator MatrixView<T>() noexcept { return view(); }            // NOLINT(google-explicit-constructor)
    operator ConstMatrixView<T>() const noexcept { return view(); } // NOLINT(google-explicit-constructor)

    /// Copies `src` (same shape) into this matrix.
    void copy_from(ConstMatrixView<T> src) {
        check_shape(src, rows_, cols_, "Matrix::copy_from", "source");
        for (index_t r = 0; r < rows_; ++r)
            for (index_t c = 0; c < cols_; ++c) (*this)(r, c) = src(r, c);
    }

private:
    index_t rows_ = 0;
    index_t cols_ = 0;
    std::unique_ptr<T[], detail::aligned_delete> data_;
};

} // namespace hypermoe
