#pragma once
// Linear maps over weights stored in the q8_0 / q4_0 / mxfp4 / q4_k block formats
// (core/quant.hpp), shared by every backend: a backend's linear whose storage is a block format
// holds a BlockLinear and forwards to it, so the weights are held once, as ggml's blocks (34, 18
// or 17 bytes per 32 weights; q4_k's super-blocks of 256 as 8 sub-blocks of 18.5), never
// widened. They are held in the layout VPDPBUSD takes (BlockWeights: tiles of 32 outputs), so
// that one kernel serves every row count, from decode to prefill, with nothing repacked per call.
// Two precisions (core/dtype.hpp):
// - exact: f32 on the weights' exact values. Per block and output, the 32 products of the
//   block's small integers with the inputs are summed in f32 and then scaled by the block's d
//   (q * d is exact in f32, so this equals f32 arithmetic on the dequantised weights up to the
//   order of the additions). mxfp4's integers are its nibbles' mxfp4_values. q4_k's sub-blocks
//   are (d sc) q - dmin m: the sum of q x input scaled by d sc, less dmin m x the inputs' sum.
//   On AVX2 from 12 rows and on AVX-512 from 16-112 (BlockLinear::widen_rows), each tile is
//   instead widened, 1024 inputs at a time, into f32 panels in the thread's workspace, which the
//   f32 panel kernel (panels.hpp) multiplies by every row: the dequantised values themselves, so
//   f32 arithmetic on them.
// - fast: the activations are quantised per block of 32 (QuantizedRows) and each block's dot
//   product is an integer one: TDPBSUD's s8 x u8 tile products on AMX-INT8 (calls of 16 rows or
//   more), VPDPBUSD's u8 x s8 products on VNNI, VPMADDUBSW's on AVX-512 BW. The weights enter
//   as unsigned codes (code_offset), their offset taken off through the activations' block sums
//   (and q4_k's mins through the same sums, in f32).
//   The integer sums are exact, so every kernel gives the same block dots; only the f32
//   accumulation order differs between them.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "hypermoe/backend/cpu_isa.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/backend/panels.hpp"
#include "hypermoe/backend/prepared_input.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/quant.hpp"
#include "hypermoe/core/workspace.hpp"

HYPERMOE_INTRINSICS_BEGIN

namespace hypermoe::detail {

/// Whether a format's integers are nibbles, two to a byte as ggml stores them (q4_0, mxfp4,
/// q4_k's sub-blocks).
template <class Block>
inline constexpr bool nibble_format = !std::is_same_v<Block, BlockQ8_0>;

/// Whether a format's blocks have a min besides their scale (value = scale * q - min): q4_k's.
template <class Block>
inline constexpr bool has_min = std::is_same_v<Block, SubBlockQ4_K>;

/// The block type ggml stores a format in: the format's own, or q4_k's super-block for its
/// sub-blocks.
template <class Block>
using ggml_block_t = std::conditional_t<has_min<Block>, BlockQ4_K, Block>;

/// The unsigned codes the integer (`fast`) kernels multiply a format's weights as, and their
/// offset from the integers they stand for: q8_0's q + 128 (as BlockWeights holds them), q4_0's
/// nibble = q + 8 (as held), mxfp4's mxfp4_values[nibble] + 12 (0 to 24, mxfp4_codes: what a
/// byte shuffle of the held nibbles gives), q4_k's nibble q itself (its min is apart).
template <class Block>
inline constexpr std::int32_t code_offset = std::is_same_v<Block, BlockQ8_0>      ? 128
                                            : std::is_same_v<Block, BlockQ4_0>    ? 8
                                            : std::is_same_v<Block, SubBlockQ4_K> ? 0
                                                                                  : 12;
inline constexpr std::array<std::uint8_t, 16> mxfp4_codes = [] {
    std::array<std::uint8_t, 16> c{};
    for (std::size_t i = 0; i < 16; ++i) c[i] = static_cast<std::uint8_t>(mxfp4_values[i] + code_offset<BlockMXFP4>);
    return c;
}();

/// The exact integer dot of a weight block's integers (`qs`: ggml's bytes of a Block) with a
/// quantised activation block (the block's values are these integers times its d): as the fast
/// kernels take it, the unsigned codes times x, less the codes' offset times sum(x).
template <class Block>
[[nodiscard]] std::int32_t block_int_dot(const std::uint8_t* qs, const std::int8_t* xq, std::int32_t xsum) noexcept {
    std::int32_t s = 0;
    if constexpr (std::is_same_v<Block, BlockMXFP4>) {
        for (std::size_t j = 0; j < 16; ++j)
            s += std::int32_t(mxfp4_codes[qs[j] & 0x0F]) * xq[j] + std::int32_t(mxfp4_codes[qs[j] >> 4]) * xq[j + 16];
        return s - code_offset<Block> * xsum;
    } else if constexpr (std::is_same_v<Block, BlockQ8_0>) {
        // As the VNNI kernel takes it: the unsigned q + 128 times x, less 128 * sum(x). (GCC 12.2
        // with -O2 -march=native on an AVX-512 VNNI CPU turned the plain int8 x int8 sum into
        // VPDPBUSD, which reads q as unsigned: wrong sums, which test_backend's block_int_dot test
        // catches; unsigned x signed it compiles right.)
        for (std::size_t i = 0; i < 32; ++i) s += std::int32_t(std::uint8_t(qs[i] ^ 0x80u)) * xq[i];
        return s - 128 * xsum;
    } else { // q4_0's nibbles q + 8; q4_k's q
        for (std::size_t j = 0; j < 16; ++j) s += std::int32_t(qs[j] & 0x0F) * xq[j] + std::int32_t(qs[j] >> 4) * xq[j + 16];
        return s - code_offset<Block> * xsum;
    }
}

/// Integer bytes per block of a format.
template <class Block>
inline constexpr index_t block_bytes_of = std::is_same_v<Block, BlockQ8_0> ? 32 : 16;

/// Bytes of a block's scale as held: q8_0's and q4_0's half, mxfp4's scale byte e (q4_k's are
/// laid out by Q4KScales).
[[nodiscard]] constexpr index_t held_scale_bytes(dtype format) noexcept { return format == dtype::mxfp4 ? 1 : 2; }

/// Where q4_k's scales are among a tile's (BlockWeights::tile_scales), for its sub-block b: per
/// super-block of 8 sub-blocks, 640 bytes: the 32 outputs' d (halves), their dmin (halves), then
/// per sub-block the 32 outputs' sc bytes and their m bytes. So a sub-block of 32 outputs takes
/// 32 x (16 + 2) bytes and each super-block 32 x 4 more: 4.625 bits a weight, where ggml's
/// super-block takes 4.5 (its 6-bit sc and m packed in 12 bytes, unpacked here once, at load).
struct Q4KScales {
    static constexpr index_t super_bytes = 640;
    static constexpr index_t d(index_t b) noexcept { return b / q4_k_sub_blocks * super_bytes; }
    static constexpr index_t dmin(index_t b) noexcept { return d(b) + 64; }
    static constexpr index_t sc(index_t b) noexcept { return d(b) + 128 + b % q4_k_sub_blocks * 64; }
    static constexpr index_t m(index_t b) noexcept { return sc(b) + 32; }
};

/// The scale of output o's (0-31) block b among a tile's scales (`wd`), and its min (q4_k; 0 for
/// the others), exactly as the kernels take them.
template <class Block>
[[nodiscard]] float tile_scale(const std::uint8_t* wd, index_t b, index_t o) noexcept {
    const auto half = [wd](index_t at) {
        std::uint16_t h;
        std::memcpy(&h, wd + at, sizeof h);
        return f16_bits_to_f32(h);
    };
    if constexpr (std::is_same_v<Block, BlockMXFP4>) return mxfp4_scale(wd[b * 32 + o]);
    else if constexpr (has_min<Block>) return half(Q4KScales::d(b) + 2 * o) * float(wd[Q4KScales::sc(b) + o]);
    else return half(2 * (b * 32 + o));
}
template <class Block>
[[nodiscard]] float tile_min(const std::uint8_t* wd, index_t b, index_t o) noexcept {
    if constexpr (has_min<Block>) {
        std::uint16_t h;
        std::memcpy(&h, wd + Q4KScales::dmin(b) + 2 * o, sizeof h);
        return f16_bits_to_f32(h) * float(wd[Q4KScales::m(b) + o]);
    } else {
        (void)wd, (void)b, (void)o;
        return 0.0f;
    }
}

/// f.template operator()<Block>() with the block type of `format` (q8_0, q4_0, mxfp4, or q4_k's
/// sub-blocks).
template <class F>
decltype(auto) with_block(dtype format, F&& f) {
    if (format == dtype::q4_0) return f.template operator()<BlockQ4_0>();
    if (format == dtype::mxfp4) return f.template operator()<BlockMXFP4>();
    if (format == dtype::q4_k) return f.template operator()<SubBlockQ4_K>();
    return f.template operator()<BlockQ8_0>();
}

/// An (N, K) weight held as ceil(N / 32) tiles of 32 outputs, each two panels of 16 (the int32
/// lanes of a 512-bit register). A tile holds its outputs' ceil(K / 32) blocks the way VPDPBUSD
/// takes them, one block after the other: per block, panel and 4 bytes of the blocks' integers
/// (a "quad"), the panel's 16 outputs' 4 bytes side by side, 64 bytes that one load brings in;
/// and, in a second array, per block the 32 outputs' scales as ggml stores them (half bits, one
/// cache line; mxfp4's scale bytes e, half a line, which the kernels turn into 2^(e - 128) as
/// they load them: mxfp4_scale; q4_k's as Q4KScales lays them out). The integers are ggml's
/// `qs` bytes, q8_0's with the sign bit flipped (q + 128: unsigned, as VPDPBUSD reads its first
/// operand), q4_0's and mxfp4's as stored (byte j of a block holds element j in its low nibble
/// and j + 16 in its high one), q4_k's sub-blocks put in that order. So a block of 32 outputs
/// takes 32 x 34, 32 x 18 or 32 x 17 bytes, as ggml's q8_0, q4_0 and mxfp4 blocks do (q4_k: 32 x
/// 18.5, against ggml's 18), and a tile's weights are one stream; outputs past N (the last
/// tile's padding) hold zero weights. `block()` gives a block back in ggml's layout (q4_k: a
/// SubBlockQ4_K).
class BlockWeights {
public:
    /// Outputs per panel: the int32 lanes of one 512-bit register; per tile: two panels.
    static constexpr index_t panel = 16;
    static constexpr index_t tile = 2 * panel;

    BlockWeights() = default;
    BlockWeights(const WeightView& w, dtype format, const std::string& name)
        : format_(format), n_(w.rows()), k_(w.cols()), blocks_per_row_((w.cols() + quant_block - 1) / quant_block),
          tiles_((w.rows() + tile - 1) / tile) {
        // a zero weight, as held: q8_0's 0 + 128, q4_0's nibbles 0 + 8, mxfp4's and q4_k's nibbles 0
        const std::uint8_t zero = format == dtype::q8_0 ? 0x80 : format == dtype::q4_0 ? 0x88 : 0x00;
        scales_.assign(std::size_t(tiles_ * tile_scale_bytes()), 0);
        quants_.assign(std::size_t(tiles_ * blocks_per_row_ * 2 * quads() * 64), zero);
        with_block(format, [&]<class Block>() {
            // Blocks already in this format (a GGUF file's) are kept as they are; anything else
            // is quantised from its values. q4_k's super-blocks are split into their sub-blocks.
            using Stored = ggml_block_t<Block>;
            constexpr index_t width = block_width_of<Stored>;
            std::vector<float> row(static_cast<std::size_t>(k_));
            std::vector<Stored> stored(static_cast<std::size_t>((k_ + width - 1) / width));
            const bool as_stored = w.type() == format;
            for (index_t r = 0; r < n_; ++r) {
                if (as_stored) {
                    std::memcpy(stored.data(), w.row_bytes(r), stored.size() * sizeof(Stored));
                } else {
                    for (index_t c = 0; c < k_; ++c) row[std::size_t(c)] = w.at(r, c);
                    quantize_row<Stored>(row, stored, concat(name, " row ", r));
                }
                for (index_t b = 0; b < blocks_per_row_; ++b) {
                    Block blk;
                    if constexpr (has_min<Block>) blk = sub_block(stored[std::size_t(b / q4_k_sub_blocks)], b % q4_k_sub_blocks);
                    else blk = stored[std::size_t(b)];
                    set_scales(r, b, blk);
                    for (index_t j = 0; j < quads(); ++j) {
                        std::uint32_t v;
                        std::memcpy(&v, blk.qs.data() + 4 * j, sizeof v);
                        if constexpr (std::is_same_v<Block, BlockQ8_0>) v ^= 0x80808080u;
                        std::memcpy(quants_.data() + quad_offset(r, b, j), &v, sizeof v);
                    }
                }
            }
        });
    }

    [[nodiscard]] dtype format() const noexcept { return format_; }
    [[nodiscard]] index_t blocks_per_row() const noexcept { return blocks_per_row_; }
    [[nodiscard]] index_t tiles() const noexcept { return tiles_; }
    /// Integer bytes per block: 32 (q8_0) or 16 (q4_0, mxfp4, q4_k).
    [[nodiscard]] index_t block_bytes() const noexcept { return format_ == dtype::q8_0 ? 32 : 16; }
    /// 64-byte loads of a panel per block: 8 (q8_0) or 4 (the nibble formats).
    [[nodiscard]] index_t quads() const noexcept { return block_bytes() / 4; }
    /// Bytes held: the integers and the scales (N rounded up to whole tiles): as many as ggml's
    /// blocks take for q8_0, q4_0 and mxfp4, 2.8% more for q4_k (Q4KScales).
    [[nodiscard]] std::size_t bytes() const noexcept { return quants_.size() + scales_.size(); }
    /// Tile t's integers (block b, panel p, quad j at + ((b * 2 + p) * quads() + j) * 64) and
    /// scales (block b, panel p's at + (b * 32 + p * 16) * held_scale_bytes(format()); q4_k's as
    /// Q4KScales lays them out).
    [[nodiscard]] const std::uint8_t* tile_quants(index_t t) const noexcept { return quants_.data() + t * blocks_per_row_ * 2 * quads() * 64; }
    [[nodiscard]] const std::uint8_t* tile_scales(index_t t) const noexcept { return scales_.data() + t * tile_scale_bytes(); }

    /// Block b of row n in ggml's layout (Block matching format(); q4_k: its sub-block b).
    template <class Block>
    [[nodiscard]] Block block(index_t n, index_t b) const noexcept {
        Block blk;
        const std::uint8_t* wd = tile_scales(n / tile);
        const index_t o = n % tile;
        if constexpr (std::is_same_v<Block, BlockMXFP4>) {
            blk.e = wd[b * tile + o];
        } else if constexpr (has_min<Block>) {
            std::memcpy(&blk.d, wd + Q4KScales::d(b) + 2 * o, sizeof blk.d);
            std::memcpy(&blk.dmin, wd + Q4KScales::dmin(b) + 2 * o, sizeof blk.dmin);
            blk.sc = wd[Q4KScales::sc(b) + o], blk.m = wd[Q4KScales::m(b) + o];
        } else {
            std::memcpy(&blk.d, wd + 2 * (b * tile + o), sizeof blk.d);
        }
        for (index_t j = 0; j < block_bytes_of<Block> / 4; ++j) {
            std::uint32_t v;
            std::memcpy(&v, quants_.data() + quad_offset(n, b, j), sizeof v);
            if constexpr (std::is_same_v<Block, BlockQ8_0>) v ^= 0x80808080u;
            std::memcpy(reinterpret_cast<std::uint8_t*>(blk.qs.data()) + 4 * j, &v, sizeof v);
        }
        return blk;
    }
    /// The 32 values of block b of row n.
    void dequantize_block(index_t n, index_t b, std::span<float, 32> out) const noexcept {
        with_block(format_, [&]<class Block>() { dequantize(block<Block>(n, b), out); });
    }
    /// Weight (n, k), exactly.
    [[nodiscard]] float at(index_t n, index_t k) const noexcept {
        std::array<float, 32> v;
        dequantize_block(n, k / quant_block, v);
        return v[std::size_t(k % quant_block)];
    }

private:
    /// Scale bytes of a tile: per block 32 scales; q4_k per super-block Q4KScales::super_bytes.
    [[nodiscard]] index_t tile_scale_bytes() const noexcept {
        if (format_ == dtype::q4_k) return (blocks_per_row_ + q4_k_sub_blocks - 1) / q4_k_sub_blocks * Q4KScales::super_bytes;
        return blocks_per_row_ * tile * held_scale_bytes(format_);
    }
    /// Writes row n's block b's scales (and q4_k's min) into its tile's.
    template <class Block>
    void set_scales(index_t n, index_t b, const Block& blk) noexcept {
        std::uint8_t* wd = scales_.data() + n / tile * tile_scale_bytes();
        const index_t o = n % tile;
        if constexpr (std::is_same_v<Block, BlockMXFP4>) {
            wd[b * tile + o] = blk.e;
        } else if constexpr (has_min<Block>) {
            std::memcpy(wd + Q4KScales::d(b) + 2 * o, &blk.d, sizeof blk.d);
            std::memcpy(wd + Q4KScales::dmin(b) + 2 * o, &blk.dmin, sizeof blk.dmin);
            wd[Q4KScales::sc(b) + o] = blk.sc, wd[Q4KScales::m(b) + o] = blk.m;
        } else {
            std::memcpy(wd + 2 * (b * tile + o), &blk.d, sizeof blk.d);
        }
    }
    [[nodiscard]] index_t quad_offset(index_t n, index_t b, index_t j) const noexcept {
        return (((n / tile * blocks_per_row_ + b) * 2 + n % tile / panel) * quads() + j) * 64 + n % panel * 4;
    }

    dtype format_ = dtype::q8_0;
    index_t n_ = 0, k_ = 0, blocks_per_row_ = 0, tiles_ = 0;
    std::vector<std::uint8_t> scales_, quants_;
};

/// One call of a tile kernel: a tile of BlockWeights (32 outputs, two panels) over its nb
/// blocks, for up to 6 rows. Each output's sum goes to out[r * ldc + column]; `mask[p]` says
/// which of panel p's 16 columns exist.
struct TileArgs {
    const std::uint8_t* wq = nullptr;  ///< the tile's integers
    const std::uint8_t* wd = nullptr;  ///< the tile's scales (BlockWeights::tile_scales)
    index_t nb = 0;
    float* out = nullptr;
    index_t ldc = 0;
    std::uint16_t mask[2] = {};
    std::ptrdiff_t ahead = 0; ///< bytes ahead of each weight load to prefetch (0: none)
};

/// The rows a tile kernel reads: `fast` the quantised ones, `exact` the f32 ones (with the last,
/// partial block of each row zero-padded in `pad`: blocks from `full` on are read from there).
struct TileRows {
    const std::int8_t* q[6] = {};
    const float* d[6] = {};
    const std::int32_t* sum[6] = {};
    const float* dsum[6] = {}; ///< `fast`: d x sum per block (QuantizedRows), for q4_k's mins
    const float* x[6] = {};
    const float* pad[6] = {};
    const float* x_sum[6] = {}; ///< `exact`: each block's input sum, for q4_k's mins and, on AVX2, q4_0's -8 and mxfp4's -12
    index_t full = 0;
};

/// The rows an AMX-INT8 call reads: 1 to 16 consecutive rows of QuantizedRows (row r's integers
/// at q + r * blocks * 32, its scales and sums at d and sum + r * blocks).
struct AmxRows {
    const std::int8_t* q = nullptr;
    const float* d = nullptr;
    const std::int32_t* sum = nullptr;
    const float* dsum = nullptr; ///< d x sum per block, for q4_k's mins
    index_t blocks = 0;
    int rows = 0;
};

#if HYPERMOE_X86_KERNELS
/// 4 activation bytes at x in every int32 lane.
__attribute__((target("avx512f"))) inline __m512i broadcast_quad(const std::int8_t* x) {
    std::int32_t v;
    std::memcpy(&v, x, sizeof v);
    return _mm512_set1_epi32(v);
}

/// 16 halves at p as floats, times 16 bytes at u (q4_k's d x sc and dmin x m, exact).
__attribute__((target("avx512f"))) inline __m512 halves_times_bytes(const std::uint8_t* p, const std::uint8_t* u) {
    const __m512 h = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_mul_ps(h, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)))));
}

/// Block b's scales of panel p of a tile as floats: 16 halves, mxfp4's 16 scale bytes e as
/// mxfp4_scale(e) = 2^(e - 128): (e - 1) << 23 as f32 bits for e >= 2, the subnormals 2^-128
/// and 2^-127 (0x00200000 << e) below, or q4_k's d x sc (tile_scale).
template <class Block>
__attribute__((target("avx512f"))) inline __m512 panel_scales(const TileArgs& t, index_t b, int p) {
    if constexpr (has_min<Block>) {
        return halves_times_bytes(t.wd + Q4KScales::d(b) + 32 * p, t.wd + Q4KScales::sc(b) + 16 * p);
    } else if constexpr (std::is_same_v<Block, BlockMXFP4>) {
        const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.wd + b * 32 + p * 16)));
        const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
        const __m512i subnormal = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
        return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2)), normal, subnormal));
    } else {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.wd + 2 * (b * 32 + p * 16))));
    }
}

/// Block b's mins of panel p of a tile as floats: q4_k's dmin x m (tile_min).
__attribute__((target("avx512f"))) inline __m512 panel_mins(const TileArgs& t, index_t b, int p) {
    return halves_times_bytes(t.wd + Q4KScales::dmin(b) + 32 * p, t.wd + Q4KScales::m(b) + 16 * p);
}

/// A 16-byte table in every 128-bit lane, for VPSHUFB (mxfp4's nibbles to their codes or values).
__attribute__((target("avx512f"))) inline __m512i nibble_table(const void* table) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(table)));
}

/// `fast`: acc + a block's exact int32 sums times (d_w * d_x), the one way every AVX-512 `fast`
/// kernel (fast_tile, amx_fast_tile) takes them into f32, so that they give the same bits.
__attribute__((target("avx512f"))) inline __m512 add_block_sums(__m512 acc, __m512i total, __m512 dw, float dx) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
}

/// `fast` q4_k: acc less a block's mins times its activations' sum, dmin m x (d_x sum(xq)): the
/// other half of a block's dot, (d sc) q - dmin m against d_x xq, in every AVX-512 kernel.
__attribute__((target("avx512f"))) inline __m512 sub_block_mins(__m512 acc, __m512 mins, float dsum) {
    return _mm512_fnmadd_ps(mins, _mm512_set1_ps(dsum), acc);
}

/// acc + per int32 lane the dot of 4 unsigned bytes of u with 4 signed bytes of x, without VNNI
/// (VPMADDUBSW then VPMADDWD): exact while a pair's sum stays within int16, which holds for
/// u <= 128 and |x| <= 127 (q4_0's nibbles and mxfp4's codes are at most 24).
__attribute__((target("avx512f,avx512bw"))) inline __m512i dot4_bw(__m512i acc, __m512i u, __m512i x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)));
}

/// `fast`: a tile's integer block dots (see TileArgs). With VNNI the weights enter as their
/// unsigned codes (q8_0: q + 128 as held, q4_0: the nibbles, q + 8, mxfp4: its nibbles shuffled
/// to mxfp4_values + 12), so each block's sums start at -offset * sum(xq); one VPDPBUSD
/// multiplies 4 k of 16 outputs by a broadcast of 4 activations. Without VNNI, VPMADDUBSW's int16
/// pairs would overflow for q + 128, so q8_0 takes |q| and moves q's sign onto the activations
/// (no offset); the nibble formats' codes go in as with VNNI. Per block and
/// row, the int32 sums times (d_w * d_x) into f32. With few rows each block's sums are split
/// over several registers (by quad), so that the chains of dependent VPDPBUSD stay short.
template <int Rows, class Block, bool Vnni>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void fast_tile(const TileArgs& t, const TileRows& x) {
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    constexpr std::int32_t offset = q4 || Vnni ? code_offset<Block> : 0;
    constexpr int split = Rows == 1 ? 4 : Rows == 2 ? 2 : 1;
    const __m512i nibble = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512i codes = nibble_table(mxfp4_codes.data());
    __m512 acc[Rows][2];
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p)
            acc[r][p] = _mm512_setzero_ps();
    for (index_t b = 0; b < t.nb; ++b) {
        __m512i sum[Rows][2][split];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < 2; ++p)
                HYPERMOE_UNROLL
                for (int i = 0; i < split; ++i) sum[r][p][i] = i == 0 ? _mm512_set1_epi32(-offset * x.sum[r][b]) : _mm512_setzero_si512();
        // Quad j = j0 + i goes to split sum i, a compile-time index (indexed by j % split, the
        // sums stayed on the stack at -O2). Unrolled: at -O2 GCC otherwise kept the loop and
        // copied every sum between registers in each pass (1.4x -O3's time at 8 rows).
        static_assert(quads % split == 0);
        HYPERMOE_UNROLL
        for (index_t j0 = 0; j0 < quads; j0 += split)
            HYPERMOE_UNROLL
            for (int i = 0; i < split; ++i) {
                const index_t j = j0 + i;
                __m512i lo[2], hi[2];
                __mmask64 negative[2] = {};
                HYPERMOE_UNROLL
                for (int p = 0; p < 2; ++p) {
                    const std::uint8_t* w = t.wq + ((b * 2 + p) * quads + j) * 64;
                    if (t.ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(w + t.ahead), _MM_HINT_T0);
                    const __m512i v = _mm512_loadu_si512(w);
                    if constexpr (q4) { // low nibbles: k = 4j..4j+3; high: k = 16 + 4j..
                        lo[p] = _mm512_and_si512(v, nibble);
                        hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                        if constexpr (mx) lo[p] = _mm512_shuffle_epi8(codes, lo[p]), hi[p] = _mm512_shuffle_epi8(codes, hi[p]);
                    } else if constexpr (Vnni) {
                        lo[p] = v;
                    } else {
                        const __m512i q = _mm512_xor_si512(v, sign);
                        negative[p] = _mm512_movepi8_mask(q);
                        lo[p] = _mm512_abs_epi8(q);
                    }
                }
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) {
                    const std::int8_t* xr = x.q[r] + b * quant_block + 4 * j;
                    const __m512i xl = broadcast_quad(xr);
                    if constexpr (q4) {
                        const __m512i xh = broadcast_quad(xr + 16);
                        HYPERMOE_UNROLL
                        for (int p = 0; p < 2; ++p) {
                            __m512i& s = sum[r][p][i];
                            if constexpr (Vnni) s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[p], xl), hi[p], xh);
                            else s = dot4_bw(dot4_bw(s, lo[p], xl), hi[p], xh);
                        }
                    } else {
                        HYPERMOE_UNROLL
                        for (int p = 0; p < 2; ++p) {
                            __m512i& s = sum[r][p][i];
                            if constexpr (Vnni) s = _mm512_dpbusd_epi32(s, lo[p], xl);
                            else s = dot4_bw(s, lo[p], _mm512_mask_sub_epi8(xl, negative[p], _mm512_setzero_si512(), xl));
                        }
                    }
                }
            }
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) {
            const __m512 dw = panel_scales<Block>(t, b, p);
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                __m512i total = sum[r][p][0];
                HYPERMOE_UNROLL
                for (int i = 1; i < split; ++i) total = _mm512_add_epi32(total, sum[r][p][i]);
                acc[r][p] = add_block_sums(acc[r][p], total, dw, x.d[r][b]);
            }
            if constexpr (has_min<Block>) {
                const __m512 mins = panel_mins(t, b, p);
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) acc[r][p] = sub_block_mins(acc[r][p], mins, x.dsum[r][b]);
            }
        }
    }
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) _mm512_mask_storeu_ps(t.out + r * t.ldc + 16 * p, t.mask[p], acc[r][p]);
}

/// The AMX tile configuration (palette 1): 64 bytes, as LDTILECFG reads them.
struct AmxTileConfig {
    std::uint8_t palette = 1, start_row = 0;
    std::uint8_t reserved[14] = {};
    std::uint16_t colsb[16] = {}; ///< bytes per row of each tile register
    std::uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64);

/// The tile registers amx_fast_tile uses, for `rows` (1..16) activation rows: tmm0 and tmm1 the
/// two panels' int32 sums (rows x 16), tmm2 the activations' block (rows x 32 bytes), tmm3 and
/// tmm4 the two panels' weights (8 rows of 64 bytes: row i holds k = 4i..4i+3 of the 16
/// outputs, BlockWeights' quads as held). The tiles are this thread's while the object lives
/// (LDTILECFG in the constructor, TILERELEASE in the destructor), so a call never depends on
/// what another library (oneDNN's AMX brgemm) left configured.
class AmxTiles {
public:
    /// A compiler barrier that makes every store to *p happen before the next tile instruction:
    /// GCC 12's AMX intrinsics are inline assembly that declares no read of TILELOADD's rows and
    /// only 8 of LDTILECFG's 64 bytes, so without it the configuration's rows and q4_0's unpacked
    /// weights could be left unwritten (dead stores, to the compiler) or written too late.
    static void publish(const void* p) noexcept { asm volatile("" : : "r"(p) : "memory"); }

    __attribute__((target("amx-tile"))) explicit AmxTiles(int rows) {
        AmxTileConfig config;
        config.rows[0] = config.rows[1] = config.rows[2] = static_cast<std::uint8_t>(rows);
        config.colsb[0] = config.colsb[1] = 64;
        config.colsb[2] = 32;
        config.rows[3] = config.rows[4] = 8;
        config.colsb[3] = config.colsb[4] = 64;
        publish(&config);
        _tile_loadconfig(&config);
    }
    __attribute__((target("amx-tile"))) ~AmxTiles() { _tile_release(); }
    AmxTiles(const AmxTiles&) = delete;
    AmxTiles& operator=(const AmxTiles&) = delete;

    /// One block: c[r * 32 + 16 p + n] = the integer dot of activation row r (32 signed bytes at
    /// a + r * lda) with output n of panel p (unsigned bytes, w[p]), by TDPBSUD.
    __attribute__((target("amx-tile,amx-int8"))) void block(const std::int8_t* a, index_t lda, const std::uint8_t* const w[2],
                                                            std::int32_t* c) const {
        publish(a), publish(w[0]), publish(w[1]);
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, a, lda);
        _tile_loadd(3, w[0], 64);
        _tile_loadd(4, w[1], 64);
        _tile_dpbsud(0, 2, 3);
        _tile_dpbsud(1, 2, 4);
        _tile_stored(0, c, 32 * sizeof(std::int32_t));
        _tile_stored(1, c + 16, 32 * sizeof(std::int32_t));
    }
};

/// AmxTiles' block() in plain C++ (HYPERMOE_AMX=emulate, cpu_isa.hpp): the same integer dots, so
/// amx_fast_tile gives the same bits on either, and its logic is tested on CPUs without AMX.
class AmxTilesEmulated {
public:
    explicit AmxTilesEmulated(int rows) noexcept : rows_(rows) {}
    void block(const std::int8_t* a, index_t lda, const std::uint8_t* const w[2], std::int32_t* c) const noexcept {
        for (int r = 0; r < rows_; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < 2; ++p)
                for (index_t n = 0; n < 16; ++n) {
                    std::int32_t s = 0;
                    for (index_t k = 0; k < quant_block; ++k) s += std::int32_t(a[r * lda + k]) * std::int32_t(w[p][k / 4 * 64 + n * 4 + k % 4]);
                    c[r * 32 + 16 * p + n] = s;
                }
    }

private:
    int rows_;
};

/// `fast` on AMX-INT8: a tile's integer block dots (see TileArgs) for up to 16 rows, by `Tiles`
/// (AmxTiles, or AmxTilesEmulated). Per block, one TDPBSUD per panel multiplies all the rows'
/// signed activations by the panel's unsigned codes (q8_0: q + 128 as held; q4_0: the nibbles,
/// q + 8; mxfp4: mxfp4_values + 12; the nibbles first unpacked into the 8 rows of 64 bytes a tile
/// takes); then per row and panel the sums less offset * sum(xq), into f32 by add_block_sums as
/// in fast_tile, so with its bits.
/// A block's sums go through memory (2 KiB), and so do the 16 rows' f32 sums (32 registers'
/// worth): AVX-512 work per block of about 7 instructions per row and panel, against VNNI's 11
/// (8 VPDPBUSD).
template <class Tiles, class Block>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void amx_fast_tile(const TileArgs& t, const AmxRows& x) {
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    constexpr std::int32_t offset = code_offset<Block>;
    const Tiles tiles(x.rows);
    alignas(64) std::int32_t c[16 * 32];
    alignas(64) float acc[16 * 32];
    alignas(64) std::uint8_t unpacked[2][8 * 64];
    std::fill_n(acc, 32 * x.rows, 0.0f);
    const __m512i nibble = _mm512_set1_epi8(0x0F), codes = nibble_table(mxfp4_codes.data());
    const index_t lda = x.blocks * quant_block;
    for (index_t b = 0; b < t.nb; ++b) {
        const std::uint8_t* w[2];
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) {
            w[p] = t.wq + (b * 2 + p) * quads * 64;
            for (index_t j = 0; t.ahead != 0 && j < quads; ++j)
                _mm_prefetch(reinterpret_cast<const char*>(w[p] + j * 64 + t.ahead), _MM_HINT_T0);
            if constexpr (q4) { // quad j's low nibbles are k = 4j..4j+3 (tile row j), its high ones k + 16 (row 4 + j)
                for (index_t j = 0; j < 4; ++j) {
                    const __m512i v = _mm512_loadu_si512(w[p] + j * 64);
                    __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                    if constexpr (mx) lo = _mm512_shuffle_epi8(codes, lo), hi = _mm512_shuffle_epi8(codes, hi);
                    _mm512_store_si512(unpacked[p] + j * 64, lo);
                    _mm512_store_si512(unpacked[p] + (4 + j) * 64, hi);
                }
                w[p] = unpacked[p];
            }
        }
        tiles.block(x.q + b * quant_block, lda, w, c);
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) {
            const __m512 dw = panel_scales<Block>(t, b, p);
            for (int r = 0; r < x.rows; ++r) {
                const index_t at = r * x.blocks + b;
                const __m512i total = _mm512_add_epi32(_mm512_load_si512(c + r * 32 + 16 * p), _mm512_set1_epi32(-offset * x.sum[at]));
                float* a = acc + r * 32 + 16 * p;
                __m512 sum = add_block_sums(_mm512_load_ps(a), total, dw, x.d[at]);
                if constexpr (has_min<Block>) sum = sub_block_mins(sum, panel_mins(t, b, p), x.dsum[at]);
                _mm512_store_ps(a, sum);
            }
        }
    }
    for (int r = 0; r < x.rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) _mm512_mask_storeu_ps(t.out + r * t.ldc + 16 * p, t.mask[p], _mm512_load_ps(acc + r * 32 + 16 * p));
}

/// `exact`: a tile's f32 dots (see TileArgs). Each 64-byte load holds 4 (q8_0) or 8 (q4_0, mxfp4)
/// k of 16 outputs; each k is widened to 16 floats in place (q8_0: a shift left and an arithmetic
/// shift right of the signed bytes; q4_0 and mxfp4: a shift right and a lookup of nibble - 8 or
/// mxfp4_values[nibble] with VPERMPS, which reads only an index's low 4 bits) and multiplied by
/// the broadcast activation.
/// Per block and output the 32 products are summed (with few rows, over several registers, so
/// that the chains of dependent FMAs stay short), then scaled by the block's d.
template <int Rows, class Block>
__attribute__((target("avx512f,avx512bw"))) void exact_tile(const TileArgs& t, const TileRows& x) {
    constexpr bool q4 = nibble_format<Block>;
    constexpr index_t quads = q4 ? 4 : 8;
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    // What a nibble stands for, by its low 4 bits: q4_0's nibble - 8, mxfp4's mxfp4_values, q4_k's nibble.
    const __m512 values = std::is_same_v<Block, BlockMXFP4>
                              ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mxfp4_values.data()))))
                              : _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_ps(float(code_offset<Block>)));
    constexpr int split = Rows == 1 ? 4 : Rows == 2 ? 2 : 1;
    __m512 acc[Rows][2];
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p)
            acc[r][p] = _mm512_setzero_ps();
    for (index_t b = 0; b < t.nb; ++b) {
        const float* xb[Rows];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) xb[r] = b < x.full ? x.x[r] + b * quant_block : x.pad[r];
        __m512 sum[Rows][2][split];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int p = 0; p < 2; ++p)
                HYPERMOE_UNROLL
                for (int i = 0; i < split; ++i) sum[r][p][i] = _mm512_setzero_ps();
        for (index_t j = 0; j < quads; ++j)
            HYPERMOE_UNROLL
            for (int p = 0; p < 2; ++p) {
                const std::uint8_t* w = t.wq + ((b * 2 + p) * quads + j) * 64;
                if (t.ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(w + t.ahead), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(w);
                if constexpr (q4) {
                    HYPERMOE_UNROLL
                    for (int s = 0; s < 8; ++s) { // nibble s of each lane: k = 4j + s / 2, + 16 if s is odd
                        const __m512 wf = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s), values);
                        const index_t k = 4 * j + s / 2 + (s % 2) * 16;
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r) sum[r][p][s % split] = _mm512_fmadd_ps(wf, _mm512_set1_ps(xb[r][k]), sum[r][p][s % split]);
                    }
                } else {
                    const __m512i q = _mm512_xor_si512(v, sign); // the signed q
                    HYPERMOE_UNROLL
                    for (int s = 0; s < 4; ++s) { // byte s of each lane: k = 4j + s
                        const __m512 wf = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(q, 24 - 8 * s), 24));
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r)
                            sum[r][p][s % split] = _mm512_fmadd_ps(wf, _mm512_set1_ps(xb[r][4 * j + s]), sum[r][p][s % split]);
                    }
                }
            }
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) {
            const __m512 dw = panel_scales<Block>(t, b, p);
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                __m512 total = sum[r][p][0];
                HYPERMOE_UNROLL
                for (int i = 1; i < split; ++i) total = _mm512_add_ps(total, sum[r][p][i]);
                acc[r][p] = _mm512_fmadd_ps(total, dw, acc[r][p]);
            }
            if constexpr (has_min<Block>) { // q4_k: less each block's min times its inputs' sum
                const __m512 mins = panel_mins(t, b, p);
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) acc[r][p] = _mm512_fnmadd_ps(mins, _mm512_set1_ps(x.x_sum[r][b]), acc[r][p]);
            }
        }
    }
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) _mm512_mask_storeu_ps(t.out + r * t.ldc + 16 * p, t.mask[p], acc[r][p]);
}

/// 4 activation bytes at x in every int32 lane of a 256-bit register.
__attribute__((target("avx2"))) inline __m256i broadcast_quad_avx2(const std::int8_t* x) {
    std::int32_t v;
    std::memcpy(&v, x, sizeof v);
    return _mm256_set1_epi32(v);
}

/// Byte m (0..3) of every int32 lane of v as an int32: zero-extended (one VPSHUFB), or with
/// Signed sign-extended (VPSHUFB to the lane's top byte, then an arithmetic shift).
template <bool Signed>
__attribute__((target("avx2"))) inline __m256i lane_byte_avx2(__m256i v, int m) {
    // VPSHUFB's control per int32 lane l: byte 4l + m into the lane's low (top if Signed) byte,
    // 0x80 (a zero byte) elsewhere.
    const auto lane = [m](int l) {
        const unsigned byte = unsigned(4 * l + m);
        return static_cast<int>(Signed ? byte << 24 | 0x808080u : byte | 0x80808000u);
    };
    const __m256i picked = _mm256_shuffle_epi8(v, _mm256_setr_epi32(lane(0), lane(1), lane(2), lane(3), lane(0), lane(1), lane(2), lane(3)));
    return Signed ? _mm256_srai_epi32(picked, 24) : picked;
}

/// Output group g's (8 outputs: panel g / 2, half g % 2) 32 bytes of 64-byte load j of a tile's
/// block b (Quads loads a block), asking for the line `t.ahead` bytes on from the first half.
template <index_t Quads>
inline const __m256i* avx2_group_bytes(const TileArgs& t, index_t b, int g, index_t j) noexcept {
    const std::uint8_t* w = t.wq + ((b * 2 + g / 2) * Quads + j) * 64 + 32 * (g % 2);
    if (t.ahead != 0 && g % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + t.ahead), _MM_HINT_T0);
    return reinterpret_cast<const __m256i*>(w);
}

/// 8 halves at p as floats, times 8 bytes at u (q4_k's d x sc and dmin x m, exact).
__attribute__((target("avx2,f16c"))) inline __m256 avx2_halves_times_bytes(const std::uint8_t* p, const std::uint8_t* u) {
    const __m256 h = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_mul_ps(h, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u)))));
}

/// Output group g's 8 mins of a tile's block b as floats: q4_k's dmin x m.
__attribute__((target("avx2,f16c"))) inline __m256 avx2_group_mins(const TileArgs& t, index_t b, int g) {
    return avx2_halves_times_bytes(t.wd + Q4KScales::dmin(b) + 16 * g, t.wd + Q4KScales::m(b) + 8 * g);
}

/// Output group g's 8 scales of a tile's block b as floats: halves, mxfp4's scale bytes as
/// panel_scales turns them into 2^(e - 128), or q4_k's d x sc.
template <class Block>
__attribute__((target("avx2,f16c"))) inline __m256 avx2_group_scales(const TileArgs& t, index_t b, int g) {
    if constexpr (has_min<Block>) {
        return avx2_halves_times_bytes(t.wd + Q4KScales::d(b) + 16 * g, t.wd + Q4KScales::sc(b) + 8 * g);
    } else if constexpr (std::is_same_v<Block, BlockMXFP4>) {
        const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(t.wd + b * 32 + 8 * g)));
        const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
        const __m256i subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
        return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, subnormal, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
    } else {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.wd + 2 * (b * 32 + 8 * g))));
    }
}

/// A 16-byte table in both 128-bit lanes, for VPSHUFB.
__attribute__((target("avx2"))) inline __m256i nibble_table_avx2(const void* table) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(table)));
}

/// Both precisions on AVX2 (with FMA and F16C), for CPUs without AVX-512: the tile's 32 outputs
/// as 4 groups of 8 (half a panel: one 32-byte half of each 64-byte load). One row keeps all four
/// groups' sums in registers, so that the tile's lines are read once, front to back, as they
/// stream from memory at decode. More rows take two passes over the blocks, a panel (two
/// groups, whole 64-byte lines) each: each activation broadcast then serves two groups, and
/// `exact` has 2 x rows independent chains of FMAs (8 with 4 rows, FMA's latency times its
/// throughput). Against a pass per group, that made one GLU expert at 8 rows 1.14-1.28x faster
/// in `exact` and 1.04-1.15x in `fast` (Zen 3; benchmarks.md). mxfp4 `fast` with 3 or 4 rows
/// keeps a pass per group: its int32 sums live across the loads, and with two groups they spill.
/// - fast: VPMADDUBSW's u8 x s8 pairs, summed by VPMADDWD into int32, as ggml does on AVX2: the
///   nibble formats' codes (q4_0's nibbles 0..15, mxfp4's 0..24) go in unsigned and the offset
///   comes off through the activations' sum (q4_0: a block's 16 products per int16 lane stay below
///   16 x 15 x 127 < 2^15, so one VPMADDWD per block; mxfp4: one per 64-byte load, 4 x 24 x 127);
///   q8_0 takes |q| and moves q's sign onto the activations (VPSIGNB), one VPMADDWD per 4 k.
/// - exact: each weight's integer widened to f32 (VPSHUFB picks byte m of every lane; mxfp4's
///   nibbles first shuffled to their unsigned codes), one FMA per row into the block's sum, which
///   is scaled by the block's d at its end (q4_0 and mxfp4: the sum of code x input less 8 or 12
///   x the block's input sum, so that every code zero-extends): f32 arithmetic on the
///   dequantised weights up to the order of the additions, as the AVX-512 and portable kernels.
template <int Rows, class Block, bool Fast>
__attribute__((target("avx2,fma,f16c"))) void avx2_tile(const TileArgs& t, const TileRows& x) {
    static_assert(Rows >= 1 && Rows <= 4);
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    constexpr int groups = Rows == 1 ? 4 : Fast && mx && Rows > 2 ? 1 : 2; // per pass over the blocks
    const __m256i nibble = _mm256_set1_epi8(0x0F), sign = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    // mxfp4's nibbles to their unsigned codes, mxfp4_values + 12 (both precisions: `exact` takes
    // 12 x the block's input sum off, as q4_0's 8)
    const __m256i table = nibble_table_avx2(mxfp4_codes.data());
    HYPERMOE_UNROLL
    for (int g0 = 0; g0 < 4; g0 += groups) { // outputs 8g .. 8g + 7: panel g / 2, half g % 2
        __m256i lanes[groups];
        unsigned any = 0, all = 0xFFu;
        HYPERMOE_UNROLL
        for (int i = 0; i < groups; ++i) {
            const int g = g0 + i;
            const unsigned bits = (t.mask[g / 2] >> (8 * (g % 2))) & 0xFFu;
            any |= bits;
            all &= bits;
            lanes[i] = avx2_lane_mask(bits);
        }
        if (any == 0) continue;
        const bool full = all == 0xFFu; // plain moves (avx2_store_lanes)
        __m256 part[Rows][groups];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int i = 0; i < groups; ++i)
                part[r][i] = _mm256_setzero_ps();
        for (index_t b = 0; b < t.nb; ++b) {
            // The block's scales are loaded after its sums (avx2_group_scales below), not held in
            // registers across the loop over its loads. (Not through a lambda: clang does not give
            // a lambda its function's target, so one returning __m256 fails without -mavx.)
            if constexpr (Fast) {
                __m256i sum[Rows][groups];
                if constexpr (q4) {
                    __m256i pairs[Rows][groups];
                    HYPERMOE_UNROLL
                    for (int r = 0; r < Rows; ++r)
                        HYPERMOE_UNROLL
                        for (int i = 0; i < groups; ++i) {
                            pairs[r][i] = _mm256_setzero_si256();
                            if constexpr (mx) sum[r][i] = _mm256_set1_epi32(-code_offset<Block> * x.sum[r][b]);
                        }
#pragma GCC unroll 1 // unrolled, every j's activation broadcasts are hoisted and spilled
                    for (index_t j = 0; j < quads; ++j) {
                        HYPERMOE_UNROLL
                        for (int i = 0; i < groups; ++i) {
                            const __m256i v = _mm256_loadu_si256(avx2_group_bytes<quads>(t, b, g0 + i, j));
                            __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                            if constexpr (mx) lo = _mm256_shuffle_epi8(table, lo), hi = _mm256_shuffle_epi8(table, hi);
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) {
                                const std::int8_t* xr = x.q[r] + b * quant_block + 4 * j;
                                pairs[r][i] = _mm256_add_epi16(pairs[r][i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast_quad_avx2(xr)),
                                                                                             _mm256_maddubs_epi16(hi, broadcast_quad_avx2(xr + 16))));
                            }
                        }
                        if constexpr (mx) // a load's pairs reach 4 x 24 x 127 per int16 lane: into int32 before the next
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r)
                                HYPERMOE_UNROLL
                                for (int i = 0; i < groups; ++i)
                                    sum[r][i] = _mm256_add_epi32(sum[r][i], _mm256_madd_epi16(pairs[r][i], ones)), pairs[r][i] = _mm256_setzero_si256();
                    }
                    if constexpr (!mx) // the offset added here, not held in registers across the loads
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r)
                            HYPERMOE_UNROLL
                            for (int i = 0; i < groups; ++i)
                                sum[r][i] = _mm256_add_epi32(_mm256_madd_epi16(pairs[r][i], ones), _mm256_set1_epi32(-code_offset<Block> * x.sum[r][b]));
                } else {
                    HYPERMOE_UNROLL
                    for (int r = 0; r < Rows; ++r)
                        HYPERMOE_UNROLL
                        for (int i = 0; i < groups; ++i) sum[r][i] = _mm256_setzero_si256();
                    for (index_t j = 0; j < quads; ++j) {
                        // The rows' 4 activations, in registers across the groups while there is room.
                        __m256i xj[Rows];
                        if constexpr (groups > 1)
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) xj[r] = broadcast_quad_avx2(x.q[r] + b * quant_block + 4 * j);
                        HYPERMOE_UNROLL
                        for (int i = 0; i < groups; ++i) {
                            const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(avx2_group_bytes<quads>(t, b, g0 + i, j)), sign);
                            const __m256i magnitude = _mm256_abs_epi8(q);
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) {
                                if constexpr (groups == 1) xj[r] = broadcast_quad_avx2(x.q[r] + b * quant_block + 4 * j);
                                const __m256i xs = _mm256_sign_epi8(xj[r], q);
                                sum[r][i] = _mm256_add_epi32(sum[r][i], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xs), ones));
                            }
                        }
                    }
                }
                HYPERMOE_UNROLL
                for (int i = 0; i < groups; ++i) {
                    const __m256 scale = avx2_group_scales<Block>(t, b, g0 + i);
                    HYPERMOE_UNROLL
                    for (int r = 0; r < Rows; ++r)
                        part[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][i]), _mm256_mul_ps(scale, _mm256_set1_ps(x.d[r][b])), part[r][i]);
                    if constexpr (has_min<Block>) { // q4_k: less dmin m x (d_x sum(xq))
                        const __m256 mins = avx2_group_mins(t, b, g0 + i);
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r)
                            part[r][i] = _mm256_fnmadd_ps(mins, _mm256_set1_ps(x.dsum[r][b]), part[r][i]);
                    }
                }
            } else {
                const float* xb[Rows];
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) xb[r] = b < x.full ? x.x[r] + b * quant_block : x.pad[r];
                __m256 sum[Rows][groups];
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r)
                    HYPERMOE_UNROLL
                    for (int i = 0; i < groups; ++i) sum[r][i] = _mm256_setzero_ps();
                for (index_t j = 0; j < quads; ++j) {
                    // Every group's load j, then each k's activations broadcast once for all groups.
                    __m256i lo[groups], hi[groups]; // q4_0: the low and high nibbles; mxfp4: their values; q8_0: q in lo
                    HYPERMOE_UNROLL
                    for (int i = 0; i < groups; ++i) {
                        const __m256i v = _mm256_loadu_si256(avx2_group_bytes<quads>(t, b, g0 + i, j));
                        if constexpr (q4) lo[i] = _mm256_and_si256(v, nibble), hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                        else lo[i] = _mm256_xor_si256(v, sign); // the signed q
                        if constexpr (mx) lo[i] = _mm256_shuffle_epi8(table, lo[i]), hi[i] = _mm256_shuffle_epi8(table, hi[i]);
                    }
                    // Unrolled, so that each s's VPSHUFB control is a constant (GCC 12 left the
                    // mxfp4 loop rolled, building the control in every pass: 2.3x q4_0's time).
#pragma GCC unroll 8
                    for (int s = 0; s < (q4 ? 8 : 4); ++s) { // q4_0: nibble s of each lane, k = 4j + s / 2, + 16 if s is odd;
                        const index_t k = q4 ? 4 * j + s / 2 + (s % 2) * 16 : 4 * j + s; // q8_0: byte s, k = 4j + s
                        __m256 xk[Rows];
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r) xk[r] = _mm256_broadcast_ss(xb[r] + k);
                        HYPERMOE_UNROLL
                        for (int i = 0; i < groups; ++i) {
                            // q4_0's nibbles and mxfp4's codes zero-extended, q8_0's q sign-extended
                            const __m256 wf = _mm256_cvtepi32_ps(q4 ? lane_byte_avx2<false>(s % 2 ? hi[i] : lo[i], s / 2) : lane_byte_avx2<true>(lo[i], s));
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) sum[r][i] = _mm256_fmadd_ps(wf, xk[r], sum[r][i]);
                        }
                    }
                }
                HYPERMOE_UNROLL
                for (int i = 0; i < groups; ++i) {
                    const __m256 scale = avx2_group_scales<Block>(t, b, g0 + i);
                    HYPERMOE_UNROLL
                    for (int r = 0; r < Rows; ++r) {
                        __m256 s = sum[r][i];
                        if constexpr (code_offset<Block> != 0 && q4) // q4_0's -8 and mxfp4's -12 on every code
                            s = _mm256_sub_ps(s, _mm256_set1_ps(float(code_offset<Block>) * x.x_sum[r][b]));
                        part[r][i] = _mm256_fmadd_ps(s, scale, part[r][i]);
                    }
                    if constexpr (has_min<Block>) { // q4_k: less each block's min times its inputs' sum
                        const __m256 mins = avx2_group_mins(t, b, g0 + i);
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r) part[r][i] = _mm256_fnmadd_ps(mins, _mm256_set1_ps(x.x_sum[r][b]), part[r][i]);
                    }
                }
            }
        }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int i = 0; i < groups; ++i) avx2_store_lanes(t.out + r * t.ldc + 8 * (g0 + i), lanes[i], full, part[r][i]);
    }
}

/// avx2_tile for 1..6 rows: more than 4 in two calls.
template <int Rows, class Block, bool Fast>
void avx2_tile_rows(const TileArgs& t, const TileRows& x) {
    if constexpr (Rows <= 4) {
        avx2_tile<Rows, Block, Fast>(t, x);
    } else {
        avx2_tile<4, Block, Fast>(t, x);
        TileArgs rest = t;
        rest.out = t.out + 4 * t.ldc;
        TileRows tail;
        tail.full = x.full;
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows - 4; ++r)
            tail.q[r] = x.q[r + 4], tail.d[r] = x.d[r + 4], tail.sum[r] = x.sum[r + 4], tail.dsum[r] = x.dsum[r + 4], tail.x[r] = x.x[r + 4],
            tail.pad[r] = x.pad[r + 4], tail.x_sum[r] = x.x_sum[r + 4];
        avx2_tile<Rows - 4, Block, Fast>(rest, tail);
    }
}

/// Block b of a tile's panel p as the first `valid` rows of f32 panel at out (16 floats a row;
/// Whole: all 32 of the block). See avx2_widen_panels.
template <class Block, bool Whole>
__attribute__((target("avx2,fma,f16c"))) inline void avx2_widen_block(const TileArgs& t, index_t b, int p, index_t valid, float* out) {
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    const __m256i nibble = _mm256_set1_epi8(0x0F), table = nibble_table_avx2(mxfp4_codes.data());
    // value = (code - code_offset) x scale, exact as dequantize's q x d: an integer of at most 8
    // bits times a half (or a power of two). q4_k: code x (d sc) - dmin m, rounded once (FMA),
    // as ggml's d x q - m. (Not code x scale - code_offset x scale: mxfp4's 12 x 2^127 is inf.)
    const __m256i codes_offset = _mm256_set1_epi32(code_offset<Block>);
    __m256 scale[2], mins[2];
    HYPERMOE_UNROLL
    for (int h = 0; h < 2; ++h) {
        scale[h] = avx2_group_scales<Block>(t, b, 2 * p + h);
        if constexpr (has_min<Block>) mins[h] = avx2_group_mins(t, b, 2 * p + h);
    }
    for (index_t j = 0; j < quads; ++j) {
        __m256i lo[2], hi[2]; // q8_0: the codes in lo
        HYPERMOE_UNROLL
        for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(avx2_group_bytes<quads>(t, b, 2 * p + h, j));
            lo[h] = v, hi[h] = v;
            if constexpr (q4) lo[h] = _mm256_and_si256(v, nibble), hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            if constexpr (mx) lo[h] = _mm256_shuffle_epi8(table, lo[h]), hi[h] = _mm256_shuffle_epi8(table, hi[h]);
        }
#pragma GCC unroll 8
        for (int s = 0; s < (q4 ? 8 : 4); ++s) { // as avx2_tile: nibble s, k = 4j + s / 2 (+ 16 if s is odd); q8_0's byte s
            const index_t k = q4 ? 4 * j + s / 2 + (s % 2) * 16 : 4 * j + s;
            if (!Whole && k >= valid) continue;
            HYPERMOE_UNROLL
            for (int h = 0; h < 2; ++h) { // the two halves of the row's line
                const __m256i code = lane_byte_avx2<false>(q4 && s % 2 ? hi[h] : lo[h], q4 ? s / 2 : s);
                __m256 value;
                if constexpr (has_min<Block>) value = _mm256_fmsub_ps(_mm256_cvtepi32_ps(code), scale[h], mins[h]);
                else value = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code, codes_offset)), scale[h]);
                _mm256_storeu_ps(out + k * BlockWeights::panel + 8 * h, value);
            }
        }
    }
}

/// Inputs [k0, k0 + len) of a tile's two panels as f32 panels for PanelKernels (`exact` with
/// many rows on AVX2, BlockLinear::widens): out[(p x len + k - k0) x 16 + o] = weight (16p + o,
/// k), each the dequantised value as core/quant.hpp's dequantize makes it (avx2_widen_block).
/// k0 is a multiple of 32; inputs past k0 + len (the padding of the last block) are not
/// written. Per 8 outputs and 4 bytes of a load, VPSHUFB (lane_byte_avx2) takes byte m of every
/// lane: 8 weights a subtraction, a conversion and a product; each panel row (a cache line)
/// is written whole.
template <class Block>
void avx2_widen_panels(const TileArgs& t, index_t k0, index_t len, float* out) {
    HYPERMOE_UNROLL
    for (int p = 0; p < 2; ++p)
        for (index_t b = k0 / quant_block; b * quant_block < k0 + len; ++b) {
            const index_t first = b * quant_block - k0, valid = std::min<index_t>(quant_block, len - first); // rows of out the block writes
            float* o = out + (p * len + first) * BlockWeights::panel;
            if (valid == quant_block) avx2_widen_block<Block, true>(t, b, p, valid, o);
            else avx2_widen_block<Block, false>(t, b, p, valid, o);
        }
}
#endif

#if HYPERMOE_NEON_KERNELS
/// `fast` on AArch64: per int32 lane, the dot of 4 signed weight bytes with 4 signed activation
/// bytes broadcast to every lane, 16 products a row: one SDOT (FEAT_DotProd), or on CPUs without
/// it (Cortex-A53/A72, ...) two widening multiplies (SMULL), a pairwise add of their int16
/// products and one into int32 (SADALP): exact while a pair sums within int16, which holds for
/// |w| <= 128 and |x| <= 127. The weights enter signed: q8_0's codes flipped back to q (no
/// offset), mxfp4's nibbles looked up as mxfp4_values (TBL; no offset), q4_0's nibbles as q + 8
/// (its sums start at -8 * sum(xq)), q4_k's as q (its mins apart). A panel's 64 bytes a quad are
/// 4 registers of 4 outputs each; the block's int32 sums and the f32 sums stay in registers: 2
/// rows of 1 panel or 1 row of both panels a call (16 of the 32 registers). The integer sums are
/// exact, so the block dots are the other kernels' own.

/// acc + per int32 lane the dot of w's 4 bytes with x's (see above).
template <bool Dot>
HYPERMOE_TARGET_DOTPROD inline int32x4_t neon_dot4(int32x4_t acc, int8x16_t w, int8x16_t x) {
    if constexpr (Dot) {
#if HYPERMOE_NEON_SDOT
        return vdotq_s32(acc, w, x);
#else
        static_assert(!Dot, "SDOT is not compiled into this build (HYPERMOE_NEON_SDOT)");
#endif
    } else {
        return vpadalq_s16(acc, vpaddq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)), vmull_high_s8(w, x)));
    }
}

/// 4 bytes at p widened to the 4 lanes.
inline uint32x4_t neon_bytes_to_u32(const std::uint8_t* p) {
    std::uint32_t v;
    std::memcpy(&v, p, sizeof v);
    return vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(v)))));
}
/// 4 activation bytes at p in every int32 lane.
inline int8x16_t neon_broadcast_quad(const std::int8_t* p) {
    std::int32_t v;
    std::memcpy(&v, p, sizeof v);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
}
/// 4 halves at p as floats.
inline float32x4_t neon_halves_to_f32(const std::uint8_t* p) {
    std::uint16_t h[4];
    std::memcpy(h, p, sizeof h);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

/// Stores v's lanes that bits [0, 4) of `lanes` select at p.
inline void neon_store_lanes(float* p, unsigned lanes, float32x4_t v) {
    if (lanes == 0xFu) return vst1q_f32(p, v);
    float f[4];
    vst1q_f32(f, v);
    HYPERMOE_UNROLL
    for (unsigned l = 0; l < 4; ++l)
        if ((lanes >> l) & 1u) p[l] = f[l];
}

/// Block b's scales of outputs o .. o + 3 (0-31) of a tile, as tile_scale gives them: halves,
/// mxfp4's 2^(e - 128) (as panel_scales builds it on AVX-512) or q4_k's d x sc; and q4_k's
/// mins, dmin x m.
template <class Block>
inline float32x4_t neon_scales(const TileArgs& t, index_t b, index_t o) {
    if constexpr (has_min<Block>) {
        return vmulq_f32(neon_halves_to_f32(t.wd + Q4KScales::d(b) + 2 * o), vcvtq_f32_u32(neon_bytes_to_u32(t.wd + Q4KScales::sc(b) + o)));
    } else if constexpr (std::is_same_v<Block, BlockMXFP4>) {
        const uint32x4_t e = neon_bytes_to_u32(t.wd + b * 32 + o);
        const uint32x4_t normal = vshlq_n_u32(vsubq_u32(e, vdupq_n_u32(1)), 23);
        const uint32x4_t subnormal = vshlq_u32(vdupq_n_u32(0x00200000), vreinterpretq_s32_u32(e));
        return vreinterpretq_f32_u32(vbslq_u32(vcltq_u32(e, vdupq_n_u32(2)), subnormal, normal));
    } else {
        return neon_halves_to_f32(t.wd + 2 * (b * 32 + o));
    }
}
inline float32x4_t neon_mins(const TileArgs& t, index_t b, index_t o) {
    return vmulq_f32(neon_halves_to_f32(t.wd + Q4KScales::dmin(b) + 2 * o), vcvtq_f32_u32(neon_bytes_to_u32(t.wd + Q4KScales::m(b) + o)));
}

/// Rows r0 .. r0 + Rows - 1 of panels p0 .. p0 + Panels - 1 of a tile (see above).
template <int Rows, int Panels, class Block, bool Dot>
HYPERMOE_TARGET_DOTPROD void neon_tile_rows(const TileArgs& t, const TileRows& x, int r0, int p0) {
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    constexpr std::int32_t offset = std::is_same_v<Block, BlockQ4_0> ? code_offset<Block> : 0;
    const uint8x16_t nibble = vdupq_n_u8(0x0F), sign = vdupq_n_u8(0x80);
    const int8x16_t values = vld1q_s8(mxfp4_values.data());
    float32x4_t acc[Rows][Panels][4];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
                HYPERMOE_UNROLL
                for (int p = 0; p < Panels; ++p)
                        HYPERMOE_UNROLL
                        for (int v = 0; v < 4; ++v) acc[r][p][v] = vdupq_n_f32(0.0f);
    for (index_t b = 0; b < t.nb; ++b) {
        const std::int8_t* xb[Rows];
        int32x4_t sum[Rows][Panels][4];
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r) {
            xb[r] = x.q[r0 + r] + b * quant_block;
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p)
                HYPERMOE_UNROLL
                for (int v = 0; v < 4; ++v) sum[r][p][v] = vdupq_n_s32(-offset * x.sum[r0 + r][b]);
        }
        // Unrolled, GCC 12 loads every quad's activations first and spills the sums.
#pragma GCC unroll 1
        for (index_t j = 0; j < quads; ++j) {
            int8x16_t xj[Rows][2]; // activations k = 4j..4j+3 in every lane (q4: and k + 16)
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                xj[r][0] = neon_broadcast_quad(xb[r] + 4 * j);
                if constexpr (q4) xj[r][1] = neon_broadcast_quad(xb[r] + 16 + 4 * j);
            }
            HYPERMOE_UNROLL
            for (int p = 0; p < Panels; ++p) {
                const std::uint8_t* w = t.wq + ((b * 2 + p0 + p) * quads + j) * 64;
                if (t.ahead != 0) __builtin_prefetch(w + t.ahead);
                HYPERMOE_UNROLL
                for (int v = 0; v < 4; ++v) {
                    const uint8x16_t bytes = vld1q_u8(w + 16 * v);
                    if constexpr (q4) { // quad j's low nibbles are k = 4j..4j+3, its high ones k + 16
                        int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(bytes, nibble)), hi = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4));
                        if constexpr (mx) lo = vqtbl1q_s8(values, vreinterpretq_u8_s8(lo)), hi = vqtbl1q_s8(values, vreinterpretq_u8_s8(hi));
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r) sum[r][p][v] = neon_dot4<Dot>(neon_dot4<Dot>(sum[r][p][v], lo, xj[r][0]), hi, xj[r][1]);
                    } else { // q8_0's quad j: k = 4j..4j+3
                        const int8x16_t q = vreinterpretq_s8_u8(veorq_u8(bytes, sign));
                        HYPERMOE_UNROLL
                        for (int r = 0; r < Rows; ++r) sum[r][p][v] = neon_dot4<Dot>(sum[r][p][v], q, xj[r][0]);
                    }
                }
            }
        }
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p)
            HYPERMOE_UNROLL
            for (int v = 0; v < 4; ++v) {
                const index_t o = 16 * (p0 + p) + 4 * v;
                const float32x4_t dw = neon_scales<Block>(t, b, o);
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) {
                    acc[r][p][v] = vfmaq_f32(acc[r][p][v], vcvtq_f32_s32(sum[r][p][v]), vmulq_n_f32(dw, x.d[r0 + r][b]));
                    if constexpr (has_min<Block>) // q4_k: less the block's min times its activations' sum
                        acc[r][p][v] = vfmsq_f32(acc[r][p][v], neon_mins(t, b, o), vdupq_n_f32(x.dsum[r0 + r][b]));
                }
            }
    }
    HYPERMOE_UNROLL
    for (int r = 0; r < Rows; ++r)
        HYPERMOE_UNROLL
        for (int p = 0; p < Panels; ++p)
            HYPERMOE_UNROLL
            for (int v = 0; v < 4; ++v)
                neon_store_lanes(t.out + (r0 + r) * t.ldc + 16 * (p0 + p) + 4 * v, (t.mask[p0 + p] >> (4 * v)) & 0xFu, acc[r][p][v]);
}

/// A tile's `rows` rows on SDOT (Dot) or NEON's widening multiplies: 2 rows a panel at a time,
/// a last single row over both panels.
template <class Block, bool Dot>
void neon_tile(const TileArgs& t, const TileRows& x, int rows) {
    int r = 0;
    for (; r + 2 <= rows; r += 2)
        HYPERMOE_UNROLL
        for (int p = 0; p < 2; ++p) neon_tile_rows<2, 1, Block, Dot>(t, x, r, p);
    if (r < rows) neon_tile_rows<1, 2, Block, Dot>(t, x, r, 0);
}
#endif

/// The tile kernels in plain C++, for x86 CPUs without AVX2 and for every other CPU (ARM): the
/// same sums in the same order per output, 16 outputs side by side. With GCC and Clang in
/// vectors of the build's width (portable_vector_bytes), each load's codes unpacked once for
/// portable_block_rows rows; plain loops, a row at a time, for other compilers. The plain loops
/// were all compilers had until 2026-12-07: a q4_0 GLU expert (d = 1024, ff = 128, 64 rows, one
/// thread, AVX2 build) took 13.2 ms in them and 1.8 ms in vectors (AVX2's kernel: 0.61 ms).
#if defined(__GNUC__) || defined(__clang__)
/// Rows per call of portable_tile_rows: each row keeps two sums of 16 outputs (the panel's and the
/// block's), so 2 rows with AVX and on AArch64, 4 with AVX-512, 1 with SSE's 16 registers.
inline constexpr int portable_block_rows = std::clamp(portable_accumulators / 2, 1, 4);

/// Rows r0 .. r0 + Rows - 1 of portable_tile: each load's codes unpacked once for all of them.
template <int Rows, class Block, bool Fast>
void portable_tile_rows(const TileArgs& t, const TileRows& x, int r0) {
    using vuint = std::uint32_t __attribute__((vector_size(portable_vector_bytes)));
    using vint = std::int32_t __attribute__((vector_size(portable_vector_bytes)));
    using vfloat = float __attribute__((vector_size(portable_vector_bytes)));
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8;
    constexpr int lanes = portable_vector_bytes / 4, per_panel = BlockWeights::panel / lanes; // vectors a panel
    HYPERMOE_UNROLL
    for (int p = 0; p < 2; ++p) {
        vfloat acc[Rows][per_panel] = {};
        for (index_t b = 0; b < t.nb; ++b) {
            // The fast path reads the quantised rows only (x.x is null there).
            const float* xb[Rows];
            HYPERMOE_UNROLL
            for (int r = 0; r < Rows; ++r) xb[r] = Fast ? nullptr : b < x.full ? x.x[r0 + r] + b * quant_block : x.pad[r0 + r];
            vint isum[Rows][per_panel] = {};
            vfloat fsum[Rows][per_panel] = {};
            for (index_t j = 0; j < quads; ++j) {
                vuint w[per_panel]; // output l's 4 bytes of load j in lane l
                HYPERMOE_UNROLL
                for (int v = 0; v < per_panel; ++v)
                    std::memcpy(&w[v], t.wq + ((b * 2 + p) * quads + j) * 64 + v * 4 * lanes, sizeof w[v]);
                HYPERMOE_UNROLL
                for (int s = 0; s < (q4 ? 8 : 4); ++s) {
                    const index_t k = q4 ? 4 * j + s / 2 + (s % 2) * 16 : 4 * j + s;
                    HYPERMOE_UNROLL
                    for (int v = 0; v < per_panel; ++v) {
                        const vuint byte = (w[v] >> (8 * (q4 ? s / 2 : s))) & 0xFFu;
                        vint q;
                        if constexpr (mx) {
                            // mxfp4_values[nib] from the FP4 bits (a lookup per lane would not vectorise):
                            // sign bit 3, exponent e (bits 2-1) and mantissa m (bit 0) give the
                            // magnitude m if e = 0, else (2 + m) 2^(e - 1).
                            const vint nib = __builtin_convertvector((byte >> (4 * (s % 2))) & 0x0Fu, vint);
                            const vint e = (nib >> 1) & 3, m = nib & 1, subnormal = e == 0, sign = -(nib >> 3);
                            const vint magnitude = (m & subnormal) | (((2 + m) << (e - 1 - subnormal)) & ~subnormal);
                            q = (magnitude ^ sign) - sign;
                        } else if constexpr (q4) {
                            q = __builtin_convertvector((byte >> (4 * (s % 2))) & 0x0Fu, vint) - code_offset<Block>;
                        } else {
                            q = __builtin_convertvector((byte ^ 0x80u) << 24, vint) >> 24; // the signed byte
                        }
                        if constexpr (Fast) {
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) isum[r][v] += q * x.q[r0 + r][b * quant_block + k];
                        } else {
                            const vfloat qf = __builtin_convertvector(q, vfloat);
                            HYPERMOE_UNROLL
                            for (int r = 0; r < Rows; ++r) fsum[r][v] += qf * xb[r][k];
                        }
                    }
                }
            }
            HYPERMOE_UNROLL
            for (int v = 0; v < per_panel; ++v) {
                vfloat dw, mins;
                for (int l = 0; l < lanes; ++l) {
                    dw[l] = tile_scale<Block>(t.wd, b, p * 16 + v * lanes + l);
                    if constexpr (has_min<Block>) mins[l] = tile_min<Block>(t.wd, b, p * 16 + v * lanes + l);
                }
                HYPERMOE_UNROLL
                for (int r = 0; r < Rows; ++r) {
                    if constexpr (Fast) acc[r][v] += __builtin_convertvector(isum[r][v], vfloat) * (dw * x.d[r0 + r][b]);
                    else acc[r][v] += fsum[r][v] * dw;
                    if constexpr (has_min<Block>) // q4_k: less the block's min times its inputs' sum
                        acc[r][v] -= mins * (Fast ? x.dsum[r0 + r][b] : x.x_sum[r0 + r][b]);
                }
            }
        }
        HYPERMOE_UNROLL
        for (int r = 0; r < Rows; ++r)
            HYPERMOE_UNROLL
            for (int v = 0; v < per_panel; ++v)
                for (int l = 0; l < lanes; ++l)
                    if ((t.mask[p] >> (v * lanes + l)) & 1u) t.out[(r0 + r) * t.ldc + 16 * p + v * lanes + l] = acc[r][v][l];
    }
}

template <class Block, bool Fast>
void portable_tile(const TileArgs& t, const TileRows& x, int rows) {
    for (int r = 0; r < rows; r += portable_block_rows) {
        switch (std::min(portable_block_rows, rows - r)) {
        case 1: portable_tile_rows<1, Block, Fast>(t, x, r); break;
        case 2: portable_tile_rows<2, Block, Fast>(t, x, r); break;
        case 3: portable_tile_rows<3, Block, Fast>(t, x, r); break;
        default: portable_tile_rows<4, Block, Fast>(t, x, r); break;
        }
    }
}
#else
template <class Block, bool Fast>
void portable_tile(const TileArgs& t, const TileRows& x, int rows) {
    constexpr bool q4 = nibble_format<Block>, mx = std::is_same_v<Block, BlockMXFP4>;
    constexpr index_t quads = q4 ? 4 : 8, lanes = BlockWeights::panel;
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < 2; ++p) {
            float acc[lanes] = {};
            for (index_t b = 0; b < t.nb; ++b) {
                // The fast path reads the quantised rows only (x.x is null there).
                const float* xb = Fast ? nullptr : b < x.full ? x.x[r] + b * quant_block : x.pad[r];
                std::int32_t isum[lanes] = {};
                float fsum[lanes] = {};
                for (index_t j = 0; j < quads; ++j) {
                    const std::uint8_t* w = t.wq + ((b * 2 + p) * quads + j) * 64;
                    for (int s = 0; s < (q4 ? 8 : 4); ++s) {
                        const index_t k = q4 ? 4 * j + s / 2 + (s % 2) * 16 : 4 * j + s;
                        for (index_t l = 0; l < lanes; ++l) {
                            const std::uint8_t byte = w[4 * l + (q4 ? s / 2 : s)];
                            const unsigned nib = (byte >> (4 * (s % 2))) & 0x0Fu;
                            const int q = mx ? int(mxfp4_values[nib]) : q4 ? int(nib) - code_offset<Block> : int(std::int8_t(byte ^ 0x80u));
                            if constexpr (Fast) isum[l] += q * x.q[r][b * quant_block + k];
                            else fsum[l] += float(q) * xb[k];
                        }
                    }
                }
                for (index_t l = 0; l < lanes; ++l) {
                    const float dw = tile_scale<Block>(t.wd, b, p * 16 + l);
                    if constexpr (Fast) acc[l] += float(isum[l]) * (dw * x.d[r][b]);
                    else acc[l] += fsum[l] * dw;
                    if constexpr (has_min<Block>) // q4_k: less the block's min times its inputs' sum
                        acc[l] -= tile_min<Block>(t.wd, b, p * 16 + l) * (Fast ? x.dsum[r][b] : x.x_sum[r][b]);
                }
            }
            for (index_t l = 0; l < lanes; ++l)
                if ((t.mask[p] >> l) & 1u) t.out[r * t.ldc + 16 * p + l] = acc[l];
        }
}
#endif

/// c = [c +] scale * Act(a W^T + b) with W in a block format; see the file comment.
template <class Act>
class BlockLinear {
public:
    BlockLinear(const WeightView& w, std::span<const float> bias, dtype format, precision prec, const std::string& name,
                bool accumulate)
        : w_(w, format, name), bias_(bias.begin(), bias.end()), n_(w.rows()), k_(w.cols()), accumulate_(accumulate),
          kernel_(block_kernel(prec)), fast_(prec == precision::fast) {}

    [[nodiscard]] const BlockWeights& weights() const noexcept { return w_; }
    /// The instructions this map's calls run on.
    [[nodiscard]] kernel_isa kernel() const noexcept { return kernel_; }

    /// `fast` quantises the activations into the workspace, and `exact` q4_k (q4_0 and mxfp4 on AVX2)
    /// takes their block sums there (prepared_bytes); accumulating into c needs the product
    /// apart (c += the epilogue of it). Never less than for fewer rows.
    [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
        if (rows <= 0) return 0;
        return prepared_bytes(rows) + product_bytes(rows, n_) + widened_bytes(rows, current_threads());
    }

    /// Bytes prepare() takes for `rows` rows.
    [[nodiscard]] std::size_t prepared_bytes(index_t rows) const noexcept {
        if (rows <= 0) return 0;
        return (fast_ ? QuantizedRows::bytes(rows, w_.blocks_per_row()) : 0) +
               (takes_block_sums(rows) ? padded_bytes<float>(rows, w_.blocks_per_row()) : 0);
    }

    /// What every tile of a product with input `a` reads (PreparedInput), in `ws` (the caller's
    /// scope, prepared_bytes(a.rows())); in parallel over rows.
    [[nodiscard]] PreparedInput prepare(ConstMatrixView<float> a, Workspace& ws) const {
        PreparedInput p{a, {}, {}, {}};
        const index_t rows = a.rows(), per_row = w_.blocks_per_row();
        if (rows == 0 || per_row == 0) return p;
        if (fast_) p.quantized.emplace(a, per_row, ws);
        if (takes_block_sums(rows)) {
            const std::span<float> sums = ws.take<float>(rows * per_row);
            parallel_for(rows, rows * k_, [&](index_t r) {
                const auto row = a.row(r);
                for (index_t b = 0; b < per_row; ++b) {
                    float sum = 0;
                    for (index_t k = b * quant_block; k < std::min(k_, (b + 1) * quant_block); ++k) sum += row[std::size_t(k)];
                    sums[std::size_t(r * per_row + b)] = sum;
                }
            });
            p.block_sums = sums;
        }
        return p;
    }

    /// Scratch of columns() for `rows` rows and `columns` columns: the product apart when
    /// accumulating, and the calling thread's widened slice (widens).
    [[nodiscard]] std::size_t columns_workspace_bytes(index_t rows, index_t columns) const noexcept {
        return product_bytes(rows, columns) + widened_bytes(rows, 1);
    }

    void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale) const {
        Workspace::Scope scope(ws, workspace_bytes(a.rows()));
        const index_t rows = a.rows();
        if (rows == 0) return;
        if (w_.blocks_per_row() == 0) return epilogue_bias_only<Act>(c, bias(0), scale, accumulate_); // K = 0: A W^T is zero
        const PreparedInput p = prepare(a, ws);
        const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(rows, n_) : c;
        const index_t items = (n_ + tile - 1) / tile;
        if (widens(rows)) { // per thread, a slice of f32 panels
            const int threads = rows * k_ * n_ >= parallel_grain ? current_threads() : 1;
            float* slices = ws.take<float>(threads * widened_floats).data();
            parallel_tasks(items, threads, [&](index_t item, int slot) {
                run_widened_item(p, t, c, item * tile, 0, scale, slices + slot * widened_floats);
            });
            return;
        }
        parallel_for(items, rows * k_ * n_, [&](index_t item) { run_item(p, t, c, item * tile, 0, scale); });
    }

    /// Columns [n0, n0 + c.cols()) of operator()'s c from the prepared input, on the calling
    /// thread: the tiles of 32 outputs operator() runs there, so the same bits. n0 a multiple
    /// of 32, c.cols() one too unless the columns reach N (the caller checked; scratch
    /// columns_workspace_bytes).
    void columns(const PreparedInput& p, MatrixView<float> c, index_t n0, Workspace& ws, float scale) const {
        Workspace::Scope scope(ws, columns_workspace_bytes(p.a.rows(), c.cols()));
        if (p.a.rows() == 0 || c.cols() == 0) return;
        if (w_.blocks_per_row() == 0) return epilogue_bias_only<Act>(c, bias(n0), scale, accumulate_);
        const MatrixView<float> t = accumulate_ ? ws.take_matrix<float>(p.a.rows(), c.cols()) : c;
        float* slice = widens(p.a.rows()) ? ws.take<float>(widened_floats).data() : nullptr;
        for (index_t j0 = n0; j0 < n0 + c.cols(); j0 += tile) {
            if (slice != nullptr) run_widened_item(p, t, c, j0, n0, scale, slice);
            else run_item(p, t, c, j0, n0, scale);
        }
    }

private:
    static constexpr index_t tile = BlockWeights::tile; ///< outputs per work item
    static constexpr index_t fast_row_block = 6;  ///< rows per `fast` kernel call: their sums stay in registers
    static constexpr index_t exact_row_block = 4; ///< rows per `exact` kernel call
    /// Rows per AMX-INT8 call (a tile register's), and the fewest a call must have to take the AMX
    /// kernel: decode and a few rows stay on VNNI, where the weights' bytes bound the time and
    /// a block's sums through memory would only add work. Not measured on an AMX CPU yet.
    static constexpr index_t amx_rows = amx_min_rows;
    /// Each weight load of an item's first row block asks for the line this many bytes on, so
    /// that the prefetchers are not left behind at the start of each tile; the later row blocks
    /// read the tile again from L1 or L2 (a tile of 32 outputs: K x 18 / 32 bytes of q4_0, K x
    /// 34 / 32 of q8_0). Until 2026-12-04 more than one row block cut K into chunks of 8 blocks
    /// (in L1) that every row block ran over in turn, without prefetching: one GLU expert (d =
    /// 1024, ff = 2816, q4_0 `fast`, 2 threads, 2-core Zen 5) took 9.8-10.0 ms at 512 rows and
    /// 1.16 ms at 64 where whole tiles take 8.2 and 1.00-1.03 (q8_0: 10.6 -> 9.4-9.7, 1.25 ->
    /// 1.12-1.19; `exact` within noise in one run, 2-14% faster in another); with the chunks,
    /// 8192 bytes ahead took the Mixtral-like layer at T = 32
    /// from 1.60-1.75 to 1.43-1.47 ms (2048: 1.53-1.59). Decode is within noise from 2048 to 8192.
    static constexpr std::ptrdiff_t prefetch_ahead = 8192;

    /// `exact` with at least widen_rows() rows widens each tile, widen_slice inputs at a time,
    /// into f32 panels (avx2_widen_panels) that the f32 panel kernel multiplies by every row
    /// (PanelKernels::run_group, 6 rows' sums in registers on AVX2, 8 on AVX-512): the weights
    /// are widened once for all rows, where avx2_tile and exact_tile (AVX-512) widen them again
    /// for every 4 rows. Widening costs about 0.1 ns a weight, so it pays from some rows on, per
    /// kernel:
    /// - AVX2: 12 rows. One GLU expert (d = 1024, ff = 2816, 1 thread, Zen 3) took, in ms,
    ///   avx2_tile -> widened: at 12 rows q4_0 3.14 -> 3.02, q4_k 3.58 -> 2.88; at 32 rows q4_0
    ///   8.48 -> 7.38, q8_0 9.59 -> 8.04; at 512 rows q4_0 139 -> 102 (benchmarks.md); at 8 rows
    ///   an earlier version of the widening took 2.26-2.35 against 2.09-2.11.
    /// - AVX-512, where exact_tile's cost a row depends on the format: q4_k 16, q4_0 and mxfp4
    ///   24, q8_0 112. The same expert, 2 threads, Zen 5, in us, exact_tile -> widened: q4_k 12
    ///   rows 814-857 -> 963-1002, 16 rows 1114-1137 -> 1078-1123; q4_0 20 rows 1327-1334 ->
    ///   1336-1351, 24 rows 1590-1595 -> 1467-1496; mxfp4 20 rows 1271-1277 -> 1352-1419, 24 rows
    ///   1583-1596 -> 1490-1518; q8_0 80 rows 3885-3945 -> 4112-4243, 112 rows 5771-5810 ->
    ///   5579-5724; at 512 rows q4_0 35.3 -> 23.3 ms and q8_0 26.4 -> 23.0 (f32: 22.6).
    /// Slices of 1024 inputs (128 KiB, in L2 while the rows read them, as PanelKernels' f32
    /// slices) were as fast as 2048 or whole rows, 5-6% faster than 256 and 11-17% faster than
    /// 128 (at 32 and 256 rows, Zen 3).
    [[nodiscard]] index_t widen_rows() const noexcept {
        if (kernel_ == kernel_isa::avx2) return 12;
        if (kernel_ == kernel_isa::avx512) {
            const dtype f = w_.format();
            return f == dtype::q8_0 ? 112 : f == dtype::q4_k ? 16 : 24;
        }
        return std::numeric_limits<index_t>::max(); // the portable and NEON kernels: not widened
    }
    static constexpr index_t widen_slice = 1024;
    static constexpr index_t widened_floats = tile * widen_slice; ///< a thread's slice

    /// Whether a product of `rows` rows runs on widened tiles.
    [[nodiscard]] bool widens(index_t rows) const noexcept { return !fast_ && rows >= widen_rows(); }

    /// Bytes of the product apart (when accumulating) for `rows` rows and `columns` columns.
    [[nodiscard]] std::size_t product_bytes(index_t rows, index_t columns) const noexcept {
        return accumulate_ && rows > 0 ? padded_bytes<float>(rows, columns) : 0;
    }
    /// Bytes of `threads` threads' widened slices for `rows` rows (none unless widens(rows)).
    [[nodiscard]] std::size_t widened_bytes(index_t rows, int threads) const noexcept {
        return widens(rows) ? padded_bytes<float>(index_t(std::max(threads, 1)) * widened_floats) : 0;
    }

    /// Whether the `exact` kernel takes each block's input sum (TileRows::x_sum) for `rows` rows:
    /// for q4_k's mins on every kernel, and for q4_0's -8 and mxfp4's -12 on AVX2 (not on
    /// widened tiles, which hold the weights' values).
    [[nodiscard]] bool takes_block_sums(index_t rows) const noexcept {
        const dtype f = w_.format();
        return !fast_ && !widens(rows) && (f == dtype::q4_k || (kernel_ == kernel_isa::avx2 && (f == dtype::q4_0 || f == dtype::mxfp4)));
    }

    /// One AMX-INT8 kernel call (`fast` only), on the CPU's tiles or HYPERMOE_AMX=emulate's.
    void run_amx(const TileArgs& t, const AmxRows& x) const {
#if HYPERMOE_X86_KERNELS
        with_block(w_.format(), [&]<class Block>() {
            if (cpu_isa().amx_emulated) amx_fast_tile<AmxTilesEmulated, Block>(t, x);
            else amx_fast_tile<AmxTiles, Block>(t, x);
        });
#else
        (void)t, (void)x; // kernel_isa::amx_int8 is chosen on x86 only
#endif
    }

    /// One kernel call for `rows` (1..6) rows, on the instructions chosen at construction.
    void run_tile(const TileArgs& t, const TileRows& x, index_t rows) const {
        with_block(w_.format(), [&]<class Block>() {
#if HYPERMOE_X86_KERNELS
            if (kernel_ != kernel_isa::portable) {
                const auto go = [&]<int Rows>() {
                    if (kernel_ == kernel_isa::avx2) {
                        if (fast_) avx2_tile_rows<Rows, Block, true>(t, x);
                        else avx2_tile_rows<Rows, Block, false>(t, x);
                    } else if (!fast_) {
                        if constexpr (Rows <= exact_row_block) exact_tile<Rows, Block>(t, x);
                    } else if (kernel_ == kernel_isa::avx512_vnni || kernel_ == kernel_isa::amx_int8) { // AMX: calls of few rows
                        fast_tile<Rows, Block, true>(t, x);
                    } else {
                        fast_tile<Rows, Block, false>(t, x);
                    }
                };
                switch (rows) { // a compile-time row count keeps every row's sums in registers
                case 1: go.template operator()<1>(); break;
                case 2: go.template operator()<2>(); break;
                case 3: go.template operator()<3>(); break;
                case 4: go.template operator()<4>(); break;
                case 5: go.template operator()<5>(); break;
                default: go.template operator()<6>(); break;
                }
                return;
            }
#endif
#if HYPERMOE_NEON_KERNELS
#if HYPERMOE_NEON_SDOT
            if (kernel_ == kernel_isa::neon_dotprod) return neon_tile<Block, true>(t, x, int(rows)); // `fast` only
#endif
            if (kernel_ == kernel_isa::neon) return neon_tile<Block, false>(t, x, int(rows));
#endif
            if (fast_) portable_tile<Block, true>(t, x, int(rows));
            else portable_tile<Block, false>(t, x, int(rows));
        });
    }

    /// The bias from output n on, or null.
    [[nodiscard]] const float* bias(index_t n) const noexcept { return bias_.empty() ? nullptr : bias_.data() + n; }

    /// One work item: outputs [j0, j0 + 32) (fewer at N) for every row, into t's and c's
    /// columns from j0 - n0 (t: c itself unless accumulating), then the epilogue on them.
    void run_item(const PreparedInput& p, MatrixView<float> t, MatrixView<float> c, index_t j0, index_t n0, float scale) const {
        const index_t rows = p.a.rows(), per_row = w_.blocks_per_row(), full = k_ / quant_block, item = j0 / tile;
        const index_t cols = std::min(tile, n_ - j0), at = j0 - n0;
        const bool amx = kernel_ == kernel_isa::amx_int8 && rows >= amx_rows;
        const index_t row_block = amx ? amx_rows : fast_ ? fast_row_block : exact_row_block;
        const QuantizedRows* xq = p.quantized ? &*p.quantized : nullptr;
        TileArgs args;
        args.ldc = t.stride();
        for (int q = 0; q < 2; ++q) args.mask[q] = static_cast<std::uint16_t>((1u << std::clamp<index_t>(cols - 16 * q, 0, 16)) - 1u);
        alignas(64) float pad[exact_row_block][quant_block] = {};
        args.nb = per_row, args.wq = w_.tile_quants(item), args.wd = w_.tile_scales(item);
        // Row blocks of sizes as equal as row_block allows (7 rows as 4 + 3, not 6 + 1): a kernel
        // call costs less a row the more rows share its weight loads (q4_0 `fast`, one thread, in
        // L2, ns a block: 7.5 for 1 row, 9.0 for 2, 13.5 for 4, 19.5 for 6). Each row's sums are
        // its own, so the bits do not depend on the blocks.
        for (index_t m = 0, here = 0; m < rows; m += here) {
            const index_t blocks_left = (rows - m + row_block - 1) / row_block;
            here = (rows - m + blocks_left - 1) / blocks_left;
            args.out = t.row(m).data() + at;
            args.ahead = m == 0 ? prefetch_ahead : 0; // the first row block streams the tile in
            if (amx) {
                run_amx(args, AmxRows{xq->q_row(m), xq->d_row(m), xq->sum_row(m), xq->dsum_row(m), per_row, int(here)});
                continue;
            }
            TileRows x;
            x.full = full;
            for (index_t r = 0; r < here; ++r) {
                if (xq != nullptr) {
                    x.q[r] = xq->q_row(m + r), x.d[r] = xq->d_row(m + r), x.sum[r] = xq->sum_row(m + r), x.dsum[r] = xq->dsum_row(m + r);
                } else {
                    x.x[r] = p.a.row(m + r).data(), x.pad[r] = pad[r];
                    if (!p.block_sums.empty()) x.x_sum[r] = p.block_sums.data() + (m + r) * per_row;
                    if (full < per_row) { // the partial last block, zero-padded
                        std::fill_n(pad[r], quant_block, 0.0f);
                        std::copy_n(x.x[r] + full * quant_block, k_ - full * quant_block, pad[r]);
                    }
                }
            }
            run_tile(args, x, here);
        }
        epilogue_item(t, c, j0, at, cols, scale);
    }

    /// c = [c +] scale * Act(t + bias) on an item's `cols` columns (outputs from j0, at column
    /// `at` of t and c): linear_spec.hpp's epilogues.
    void epilogue_item(MatrixView<float> t, MatrixView<float> c, index_t j0, index_t at, index_t cols, float scale) const {
        if (accumulate_) epilogue_accumulate<Act>(t.col_block(at, cols), c.col_block(at, cols), bias(j0), scale);
        else epilogue_in_place<Act>(c.col_block(at, cols), bias(j0), scale);
    }

    /// run_item on widened tiles (widens): for each slice of widen_slice inputs, the tile's two
    /// panels widened into `slice` (widened_floats floats) and multiplied by every row, the
    /// slices' products added up in C, then the epilogue.
    void run_widened_item(const PreparedInput& p, MatrixView<float> t, MatrixView<float> c, index_t j0, index_t n0, float scale,
                          float* slice) const {
#if HYPERMOE_X86_KERNELS
        const index_t item = j0 / tile, cols = std::min(tile, n_ - j0), at = j0 - n0;
        TileArgs args;
        args.nb = w_.blocks_per_row(), args.wq = w_.tile_quants(item), args.wd = w_.tile_scales(item);
        const PanelKernels kernels(kernel_);
        for (index_t k0 = 0; k0 < k_; k0 += widen_slice) {
            const index_t len = std::min(widen_slice, k_ - k0);
            with_block(w_.format(), [&]<class Block>() { avx2_widen_panels<Block>(args, k0, len, slice); });
            kernels.run_group(static_cast<const float*>(slice), len * BlockWeights::panel, len, cols, 0, p.a.data() + k0, p.a.stride(),
                              p.a.rows(), t.row(0).data() + at, t.stride(), k0 > 0);
        }
        epilogue_item(t, c, j0, at, cols, scale);
#else
        (void)p, (void)t, (void)c, (void)j0, (void)n0, (void)scale, (void)slice; // widens() is x86 only
#endif
    }

    BlockWeights w_;
    std::vector<float> bias_;
    index_t n_, k_;
    bool accumulate_;
    kernel_isa kernel_;
    bool fast_;
};

} // namespace hypermoe::detail

HYPERMOE_INTRINSICS_END
