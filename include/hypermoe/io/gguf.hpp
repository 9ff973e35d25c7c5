#pragma once
// GGUF (llama.cpp's model format, versions 2 and 3; ggml/docs/gguf.md): a reader that validates
// the whole header against the file before any tensor is used.
//
// Layout, little-endian: "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata
// (key: u64 length + bytes, u32 value type, value; arrays are u32 element type, u64 count,
// elements); the tensor infos (name, u32 dims, u64 ne[dims] innermost first, u32 ggml type, u64
// offset into the data section); padding to `general.alignment` (default 32); the data.
//
// Checked, each a weight_error naming the file (and the key or tensor): a file too short for
// what its counts promise (every length and count is compared with the bytes left before it is
// used, so a huge count fails at once); a bad magic; a version other than 2 or 3 (1, and a
// big-endian file, named as such); a duplicate key or tensor name; an unknown value or ggml type;
// nested arrays; more than 4 dimensions, a negative dimension or an element count that
// overflows; a block type whose first dimension is not a whole number of blocks; an alignment
// that is not a power of two; a tensor offset that is not a multiple of the alignment, runs past
// the end of the file, or overlaps another tensor. After that, no access reads outside the file.

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/detail/format.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// A ggml tensor type as GGUF stores it: its id, name, and block geometry (elements per block,
/// bytes per block; 1 and the element size for the plain types).
struct GgmlType {
    std::uint32_t id;
    std::string_view name;
    std::uint32_t block, bytes;
};

namespace detail {

/// Every ggml type id a GGUF file may hold (ids ggml removed are absent).
inline constexpr std::array<GgmlType, 32> ggml_types = {{
    {0, "F32", 1, 4},        {1, "F16", 1, 2},        {2, "Q4_0", 32, 18},     {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},     {7, "Q5_1", 32, 24},     {8, "Q8_0", 32, 34},     {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},   {11, "Q3_K", 256, 110},  {12, "Q4_K", 256, 144},  {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},  {15, "Q8_K", 256, 292},  {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18},  {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},  {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},       {25, "I16", 1, 2},
    {26, "I32", 1, 4},       {27, "I64", 1, 8},       {28, "F64", 1, 8},       {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},      {34, "TQ1_0", 256, 54},  {35, "TQ2_0", 256, 66},  {39, "MXFP4", 32, 17},
}};

[[nodiscard]] constexpr const GgmlType* find_ggml_type(std::uint32_t id) noexcept {
    for (const GgmlType& t : ggml_types)
        if (t.id == id) return &t;
    return nullptr;
}

/// The library's dtype for a ggml type: the ones it reads, else `other`.
[[nodiscard]] constexpr tensor_dtype tensor_dtype_of_ggml(std::uint32_t id) noexcept {
    switch (id) {
    case 0: return tensor_dtype::f32;
    case 1: return tensor_dtype::f16;
    case 2: return tensor_dtype::q4_0;
    case 3: return tensor_dtype::q4_1;
    case 6: return tensor_dtype::q5_0;
    case 7: return tensor_dtype::q5_1;
    case 8: return tensor_dtype::q8_0;
    case 10: return tensor_dtype::q2_k;
    case 11: return tensor_dtype::q3_k;
    case 12: return tensor_dtype::q4_k;
    case 13: return tensor_dtype::q5_k;
    case 14: return tensor_dtype::q6_k;
    case 20: return tensor_dtype::iq4_nl;
    case 23: return tensor_dtype::iq4_xs;
    case 24: return tensor_dtype::i8;
    case 25: return tensor_dtype::i16;
    case 26: return tensor_dtype::i32;
    case 27: return tensor_dtype::i64;
    case 28: return tensor_dtype::f64;
    case 30: return tensor_dtype::bf16;
    case 39: return tensor_dtype::mxfp4;
    default: return tensor_dtype::other;
    }
}

} // namespace detail

/// GGUF metadata value types (the u32 before each value).
enum class gguf_type : std::uint32_t { u8, i8, u16, i16, u32, i32, f32, boolean, string, array, u64, i64, f64 };

[[nodiscard]] constexpr std::string_view to_string(gguf_type t) noexcept {
    constexpr std::string_view names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
    return names[static_cast<int>(t)];
}

/// One metadata value. Scalars are kept decoded; an array keeps its element type, count and
/// bytes (a tokenizer's vocabulary is not copied), decoded on request.
struct GgufValue {
    gguf_type type{};
    std::variant<std::int64_t, std::uint64_t, double, bool, std::string> scalar{};
    gguf_type element{};                  ///< arrays: the elements' type
    std::uint64_t count = 0;              ///< arrays: the number of elements
    std::span<const std::byte> items{};   ///< arrays: the elements' bytes

    [[nodiscard]] bool is_integer() const noexcept {
        return type != gguf_type::array && (std::holds_alternative<std::int64_t>(scalar) || std::holds_alternative<std::uint64_t>(scalar));
    }
    [[nodiscard]] bool is_number() const noexcept { return is_integer() || (type != gguf_type::array && std::holds_alternative<double>(scalar)); }
};

/// A parsed, validated GGUF image over bytes someone else owns (a mapping, a buffer). Tensors
/// are named as in the file, with their shape outermost first (ne reversed, as safetensors and
/// PyTorch write it).
class GgufView : public TensorTable {
public:
    /// Validates `bytes` as a GGUF image; `source` names it in messages (a path).
    GgufView(std::span<const std::byte> bytes, std::string source) : bytes_(bytes) {
        source_ = std::move(source);
        parse();
    }

    [[nodiscard]] std::uint32_t version() const noexcept { return version_; }
    [[nodiscard]] std::uint64_t alignment() const noexcept { return alignment_; }
    [[nodiscard]] const std::map<std::string, GgufValue, std::less<>>& metadata() const noexcept { return metadata_; }
    [[nodiscard]] const GgufValue* find_key(std::string_view key) const noexcept {
        const auto it = metadata_.find(key);
        return it == metadata_.end() ? nullptr : &it->second;
    }
    /// The ggml type of a tensor of this file.
    [[nodiscard]] const GgmlType& ggml_type(const TensorInfo& t) const noexcept { return *ggml_types_.at(t.name); }

    /// Metadata `key` as an integer; nullopt when absent. A config_error names the key when it
    /// holds another type or a value beyond int64.
    [[nodiscard]] std::optional<index_t> integer(std::string_view key) const {
        const GgufValue* v = find_key(key);
        if (v == nullptr) return std::nullopt;
        if (!v->is_integer())
            throw config_error(detail::concat(source_, ": metadata '", key, "' is a ", to_string(v->type), ", expected an integer"));
        if (const auto* u = std::get_if<std::uint64_t>(&v->scalar)) {
            if (*u > std::uint64_t(INT64_MAX))
                throw config_error(detail::concat(source_, ": metadata '", key, "' is ", *u, ", expected at most ", INT64_MAX));
            return index_t(*u);
        }
        return std::get<std::int64_t>(v->scalar);
    }
    /// Metadata `key` as a number (an integer or a float).
    [[nodiscard]] std::optional<double> number(std::string_view key) const {
        const GgufValue* v = find_key(key);
        if (v == nullptr) return std::nullopt;
        if (!v->is_number())
            throw config_error(detail::concat(source_, ": metadata '", key, "' is a ", to_string(v->type), ", expected a number"));
        if (const auto* d = std::get_if<double>(&v->scalar)) return *d;
        return double(*integer(key));
    }
    [[nodiscard]] std::optional<bool> boolean(std::string_view key) const {
        const GgufValue* v = find_key(key);
        if (v == nullptr) return std::nullopt;
        if (v->type != gguf_type::boolean)
            throw config_error(detail::concat(source_, ": metadata '", key, "' is a ", to_string(v->type), ", expected a bool"));
        return std::get<bool>(v->scalar);
    }
    [[nodiscard]] std::optional<std::string> string(std::string_view key) const {
        const GgufValue* v = find_key(key);
        if (v == nullptr) return std::nullopt;
        if (v->type != gguf_type::string)
            throw config_error(detail::concat(source_, ": metadata '", key, "' is a ", to_string(v->type), ", expected a string"));
        return std::get<std::string>(v->scalar);
    }

private:
    [[noreturn]] void fail(const std::string& what) const { throw weight_error(detail::concat(source_, ": ", what)); }

    /// Reads from the header, checking every length against the bytes left.
    struct Cursor {
        const GgufView& file;
        std::size_t at = 0;

        [[nodiscard]] std::size_t left() const noexcept { return file.bytes_.size() - at; }
        void need(std::uint64_t n, std::string_view what) const {
            if (n > left())
                file.fail(detail::concat("truncated: ", what, " needs ", n, " bytes at offset ", at, ", but the file has ", left(),
                                         " left"));
        }
        template <class T>
        T read(std::string_view what) {
            need(sizeof(T), what);
            T v;
            std::memcpy(&v, file.bytes_.data() + at, sizeof(T));
            at += sizeof(T);
            return v;
        }
        std::string string(std::string_view what) {
            const auto n = read<std::uint64_t>(what);
            need(n, what);
            std::string s(reinterpret_cast<const char*>(file.bytes_.data() + at), std::size_t(n));
            at += std::size_t(n);
            return s;
        }
        void skip(std::uint64_t n, std::string_view what) {
            need(n, what);
            at += std::size_t(n);
        }
    };

    static constexpr std::uint64_t scalar_size(gguf_type t) noexcept {
        switch (t) {
        case gguf_type::u8: case gguf_type::i8: case gguf_type::boolean: return 1;
        case gguf_type::u16: case gguf_type::i16: return 2;
        case gguf_type::u32: case gguf_type::i32: case gguf_type::f32: return 4;
        case gguf_type::u64: case gguf_type::i64: case gguf_type::f64: return 8;
        case gguf_type::string: case gguf_type::array: return 0;
        }
        return 0;
    }

    gguf_type value_type(std::uint32_t raw, const std::string& key) const {
        if (raw > std::uint32_t(gguf_type::f64)) fail(detail::concat("metadata '", key, "' has unknown value type ", raw));
        return gguf_type(raw);
    }

    GgufValue read_value(Cursor& c, gguf_type type, const std::string& key) const {
        const std::string what = "metadata '" + key + "'";
        GgufValue v;
        v.type = type;
        switch (type) {
        case gguf_type::u8: v.scalar = std::uint64_t(c.read<std::uint8_t>(what)); break;
        case gguf_type::i8: v.scalar = std::int64_t(c.read<std::int8_t>(what)); break;
        case gguf_type::u16: v.scalar = std::uint64_t(c.read<std::uint16_t>(what)); break;
        case gguf_type::i16: v.scalar = std::int64_t(c.read<std::int16_t>(what)); break;
        case gguf_type::u32: v.scalar = std::uint64_t(c.read<std::uint32_t>(what)); break;
        case gguf_type::i32: v.scalar = std::int64_t(c.read<std::int32_t>(what)); break;
        case gguf_type::u64: v.scalar = c.read<std::uint64_t>(what); break;
        case gguf_type::i64: v.scalar = c.read<std::int64_t>(what); break;
        case gguf_type::f32: v.scalar = double(c.read<float>(what)); break;
        case gguf_type::f64: v.scalar = c.read<double>(what); break;
        case gguf_type::boolean: {
            const auto b = c.read<std::uint8_t>(what);
            if (b > 1) fail(detail::concat(what, " is a bool holding ", unsigned(b), ", expected 0 or 1"));
            v.scalar = b == 1;
            break;
        }
        case gguf_type::string: v.scalar = c.string(what); break;
        case gguf_type::array: {
            v.element = value_type(c.read<std::uint32_t>(what), key);
            if (v.element == gguf_type::array) fail(detail::concat(what, " is an array of arrays, which this reader does not take"));
            v.count = c.read<std::uint64_t>(what);
            const std::size_t begin = c.at;
            // Each element takes at least one byte (a string its 8-byte length): a count beyond
            // what is left fails before the walk.
            const std::uint64_t least = v.element == gguf_type::string ? 8 : scalar_size(v.element);
            if (v.count > c.left() / least)
                fail(detail::concat("truncated: ", what, " declares ", v.count, " ", to_string(v.element), " elements, but the file has ",
                                    c.left(), " bytes left"));
            if (v.element == gguf_type::string)
                for (std::uint64_t i = 0; i < v.count; ++i) c.skip(c.read<std::uint64_t>(what), what);
            else
                c.skip(v.count * least, what);
            v.items = bytes_.subspan(begin, c.at - begin);
            break;
        }
        }
        return v;
    }

    void parse() {
        Cursor c{*this};
        if (bytes_.size() < 4 || std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
            std::string got;
            for (std::size_t i = 0; i < std::min<std::size_t>(4, bytes_.size()); ++i) {
                const auto ch = std::to_integer<unsigned>(bytes_[i]);
                got += ch >= 32 && ch < 127 ? std::string(1, char(ch)) : std::string{'\\', 'x', "0123456789abcdef"[ch >> 4], "0123456789abcdef"[ch & 15]};
            }
            fail(detail::concat("not a GGUF file: it starts with \"", got, "\", expected \"GGUF\""));
        }
        c.at = 4;
        version_ = c.read<std::uint32_t>("the version");
        if (version_ == 1) fail("GGUF version 1 is not supported (versions 2 and 3 are); convert the file again with a current llama.cpp");
        if (version_ != 2 && version_ != 3) {
            if (const std::uint32_t swapped = __builtin_bswap32(version_); swapped == 2 || swapped == 3)
                fail("big-endian GGUF file; this reader takes little-endian files only");
            fail(detail::concat("GGUF version is ", version_, ", expected 2 or 3"));
        }
        const auto tensor_count = c.read<std::uint64_t>("the tensor count");
        const auto kv_count = c.read<std::uint64_t>("the metadata count");
        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at
        // least 8 + 4 + 4 + 8: counts beyond what the file could hold fail before any allocation.
        if (kv_count > c.left() / 13)
            fail(detail::concat("the header declares ", kv_count, " metadata entries, but the file has room for at most ", c.left() / 13));
        for (std::uint64_t i = 0; i < kv_count; ++i) {
            const std::string key = c.string(detail::concat("metadata key ", i));
            const gguf_type type = value_type(c.read<std::uint32_t>("metadata '" + key + "'"), key);
            GgufValue v = read_value(c, type, key);
            if (!metadata_.emplace(key, std::move(v)).second) fail(detail::concat("metadata key '", key, "' appears twice"));
        }
        if (const GgufValue* a = find_key("general.alignment")) {
            if (a->type != gguf_type::u32)
                fail(detail::concat("metadata 'general.alignment' is a ", to_string(a->type), ", expected a u32"));
            alignment_ = std::get<std::uint64_t>(a->scalar);
            if (alignment_ == 0 || !std::has_single_bit(alignment_))
                fail(detail::concat("metadata 'general.alignment' is ", alignment_, ", expected a power of two"));
        }
        if (tensor_count > c.left() / 24)
            fail(detail::concat("the header declares ", tensor_count, " tensors, but the file has room for at most ", c.left() / 24));
        std::vector<TensorInfo> tensors;
        std::vector<std::uint64_t> offsets, sizes;
        for (std::uint64_t i = 0; i < tensor_count; ++i) {
            TensorInfo t;
            t.name = c.string(detail::concat("the name of tensor ", i));
            const std::string what = "tensor '" + t.name + "'";
            const auto dims = c.read<std::uint32_t>(what);
            if (dims > 4) fail(detail::concat(what, " has ", dims, " dimensions, expected at most 4"));
            std::array<std::int64_t, 4> ne{1, 1, 1, 1};
            for (std::uint32_t d = 0; d < dims; ++d) {
                ne[d] = c.read<std::int64_t>(what);
                if (ne[d] < 0) fail(detail::concat(what, " has dimension ", d, " = ", ne[d], ", expected a non-negative size"));
            }
            for (std::uint32_t d = dims; d-- > 0;) t.shape.push_back(ne[d]);
            if (!shape_fits(t.shape)) fail(detail::concat(what, " has too many elements"));
            const index_t count = t.numel();
            const auto id = c.read<std::uint32_t>(what);
            const GgmlType* type = detail::find_ggml_type(id);
            if (type == nullptr) fail(detail::concat(what, " has ggml type id ", id, ", which is not a ggml type"));
            if (ne[0] % type->block != 0)
                fail(detail::concat(what, " has ", ne[0], " elements per row, not a whole number of ", type->name, " blocks of ",
                                    type->block));
            t.dtype = detail::tensor_dtype_of_ggml(id);
            if (t.dtype == tensor_dtype::other) t.type_name = std::string(type->name);
            const auto offset = c.read<std::uint64_t>(what);
            if (offset % alignment_ != 0)
                fail(detail::concat(what, " starts at data offset ", offset, ", not a multiple of the alignment ", alignment_));
            offsets.push_back(offset);
            sizes.push_back(std::uint64_t(count) / type->block * type->bytes);
            if (ggml_types_.count(t.name) != 0) fail(detail::concat("tensor name '", t.name, "' appears twice"));
            ggml_types_[t.name] = type;
            tensors.push_back(std::move(t));
        }
        const std::size_t data_start = (c.at + alignment_ - 1) / alignment_ * alignment_;
        const std::size_t data_size = bytes_.size() > data_start ? bytes_.size() - data_start : 0;
        for (std::size_t i = 0; i < tensors.size(); ++i) {
            TensorInfo& t = tensors[i];
            if (offsets[i] > data_size || sizes[i] > data_size - offsets[i])
                fail(detail::concat("tensor '", t.name, "' (", t.type_string(), " ", t.shape_string(), ", ", sizes[i],
                                    " bytes at data offset ", offsets[i], ") runs past the ", data_size, " data bytes of the file"));
            t.begin = std::size_t(offsets[i]);
            t.end = std::size_t(offsets[i] + sizes[i]);
        }
        std::vector<const TensorInfo*> by_offset;
        for (const TensorInfo& t : tensors) by_offset.push_back(&t);
        std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
        for (std::size_t i = 1; i < by_offset.size(); ++i)
            if (by_offset[i]->begin < by_offset[i - 1]->end)
                fail(detail::concat("tensors '", by_offset[i - 1]->name, "' [", by_offset[i - 1]->begin, ", ", by_offset[i - 1]->end,
                                    ") and '", by_offset[i]->name, "' [", by_offset[i]->begin, ", ", by_offset[i]->end,
                                    ") overlap"));
        static_cast<TensorTable&>(*this) = TensorTable(bytes_.subspan(std::min(data_start, bytes_.size())), source_, std::move(tensors));
    }

    std::span<const std::byte> bytes_;
    std::uint32_t version_ = 0;
    std::uint64_t alignment_ = 32;
    std::map<std::string, GgufValue, std::less<>> metadata_;
    std::map<std::string, const GgmlType*, std::less<>> ggml_types_;
};

/// A GGUF file, memory-mapped read-only for its lifetime.
using GgufFile = ParsedFile<GgufView>;

} // namespace hypermoe
