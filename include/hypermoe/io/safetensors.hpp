#pragma once
// safetensors (https://github.com/huggingface/safetensors, format: 8-byte little-endian header
// length N, N bytes of JSON, then the data): a reader that validates the whole header against
// the file before any tensor is used, and a writer.
//
// Checked, each a weight_error naming the file (and tensor): file shorter than 8 bytes; header
// length past the end of the file (or above 100 MB); header not JSON or not an object; a
// duplicate tensor name; an entry without dtype/shape/data_offsets or with the wrong JSON types;
// an unknown dtype; negative dimensions or an element count that overflows; offsets reversed,
// past the end of the data, or overlapping another tensor; a byte size that is not
// dtype size x element count. After that, no access reads outside the mapping.
//
// Opening maps the file read-only (mmap); F32 tensors whose data is 4-byte aligned are used in
// place as float views, everything else is converted on request.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// Element types of a stored tensor: those a safetensors file may declare, the block formats of
/// GGUF files along the last dimension (q8_0, q4_0, mxfp4 and q4_k, held as stored; the other
/// ggml quants, read by widening: q4_1, q5_0, q5_1 and iq4_nl in blocks of 32, the K-quants q2_k
/// to q6_k and iq4_xs in super-blocks of 256; core/quant.hpp; mxfp4 and q4_k are among these too,
/// for storages other than their own) and `other` for a GGUF type the library does not read
/// (its name is TensorInfo::type_name).
enum class tensor_dtype {
    f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean,
    q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs, other
};

[[nodiscard]] inline std::optional<tensor_dtype> parse_tensor_dtype(std::string_view s) noexcept {
    static constexpr std::pair<std::string_view, tensor_dtype> names[] = {
        {"F64", tensor_dtype::f64}, {"F32", tensor_dtype::f32}, {"F16", tensor_dtype::f16}, {"BF16", tensor_dtype::bf16},
        {"I64", tensor_dtype::i64}, {"I32", tensor_dtype::i32}, {"I16", tensor_dtype::i16}, {"I8", tensor_dtype::i8},
        {"U8", tensor_dtype::u8},   {"BOOL", tensor_dtype::boolean}};
    for (const auto& [n, t] : names)
        if (n == s) return t;
    return std::nullopt;
}

[[nodiscard]] constexpr std::string_view to_string(tensor_dtype t) noexcept {
    constexpr std::string_view names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "Q8_0", "Q4_0",
                                          "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "OTHER"};
    return names[static_cast<int>(t)];
}

/// The weight dtype a tensor dtype's bytes are as they are (F32, BF16, Q8_0, Q4_0, MXFP4, Q4_K), if any.
[[nodiscard]] constexpr std::optional<dtype> held_dtype(tensor_dtype t) noexcept {
    switch (t) {
    case tensor_dtype::f32: return dtype::f32;
    case tensor_dtype::bf16: return dtype::bf16;
    case tensor_dtype::q8_0: return dtype::q8_0;
    case tensor_dtype::q4_0: return dtype::q4_0;
    case tensor_dtype::mxfp4: return dtype::mxfp4;
    case tensor_dtype::q4_k: return dtype::q4_k;
    default: return std::nullopt;
    }
}

/// The format LoadOptions::keep_stored keeps a tensor of dtype `t` in (held_dtype but f32, which
/// takes the storage), if any.
[[nodiscard]] constexpr std::optional<dtype> kept_dtype(tensor_dtype t) noexcept {
    const auto held = held_dtype(t);
    return held && *held != dtype::f32 ? held : std::nullopt;
}

/// Whether a tensor dtype is a block format a layer holds as stored (q8_0, q4_0, mxfp4, q4_k).
[[nodiscard]] constexpr bool is_block_dtype(tensor_dtype t) noexcept { return held_dtype(t) && is_block_format(*held_dtype(t)); }

/// Whether a tensor dtype is one of the ggml quants read by converting it to f32 (ggml_quant,
/// core/quant.hpp): q4_1 to iq4_xs in the enum's order.
[[nodiscard]] constexpr bool is_ggml_quant_dtype(tensor_dtype t) noexcept { return t >= tensor_dtype::q4_1 && t <= tensor_dtype::iq4_xs; }

/// Whether a tensor dtype's elements read as floats (element(), to_f32): F32, BF16, F16, F64,
/// the block formats and the other ggml quants; not the integers, BOOL or `other`.
[[nodiscard]] constexpr bool is_floating_dtype(tensor_dtype t) noexcept {
    return t == tensor_dtype::f32 || t == tensor_dtype::bf16 || t == tensor_dtype::f16 || t == tensor_dtype::f64 || is_block_dtype(t) ||
           is_ggml_quant_dtype(t);
}

/// The ggml quant a dtype for which is_ggml_quant_dtype() holds is (the two enums list them in
/// the same order).
[[nodiscard]] constexpr ggml_quant ggml_quant_of(tensor_dtype t) noexcept {
    return static_cast<ggml_quant>(static_cast<int>(t) - static_cast<int>(tensor_dtype::q4_1));
}
static_assert(ggml_quant_of(tensor_dtype::iq4_nl) == ggml_quant::iq4_nl && ggml_quant_of(tensor_dtype::mxfp4) == ggml_quant::mxfp4 &&
              ggml_quant_of(tensor_dtype::q2_k) == ggml_quant::q2_k &&
              ggml_quant_of(tensor_dtype::iq4_xs) == ggml_quant::iq4_xs);

/// Bytes of one element of an element dtype; for the block formats, of one block (of 32, or 256
/// for the K-quants and IQ4_XS); 0 for `other`.
[[nodiscard]] constexpr std::size_t size_of(tensor_dtype t) noexcept {
    constexpr std::size_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1, 34, 18, 20, 22, 24, 18, 17, 84, 110, 144, 176, 210, 136, 0};
    return sizes[static_cast<int>(t)];
}

/// Largest element count a tensor may declare (2^50): far above any checkpoint, far below
/// overflow of index_t and of the byte counts derived from it.
inline constexpr index_t max_tensor_elements = index_t{1} << 50;

/// Whether a shape of non-negative dimensions stays within max_tensor_elements. It bounds the
/// product of the non-zero dimensions, not the running product, because a zero dimension keeps
/// the running product at 0 while the dimensions after it could overflow `TensorInfo::numel`,
/// which multiplies in another order. With this bound every partial product, in any order, fits.
[[nodiscard]] inline bool shape_fits(std::span<const index_t> shape) noexcept {
    index_t nonzero = 1;
    for (const index_t d : shape)
        if (d != 0) {
            if (nonzero > max_tensor_elements / d) return false;
            nonzero *= d;
        }
    return true;
}

/// One tensor of a file: where its bytes are, and what they are.
struct TensorInfo {
    std::string name;
    tensor_dtype dtype;
    std::vector<index_t> shape;
    std::size_t begin = 0, end = 0; ///< byte offsets into the data section
    /// Where the tensor comes from when that is not `name` in the file (a GGUF tensor or a slice
    /// of one, named by the checkpoint's loader), for messages; empty otherwise.
    std::string origin = {};
    /// The file's own name for the dtype when it is `other` (a GGUF type such as Q4_K).
    std::string type_name = {};

    [[nodiscard]] index_t numel() const noexcept {
        index_t n = 1;
        for (const index_t s : shape) n *= s;
        return n;
    }
    [[nodiscard]] std::string shape_string() const {
        std::string s = "[";
        for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
        return s + "]";
    }
    /// The dtype as the file names it ("F32", "Q4_K").
    [[nodiscard]] std::string type_string() const { return dtype == tensor_dtype::other ? type_name : std::string(to_string(dtype)); }
    /// "'name'", or "'name' (origin)" for a tensor a loader renamed.
    [[nodiscard]] std::string describe() const { return origin.empty() ? "'" + name + "'" : "'" + name + "' (" + origin + ")"; }
};

/// Named tensors over a data section someone else owns (a mapping, a buffer): what a checkpoint
/// reads weights through, whatever the file format. The tensors' byte ranges were checked
/// against the data by whoever built the table (SafeTensorsView, GgufView), so no access reads
/// outside it.
class TensorTable {
public:
    TensorTable() = default;
    /// `tensors` index into `data`; `source` names the file in messages.
    TensorTable(std::span<const std::byte> data, std::string source, std::vector<TensorInfo> tensors)
        : data_(data), source_(std::move(source)), tensors_(std::move(tensors)) {
        std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
    }

    [[nodiscard]] const std::string& source() const noexcept { return source_; }
    /// The bytes the tensors' offsets index.
    [[nodiscard]] std::span<const std::byte> data_section() const noexcept { return data_; }
    /// Every tensor, by name.
    [[nodiscard]] const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
    [[nodiscard]] bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }

    [[nodiscard]] const TensorInfo* find(std::string_view name) const noexcept {
        const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                         [](const TensorInfo& t, std::string_view n) { return t.name < n; });
        return it != tensors_.end() && it->name == name ? &*it : nullptr;
    }
    [[nodiscard]] const TensorInfo& info(std::string_view name) const {
        if (const TensorInfo* t = find(name)) return *t;
        throw weight_error(detail::concat(source_, ": no tensor '", name, "'"));
    }
    /// The raw bytes of a tensor.
    [[nodiscard]] std::span<const std::byte> data(const TensorInfo& t) const noexcept { return data_.subspan(t.begin, t.end - t.begin); }

    /// Element i (row-major) of a tensor widened to double (any dtype but `other`, which gives 0);
    /// a block format's element is its block's value (exact in f32).
    [[nodiscard]] double element(const TensorInfo& t, index_t i) const noexcept {
        const std::byte* base = data_.data() + t.begin;
        if (is_ggml_quant_dtype(t.dtype)) { // MXFP4 and Q4_K too
            const index_t n = block_elements(ggml_quant_of(t.dtype));
            return GgmlQuantBlock(base + std::size_t(i / n) * size_of(t.dtype), ggml_quant_of(t.dtype))[i % n];
        }
        if (is_block_dtype(t.dtype))
            return stored_block_element(base + std::size_t(i / quant_block) * size_of(t.dtype), *held_dtype(t.dtype), i % quant_block);
        const std::byte* p = base + std::size_t(i) * size_of(t.dtype);
        const auto load = [p]<class T>(T v) {
            std::memcpy(&v, p, sizeof(T));
            return v;
        };
        switch (t.dtype) {
        case tensor_dtype::f64: return load(double{});
        case tensor_dtype::f32: return load(float{});
        case tensor_dtype::f16: return f16_bits_to_f32(load(std::uint16_t{}));
        case tensor_dtype::bf16: return bf16{load(std::uint16_t{})}.to_float();
        case tensor_dtype::i64: return double(load(std::int64_t{}));
        case tensor_dtype::i32: return load(std::int32_t{});
        case tensor_dtype::i16: return load(std::int16_t{});
        case tensor_dtype::i8: return load(std::int8_t{});
        case tensor_dtype::u8: return load(std::uint8_t{});
        case tensor_dtype::boolean: return load(std::uint8_t{}) != 0;
        default: break; // the block formats (read above) and `other`
        }
        return 0;
    }

    /// A tensor as a (rows, cols) float matrix: the last dimension is cols, the others fold into
    /// rows (a scalar or 1-D tensor is one row). Converts F64/F16/BF16/integers exactly or by
    /// rounding to nearest, blocks to their values.
    [[nodiscard]] Matrix<float> to_f32(const TensorInfo& t) const {
        const index_t cols = t.shape.empty() ? 1 : t.shape.back();
        Matrix<float> m(cols == 0 ? 0 : t.numel() / cols, cols);
        convert_f32(t, {m.data(), std::size_t(t.numel())});
        return m;
    }

    /// A tensor's elements [first, first + out.size()) as to_f32 converts them, into `out` (by
    /// default all of them: out.size() = t.numel()). For a block dtype, first and out.size() are
    /// whole blocks (whole rows are: a block format's rows hold whole blocks).
    void convert_f32(const TensorInfo& t, std::span<float> out, index_t first = 0) const noexcept {
        const auto count = index_t(out.size());
        if (t.dtype == tensor_dtype::f32) {
            if (count > 0) std::memcpy(out.data(), data(t).data() + std::size_t(first) * sizeof(float), out.size_bytes());
        } else if (is_ggml_quant_dtype(t.dtype)) { // a block's scales read once, not per element
            const index_t n = block_elements(ggml_quant_of(t.dtype));
            for (index_t b = 0; b < count / n; ++b) {
                const GgmlQuantBlock block(data_.data() + t.begin + std::size_t(first / n + b) * size_of(t.dtype), ggml_quant_of(t.dtype));
                for (index_t j = 0; j < n; ++j) out[std::size_t(b * n + j)] = block[j];
            }
        } else {
            for (index_t i = 0; i < count; ++i) out[std::size_t(i)] = float(element(t, first + i));
        }
    }

    /// An F32 tensor's bytes as floats in place, when the data is 4-byte aligned; empty otherwise.
    [[nodiscard]] std::span<const float> f32_in_place(const TensorInfo& t) const noexcept {
        const std::byte* p = data(t).data();
        if (t.dtype != tensor_dtype::f32 || reinterpret_cast<std::uintptr_t>(p) % alignof(float) != 0) return {};
        return {reinterpret_cast<const float*>(p), std::size_t(t.numel())};
    }

protected:
    std::span<const std::byte> data_;
    std::string source_;
    std::vector<TensorInfo> tensors_;
};

/// A parsed, validated safetensors image over bytes someone else owns (a mapping, a buffer).
class SafeTensorsView : public TensorTable {
public:
    /// Validates `bytes` as a safetensors image; `source` names it in messages (a path).
    SafeTensorsView(std::span<const std::byte> bytes, std::string source) { parse(bytes, std::move(source)); }

    [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
    /// Metadata `key` as an integer in [min, max]; config_error naming the key and its value when
    /// it is missing, not a base-10 integer, or out of range.
    [[nodiscard]] index_t metadata_integer(const std::string& key, index_t min, index_t max) const {
        const auto it = metadata_.find(key);
        if (it == metadata_.end()) throw config_error(detail::concat("safetensors: no metadata '", key, "'"));
        const std::string& v = it->second;
        index_t out = 0;
        const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
        if (ec != std::errc{} || end != v.data() + v.size() || v.empty() || out < min || out > max)
            throw config_error(detail::concat("safetensors: metadata '", key, "' is \"", v, "\", expected an integer in [",
                                              min, ", ", max, "]"));
        return out;
    }

private:
    [[noreturn]] void fail(const std::string& what) const { throw weight_error(detail::concat(source_, ": ", what)); }

    void parse(std::span<const std::byte> bytes, std::string source) {
        source_ = std::move(source);
        if (bytes.size() < 8) fail(detail::concat("file has ", bytes.size(), " bytes, expected at least 8 (the header length)"));
        std::uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint64_t(std::to_integer<unsigned>(bytes[std::size_t(i)]));
        constexpr std::uint64_t max_header = 100'000'000;
        if (n > bytes.size() - 8 || n > max_header)
            fail(detail::concat("header length is ", n, " bytes, but only ", bytes.size() - 8, " bytes follow"));
        data_ = bytes.subspan(8 + std::size_t(n));
        const auto* text = reinterpret_cast<const char*>(bytes.data() + 8);

        // Duplicate names are invisible once parsed (the last wins), so the callback sees keys.
        std::vector<std::string> top_keys;
        const nlohmann::json::parser_callback_t on_event = [&](int depth, nlohmann::json::parse_event_t event,
                                                               nlohmann::json& parsed) {
            if (event == nlohmann::json::parse_event_t::key && depth == 1) top_keys.push_back(parsed.get<std::string>());
            return true;
        };
        nlohmann::json header;
        try {
            header = nlohmann::json::parse(text, text + n, on_event);
        } catch (const nlohmann::json::exception& e) {
            fail(detail::concat("header is not valid JSON (", e.what(), ")"));
        }
        if (!header.is_object()) fail("header is not a JSON object");
        std::sort(top_keys.begin(), top_keys.end());
        if (const auto d = std::adjacent_find(top_keys.begin(), top_keys.end()); d != top_keys.end())
            fail(detail::concat("tensor name '", *d, "' appears twice in the header"));

        for (const auto& [name, entry] : header.items()) {
            if (name == "__metadata__") {
                if (!entry.is_object()) fail("__metadata__ is not an object");
                for (const auto& [k, v] : entry.items()) {
                    if (!v.is_string()) fail(detail::concat("__metadata__ value '", k, "' is not a string"));
                    metadata_[k] = v.get<std::string>();
                }
                continue;
            }
            tensors_.push_back(parse_entry(name, entry, data_.size()));
        }
        std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
        for (std::size_t i = 1; i < tensors_.size(); ++i)
            if (tensors_[i].begin < tensors_[i - 1].end)
                fail(detail::concat("tensors '", tensors_[i - 1].name, "' [", tensors_[i - 1].begin, ", ", tensors_[i - 1].end,
                                    ") and '", tensors_[i].name, "' [", tensors_[i].begin, ", ", tensors_[i].end, ") overlap"));
        std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
    }

    TensorInfo parse_entry(const std::string& name, const nlohmann::json& e, std::size_t data_size) const {
        const auto bad = [&](const std::string& what) { fail(detail::concat("tensor '", name, "': ", what)); };
        if (!e.is_object()) bad("entry is not an object");
        const auto dt = e.find("dtype");
        const auto sh = e.find("shape");
        const auto off = e.find("data_offsets");
        if (dt == e.end() || sh == e.end() || off == e.end()) bad("entry needs dtype, shape and data_offsets");
        if (!dt->is_string()) bad("dtype is not a string");
        const auto type = parse_tensor_dtype(dt->get<std::string>());
        if (!type) bad(detail::concat("unknown dtype '", dt->get<std::string>(), "'"));
        TensorInfo t{name, *type, {}, 0, 0};
        if (!sh->is_array()) bad("shape is not an array");
        for (const auto& d : *sh) {
            if (!d.is_number_integer() || d.get<std::int64_t>() < 0) bad(detail::concat("shape ", sh->dump(), " has an entry that is not a non-negative integer"));
            t.shape.push_back(d.get<index_t>());
        }
        if (!shape_fits(t.shape)) bad(detail::concat("shape ", sh->dump(), " has too many elements"));
        const index_t count = t.numel();
        if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
            bad(detail::concat("data_offsets ", off->dump(), " is not a pair of non-negative integers"));
        const auto b = (*off)[0].get<std::uint64_t>(), en = (*off)[1].get<std::uint64_t>();
        if (b > en) bad(detail::concat("data_offsets [", b, ", ", en, "] are reversed"));
        if (en > data_size) bad(detail::concat("data_offsets [", b, ", ", en, "] run past the ", data_size, " data bytes of the file"));
        const std::uint64_t expected = std::uint64_t(count) * size_of(*type);
        if (en - b != expected)
            bad(detail::concat("holds ", en - b, " bytes, but ", to_string(*type), " ", t.shape_string(), " needs ", expected));
        t.begin = std::size_t(b);
        t.end = std::size_t(en);
        return t;
    }

    std::map<std::string, std::string> metadata_;
};

/// A file memory-mapped read-only for the object's lifetime; the exception type names the path
/// when it cannot be opened or mapped.
class MappedFile {
public:
    explicit MappedFile(const std::string& path) : path_(path) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw weight_error(detail::concat(path, ": cannot open the file"));
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            ::close(fd);
            throw weight_error(detail::concat(path, ": cannot stat the file"));
        }
        size_ = std::size_t(st.st_size);
        if (size_ > 0) {
            void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                ::close(fd);
                throw weight_error(detail::concat(path, ": cannot map the file"));
            }
            map_ = static_cast<const std::byte*>(p);
        }
        ::close(fd);
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    /// Virtual: a checkpoint holds its files (SafeTensorsFile, GgufFile) as MappedFiles.
    virtual ~MappedFile() {
        if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), size_);
    }

    [[nodiscard]] const std::string& path() const noexcept { return path_; }
    [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {map_, size_}; }

    /// Drops the resident pages wholly inside `bytes` if they lie in this file's mapping (a no-op
    /// otherwise): a loader calls it once a tensor is packed into a layer's own storage, so the
    /// source is not held twice. The mapping is private and read-only, so a later read simply
    /// faults the same bytes in again from the file.
    void release(std::span<const std::byte> bytes) const noexcept {
        if (map_ == nullptr || bytes.empty() || bytes.data() < map_ || bytes.data() + bytes.size() > map_ + size_) return;
        const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
        const auto begin = (reinterpret_cast<std::uintptr_t>(bytes.data()) + page - 1) / page * page;
        const auto end = (reinterpret_cast<std::uintptr_t>(bytes.data()) + bytes.size()) / page * page;
        if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
    }

private:
    std::string path_;
    const std::byte* map_ = nullptr;
    std::size_t size_ = 0;
};

/// A file memory-mapped read-only for its lifetime and parsed as a View (SafeTensorsView,
/// GgufView) over the mapping.
template <class View>
class ParsedFile : public MappedFile {
public:
    explicit ParsedFile(const std::string& path) : MappedFile(path), view_(bytes(), path) {}

    [[nodiscard]] const View& view() const noexcept { return view_; }

private:
    View view_;
};

/// A safetensors file, memory-mapped read-only for its lifetime.
using SafeTensorsFile = ParsedFile<SafeTensorsView>;

/// A tensor to write: its dtype, shape and bytes (little-endian, row-major).
struct TensorToWrite {
    std::string name;
    tensor_dtype dtype;
    std::vector<index_t> shape;
    std::vector<std::byte> bytes;
};

/// Convenience constructors for the writer.
[[nodiscard]] inline TensorToWrite f32_tensor(std::string name, std::vector<index_t> shape, std::span<const float> v) {
    std::vector<std::byte> b(v.size() * sizeof(float));
    std::memcpy(b.data(), v.data(), b.size());
    return {std::move(name), tensor_dtype::f32, std::move(shape), std::move(b)};
}
[[nodiscard]] inline TensorToWrite i32_tensor(std::string name, std::vector<index_t> shape, std::span<const std::int32_t> v) {
    std::vector<std::byte> b(v.size() * sizeof(std::int32_t));
    std::memcpy(b.data(), v.data(), b.size());
    return {std::move(name), tensor_dtype::i32, std::move(shape), std::move(b)};
}

namespace detail {
/// A weight_error when a safetensors file cannot hold `dtype` (tensor `name`).
inline void check_writable(const std::string& name, tensor_dtype dtype) {
    if (!parse_tensor_dtype(to_string(dtype)))
        throw weight_error(concat("safetensors writer: tensor '", name, "' has dtype ", to_string(dtype),
                                  ", expected one a safetensors file holds (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)"));
}
} // namespace detail

/// A safetensors image laid out, its data zeroed (safetensors_layout): the bytes, where the data
/// section starts in them, and each tensor with its begin and end in that section.
struct SafetensorsImage {
    std::vector<std::byte> bytes;
    std::size_t data_start = 0;
    std::vector<TensorInfo> tensors;

    /// Tensor i's data in `bytes`.
    [[nodiscard]] std::span<std::byte> data(std::size_t i) noexcept {
        return std::span(bytes).subspan(data_start + tensors[i].begin, tensors[i].end - tensors[i].begin);
    }
};

/// The image of a safetensors file holding `tensors` (their names, dtypes and shapes, in this
/// order; begin and end are set here), header padded with spaces to a multiple of 8 and data
/// zeroed, for the caller to fill in place: one buffer, written once, where building each
/// tensor's bytes apart and then copying them in touched the memory twice.
[[nodiscard]] inline SafetensorsImage safetensors_layout(std::vector<TensorInfo> tensors,
                                                         const std::map<std::string, std::string>& metadata = {}) {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::size_t offset = 0;
    for (TensorInfo& t : tensors) {
        detail::check_writable(t.name, t.dtype);
        t.begin = offset;
        t.end = offset + std::size_t(t.numel()) * size_of(t.dtype);
        header[t.name] = {{"dtype", to_string(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
        offset = t.end;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    SafetensorsImage image{std::vector<std::byte>(8 + text.size() + offset), 8 + text.size(), std::move(tensors)};
    for (int i = 0; i < 8; ++i) image.bytes[std::size_t(i)] = std::byte((std::uint64_t(text.size()) >> (8 * i)) & 0xFFu);
    std::memcpy(image.bytes.data() + 8, text.data(), text.size());
    return image;
}

/// The bytes of a safetensors image of `tensors` (header padded with spaces to a multiple of 8).
[[nodiscard]] inline std::vector<std::byte> safetensors_bytes(const std::vector<TensorToWrite>& tensors,
                                                              const std::map<std::string, std::string>& metadata = {}) {
    std::vector<TensorInfo> infos;
    for (const auto& t : tensors) {
        detail::check_writable(t.name, t.dtype);
        infos.push_back({t.name, t.dtype, t.shape});
        const std::size_t want = std::size_t(infos.back().numel()) * size_of(t.dtype);
        if (t.bytes.size() != want)
            throw weight_error(detail::concat("safetensors writer: tensor '", t.name, "' has ", t.bytes.size(), " bytes, expected ", want));
    }
    SafetensorsImage image = safetensors_layout(std::move(infos), metadata);
    for (std::size_t i = 0; i < tensors.size(); ++i)
        if (!tensors[i].bytes.empty()) std::memcpy(image.data(i).data(), tensors[i].bytes.data(), tensors[i].bytes.size());
    return std::move(image.bytes);
}

/// Writes `bytes` as the file `path`; a weight_error names the path when it cannot be written.
inline void write_file_bytes(const std::string& path, std::span<const std::byte> bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    if (!out) throw weight_error(detail::concat(path, ": cannot write the file"));
}

/// Writes a safetensors file; a weight_error names the path when it cannot be written.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
    write_file_bytes(path, safetensors_bytes(tensors, metadata));
}

} // namespace hypermoe
