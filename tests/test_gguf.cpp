// GGUF files (io/gguf.hpp, io/gguf_model.hpp), written by the tests' own writer
// (gguf_writer.hpp): every architecture and tensor type gives the block the same weights give
// from safetensors; the fixtures converted to GGUF give their expected outputs; blocks are kept
// as stored; malformed files and unsupported models give typed errors naming the problem.
#include <doctest/doctest.h>

#include <bit>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <fstream>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>
#include <hypermoe/train/trainer.hpp>

#include "gguf_writer.hpp"
#include "test_support.hpp"

using namespace hypermoe;
using test::TempDir;
using test::relative_error;
namespace fs = std::filesystem;

namespace {

/// y = block(x) of MoE block `layer`.
template <class B>
Matrix<float> forward(const Checkpoint& ck, index_t layer, ConstMatrixView<float> x, const LoadOptions& opt) {
    const auto block = load_moe_block<B>(ck, layer, "", opt);
    Matrix<float> y(x.rows(), x.cols());
    Workspace ws;
    block.forward(x, y.view(), ws);
    return y;
}

/// How many of the whole pages inside `bytes` are mapped into this process (the "present" bit
/// of /proc/self/pagemap; -1 where the kernel does not give it), and how many there are.
[[nodiscard]] std::pair<long, long> present_pages(std::span<const std::byte> bytes) {
    const auto page = std::uintptr_t(::sysconf(_SC_PAGESIZE));
    const std::uintptr_t first = (reinterpret_cast<std::uintptr_t>(bytes.data()) + page - 1) / page;
    const std::uintptr_t last = (reinterpret_cast<std::uintptr_t>(bytes.data()) + bytes.size()) / page;
    const int fd = ::open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) return {-1, long(last - first)};
    long n = 0;
    for (std::uintptr_t p = first; p < last && n >= 0; ++p) {
        std::uint64_t entry = 0;
        if (::pread(fd, &entry, sizeof entry, off_t(p * sizeof entry)) != ssize_t(sizeof entry)) n = -1;
        else n += long(entry >> 63);
    }
    ::close(fd);
    return {n, long(last - first)};
}

[[nodiscard]] float max_abs_diff(ConstMatrixView<float> a, ConstMatrixView<float> b) {
    float m = 0;
    for (index_t r = 0; r < a.rows(); ++r)
        for (index_t c = 0; c < a.cols(); ++c) m = std::max(m, std::fabs(a(r, c) - b(r, c)));
    return m;
}

/// A copy of checkpoint `src` in `dst` whose expert matrices hold the values `type` stores
/// (F16 and BF16 rounding; the block formats are left to the loader's quantiser), with config
/// keys overridden by `config`.
void reference_copy(const std::string& src, const std::string& dst, std::uint32_t type, const nlohmann::json& config) {
    fs::create_directories(dst);
    nlohmann::json c = read_json_file(src + "/config.json");
    if (!config.is_null()) c.update(config);
    std::ofstream(dst + "/config.json") << c.dump(2);
    const SafeTensorsFile f(src + "/model.safetensors");
    std::vector<TensorToWrite> out;
    for (const TensorInfo& t : f.view().tensors()) {
        Matrix<float> m = f.view().to_f32(t);
        if (t.name.find("expert") != std::string::npos && t.name.find("expert_gate") == std::string::npos && t.shape.size() == 2)
            for (index_t i = 0; i < m.rows() * m.cols(); ++i) {
                float& v = m.data()[i];
                if (type == test::F16) v = f16_bits_to_f32(f32_to_f16_bits(v));
                if (type == test::BF16) v = bf16::from_float(v).to_float();
            }
        out.push_back(f32_tensor(t.name, t.shape, {m.data(), std::size_t(m.rows() * m.cols())}));
    }
    write_safetensors(dst + "/model.safetensors", out);
}

/// The elements in one block of a ggml type the library widens: 32 or 256.
index_t block_of(std::uint32_t type) {
    return type == test::Q4_1 || type == test::Q5_0 || type == test::Q5_1 || type == test::IQ4_NL || type == test::MXFP4 ? 32 : 256;
}

/// The values of one block of a ggml quant the library widens (Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4: 32; Q2_K
/// to Q6_K, IQ4_XS: 256), decoded the way ggml's dequantize_row_* loops walk a block (the library
/// reads each element on its own).
std::vector<float> decode_ggml_quant(std::uint32_t type, const std::byte* block) {
    const auto* b = reinterpret_cast<const std::uint8_t*>(block);
    const auto half = [b](int at) { return f16_bits_to_f32(std::uint16_t(b[at] | b[at + 1] << 8)); };
    std::vector<float> y;
    static constexpr std::int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    if (type == test::MXFP4) { // ggml's kvalues_mxfp4, and GGML_E8M0_TO_FP32_HALF's bits for 2^(e - 128)
        static constexpr std::int8_t kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        const std::uint32_t bits = b[0] < 2 ? 0x00200000u << b[0] : std::uint32_t(b[0] - 1) << 23;
        const float d = std::bit_cast<float>(bits);
        y.resize(32);
        for (int j = 0; j < 16; ++j) {
            y[std::size_t(j)] = float(kvalues_mxfp4[b[1 + j] & 0x0F]) * d;
            y[std::size_t(j + 16)] = float(kvalues_mxfp4[b[1 + j] >> 4]) * d;
        }
        return y;
    }
    if (block_of(type) == 32) {
        y.resize(32);
        const float d = half(0);
        if (type == test::IQ4_NL) {
            for (int j = 0; j < 16; ++j) {
                y[std::size_t(j)] = d * float(kvalues_iq4nl[b[2 + j] & 0xf]);
                y[std::size_t(j + 16)] = d * float(kvalues_iq4nl[b[2 + j] >> 4]);
            }
            return y;
        }
        const bool five = type == test::Q5_0 || type == test::Q5_1;
        const float m = type == test::Q5_0 ? 0.0f : half(2);
        const std::uint8_t* qs = b + (type == test::Q4_1 ? 4 : type == test::Q5_0 ? 6 : 8);
        std::uint32_t qh = 0;
        if (five) std::memcpy(&qh, qs - 4, 4);
        for (int j = 0; j < 16; ++j) {
            const int xh_0 = five ? ((qh >> (j + 0)) << 4) & 0x10 : 0;
            const int xh_1 = five ? ((qh >> (j + 12))) & 0x10 : 0;
            int x0 = (qs[j] & 0x0F) | xh_0, x1 = (qs[j] >> 4) | xh_1;
            if (type == test::Q5_0) {
                x0 -= 16, x1 -= 16;
                y[std::size_t(j)] = float(x0) * d, y[std::size_t(j + 16)] = float(x1) * d;
            } else {
                y[std::size_t(j)] = float(x0) * d + m, y[std::size_t(j + 16)] = float(x1) * d + m;
            }
        }
        return y;
    }
    if (type == test::IQ4_XS) {
        const float d = half(0);
        const int scales_h = b[2] | b[3] << 8;
        const std::uint8_t* scales_l = b + 4;
        const std::uint8_t* qs = b + 8;
        for (int ib = 0; ib < 8; ++ib) {
            const int ls = ((scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
            const float dl = d * float(ls - 32);
            y.resize(y.size() + 32);
            float* out = y.data() + 32 * ib;
            for (int j = 0; j < 16; ++j) {
                out[j + 0] = dl * float(kvalues_iq4nl[qs[j] & 0xf]);
                out[j + 16] = dl * float(kvalues_iq4nl[qs[j] >> 4]);
            }
            qs += 16;
        }
        return y;
    }
    if (type == test::Q2_K || type == test::Q3_K) {
        // Q3_K's sixteen 6-bit scales, unpacked as ggml does: four words and two masks.
        std::int8_t scales[16];
        if (type == test::Q3_K) {
            std::uint32_t aux[4];
            std::memcpy(aux, b + 96, 12);
            const std::uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f, tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
            aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
            aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
            aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
            std::memcpy(scales, aux, 16);
        }
        const float d = type == test::Q2_K ? half(80) : half(108), min = type == test::Q2_K ? half(82) : 0.0f;
        const std::uint8_t* q = b + (type == test::Q2_K ? 16 : 32);
        const std::uint8_t* hm = b;
        std::uint8_t m = 1;
        int is = 0;
        for (int n = 0; n < 256; n += 128) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int h = 0; h < 2; ++h, ++is) {
                    if (type == test::Q2_K) {
                        const std::uint8_t sc = b[is];
                        const float dl = d * float(sc & 0xF), ml = min * float(sc >> 4);
                        for (int l = 0; l < 16; ++l) y.push_back(dl * float(std::int8_t((q[l + 16 * h] >> shift) & 3)) - ml);
                    } else {
                        const float dl = d * float(scales[is] - 32);
                        for (int l = 0; l < 16; ++l)
                            y.push_back(dl * float(std::int8_t((q[l + 16 * h] >> shift) & 3) - ((hm[l + 16 * h] & m) ? 0 : 4)));
                    }
                }
                m = std::uint8_t(m << 1);
            }
            q += 32;
        }
        return y;
    }
    if (type == test::Q6_K) {
        const float d = half(208);
        y.resize(256);
        for (int n = 0; n < 2; ++n)
            for (int l = 0; l < 32; ++l) {
                const std::uint8_t* ql = b + 64 * n;
                const std::uint8_t qh = b[128 + 32 * n + l];
                const auto* sc = reinterpret_cast<const std::int8_t*>(b + 192 + 8 * n + l / 16);
                const int q[4] = {(ql[l] & 0xF) | ((qh & 3) << 4), (ql[l + 32] & 0xF) | (((qh >> 2) & 3) << 4),
                                  (ql[l] >> 4) | (((qh >> 4) & 3) << 4), (ql[l + 32] >> 4) | (((qh >> 6) & 3) << 4)};
                for (int u = 0; u < 4; ++u) y[std::size_t(128 * n + 32 * u + l)] = d * float(sc[2 * u]) * float(q[u] - 32);
            }
        return y;
    }
    const float d = half(0), dmin = half(2);
    const std::uint8_t* s = b + 4;
    const std::uint8_t* qh = b + 16;
    const std::uint8_t* q = b + (type == test::Q5_K ? 48 : 16);
    for (int sub = 0; sub < 8; ++sub) {
        const int sc = sub < 4 ? s[sub] & 63 : (s[sub + 4] & 0xF) | (s[sub - 4] >> 6) << 4;
        const int m = sub < 4 ? s[sub + 4] & 63 : (s[sub + 4] >> 4) | (s[sub] >> 6) << 4;
        for (int l = 0; l < 32; ++l) {
            const std::uint8_t byte = q[32 * (sub / 2) + l];
            int v = sub % 2 == 0 ? byte & 0xF : byte >> 4;
            if (type == test::Q5_K && (qh[l] >> sub & 1)) v += 16;
            y.push_back(d * float(sc) * float(v) - dmin * float(m));
        }
    }
    return y;
}

/// `blocks` blocks of random bytes of a ggml quant the library widens, with finite scales (and
/// mins) of about 2^-8 (`type`: Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K to Q6_K, IQ4_XS).
std::vector<std::byte> random_ggml_quant(std::uint32_t type, index_t blocks, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    return test::random_ggml_quant(type, blocks, rng, std::uniform_real_distribution<float>(1.0f / 512, 1.0f / 128));
}

struct Variant {
    const char* family;
    test::GgufConversion how;
    nlohmann::json config; ///< what the GGUF architecture implies, set on the safetensors side too
};

} // namespace

TEST_CASE_TEMPLATE_DEFINE("GGUF: every architecture and tensor type gives the block its weights give from safetensors", B, every_type) {
    const std::vector<Variant> variants = {
        {"mixtral", {.merged = true}, {}},
        {"mixtral", {.merged = false}, {}},
        {"qwen2_moe", {}, {{"norm_topk_prob", false}}},
        {"qwen3_moe", {}, {{"norm_topk_prob", true}}},
        {"olmoe", {}, {{"norm_topk_prob", false}}},
        {"deepseek_v3", {.gating = 2}, {}},
        {"deepseek_v3", {.gating = 1}, {{"scoring_func", "softmax"}}},
        {"gpt_oss", {}, {}},
    };
    const std::vector<std::pair<std::uint32_t, dtype>> types = {
        {test::F32, dtype::f32},   {test::F16, dtype::f32},   {test::BF16, dtype::bf16},
        {test::Q8_0, dtype::q8_0}, {test::Q4_0, dtype::q4_0}, {test::MXFP4, dtype::mxfp4}};
    TempDir tmp("types");
    const Matrix<float> x = test::random_matrix(5, 64, 7);
    for (const Variant& v : variants) {
        const std::string src = (tmp.path / "src").string();
        fs::remove_all(src);
        write_synthetic_checkpoint(src, {.family = *find_family(v.family), .d_model = 64, .d_ff = 64, .experts = 8, .top_k = 2, .layers = 2});
        for (const auto& type_storage : types) {
            const std::uint32_t type = type_storage.first; // not a structured binding: clang 14 cannot capture those
            const dtype storage = type_storage.second;
            CAPTURE(v.family);
            CAPTURE(v.how.merged);
            CAPTURE(v.how.gating);
            CAPTURE(type);
            const std::string ref = (tmp.path / "ref").string(), file = (tmp.path / "model.gguf").string();
            fs::remove_all(ref);
            reference_copy(src, ref, type, v.config);
            test::GgufConversion how = v.how;
            how.experts = type;
            test::gguf_from(Checkpoint(src), how).write(file);
            const Checkpoint g(file), r(ref);
            CHECK(describe(g).family == describe(r).family);
            CHECK(describe(g).moe_blocks == describe(r).moe_blocks);
            for (const precision p : {precision::exact, precision::fast}) {
                const LoadOptions opt{.storage = storage, .prec = p};
                const Matrix<float> yg = forward<B>(g, 1, x.view(), opt), yr = forward<B>(r, 1, x.view(), opt);
                CHECK(max_abs_diff(yg.view(), yr.view()) == 0.0f);
            }
        }
    }
}

TEST_CASE_TEMPLATE_DEFINE("GGUF: the fixtures converted as llama.cpp would give their expected outputs", B, fixtures) {
    TempDir tmp("fixtures");
    for (const char* name :
         {"mixtral-basic", "mixtral-decode", "qwen2_moe-basic", "olmoe-basic", "deepseek_v3-basic", "deepseek_v3-decode", "gpt_oss-basic"}) {
        CAPTURE(name);
        const std::string dir = test::data_dir + "/" + name;
        const Checkpoint st(dir);
        const SafeTensorsFile input(dir + "/input.safetensors"), expected(dir + "/expected.safetensors");
        const Matrix<float> x = input.view().to_f32(input.view().info("x")), y_want = expected.view().to_f32(expected.view().info("y"));
        const index_t layer = std::stoll(input.view().metadata().at("layer"));
        for (const bool merged : {true, false}) {
            if (!merged && std::string(name).rfind("mixtral", 0) != 0) continue; // per-expert tensors: llama only
            const std::string file = (tmp.path / "f32.gguf").string();
            test::gguf_from(st, {.experts = test::F32, .merged = merged}).write(file);
            const Checkpoint g(file);
            const Matrix<float> y = forward<B>(g, layer, x.view(), {});
            CHECK(relative_error(y.view(), y_want.view()) <= 1e-5);
        }
        // Q8_0 / Q4_0 / MXFP4 / Q4_K (matrices whose rows are not whole blocks stay F32, as
        // llama.cpp's quantizer leaves them): exactly what the safetensors weights held in that
        // format give.
        for (const auto& [type, storage] :
             {std::pair{test::Q8_0, dtype::q8_0}, {test::Q4_0, dtype::q4_0}, {test::MXFP4, dtype::mxfp4}, {test::Q4_K, dtype::q4_k}}) {
            const std::string file = (tmp.path / "q.gguf").string();
            test::gguf_from(st, {.experts = type}).write(file);
            const LoadOptions opt{.storage = storage};
            const Matrix<float> yg = forward<B>(Checkpoint(file), layer, x.view(), opt), ys = forward<B>(st, layer, x.view(), opt);
            CHECK(max_abs_diff(yg.view(), ys.view()) == 0.0f);
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(fixtures, test::all_backends);

TEST_CASE_TEMPLATE_DEFINE("gpt_oss: Hugging Face's MXFP4 experts (_blocks, _scales) are held as the GGUF file of the same blocks holds them",
                          B, gpt_oss_mxfp4) {
    TempDir tmp("gpt-oss-mxfp4");
    const std::string dir = test::data_dir + "/gpt_oss-basic";
    const Checkpoint st(dir);
    const auto write_copy = [&](const std::string& to, const std::vector<TensorToWrite>& tensors, const std::string& config_from = "") {
        fs::create_directories(to);
        fs::copy_file((config_from.empty() ? dir : config_from) + "/config.json", to + "/config.json", fs::copy_options::overwrite_existing);
        write_safetensors(to + "/model.safetensors", tensors);
        return to;
    };
    const std::vector<TensorToWrite> blocks = test::gpt_oss_mxfp4(st);
    const Checkpoint mx(write_copy((tmp.path / "mx").string(), blocks));
    const std::string file = (tmp.path / "mx.gguf").string();
    test::gguf_from(st, {.experts = test::MXFP4}).write(file);
    const Checkpoint g(file);
    CHECK(mx.expert_storage() == dtype::mxfp4); // the biases (F32) and scales do not count
    CHECK(g.expert_storage() == dtype::mxfp4);
    CHECK(mx.expert_dtypes() == std::set<std::string>{"MXFP4"});
    CHECK(g.expert_dtypes() == std::set<std::string>{"MXFP4"});
    const SafeTensorsFile input(dir + "/input.safetensors"), expected(dir + "/expected.safetensors");
    const Matrix<float> x = input.view().to_f32(input.view().info("x"));
    // The same blocks, from either file: held as they are (mxfp4), or converted from their values.
    for (const LoadOptions opt : {LoadOptions{.storage = dtype::mxfp4}, LoadOptions{.storage = dtype::mxfp4, .prec = precision::fast},
                                  LoadOptions{.storage = dtype::q8_0}, LoadOptions{.storage = dtype::f32}}) {
        CAPTURE(to_string(opt.storage));
        CAPTURE(to_string(opt.prec));
        const Matrix<float> ym = forward<B>(mx, 1, x.view(), opt), yg = forward<B>(g, 1, x.view(), opt);
        CHECK(max_abs_diff(ym.view(), yg.view()) == 0.0f);
        CHECK(relative_error(ym.view(), expected.view().to_f32(expected.view().info("y")).view()) <= 0.5);
    }
    // Hugging Face's fused layout in BF16: each expert's slice, converted as it is packed, gives
    // what the same values split per expert give (held as f32 or bf16).
    std::vector<TensorToWrite> bf16_tensors;
    for (const std::string& name : st.tensor_names()) {
        const Checkpoint::Ref r = st.tensor(name);
        const Matrix<float> v = r.file->to_f32(*r.info);
        TensorToWrite t{name, tensor_dtype::bf16, r.info->shape, std::vector<std::byte>(std::size_t(v.rows() * v.cols()) * 2)};
        for (index_t i = 0; i < v.rows() * v.cols(); ++i) {
            const std::uint16_t bits = bf16::from_float(v.data()[i]).bits;
            std::memcpy(t.bytes.data() + 2 * i, &bits, 2);
        }
        bf16_tensors.push_back(std::move(t));
    }
    const Checkpoint fused_bf16(write_copy((tmp.path / "bf16").string(), bf16_tensors));
    const Checkpoint split_bf16(write_copy((tmp.path / "split").string(), test::gpt_oss_split(fused_bf16)));
    CHECK(fused_bf16.expert_storage() == dtype::bf16);
    for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0}) {
        CAPTURE(to_string(storage));
        const LoadOptions opt{.storage = storage};
        const Matrix<float> yf = forward<B>(fused_bf16, 1, x.view(), opt), ys = forward<B>(split_bf16, 1, x.view(), opt);
        CHECK(max_abs_diff(yf.view(), ys.view()) == 0.0f);
    }
    // Widths that are not whole tiles of the conversion (32 rows): the fused layout of a
    // synthetic model gives what its experts' own tensors give, in every storage.
    write_synthetic_checkpoint((tmp.path / "own").string(),
                               {.family = family("gpt_oss"), .d_model = 64, .d_ff = 40, .experts = 4, .top_k = 2, .layers = 1});
    const Checkpoint own((tmp.path / "own").string());
    const Checkpoint fused(write_copy((tmp.path / "fused").string(), test::gpt_oss_fused(own), (tmp.path / "own").string()));
    const Matrix<float> x64 = test::random_matrix(5, 64, 9, 3.0f);
    for (const dtype storage : {dtype::f32, dtype::bf16, dtype::q8_0, dtype::mxfp4}) {
        CAPTURE(to_string(storage));
        const LoadOptions opt{.storage = storage};
        const Matrix<float> yf = forward<B>(fused, 0, x64.view(), opt), yo = forward<B>(own, 0, x64.view(), opt);
        CHECK(max_abs_diff(yf.view(), yo.view()) == 0.0f);
    }
    // A missing or mistyped half of the pair: one weight_error naming each.
    std::vector<TensorToWrite> broken;
    for (const TensorToWrite& t : blocks) {
        if (t.name == "model.layers.1.mlp.experts.gate_up_proj_scales") continue;
        broken.push_back(t);
        if (t.name == "model.layers.1.mlp.experts.down_proj_blocks") broken.back().dtype = tensor_dtype::i8;
    }
    const Checkpoint bad(write_copy((tmp.path / "bad").string(), broken));
    CHECK_THROWS_WITH_AS((void)load_moe_block<B>(bad, 1), doctest::Contains("2 problems with its tensors:\n  missing tensor "
                                                                             "'model.layers.1.mlp.experts.gate_up_proj_scales'"),
                         weight_error);
    const std::string mistyped = "'model.layers.1.mlp.experts.down_proj_blocks' in " + (tmp.path / "bad").string() +
                                 "/model.safetensors is I8 [8, 32, 2, 16], expected U8 [8, 32, 2, 16]";
    CHECK_THROWS_WITH_AS((void)load_moe_block<B>(bad, 1), doctest::Contains(mistyped.c_str()), weight_error);
    // MXFP4 blocks are not trained: no names for their gradients, and a Trainer says so.
    const auto block = load_moe_block<B>(mx, 1);
    Matrix<float> dx(x.rows(), x.cols());
    Workspace ws;
    CHECK_THROWS_WITH_AS((void)block.gradients(x.view(), x.view(), dx.view(), ws),
                         doctest::Contains("the block's experts have no tensor names of their own"), config_error);
    CHECK_THROWS_WITH_AS(Trainer<B>(mx, TrainOptions{}),
                         "Trainer: gpt_oss block 0 reads its experts from MXFP4 blocks (gpt-oss's fused _blocks and _scales), which are "
                         "not trained; start from a dequantised checkpoint",
                         config_error);
    // GGUF: an expert bias that is not [experts, N] is named with the shape expected.
    const std::string flat = (tmp.path / "flat.gguf").string();
    test::rewritten(test::gguf_from(st).bytes(), [](const std::string& name, test::TensorEdit& e) {
        if (name == "blk.1.ffn_up_exps.bias") e.ne = {e.ne[0] * e.ne[1]};
        return true;
    }).write(flat);
    const std::string flat_bias = "'model.layers.1.mlp.experts.0.up_proj.bias' (GGUF 'blk.1.ffn_up_exps.bias' [512], expected [8, N]) in " +
                                  flat + " has shape [512], expected [64]";
    CHECK_THROWS_WITH_AS((void)load_moe_block<B>(Checkpoint(flat), 1), doctest::Contains(flat_bias.c_str()), weight_error);
}
TEST_CASE_TEMPLATE_APPLY(gpt_oss_mxfp4, test::all_backends);

TEST_CASE("GGUF: Q8_0, Q4_0 and MXFP4 blocks are held as stored, not requantised") {
    // Blocks no quantiser of their values would give: random integers under random scales.
    const index_t n = 40, k = 96;
    std::vector<std::byte> q8, q4;
    std::uint64_t s = 12345;
    const auto next = [&] { return s = s * 6364136223846793005ull + 1442695040888963407ull, std::uint32_t(s >> 33); };
    std::vector<BlockQ8_0> b8(std::size_t(n * k / 32));
    std::vector<BlockQ4_0> b4(b8.size());
    std::vector<BlockMXFP4> bm(b8.size());
    for (std::size_t i = 0; i < b8.size(); ++i) {
        b8[i].d = f32_to_f16_bits(float(next() % 1000 + 1) * 1e-4f);
        b4[i].d = f32_to_f16_bits(-float(next() % 1000 + 1) * 1e-4f);
        bm[i].e = std::uint8_t(next() % 253); // 253 to 255 could give an infinity
        for (auto& q : b8[i].qs) q = std::int8_t(int(next() % 201) - 100);
        for (auto& q : b4[i].qs) q = std::uint8_t(next() % 256);
        for (auto& q : bm[i].qs) q = std::uint8_t(next() % 256);
    }
    const detail::BlockWeights w8(WeightView::blocks(b8.data(), dtype::q8_0, n, k), dtype::q8_0, "w8");
    const detail::BlockWeights w4(WeightView::blocks(b4.data(), dtype::q4_0, n, k), dtype::q4_0, "w4");
    const detail::BlockWeights wm(WeightView::blocks(bm.data(), dtype::mxfp4, n, k), dtype::mxfp4, "wm");
    for (index_t r = 0; r < n; ++r)
        for (index_t b = 0; b < k / 32; ++b) {
            const auto& want8 = b8[std::size_t(r * (k / 32) + b)];
            const auto& want4 = b4[std::size_t(r * (k / 32) + b)];
            const auto& wantm = bm[std::size_t(r * (k / 32) + b)];
            const BlockQ8_0 got8 = w8.block<BlockQ8_0>(r, b);
            const BlockQ4_0 got4 = w4.block<BlockQ4_0>(r, b);
            const BlockMXFP4 gotm = wm.block<BlockMXFP4>(r, b);
            CHECK(std::memcmp(&got8, &want8, sizeof got8) == 0);
            CHECK(std::memcmp(&got4, &want4, sizeof got4) == 0);
            CHECK(std::memcmp(&gotm, &wantm, sizeof gotm) == 0);
        }
    // A view's elements are the blocks' values, and a GLU expert fuses gate and up as blocks.
    const WeightView v = WeightView::blocks(b4.data(), dtype::q4_0, n, k);
    std::array<float, 32> vals{};
    dequantize(b4[1], vals);
    CHECK(v.at(0, 32 + 17) == vals[17]);
    CHECK(v.extent().size() == std::size_t(n * k / 32 * 18));
    CHECK_THROWS_AS((void)WeightView::blocks(b4.data(), dtype::q4_0, n, 40), shape_error);
    CHECK_THROWS_AS((void)WeightView::blocks(b4.data(), dtype::bf16, n, 32), config_error);
}

TEST_CASE("GGUF: Q4_K super-blocks are held as stored, as their sub-blocks, not requantised") {
    // Random super-blocks (every byte of the 12 packed scales random, so both of k_scale_min's
    // layouts and the top bits are used), two a row, then a row of 320 weights (one whole
    // super-block and a zero-padded one, as the loader converts a row of that width).
    const index_t n = 40;
    std::mt19937 rng(77);
    for (const index_t k : {512, 320}) {
        CAPTURE(k);
        const index_t supers = (k + 255) / 256, subs = k / 32;
        std::vector<BlockQ4_K> blocks(std::size_t(n * supers));
        for (BlockQ4_K& b : blocks) {
            b.d = f32_to_f16_bits(float(rng() % 1000 + 1) * 1e-5f);
            b.dmin = f32_to_f16_bits(float(rng() % 1000) * 1e-5f);
            for (auto& v : b.scales) v = static_cast<std::uint8_t>(rng());
            for (auto& v : b.qs) v = static_cast<std::uint8_t>(rng());
        }
        const WeightView v = WeightView::blocks(blocks.data(), dtype::q4_k, n, k);
        CHECK(v.extent().size() == std::size_t(n * supers * 144));
        const detail::BlockWeights held(v, dtype::q4_k, "wk");
        for (index_t r = 0; r < n; ++r)
            for (index_t b = 0; b < subs; ++b) {
                const SubBlockQ4_K got = held.block<SubBlockQ4_K>(r, b), want = sub_block(blocks[std::size_t(r * supers + b / 8)], b % 8);
                CHECK(std::memcmp(&got, &want, sizeof got) == 0);
                for (index_t i = 0; i < 32; i += 7) { // the values ggml's decoder gives, through the view and as held
                    const float value = GgmlQuantBlock(&blocks[std::size_t(r * supers + b / 8)], ggml_quant::q4_k)[(b % 8) * 32 + i];
                    CHECK(v.at(r, b * 32 + i) == value);
                    CHECK(held.at(r, b * 32 + i) == value);
                }
            }
    }
    CHECK_THROWS_WITH_AS((void)WeightView::blocks(nullptr, dtype::q4_k, n, 100), "WeightView::blocks: 100 columns, expected a multiple of 32",
                         shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("GGUF: keep_stored holds Q4_K experts as stored and requantises only the others (llama.cpp's Q4_K_M mix)", B,
                          keep_stored) {
    // A Qwen2-MoE block (routed and shared experts) whose gate and up are Q4_K (quantised here)
    // and down Q6_K (random blocks), as llama.cpp's Q4_K_M files hold them; against an F32 file
    // of the values keep_stored must compute with: gate and up's Q4_K values as they are, down's
    // Q6_K values requantised to q8_0 (Checkpoint::expert_storage(true)).
    TempDir tmp("keep");
    const std::string dir = (tmp.path / "hf").string();
    write_synthetic_checkpoint(dir, {.family = family("qwen2_moe"), .d_model = 256, .d_ff = 256, .experts = 3, .top_k = 2, .layers = 1});
    const std::vector<std::byte> base = test::gguf_from(Checkpoint(dir)).bytes();
    std::mt19937_64 rng(17);
    const std::uniform_real_distribution<float> scale(1.0f / 512, 1.0f / 128);
    std::map<std::string, test::TensorEdit> mixed, values; // the expert matrices of each file
    (void)test::rewritten(base, [&](const std::string& name, test::TensorEdit& t) {
        const bool gate_up = (name.find("ffn_gate_") != std::string::npos || name.find("ffn_up_") != std::string::npos) &&
                             name.find("gate_inp") == std::string::npos;
        const bool down = name.find("ffn_down_") != std::string::npos;
        if (!gate_up && !down) return true;
        const index_t cols = t.ne[0], rows = index_t(t.bytes.size() / sizeof(float)) / cols;
        const ConstMatrixView<float> m(reinterpret_cast<const float*>(t.bytes.data()), rows, cols);
        mixed[name] = {gate_up ? test::Q4_K : test::Q6_K, t.ne, gate_up ? test::encode(m, test::Q4_K)
                                                                         : test::random_ggml_quant(test::Q6_K, rows * cols / 256, rng, scale)};
        std::vector<float> row(static_cast<std::size_t>(cols));
        std::vector<std::byte>& out = values[name].bytes;
        values[name].type = test::F32, values[name].ne = t.ne;
        for (index_t r = 0; r < rows; ++r) {
            for (index_t b = 0; b < cols / 256; ++b) {
                const auto v = decode_ggml_quant(mixed[name].type, mixed[name].bytes.data() + std::size_t(r * cols / 256 + b) * (gate_up ? 144 : 210));
                std::copy(v.begin(), v.end(), row.begin() + b * 256);
            }
            for (const float f : gate_up ? row : test::requantized(dtype::q8_0, row)) test::GgufWriter::put(out, f);
        }
        return true;
    });
    const auto file = [&](const std::string& stem, std::map<std::string, test::TensorEdit>& edits) {
        const std::string path = (tmp.path / stem).string();
        test::rewritten(base, [&](const std::string& name, test::TensorEdit& t) {
            if (edits.count(name) != 0) t = edits[name];
            return true;
        }).write(path);
        return path;
    };
    const Checkpoint k(file("k.gguf", mixed)), f(file("f.gguf", values));
    CHECK(k.expert_storage() == dtype::q8_0);      // one storage for every expert matrix
    CHECK(k.expert_storage(true) == dtype::q8_0);  // for the Q6_K ones
    const LoadOptions keep{.storage = k.expert_storage(true), .keep_stored = true};
    const auto block = load_moe_block<B>(k, 0, "", keep);
    CHECK(block.expert_storages() == std::set<dtype>{dtype::q4_k, dtype::q8_0});
    const index_t d = 256, ff = 256, shared_ff = describe(k).shared_ff;
    REQUIRE(shared_ff % 256 == 0);
    const auto expert = [&](index_t width) {
        return weight_bytes(dtype::q4_k, std::size_t(2 * width), std::size_t(d)) + weight_bytes(dtype::q8_0, std::size_t(d), std::size_t(width));
    };
    CHECK(block.expert_weight_bytes() == 3 * expert(ff) + expert(shared_ff));
    const Matrix<float> x = test::random_matrix(6, 256, 4);
    Matrix<float> y(6, 256);
    Workspace ws;
    block.forward(x.view(), y.view(), ws);
    const Matrix<float> want = forward<B>(f, 0, x.view(), {});
    CHECK(relative_error(y.view(), want.view()) <= 1e-5);
    // Without it, one storage for all: gate and up requantised too, in more bytes.
    const auto all = load_moe_block<B>(k, 0, "", {.storage = dtype::q8_0});
    CHECK(all.expert_storages() == std::set<dtype>{dtype::q8_0});
    CHECK(all.expert_weight_bytes() > block.expert_weight_bytes());
    Matrix<float> y_all(6, 256);
    all.forward(x.view(), y_all.view(), ws);
    CHECK(relative_error(y_all.view(), want.view()) > 1e-4);
}
TEST_CASE_TEMPLATE_APPLY(keep_stored, test::all_backends);

TEST_CASE("GGUF: v2 and v3, any alignment, arrays and every metadata type are read") {
    TempDir tmp("versions");
    const std::string dir = test::data_dir + "/mixtral-basic";
    for (const std::uint32_t version : {2u, 3u})
        for (const std::uint32_t align : {32u, 64u, 4096u}) {
            CAPTURE(version);
            CAPTURE(align);
            test::GgufWriter w = test::gguf_from(Checkpoint(dir));
            if (align != 32) w.u32("general.alignment", align);
            w.strings("tokenizer.ggml.tokens", {"a", "bc", ""});
            w.i32("x.i32", -3);
            w.u64("x.u64", 5);
            w.scalar("x.u8", 0, std::uint8_t{200});
            w.scalar("x.i8", 1, std::int8_t{-100});
            w.scalar("x.u16", 2, std::uint16_t{60000});
            w.scalar("x.i16", 3, std::int16_t{-30000});
            w.f32("x.f32", 0.25f);
            w.boolean("x.bool", true);
            w.scalar("x.i64", 11, std::int64_t{-5'000'000'000});
            w.scalar("x.f64", 12, -1.5);
            w.u64("x.huge", std::uint64_t{1} << 63);
            const auto bytes = w.bytes(version, align);
            const GgufView v(bytes, "mem");
            CHECK(v.version() == version);
            CHECK(v.alignment() == align);
            CHECK(*v.integer("x.i32") == -3);
            CHECK(*v.integer("x.u64") == 5);
            CHECK(*v.integer("x.u8") == 200);
            CHECK(*v.integer("x.i8") == -100);
            CHECK(*v.integer("x.u16") == 60000);
            CHECK(*v.integer("x.i16") == -30000);
            CHECK(*v.integer("x.i64") == -5'000'000'000);
            CHECK(*v.number("x.i16") == -30000.0);
            CHECK(*v.number("x.f32") == 0.25);
            CHECK(*v.number("x.f64") == -1.5);
            CHECK(*v.boolean("x.bool"));
            CHECK(!v.number("x.absent"));
            CHECK(!v.boolean("x.absent"));
            CHECK_THROWS_WITH_AS((void)v.integer("x.huge"),
                                 "mem: metadata 'x.huge' is 9223372036854775808, expected at most 9223372036854775807", config_error);
            CHECK_THROWS_WITH_AS((void)v.integer("x.f64"), "mem: metadata 'x.f64' is a f64, expected an integer", config_error);
            CHECK_THROWS_WITH_AS((void)v.number("x.bool"), "mem: metadata 'x.bool' is a bool, expected a number", config_error);
            CHECK_THROWS_WITH_AS((void)v.boolean("x.u8"), "mem: metadata 'x.u8' is a u8, expected a bool", config_error);
            CHECK(*v.string("general.architecture") == "llama");
            CHECK(v.find_key("tokenizer.ggml.tokens")->count == 3);
            CHECK(v.find_key("tokenizer.ggml.tokens")->element == gguf_type::string);
            CHECK(v.find_key("tokenizer.ggml.token_type")->count == 3);
            const TensorInfo& t = v.info("blk.0.ffn_gate_exps.weight");
            CHECK(t.shape == std::vector<index_t>{4, 40, 32}); // ne = [32, 40, 4], outermost first
            CHECK(v.data(t).data() - bytes.data() >= 0);
            CHECK(std::uintptr_t(v.data(t).data() - bytes.data()) % align == 0);
            CHECK_THROWS_WITH_AS((void)v.string("x.i32"), doctest::Contains("metadata 'x.i32' is a i32, expected a string"), config_error);
            CHECK_THROWS_WITH_AS((void)v.integer("general.architecture"),
                                 doctest::Contains("metadata 'general.architecture' is a string, expected an integer"), config_error);
        }
}

TEST_CASE("GGUF: inspect-level description: family, blocks, types and bytes") {
    TempDir tmp("describe");
    const std::string file = (tmp.path / "m.gguf").string();
    test::gguf_from(Checkpoint(test::data_dir + "/deepseek_v3-basic"), {.experts = test::F16}).write(file);
    const Checkpoint ck(file);
    const ModelInfo m = describe(ck);
    CHECK(to_string(m.family) == "deepseek_v3");
    CHECK(ck.gguf_architecture() == "deepseek2");
    CHECK(m.moe_blocks == std::vector<MoeBlockRef>{{1, ""}, {2, ""}}); // leading dense block 0
    CHECK(m.experts == 8);
    CHECK(m.top_k == 2);
    CHECK(m.dtypes == std::set<std::string>{"F16", "F32"});
    CHECK(ck.expert_dtypes() == std::set<std::string>{"F16"});
    CHECK(ck.bytes_by_dtype().at("F16") == std::size_t(2 * (8 + 1) * 3 * 32 * 8 * 2));
    CHECK(ck.config_source() == file + " (GGUF metadata)");
}

TEST_CASE("expert_storage is the experts' stored BF16 / Q8_0 / Q4_0, q4_0 with Q2_K or Q3_K, q8_0 for other quants, else f32") {
    // A block whose rows are whole super-blocks (d_model = d_ff = 256), its experts rewritten.
    TempDir tmp("expert_storage");
    const std::string hf = (tmp.path / "hf").string();
    SyntheticModel model{.family = family("mixtral"), .d_model = 256, .d_ff = 256, .experts = 2, .top_k = 1, .layers = 1};
    write_synthetic_checkpoint(hf, model);
    const Checkpoint st(hf);
    CHECK(st.expert_storage() == dtype::f32); // F32 safetensors: the values as they are
    model.weights = dtype::bf16;
    write_synthetic_checkpoint((tmp.path / "hf_bf16").string(), model);
    CHECK(Checkpoint((tmp.path / "hf_bf16").string()).expert_storage() == dtype::bf16); // BF16 safetensors: as stored
    std::mt19937_64 rng(4);
    const std::uniform_real_distribution<float> scale(1.0f / 512, 1.0f / 128);
    const auto storage = [&](std::uint32_t gate_up, std::uint32_t down) {
        const std::string path = (tmp.path / "e.gguf").string();
        test::rewritten(test::gguf_from(st).bytes(), [&](const std::string& name, test::TensorEdit& t) {
            if (name.find("_exps") == std::string::npos) return true;
            t.type = name.find("down") != std::string::npos ? down : gate_up;
            if (t.type == test::F32 || t.type == test::F16 || t.type == test::BF16 || t.type == test::Q8_0 || t.type == test::Q4_0) {
                const auto f = reinterpret_cast<const float*>(t.bytes.data());
                t.bytes = test::encode(ConstMatrixView<float>(f, 2 * 256, 256), t.type);
            } else {
                t.bytes = test::random_ggml_quant(t.type, 2 * 256 * 256 / block_of(t.type), rng, scale);
            }
            return true;
        }).write(path);
        return Checkpoint(path).expert_storage();
    };
    CHECK(storage(test::F32, test::F32) == dtype::f32);
    CHECK(storage(test::F16, test::F16) == dtype::f32); // widened exactly
    CHECK(storage(test::BF16, test::BF16) == dtype::bf16);
    CHECK(storage(test::Q8_0, test::Q8_0) == dtype::q8_0);
    CHECK(storage(test::Q4_0, test::Q4_0) == dtype::q4_0);
    CHECK(storage(test::Q4_K, test::Q4_K) == dtype::q4_k); // held as stored
    CHECK(storage(test::Q4_K, test::Q6_K) == dtype::q8_0); // Q4_K_M's mix, requantised to 8 bits
    CHECK(storage(test::Q5_0, test::Q5_0) == dtype::q8_0);
    CHECK(storage(test::MXFP4, test::MXFP4) == dtype::mxfp4); // MXFP4_MOE: held as stored
    CHECK(storage(test::MXFP4, test::Q8_0) == dtype::q8_0);   // a mix of quants
    CHECK(storage(test::Q4_K, test::Q4_0) == dtype::q8_0); // a mix of quants
    CHECK(storage(test::Q2_K, test::Q3_K) == dtype::q4_0); // llama.cpp's Q2_K mix: coarser than q4_0
    CHECK(storage(test::Q3_K, test::Q3_K) == dtype::q4_0); // Q3_K_S
    CHECK(storage(test::Q3_K, test::Q5_K) == dtype::q4_0); // Q3_K_L: its Q5_K within Q3_K's error
    CHECK(storage(test::Q4_K, test::Q2_K) == dtype::q4_0);
    CHECK(storage(test::Q3_K, test::F16) == dtype::f32);   // a mix with F16: exact
    CHECK(storage(test::Q4_0, test::F32) == dtype::f32);   // a mix with F32: exact
    CHECK(storage(test::BF16, test::Q8_0) == dtype::f32);
}

TEST_CASE("expert_storage counts the shared experts' matrices (Qwen2-MoE's shared_expert, DeepSeek's shared_experts), not the shared gate") {
    // Routed experts in Q4_K (held as stored); the shared expert's matrices in `shared`; Qwen2-MoE's
    // shared_expert_gate stays F32, as every gate, and must not count.
    TempDir tmp("shared_storage");
    std::mt19937_64 rng(9);
    const std::uniform_real_distribution<float> scale(1.0f / 512, 1.0f / 128);
    for (const char* name : {"qwen2_moe", "deepseek_v3"}) {
        CAPTURE(name);
        const std::string hf = (tmp.path / name).string();
        write_synthetic_checkpoint(hf, {.family = *find_family(name), .d_model = 256, .d_ff = 256, .experts = 4, .top_k = 2, .layers = 1});
        const std::vector<std::byte> base = test::gguf_from(Checkpoint(hf)).bytes();
        const auto file = [&](std::uint32_t shared) {
            const std::string path = (tmp.path / (std::string(name) + std::to_string(shared) + ".gguf")).string();
            test::rewritten(base, [&](const std::string& tensor, test::TensorEdit& t) {
                const bool routed = tensor.find("_exps") != std::string::npos, shexp = tensor.find("_shexp") != std::string::npos;
                if ((!routed && !shexp) || tensor.find("gate_inp") != std::string::npos) return true;
                t.type = routed ? test::Q4_K : shared;
                t.bytes = test::random_ggml_quant(t.type, t.bytes.size() / sizeof(float) / block_of(t.type), rng, scale); // F32 before
                return true;
            }).write(path);
            return path;
        };
        const Checkpoint mixed(file(test::Q6_K)), same(file(test::Q4_K));
        CHECK(mixed.expert_dtypes() == std::set<std::string>{"Q4_K", "Q6_K"});
        CHECK(mixed.expert_storage() == dtype::q8_0);     // a mix of quants
        CHECK(mixed.expert_storage(true) == dtype::q8_0); // for the shared Q6_K ones (f32 when they went uncounted)
        CHECK(same.expert_dtypes() == std::set<std::string>{"Q4_K"});
        CHECK(same.expert_storage() == dtype::q4_k); // the F32 shared_expert_gate does not count
        // Loaded as `hypermoe` does by default: the routed experts in q4_k, the shared one in q8_0.
        const auto block = load_moe_block<reference>(mixed, 0, "", {.storage = mixed.expert_storage(true), .keep_stored = true});
        CHECK(block.expert_storages() == std::set<dtype>{dtype::q4_k, dtype::q8_0});
        const index_t shared_ff = describe(mixed).shared_ff;
        CHECK(block.expert_weight_bytes() ==
              4 * weight_bytes(dtype::q4_k, 3 * 256, 256) + weight_bytes(dtype::q8_0, std::size_t(3 * shared_ff), 256));
    }
}

TEST_CASE("GGUF: blocks of Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4 and super-blocks of Q2_K to Q6_K, IQ4_XS read as ggml's values, worked by hand") {
    // One block of each, all bytes 0 but those named; each value worked out in the comment.
    const auto at = [](std::vector<std::uint8_t>& b, std::size_t i, std::uint8_t v) { b[i] = v; };
    // Q4_K: d = 1 (half 0x3C00), dmin = 0.5 (0x3800). Scales: sub-block 0 sc = 2 (byte 0), m = 3
    // (byte 4); sub-block 5 sc = 1 (low nibble of byte 9) + 16 * 3 (top bits of byte 1) = 49,
    // m = 2 (high nibble of byte 9) + 16 * 1 (top bits of byte 5) = 18; sub-blocks 1 and 4 have
    // sc = m = 0 (bytes 1 and 5 keep their low 6 bits 0; bytes 8 and the top bits of 0 and 4 are 0).
    std::vector<std::uint8_t> q4(144, 0);
    at(q4, 0, 0x00), at(q4, 1, 0x3C), at(q4, 2, 0x00), at(q4, 3, 0x38);
    at(q4, 4 + 0, 2), at(q4, 4 + 4, 3), at(q4, 4 + 9, 0x21), at(q4, 4 + 1, 0xC0), at(q4, 4 + 5, 0x40);
    at(q4, 16 + 0, 0x7A);  // element 0 (sub-block 0, low nibble): q = 10 -> 2 * 10 - 0.5 * 3 = 18.5;
                           // element 32 (sub-block 1, high nibble): q = 7 -> 0 * 7 - 0 = 0
    at(q4, 16 + 64, 0xF0); // element 160 (sub-block 5, high nibble of byte 64): q = 15 -> 49 * 15 - 0.5 * 18 = 726;
                           // element 128 (sub-block 4, low nibble): 0
    // Q5_K: the same d, dmin and scales; qh (bytes 16-47) bit s of byte l adds 16 to element
    // 32 s + l's nibble (bytes 48-175). Element 0: nibble 10 + 16 = 26 -> 2 * 26 - 1.5 = 50.5;
    // element 161 (sub-block 5, l = 1): nibble 0 + 16 -> 49 * 16 - 9 = 775; element 1: 0 - 1.5.
    std::vector<std::uint8_t> q5(176, 0);
    for (std::size_t i = 0; i < 16; ++i) q5[i] = q4[i];
    at(q5, 48 + 0, 0x0A), at(q5, 16 + 0, 0x01), at(q5, 16 + 1, 0x20);
    // Q6_K: d = 0.5 (half 0x3800 at byte 208). Element 0: ql[0] low nibble 5, qh[0] bits 0-1 = 2:
    // q = (5 | 2 << 4) - 32 = 5, scale byte 192 = -3 -> 0.5 * -3 * 5 = -7.5.
    // Element 96 (quarter 3): ql[32] high nibble 9, qh[0] bits 6-7 = 3: (9 | 48) - 32 = 25, scale
    // byte 198 = 4 -> 50. Element 144 (half 1, l = 16): ql[80] low nibble 15, qh[176] bits 0-1 = 0:
    // 15 - 32 = -17, scale byte 201 = 127 -> 0.5 * 127 * -17 = -1079.5.
    std::vector<std::uint8_t> q6(210, 0);
    at(q6, 208, 0x00), at(q6, 209, 0x38), at(q6, 0, 0x05), at(q6, 128, 0xC2), at(q6, 192, 0xFD), at(q6, 32, 0x90), at(q6, 198, 4);
    at(q6, 80, 0x0F), at(q6, 201, 0x7F);
    // Q2_K: scale bytes 0-15 (sc low nibble, m high), qs 16-79, d = 1 at 80, dmin = 0.5 at 82.
    // Element 0 (half 0, g = 0, b = 0): qs[0] bits 0-1 = 3, sub-block 0: sc 2, m 3 -> 2 * 3 - 1.5 = 4.5;
    // element 1: q = 0 -> -1.5. Element 48 (g = 1, b = 16, sub-block 3): qs[16] bits 2-3 = 2, sc 7,
    // m 15 -> 14 - 7.5 = 6.5; element 16 (g = 0, b = 16, sub-block 1: byte 1 = 0): 0.
    // Element 200 (half 1, g = 2, b = 8, sub-block 12): qs[40] bits 4-5 = 3, sc 15, m 1 -> 45 - 0.5 = 44.5.
    std::vector<std::uint8_t> q2(84, 0);
    at(q2, 80, 0x00), at(q2, 81, 0x3C), at(q2, 82, 0x00), at(q2, 83, 0x38);
    at(q2, 0, 0x32), at(q2, 16 + 0, 0x03), at(q2, 3, 0xF7), at(q2, 16 + 16, 0x08), at(q2, 12, 0x1F), at(q2, 16 + 40, 0x30);
    // Q3_K: hmask 0-31, qs 32-95, scale bytes 96-107, d = 0.5 at 108. Sub-block 0's scale: low
    // nibble of byte 0 (5), top bits 0-1 of byte 8 (2) -> 37 - 32 = 5. Element 0: qs[0] bits 0-1 =
    // 3, hmask[0] bit 0 set -> 3 -> 0.5 * 5 * 3 = 7.5; element 1: q = 0, hmask[1] bit 0 clear -> -4
    // -> -10. Element 160 (half 1, g = 1, b = 0, sub-block 10): high nibble of byte 2 (10), bits 4-5
    // of byte 10 (3) -> 58 - 32 = 26; qs[32] bits 2-3 = 1, hmask[0] bit 5 clear -> -3 -> -39.
    // Element 255 (half 1, g = 3, b = 31, sub-block 15): high nibble of byte 7 (15), bits 6-7 of
    // byte 11 (3) -> 63 - 32 = 31; qs[63] bits 6-7 = 3, hmask[31] bit 7 set -> 3 -> 46.5.
    std::vector<std::uint8_t> q3(110, 0);
    at(q3, 108, 0x00), at(q3, 109, 0x38);
    at(q3, 96 + 0, 0x05), at(q3, 96 + 8, 0x02), at(q3, 32 + 0, 0x03), at(q3, 0, 0x01);
    at(q3, 96 + 2, 0xA0), at(q3, 96 + 10, 0x30), at(q3, 32 + 32, 0x04);
    at(q3, 96 + 7, 0xF0), at(q3, 96 + 11, 0xC0), at(q3, 32 + 63, 0xC0), at(q3, 31, 0x80);
    // IQ4_XS: d = 0.5 at 0, scales_h at 2-3, scales_l 4-7, nibbles 8-135; a nibble stands for
    // iq4nl_values[nibble]. Sub-block 0: low nibble of scales_l[0] (5), scales_h bits 0-1 (2) ->
    // 37 - 32 = 5. Element 0: low nibble of byte 8 (15 -> 113) -> 0.5 * 5 * 113 = 282.5; element
    // 16: its high nibble (0 -> -127) -> -317.5. Element 33 (sub-block 1, l = 1): high nibble of
    // scales_l[0] (10), scales_h bits 2-3 (0) -> -22; byte 8 + 17 low nibble 8 -> 1 -> -11.
    // Element 255 (sub-block 7, l = 31): high nibble of scales_l[3] (15), scales_h bits 14-15 (3)
    // -> 31; byte 8 + 127 high nibble 7 -> -10 -> -155.
    std::vector<std::uint8_t> iq4(136, 0);
    at(iq4, 0, 0x00), at(iq4, 1, 0x38), at(iq4, 2, 0x02), at(iq4, 3, 0xC0), at(iq4, 4, 0xA5), at(iq4, 7, 0xF0);
    at(iq4, 8, 0x0F), at(iq4, 8 + 17, 0x08), at(iq4, 8 + 127, 0x70);
    // The blocks of 32: element j < 16 is the low nibble of qs[j], element j + 16 its high one.
    // Q4_1: d = 1 at 0, m = -2.5 (half 0xC100) at 2, qs at 4. Element 0: low nibble of qs[0]
    // (10) -> 10 - 2.5 = 7.5; element 16: its high nibble (7) -> 4.5; element 31: high nibble of
    // qs[15] (15) -> 12.5; element 15: 0 -> -2.5.
    std::vector<std::uint8_t> q41(20, 0);
    at(q41, 1, 0x3C), at(q41, 2, 0x00), at(q41, 3, 0xC1), at(q41, 4 + 0, 0x7A), at(q41, 4 + 15, 0xF0);
    // Q5_0: d = 0.5 at 0, qh (a little-endian u32: bit j is element j's fifth bit) at 2, qs at 6.
    // Element 0: nibble 3, bit 0 set -> 19 - 16 = 3 -> 1.5; element 1: nibble 0, bit clear -> -16
    // -> -8; element 17: high nibble of qs[1] (12), bit 17 (qh byte 2, bit 1) set -> 28 - 16 -> 6;
    // element 8: nibble 5, bit 8 (qh byte 1, bit 0) set -> 21 - 16 -> 2.5; element 30: high
    // nibble of qs[14] (15), bit clear -> -1 -> -0.5.
    std::vector<std::uint8_t> q50(22, 0);
    at(q50, 1, 0x38), at(q50, 2, 0x01), at(q50, 3, 0x01), at(q50, 4, 0x02);
    at(q50, 6 + 0, 0x03), at(q50, 6 + 1, 0xC0), at(q50, 6 + 8, 0x05), at(q50, 6 + 14, 0xF0);
    // Q5_1: d = 0.25 (0x3400) at 0, m = 1 at 2, qh at 4, qs at 8. Element 0: nibble 15, bit 0 set
    // -> 31 -> 0.25 * 31 + 1 = 8.75; element 16: high nibble 1, bit clear -> 1.25; element 31:
    // nibble 0, bit 31 (qh byte 3, bit 7) set -> 16 -> 5; element 5: 0 -> 1.
    std::vector<std::uint8_t> q51(24, 0);
    at(q51, 1, 0x34), at(q51, 3, 0x3C), at(q51, 4, 0x01), at(q51, 7, 0x80), at(q51, 8 + 0, 0x1F);
    // IQ4_NL: d = 0.5 at 0, qs at 2; a nibble stands for iq4nl_values[nibble]. Element 0: 15 ->
    // 113 -> 56.5; element 16: 0 -> -127 -> -63.5; element 15: low nibble of qs[15] (7) -> -10
    // -> -5; element 31: its high nibble (8) -> 1 -> 0.5.
    std::vector<std::uint8_t> nl(18, 0);
    at(nl, 1, 0x38), at(nl, 2 + 0, 0x0F), at(nl, 2 + 15, 0x87);
    // MXFP4, three blocks of 17 bytes: the scale byte e at 0 (the scale is 2^(e - 128)), qs at 1;
    // a nibble stands for mxfp4_values[nibble] (E2M1 doubled). Block 0, e = 130 (scale 4):
    // element 0, low nibble of qs[0] (7 -> 12) -> 48; element 16, its high nibble (15 -> -12) ->
    // -48; element 15, low nibble of qs[15] (8, E2M1's -0 -> 0) -> 0; element 31, its high nibble
    // (9 -> -1) -> -4; element 1: nibble 0 -> 0. Block 1, e = 0 (2^-128, a subnormal float):
    // element 32, nibble 5 (6) -> 6 * 2^-128; element 48, nibble 14 (-8) -> -2^-125. Block 2,
    // e = 255 (2^127): element 64, nibble 1 -> 2^127; element 80, nibble 9 -> -2^127.
    std::vector<std::uint8_t> mx(3 * 17, 0);
    at(mx, 0, 130), at(mx, 1 + 0, 0xF7), at(mx, 1 + 15, 0x98);
    at(mx, 17, 0), at(mx, 17 + 1, 0xE5);
    at(mx, 34, 255), at(mx, 34 + 1, 0x91);

    test::GgufWriter w;
    w.string("general.architecture", "llama");
    const auto bytes = [](const std::vector<std::uint8_t>& b) {
        return std::vector<std::byte>(reinterpret_cast<const std::byte*>(b.data()), reinterpret_cast<const std::byte*>(b.data()) + b.size());
    };
    w.tensor("q4", test::Q4_K, {256}, bytes(q4));
    w.tensor("q5", test::Q5_K, {256}, bytes(q5));
    w.tensor("q6", test::Q6_K, {256}, bytes(q6));
    w.tensor("q2", test::Q2_K, {256}, bytes(q2));
    w.tensor("q3", test::Q3_K, {256}, bytes(q3));
    w.tensor("iq4", test::IQ4_XS, {256}, bytes(iq4));
    w.tensor("q41", test::Q4_1, {32}, bytes(q41));
    w.tensor("q50", test::Q5_0, {32}, bytes(q50));
    w.tensor("q51", test::Q5_1, {32}, bytes(q51));
    w.tensor("nl", test::IQ4_NL, {32}, bytes(nl));
    w.tensor("mx", test::MXFP4, {96}, bytes(mx));
    const std::vector<std::byte> image = w.bytes();
    const GgufView v(image, "k.gguf");
    const auto value = [&](const char* name, index_t i) { return v.element(v.info(name), i); };
    CHECK(v.info("q4").dtype == tensor_dtype::q4_k);
    CHECK(v.info("q4").type_string() == "Q4_K");
    CHECK(value("q4", 0) == 18.5);
    CHECK(value("q4", 32) == 0.0);
    CHECK(value("q4", 160) == 726.0);
    CHECK(value("q4", 128) == 0.0);
    CHECK(value("q4", 1) == -1.5); // nibble 0 of sub-block 0: 0 - 0.5 * 3
    CHECK(value("q5", 0) == 50.5);
    CHECK(value("q5", 161) == 775.0);
    CHECK(value("q5", 1) == -1.5);
    CHECK(value("q6", 0) == -7.5);
    CHECK(value("q6", 96) == 50.0);
    CHECK(value("q6", 144) == -1079.5);
    CHECK(value("q6", 1) == 0.5 * -3 * -32); // every byte 0: q = -32
    CHECK(v.info("q2").dtype == tensor_dtype::q2_k);
    CHECK(v.info("q3").type_string() == "Q3_K");
    CHECK(value("q2", 0) == 4.5);
    CHECK(value("q2", 1) == -1.5);
    CHECK(value("q2", 48) == 6.5);
    CHECK(value("q2", 16) == 0.0);
    CHECK(value("q2", 200) == 44.5);
    CHECK(value("q3", 0) == 7.5);
    CHECK(value("q3", 1) == -10.0);
    CHECK(value("q3", 160) == -39.0);
    CHECK(value("q3", 255) == 46.5);
    CHECK(v.info("iq4").type_string() == "IQ4_XS");
    CHECK(value("iq4", 0) == 282.5);
    CHECK(value("iq4", 16) == -317.5);
    CHECK(value("iq4", 33) == -11.0);
    CHECK(value("iq4", 255) == -155.0);
    CHECK(v.info("q41").dtype == tensor_dtype::q4_1);
    CHECK(value("q41", 0) == 7.5);
    CHECK(value("q41", 16) == 4.5);
    CHECK(value("q41", 31) == 12.5);
    CHECK(value("q41", 15) == -2.5);
    CHECK(v.info("q50").type_string() == "Q5_0");
    CHECK(value("q50", 0) == 1.5);
    CHECK(value("q50", 1) == -8.0);
    CHECK(value("q50", 17) == 6.0);
    CHECK(value("q50", 8) == 2.5);
    CHECK(value("q50", 30) == -0.5);
    CHECK(v.info("q51").dtype == tensor_dtype::q5_1);
    CHECK(value("q51", 0) == 8.75);
    CHECK(value("q51", 16) == 1.25);
    CHECK(value("q51", 31) == 5.0);
    CHECK(value("q51", 5) == 1.0);
    CHECK(v.info("nl").type_string() == "IQ4_NL");
    CHECK(value("nl", 0) == 56.5);
    CHECK(value("nl", 16) == -63.5);
    CHECK(value("nl", 15) == -5.0);
    CHECK(value("nl", 31) == 0.5);
    CHECK(v.info("mx").dtype == tensor_dtype::mxfp4);
    CHECK(v.info("mx").type_string() == "MXFP4");
    CHECK(value("mx", 0) == 48.0);
    CHECK(value("mx", 16) == -48.0);
    CHECK(value("mx", 15) == 0.0);
    CHECK(value("mx", 31) == -4.0);
    CHECK(value("mx", 1) == 0.0);
    CHECK(value("mx", 32) == std::ldexp(6.0, -128));
    CHECK(value("mx", 48) == -std::ldexp(1.0, -125));
    CHECK(value("mx", 64) == std::ldexp(1.0, 127));
    CHECK(value("mx", 80) == -std::ldexp(1.0, 127));
    // to_f32 gives the same values, as the loop-form decoder does.
    const std::map<std::string, std::uint32_t> types = {{"q2", test::Q2_K},   {"q3", test::Q3_K},   {"q4", test::Q4_K},
                                                         {"q5", test::Q5_K},   {"q6", test::Q6_K},   {"iq4", test::IQ4_XS},
                                                         {"q41", test::Q4_1},  {"q50", test::Q5_0},  {"q51", test::Q5_1},
                                                         {"nl", test::IQ4_NL}, {"mx", test::MXFP4}};
    for (const auto& entry : types) {
        const std::string& name = entry.first; // not a structured binding: clang 14 cannot capture one
        const std::uint32_t type = entry.second;
        CAPTURE(name);
        const TensorInfo& t = v.info(name);
        const Matrix<float> m = v.to_f32(t);
        const index_t n = block_of(type), blocks = t.numel() / n;
        REQUIRE(t.numel() == blocks * n);
        const std::size_t size = v.data(t).size() / std::size_t(blocks);
        for (index_t b = 0; b < blocks; ++b) {
            const auto want = decode_ggml_quant(type, v.data(t).data() + std::size_t(b) * size);
            for (index_t i = 0; i < n; ++i) CHECK(m.data()[b * n + i] == want[std::size_t(i)]);
        }
    }
    // Random super-blocks of every type: the library's element-wise reading against the loop form.
    for (const auto& entry : types) {
        const std::string& name = entry.first;
        const std::uint32_t type = entry.second;
        CAPTURE(name);
        const std::vector<std::byte> blocks = random_ggml_quant(type, 16, 99);
        const index_t n = block_of(type);
        test::GgufWriter r;
        r.string("general.architecture", "llama");
        r.tensor("w", type, {n, 16}, blocks);
        const std::vector<std::byte> file = r.bytes();
        const GgufView rv(file, "r.gguf");
        const Matrix<float> m = rv.to_f32(rv.info("w"));
        const std::size_t size = blocks.size() / 16;
        for (index_t b = 0; b < 16; ++b) {
            const auto want = decode_ggml_quant(type, blocks.data() + std::size_t(b) * size);
            for (index_t i = 0; i < n; ++i) CHECK(m(b, i) == want[std::size_t(i)]);
        }
    }
}

TEST_CASE_TEMPLATE_DEFINE("GGUF: experts in every widened ggml quant give the block their values give as F32", B, ggml_quants) {
    // A Mixtral-like block (d_model = 256, 3 experts) converted to GGUF, its expert tensors
    // replaced by random blocks of a ggml quant the library widens; the same file with those
    // experts' values (decoded apart) as F32 must give the same outputs, bit for bit. The
    // K-quants with d_ff = 256 (rows of whole super-blocks); the blocks of 32 with d_ff = 96,
    // which no super-block divides, as llama.cpp stores such a block: Qwen1.5-MoE's Q4_K_M file
    // holds its gate and up (rows of d_model) in Q4_K and its down projection (rows of d_ff) in
    // Q5_0; Q5_K_M's in Q5_K and Q5_1, IQ4_XS's in IQ4_XS and IQ4_NL. MXFP4 (llama.cpp's
    // MXFP4_MOE files) holds the experts throughout.
    struct Case {
        std::uint32_t gate_up, down;
        index_t ff;
    };
    const Case cases[] = {{test::Q2_K, test::Q2_K, 256},     {test::Q3_K, test::Q3_K, 256}, {test::Q4_K, test::Q4_K, 256},
                          {test::Q5_K, test::Q5_K, 256},     {test::Q6_K, test::Q6_K, 256}, {test::IQ4_XS, test::IQ4_XS, 256},
                          {test::Q4_1, test::Q4_1, 96},      {test::Q4_K, test::Q5_0, 96},  {test::Q5_K, test::Q5_1, 96},
                          {test::IQ4_XS, test::IQ4_NL, 96},  {test::MXFP4, test::MXFP4, 96}};
    TempDir tmp("ggml_quants");
    std::map<index_t, std::vector<std::byte>> bases; // by d_ff
    for (const index_t ff : {96, 256}) {
        const std::string dir = (tmp.path / ("hf" + std::to_string(ff))).string();
        write_synthetic_checkpoint(dir, {.family = family("mixtral"), .d_model = 256, .d_ff = ff, .experts = 3, .top_k = 2, .layers = 1});
        bases[ff] = test::gguf_from(Checkpoint(dir)).bytes();
    }
    const Matrix<float> x = test::random_matrix(5, 256, 3);
    std::uint64_t seed = 10;
    for (const Case& c : cases) {
        CAPTURE(c.gate_up);
        CAPTURE(c.down);
        const index_t ff = c.ff;
        std::map<std::string, std::vector<std::byte>> blocks, values;
        std::map<std::string, std::vector<std::int64_t>> ne;
        std::map<std::string, std::uint32_t> types;
        for (const char* g : {"gate", "up", "down"}) {
            const std::string name = std::string("blk.0.ffn_") + g + "_exps.weight";
            const bool down = std::string(g) == "down";
            types[name] = down ? c.down : c.gate_up;
            ne[name] = down ? std::vector<std::int64_t>{ff, 256, 3} : std::vector<std::int64_t>{256, ff, 3};
            const index_t count = 3 * 256 * ff / block_of(types[name]); // 3 experts x 256 x ff weights
            blocks[name] = random_ggml_quant(types[name], count, ++seed);
            const std::size_t size = blocks[name].size() / std::size_t(count);
            for (index_t i = 0; i < count; ++i)
                for (const float f : decode_ggml_quant(types[name], blocks[name].data() + std::size_t(i) * size))
                    test::GgufWriter::put(values[name], f);
        }
        const auto file = [&](const std::string& path, bool quantised) {
            test::rewritten(bases[ff], [&](const std::string& name, test::TensorEdit& t) {
                if (blocks.count(name) != 0) t = {quantised ? types[name] : test::F32, ne[name], quantised ? blocks[name] : values[name]};
                return true;
            }).write(path);
            return path;
        };
        const Checkpoint k(file((tmp.path / "k.gguf").string(), true)), f(file((tmp.path / "f.gguf").string(), false));
        const Matrix<float> yk = forward<B>(k, 0, x.view(), {}), yf = forward<B>(f, 0, x.view(), {});
        CHECK(max_abs_diff(yk.view(), yf.view()) == 0.0f);
        CHECK(max_abs_diff(yf.view(), Matrix<float>(5, 256).view()) > 0.0f); // the block is not all zeros
        // Converted to f32 by default; on request rounded to bf16 or requantised to q8_0 / q4_0 /
        // mxfp4, a row at a time straight into that type (TensorBinder::materialise; MXFP4 into
        // mxfp4: its blocks as stored, which quantising their values gives back, or the same
        // values under another scale): the same bits as the expert converting the F32 file's
        // values. (mxfp4 on AVX2 `exact` sums codes = value + 12 and takes 12 x the inputs' sum
        // off, so the same values under another scale agree to f32 rounding, not bit for bit.)
        for (const dtype storage : {dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::mxfp4}) {
            CAPTURE(storage);
            const Matrix<float> sk = forward<B>(k, 0, x.view(), {.storage = storage}), sf = forward<B>(f, 0, x.view(), {.storage = storage});
            if (storage == dtype::mxfp4) CHECK(relative_error(sk.view(), sf.view()) <= 1e-6);
            else CHECK(max_abs_diff(sk.view(), sf.view()) == 0.0f);
        }
        // Q4_K experts held as stored (a file's default storage when every expert is Q4_K): the
        // values ggml's dequantize_row_q4_K gives these random super-blocks (every 6-bit scale
        // and min layout), so within f32 rounding of the F32 file's with `exact`, and within the
        // 8-bit activations' step with `fast`.
        if (c.gate_up == test::Q4_K && c.down == test::Q4_K) {
            CHECK(k.expert_storage() == dtype::q4_k);
            const Matrix<float> exact = forward<B>(k, 0, x.view(), {.storage = dtype::q4_k}),
                                fast = forward<B>(k, 0, x.view(), {.storage = dtype::q4_k, .prec = precision::fast});
            CHECK(relative_error(exact.view(), yf.view()) <= 1e-5);
            CHECK(relative_error(fast.view(), yf.view()) <= 3e-2);
        }
        // MXFP4 and Q4_K are formats experts are held in, so their tensors are viewed in place in
        // the mapping, as Q8_0's and Q4_0's are (the linear map widens them for f32 storage).
        const bool held = c.gate_up == test::MXFP4 || c.gate_up == test::Q4_K;
        if (std::is_same_v<B, reference> && held) {
            TensorBinder in_place(k, "in place");
            const std::string w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight";
            const WeightView v = in_place.deferred_matrix(w1, ff, 256);
            in_place.finish();
            const Checkpoint::Ref source = k.find(w1);
            CHECK(v.type() == (c.gate_up == test::MXFP4 ? dtype::mxfp4 : dtype::q4_k));
            CHECK(v.extent().data() == source.file->data(*source.info).data());
        }
        // The loader converts an expert's widened quantised tensors only as it packs that expert
        // (TensorBinder::deferred_matrix, materialise, release): the same values as matrix()'s
        // eager conversion; an F32 tensor is viewed in place either way.
        if (std::is_same_v<B, reference> && !held) {
            TensorBinder eager(k, "eager"), deferred(k, "deferred");
            const std::string w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight", gate = "model.layers.0.block_sparse_moe.gate.weight";
            const WeightView e = eager.matrix(w1, ff, 256), d = deferred.deferred_matrix(w1, ff, 256);
            deferred.finish();
            deferred.materialise(d);
            deferred.materialise(d); // once only
            REQUIRE(d.type() == dtype::f32);
            CHECK(std::memcmp(d.extent().data(), e.extent().data(), std::size_t(ff) * 256 * sizeof(float)) == 0);
            CHECK(deferred.deferred_matrix(gate, 3, 256).extent().data() == eager.matrix(gate, 3, 256).extent().data());
            // Once converted, the quantised bytes it was converted from leave this process's
            // memory (materialise() drops them; the mapping is private and read-only: they fault
            // back in from the file if read again).
            const Checkpoint::Ref source = k.find(w1);
            const auto from = source.file->data(*source.info);
            REQUIRE(from.size() == blocks["blk.0.ffn_gate_exps.weight"].size() / 3); // expert 1's third
            const auto [mapped, pages] = present_pages(from);
            REQUIRE(pages >= 2); // IQ4_XS's 13 KiB at d_ff = 96 (the fewest) hold at least 2 whole pages
            if (mapped < 0) {
                MESSAGE("/proc/self/pagemap is not readable here: the page release check is skipped");
            } else {
                CHECK(mapped == 0);
                (void)eager.matrix(w1, ff, 256); // converting again maps them all again
                CHECK(present_pages(from).first == pages);
            }
            deferred.release(d);
            // For q4_0 storage the buffer holds q4_0 blocks: each row quantised from its values.
            TensorBinder q(k, "q4_0");
            const WeightView dq = q.deferred_matrix(w1, ff, 256, dtype::q4_0);
            q.finish();
            q.materialise(dq);
            REQUIRE(dq.type() == dtype::q4_0);
            std::vector<BlockQ4_0> row(256 / 32);
            for (index_t r = 0; r < ff; ++r) {
                quantize_row(std::span(reinterpret_cast<const float*>(e.row_bytes(r)), 256), std::span(row), "row");
                CHECK(std::memcmp(dq.row_bytes(r), row.data(), row.size() * sizeof(BlockQ4_0)) == 0);
            }
            // A GLU's gate and up converted into one buffer, up's rows right after gate's: the
            // [gate; up] stack GluExpert then views in place.
            TensorBinder sb(k, "stack");
            const std::string w3 = "model.layers.0.block_sparse_moe.experts.1.w3.weight";
            const std::pair<WeightView, WeightView> st = sb.deferred_stack(w1, w3, ff, 256, dtype::q4_0);
            sb.finish();
            sb.materialise(st.first);
            sb.materialise(st.second);
            REQUIRE(st.first.type() == dtype::q4_0);
            REQUIRE(st.second.type() == dtype::q4_0);
            CHECK(st.second.row_bytes(0) == st.first.row_bytes(0) + std::size_t(ff) * row.size() * sizeof(BlockQ4_0));
            CHECK(std::memcmp(st.first.row_bytes(0), dq.row_bytes(0), std::size_t(ff) * row.size() * sizeof(BlockQ4_0)) == 0);
            sb.release(st.first);
            sb.release(st.second);
        }
        // A trainer holds their values too (expert 1's gate: the second ff x 256 slice).
        if (std::is_same_v<B, reference>) {
            ParameterStore store{k};
            const auto v = store.values("model.layers.0.block_sparse_moe.experts.1.w1.weight");
            REQUIRE(v.size() == std::size_t(ff) * 256);
            CHECK(std::memcmp(v.data(), values["blk.0.ffn_gate_exps.weight"].data() + v.size() * sizeof(float), v.size() * sizeof(float)) == 0);
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(ggml_quants, test::all_backends);

TEST_CASE("GGUF: a non-finite value converted from a quantised expert is a weight_error naming its tensor") {
    // Expert 0's gate in Q4_1 whose first block has d = inf (half 0x7C00), nibble 1 first and every
    // other byte 0: element (0, 0) is inf * 1 + 0 = inf. Converted into f32 the expert's linear map reports it
    // (by its own name); converted straight into q4_0 or bf16 the loader reports the tensor.
    TempDir tmp("nonfinite");
    const std::string dir = (tmp.path / "hf").string();
    write_synthetic_checkpoint(dir, {.family = family("mixtral"), .d_model = 64, .d_ff = 32, .experts = 2, .top_k = 1, .layers = 1});
    const std::string file = (tmp.path / "nan.gguf").string();
    test::rewritten(test::gguf_from(Checkpoint(dir)).bytes(), [](const std::string& name, test::TensorEdit& t) {
        if (name != "blk.0.ffn_gate_exps.weight") return true;
        std::vector<std::byte> bytes(2 * 32 * 2 * 20); // 2 experts x 32 rows x 2 blocks
        bytes[1] = std::byte{0x7C}, bytes[4] = std::byte{0x01};
        t = {test::Q4_1, {64, 32, 2}, bytes};
        return true;
    }).write(file);
    const Checkpoint ck(file);
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 0), doctest::Contains("weight element (0, 0) is inf, expected a finite value"),
                         weight_error);
    for (const dtype storage : {dtype::bf16, dtype::q4_0}) {
        CAPTURE(storage);
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 0, "", {.storage = storage}),
                             doctest::Contains(("'model.layers.0.block_sparse_moe.experts.0.w1.weight' (GGUF 'blk.0.ffn_gate_exps.weight' "
                                                "expert 0) in " + file + ": weight element (0, 0) is inf, expected a finite value")
                                                   .c_str()),
                             weight_error);
    }
    // MXFP4, expert 0's gate row 1: scale byte 253 and nibble 7 make 12 x 2^125 = inf at column 52.
    // Held as stored or widened to f32, the expert's linear map reports it; converted into
    // q8_0, the loader names the tensor.
    const std::string mx = (tmp.path / "mx.gguf").string();
    test::rewritten(test::gguf_from(Checkpoint(dir)).bytes(), [](const std::string& name, test::TensorEdit& t) {
        if (name != "blk.0.ffn_gate_exps.weight") return true;
        std::vector<std::byte> bytes(2 * 32 * 2 * 17); // 2 experts x 32 rows x 2 blocks
        for (std::size_t b = 0; b < bytes.size(); b += 17) bytes[b] = std::byte{120};
        bytes[17 * 3] = std::byte{253}, bytes[17 * 3 + 1 + 4] = std::byte{0x70}; // row 1, block 1: element 32 + 20
        t = {test::MXFP4, {64, 32, 2}, bytes};
        return true;
    }).write(mx);
    const Checkpoint mk(mx);
    for (const dtype storage : {dtype::mxfp4, dtype::f32})
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(mk, 0, "", {.storage = storage}),
                             doctest::Contains("weight element (1, 52) is inf, expected a finite value"), weight_error);
    CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(mk, 0, "", {.storage = dtype::q8_0}),
                         doctest::Contains(("'model.layers.0.block_sparse_moe.experts.0.w1.weight' (GGUF 'blk.0.ffn_gate_exps.weight' "
                                            "expert 0) in " + mx + ": weight element (1, 52) is inf, expected a finite value")
                                               .c_str()),
                         weight_error);
}

TEST_CASE("GGUF: unsupported types, missing tensors and metadata give typed errors that name them") {
    TempDir tmp("errors");
    const std::string file = (tmp.path / "m.gguf").string();
    const Checkpoint st(test::data_dir + "/mixtral-basic");

    // Block 1's up experts in IQ2_XXS (a grid type, in llama.cpp's smallest files; rows of 256, a
    // different shape too, but the type is reported): the file opens and describes, block 0
    // loads, block 1 names the tensor and its type.
    {
        test::rewritten(test::gguf_from(st).bytes(), [](const std::string& name, test::TensorEdit& t) {
            if (name == "blk.1.ffn_up_exps.weight") t = {test::IQ2_XXS, {256, 5, 4}, std::vector<std::byte>(4 * 5 * 66)};
            return true;
        }).write(file);
        const Checkpoint ck(file);
        CHECK(describe(ck).dtypes.count("IQ2_XXS") == 1);
        CHECK_NOTHROW((void)load_moe_block<reference>(ck, 0));
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 1),
                             doctest::Contains(("'model.layers.1.block_sparse_moe.experts.0.w3.weight' (GGUF "
                                                "'blk.1.ffn_up_exps.weight' expert 0) in " + file +
                                                " has dtype IQ2_XXS, expected F32, BF16, F16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4, Q2_K, Q3_K, Q4_K, "
                                                "Q5_K, Q6_K or IQ4_XS")
                                                   .c_str()),
                             weight_error);
        // Nor can a trainer hold it (it would have to widen it).
        CHECK_THROWS_WITH_AS(ParameterStore{ck},
                             doctest::Contains("'model.layers.1.block_sparse_moe.experts.0.w3.weight' (GGUF 'blk.1.ffn_up_exps.weight' "
                                               "expert 0) has dtype IQ2_XXS, which cannot be held for training"),
                             weight_error);
    }
    // A missing expert tensor names the GGUF tensors it is read from.
    {
        test::rewritten(test::gguf_from(st).bytes(), [](const std::string& name, test::TensorEdit&) { return name != "blk.0.ffn_down_exps.weight"; })
            .write(file);
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(Checkpoint(file), 0),
                             doctest::Contains("missing tensor 'model.layers.0.block_sparse_moe.experts.2.w2.weight' (GGUF "
                                               "'blk.0.ffn_down_exps.weight' or 'blk.0.ffn_down.2.weight')"),
                             weight_error);
    }
    // Wrong dims: the router's matrix stored transposed, and a merged tensor of 3 experts for 4.
    {
        test::rewritten(test::gguf_from(st).bytes(), [](const std::string& name, test::TensorEdit& t) {
            if (name == "blk.0.ffn_gate_inp.weight") std::swap(t.ne[0], t.ne[1]);
            if (name == "blk.0.ffn_up_exps.weight") t.ne = {32, 40, 3}, t.bytes.resize(t.bytes.size() / 4 * 3);
            return true;
        }).write(file);
        const Checkpoint ck(file);
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 0),
                             doctest::Contains(("'model.layers.0.block_sparse_moe.gate.weight' (GGUF 'blk.0.ffn_gate_inp.weight') in " + file +
                                                " has shape [32, 4], expected [4, 32]").c_str()),
                             weight_error);
        CHECK_THROWS_WITH_AS((void)load_moe_block<reference>(ck, 0),
                             doctest::Contains("'model.layers.0.block_sparse_moe.experts.3.w3.weight' (GGUF 'blk.0.ffn_up_exps.weight' "
                                               "[3, 40, 32], expected [4, N, K])"),
                             weight_error);
    }
    // Metadata: no architecture, an unsupported one, a llama without experts, a missing key, a wrong type.
    const auto with = [&](const std::function<void(test::GgufWriter&)>& f) {
        test::GgufWriter w;
        f(w);
        w.write(file);
        return file;
    };
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto&) {})), doctest::Contains("no metadata 'general.architecture'"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) { w.string("general.architecture", "gemma"); })),
                         doctest::Contains("general.architecture is \"gemma\"; supported MoE architectures: llama (with experts), "
                                           "qwen2moe, qwen3moe, olmoe, deepseek2"),
                         config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "llama");
                             w.u32("llama.block_count", 2);
                             w.u32("llama.embedding_length", 32);
                         })),
                         doctest::Contains("llama model without experts (llama.expert_count is absent or 0): not an MoE model"),
                         config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "olmoe");
                             w.u32("olmoe.block_count", 2);
                             w.u32("olmoe.embedding_length", 32);
                             w.u32("olmoe.expert_count", 4);
                             w.u32("olmoe.expert_used_count", 2);
                         })),
                         doctest::Contains("no metadata 'olmoe.expert_feed_forward_length'"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "qwen2moe");
                             w.string("qwen2moe.block_count", "two");
                         })),
                         doctest::Contains("metadata 'qwen2moe.block_count' is a string, expected an integer"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "olmoe");
                             w.u32("olmoe.block_count", 2);
                             w.u32("olmoe.embedding_length", 32);
                             w.u32("olmoe.expert_count", 5000);
                         })),
                         doctest::Contains("metadata 'olmoe.expert_count' is 5000, expected an integer in [0, 4096]"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "deepseek2");
                             w.u32("deepseek2.block_count", 2);
                             w.u32("deepseek2.embedding_length", 32);
                             w.u32("deepseek2.expert_count", 4);
                             w.u32("deepseek2.expert_used_count", 2);
                             w.u32("deepseek2.expert_feed_forward_length", 8);
                             w.u32("deepseek2.expert_gating_func", 3);
                         })),
                         doctest::Contains("'deepseek2.expert_gating_func' is 3, expected 1 (softmax) or 2 (sigmoid)"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint(with([](auto& w) {
                             w.string("general.architecture", "llama");
                             w.u32("split.count", 3);
                         })),
                         doctest::Contains("one part of a split GGUF model (split.count = 3)"), config_error);
    CHECK_THROWS_WITH_AS(Checkpoint((tmp.path / "nope.gguf").string()), doctest::Contains("neither a checkpoint directory nor a GGUF file"),
                         config_error);
}

TEST_CASE("GGUF: malformed files give weight_errors naming the problem, and no prefix of a file reads out of bounds") {
    const auto base = test::gguf_from(Checkpoint(test::data_dir + "/olmoe-basic")).bytes();
    // Every truncation fails cleanly (the data section's end included).
    for (std::size_t n = 0; n < base.size(); n += (n < 2048 ? 1 : 97)) {
        CAPTURE(n);
        CHECK_THROWS_AS(GgufView(std::span(base.data(), n), "cut"), weight_error);
    }
    CHECK_NOTHROW(GgufView(base, "whole"));

    const auto fails = [](const std::vector<std::byte>& bytes, const std::string& what) {
        CAPTURE(what);
        CHECK_THROWS_WITH_AS(GgufView(bytes, "bad.gguf"), doctest::Contains(what.c_str()), weight_error);
    };
    const auto header = [](std::uint32_t version, std::uint64_t tensors, std::uint64_t kvs) {
        std::vector<std::byte> b{std::byte{'G'}, std::byte{'G'}, std::byte{'U'}, std::byte{'F'}};
        test::GgufWriter::put(b, version);
        test::GgufWriter::put(b, tensors);
        test::GgufWriter::put(b, kvs);
        return b;
    };
    const auto key = [](std::vector<std::byte> b, const std::string& k, std::uint32_t type) {
        test::GgufWriter::put_string(b, k);
        test::GgufWriter::put(b, type);
        return b;
    };
    std::vector<std::byte> magic = base;
    magic[0] = std::byte{0x7f};
    fails(magic, "not a GGUF file: it starts with \"\\x7fGUF\", expected \"GGUF\"");
    fails(header(1, 0, 0), "GGUF version 1 is not supported");
    fails(header(0x03000000u, 0, 0), "big-endian GGUF file");
    fails(header(7, 0, 0), "GGUF version is 7, expected 2 or 3");
    fails(header(3, 0, std::uint64_t(1) << 60), "the header declares 1152921504606846976 metadata entries");
    fails(header(3, std::uint64_t(1) << 60, 0), "the header declares 1152921504606846976 tensors");
    {
        auto b = header(3, 0, 1);
        test::GgufWriter::put(b, std::uint64_t(1) << 62); // a key length past the end
        b.resize(b.size() + 16);
        fails(b, "truncated: metadata key 0 needs 4611686018427387904 bytes at offset 32, but the file has 16 left");
    }
    {
        auto b = key(header(3, 0, 1), "a", 9);
        test::GgufWriter::put(b, std::uint32_t(8));
        test::GgufWriter::put(b, std::uint64_t(1) << 61);
        fails(b, "truncated: metadata 'a' declares 2305843009213693952 string elements");
    }
    {
        auto b = key(header(3, 0, 1), "a", 9);
        test::GgufWriter::put(b, std::uint32_t(9));
        test::GgufWriter::put(b, std::uint64_t(0));
        fails(b, "metadata 'a' is an array of arrays");
    }
    fails(key(header(3, 0, 1), "a", 13), "metadata 'a' has unknown value type 13");
    {
        auto b = key(header(3, 0, 1), "b", 7);
        b.push_back(std::byte{2});
        fails(b, "metadata 'b' is a bool holding 2, expected 0 or 1");
    }
    {
        auto b = key(header(3, 0, 2), "k", 4);
        test::GgufWriter::put(b, std::uint32_t(1));
        b = key(b, "k", 4);
        test::GgufWriter::put(b, std::uint32_t(1));
        fails(b, "metadata key 'k' appears twice");
    }
    {
        auto b = key(header(3, 0, 1), "general.alignment", 4);
        test::GgufWriter::put(b, std::uint32_t(24));
        fails(b, "metadata 'general.alignment' is 24, expected a power of two");
        auto c = key(header(3, 0, 1), "general.alignment", 5);
        test::GgufWriter::put(c, std::int32_t(32));
        fails(c, "metadata 'general.alignment' is a i32, expected a u32");
    }
    // Tensor infos.
    const auto tensor = [&](std::vector<std::int64_t> ne, std::uint32_t type, std::uint64_t offset, std::size_t data = 64,
                            int count = 1, const std::string& second = "t2") {
        auto b = header(3, std::uint64_t(count), 0);
        for (int i = 0; i < count; ++i) {
            test::GgufWriter::put_string(b, i == 0 ? "t" : second);
            test::GgufWriter::put(b, std::uint32_t(ne.size()));
            for (const auto n : ne) test::GgufWriter::put(b, n);
            test::GgufWriter::put(b, type);
            test::GgufWriter::put(b, i == 0 ? offset : std::uint64_t(0));
        }
        b.resize((b.size() + 31) / 32 * 32 + data);
        return b;
    };
    CHECK_NOTHROW(GgufView(tensor({4, 2}, test::F32, 32), "ok"));
    { // An empty tensor (and an empty data section) is valid, and reads as an empty matrix (the fuzzer's find).
        const auto empty = tensor({0}, test::F32, 0, 0);
        const GgufView v(empty, "empty");
        CHECK(v.to_f32(v.info("t")).rows() * v.to_f32(v.info("t")).cols() == 0);
    }
    fails(tensor({1, 1, 1, 1, 1}, test::F32, 0), "tensor 't' has 5 dimensions, expected at most 4");
    fails(tensor({-4}, test::F32, 0), "tensor 't' has dimension 0 = -4, expected a non-negative size");
    fails(tensor({std::int64_t(1) << 40, std::int64_t(1) << 40}, test::F32, 0), "tensor 't' has too many elements");
    // A zero dimension does not let the others overflow (the fuzzer's find: numel() multiplies outermost first).
    fails(tensor({0, std::int64_t(1) << 45, std::int64_t(1) << 43}, test::F32, 0), "tensor 't' has too many elements");
    fails(tensor({4}, 5, 0), "tensor 't' has ggml type id 5, which is not a ggml type");
    fails(tensor({48}, test::Q8_0, 0), "tensor 't' has 48 elements per row, not a whole number of Q8_0 blocks of 32");
    fails(tensor({4}, test::F32, 16), "tensor 't' starts at data offset 16, not a multiple of the alignment 32");
    fails(tensor({32}, test::F32, 0), "tensor 't' (F32 [32], 128 bytes at data offset 0) runs past the 64 data bytes of the file");
    fails(tensor({4}, test::F32, std::uint64_t(1) << 63), "runs past the 64 data bytes");
    fails(tensor({8}, test::F32, 0, 64, 2), "[0, 32) overlap");
    fails(tensor({8}, test::F32, 0, 64, 2, "t"), "tensor name 't' appears twice");
}

TEST_CASE_TEMPLATE_APPLY(every_type, test::all_backends);

TEST_CASE("GGUF: loading a block reads only that block's tensors from the file") {
    TempDir tmp("pages");
    const std::string src = (tmp.path / "src").string(), file = (tmp.path / "m.gguf").string();
    write_synthetic_checkpoint(src, {.family = family("mixtral"), .d_model = 256, .d_ff = 1024, .experts = 8, .top_k = 2, .layers = 3});
    test::gguf_from(Checkpoint(src)).write(file); // 3 blocks of 24 MiB of F32 experts
    fs::remove_all(src);
    // Drop the file's pages from the page cache, then count which are read back.
    const int fd = ::open(file.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    const std::size_t size = fs::file_size(file);
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    REQUIRE(map != MAP_FAILED);
    const auto* base = static_cast<const std::byte*>(map);
    const auto page = std::size_t(::sysconf(_SC_PAGESIZE));
    const auto resident = [&](std::size_t begin, std::size_t end) { // pages of [begin, end) in the page cache
        begin = begin / page * page;
        std::vector<unsigned char> v((end - begin + page - 1) / page);
        REQUIRE(::mincore(const_cast<std::byte*>(base) + begin, end - begin, v.data()) == 0);
        std::size_t n = 0;
        for (const unsigned char c : v) n += c & 1u;
        return n;
    };
    if (resident(0, size) > size / page / 10) {
        MESSAGE("this file system keeps the file's pages cached (tmpfs?): the residency check is skipped");
    } else {
        // Block 0's and block 1's byte ranges, from the file's own header (read through read(), not the mapping).
        std::vector<std::byte> bytes(size);
        REQUIRE(::pread(fd, bytes.data(), size, 0) == ssize_t(size));
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        const GgufView v(bytes, "m.gguf");
        const auto range = [&](const std::string& prefix) {
            std::size_t lo = size, hi = 0;
            for (const TensorInfo& t : v.tensors())
                if (t.name.rfind(prefix, 0) == 0) {
                    lo = std::min(lo, std::size_t(v.data(t).data() - bytes.data()));
                    hi = std::max(hi, std::size_t(v.data(t).data() - bytes.data()) + v.data(t).size());
                }
            return std::pair{lo, hi};
        };
        const auto [b1, e1] = range("blk.1.");
        const auto [b2, e2] = range("blk.2.");
        REQUIRE(e1 - b1 > (std::size_t(20) << 20));
        REQUIRE(e1 <= b2);
        CHECK(resident(0, size) < size / page / 10);
        {
            const Checkpoint ck(file);
            const auto block = load_moe_block<reference>(ck, 2);
            CHECK(block.d_model() == 256);
        }
        // Block 1 lies between the header (read) and block 2 (read). The kernel reads around a
        // page fault (read_ahead_kb, 8 MiB on this machine's disk, half of it backwards), so
        // the 12 MiB of block 1 farthest from block 2 are never read.
        CHECK(resident(b1, e1 - (std::size_t(12) << 20)) == 0);
        CHECK(resident(b2, e2) > (e2 - b2) / page / 2);
    }
    ::munmap(map, size);
    ::close(fd);
}
