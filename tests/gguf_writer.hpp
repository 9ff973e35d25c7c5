#pragma once
// A small GGUF writer for the tests (the format as ggml/docs/gguf.md describes it): metadata of
// every value type, tensors of any ggml type id with bytes given, version and alignment chosen.
// Plus the encodings of a float matrix as F32, F16, BF16, Q8_0, Q4_0, MXFP4 and Q4_K (the
// library's own quantisers, which follow ggml's), and a converter from a Hugging Face checkpoint of
// the five decoder families to the GGUF llama.cpp would write for it, a rewriter of such a file's tensors,
// and random blocks of the ggml quants the library widens.

#include <cmath>
#include <cstdint>
#include <functional>
#include <cstring>
#include <cstddef>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <hypermoe/io/io.hpp>

namespace hypermoe::test {



/// ggml type ids.
enum ggml : std::uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
    IQ2_XXS = 16, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30, MXFP4 = 39
};

class GgufWriter {
public:
    void u32(const std::string& key, std::uint32_t v) { scalar(key, 4, v); }
    void i32(const std::string& key, std::int32_t v) { scalar(key, 5, v); }
    void f32(const std::string& key, float v) { scalar(key, 6, v); }
    void boolean(const std::string& key, bool v) { scalar(key, 7, std::uint8_t{v}); }
    void u64(const std::string& key, std::uint64_t v) { scalar(key, 10, v); }
    /// Any scalar metadata type: its gguf_type id and a value of the matching C++ type.
    template <class T>
    void scalar(const std::string& key, std::uint32_t type, T v) { kv(key, type, &v, sizeof v); }
    void string(const std::string& key, const std::string& v) {
        std::vector<std::byte> b;
        put_string(b, v);
        kv(key, 8, b.data(), b.size());
    }
    void strings(const std::string& key, const std::vector<std::string>& v) {
        std::vector<std::byte> b;
        put(b, std::uint32_t{8});
        put(b, std::uint64_t(v.size()));
        for (const auto& s : v) put_string(b, s);
        kv(key, 9, b.data(), b.size());
    }
    void u32s(const std::string& key, const std::vector<std::uint32_t>& v) {
        std::vector<std::byte> b;
        put(b, std::uint32_t{4});
        put(b, std::uint64_t(v.size()));
        for (const auto x : v) put(b, x);
        kv(key, 9, b.data(), b.size());
    }
    /// A tensor: dims innermost first (ggml's ne), its bytes as stored.
    void tensor(const std::string& name, std::uint32_t type, std::vector<std::int64_t> ne, std::vector<std::byte> bytes) {
        tensors_.push_back({name, type, std::move(ne), std::move(bytes)});
    }

    /// The file's bytes.
    [[nodiscard]] std::vector<std::byte> bytes(std::uint32_t version = 3, std::uint32_t alignment = 32) const {
        std::vector<std::byte> out;
        out.insert(out.end(), {std::byte{'G'}, std::byte{'G'}, std::byte{'U'}, std::byte{'F'}});
        put(out, version);
        put(out, std::uint64_t(tensors_.size()));
        put(out, std::uint64_t(kvs_.size()));
        for (const auto& b : kvs_) out.insert(out.end(), b.begin(), b.end());
        std::uint64_t offset = 0;
        std::vector<std::uint64_t> offsets;
        for (const auto& t : tensors_) {
            put_string(out, t.name);
            put(out, std::uint32_t(t.ne.size()));
            for (const auto n : t.ne) put(out, n);
            put(out, t.type);
            offsets.push_back(offset);
            put(out, offset);
            offset += (t.bytes.size() + alignment - 1) / alignment * alignment;
        }
        out.resize((out.size() + alignment - 1) / alignment * alignment);
        const std::size_t data = out.size();
        out.resize(data + (tensors_.empty() ? 0 : offsets.back() + tensors_.back().bytes.size())); // no padding after the last
        for (std::size_t i = 0; i < tensors_.size(); ++i)
            if (!tensors_[i].bytes.empty()) std::memcpy(out.data() + data + offsets[i], tensors_[i].bytes.data(), tensors_[i].bytes.size());
        return out;
    }
    void write(const std::string& path, std::uint32_t version = 3, std::uint32_t alignment = 32) const {
        const auto b = bytes(version, alignment);
        std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    }

    template <class T>
    static void put(std::vector<std::byte>& out, T v) {
        const auto* p = reinterpret_cast<const std::byte*>(&v);
        out.insert(out.end(), p, p + sizeof(T));
    }
    static void put_string(std::vector<std::byte>& out, const std::string& s) {
        put(out, std::uint64_t(s.size()));
        const auto* p = reinterpret_cast<const std::byte*>(s.data());
        out.insert(out.end(), p, p + s.size());
    }

private:
    void kv(const std::string& key, std::uint32_t type, const void* value, std::size_t n) {
        std::vector<std::byte> b;
        put_string(b, key);
        put(b, type);
        const auto* p = static_cast<const std::byte*>(value);
        b.insert(b.end(), p, p + n);
        kvs_.push_back(std::move(b));
    }
    struct Tensor {
        std::string name;
        std::uint32_t type;
        std::vector<std::int64_t> ne;
        std::vector<std::byte> bytes;
    };
    std::vector<std::vector<std::byte>> kvs_;
    std::vector<Tensor> tensors_;
};

/// A (rows, cols) float matrix stored as ggml type `type` (row-major; blocks along cols).
inline std::vector<std::byte> encode(hypermoe::ConstMatrixView<float> m, std::uint32_t type) {
    std::vector<std::byte> out;
    for (index_t r = 0; r < m.rows(); ++r) {
        const float* row = m.row(r).data();
        for (index_t c = 0; c < m.cols(); c += type == Q4_K ? 256 : (type == Q8_0 || type == Q4_0 || type == MXFP4) ? 32 : 1) {
            if (type == F32) GgufWriter::put(out, row[c]);
            else if (type == F16) GgufWriter::put(out, hypermoe::f32_to_f16_bits(row[c]));
            else if (type == BF16) GgufWriter::put(out, hypermoe::bf16::from_float(row[c]).bits);
            else if (type == Q8_0) GgufWriter::put(out, hypermoe::quantize_q8_0(std::span<const float, 32>(row + c, 32)));
            else if (type == Q4_0) GgufWriter::put(out, hypermoe::quantize_q4_0(std::span<const float, 32>(row + c, 32)));
            else if (type == MXFP4) GgufWriter::put(out, hypermoe::quantize_mxfp4(std::span<const float, 32>(row + c, 32)));
            else if (type == Q4_K) GgufWriter::put(out, hypermoe::quantize_q4_k(std::span<const float, 256>(row + c, 256)));
        }
    }
    return out;
}

/// How to convert a checkpoint: the expert matrices' type (block types fall back to F32 for a
/// matrix whose rows are not whole blocks, as llama.cpp's quantizer does), merged or per-expert
/// tensors (llama only), and the deepseek2 gating function to write (2 sigmoid, 1 softmax).
struct GgufConversion {
    std::uint32_t experts = F32;
    bool merged = true;
    std::uint32_t gating = 2;
    std::uint32_t version = 3;
};

/// Expert e's `which` ("gate", "up" or "down") weight of a gpt_oss block under `p` (its MLP), and
/// its bias (as a one-row matrix): each expert's own tensors, or split from Hugging Face's fused
/// ones as llama.cpp's converter splits them (gate_up_proj [E, d, 2 ff] transposed, gate the even
/// rows and up the odd ones; down_proj [E, ff, d] transposed).
inline std::pair<hypermoe::Matrix<float>, hypermoe::Matrix<float>> gpt_oss_expert(const hypermoe::Checkpoint& ck, const std::string& p,
                                                                                 index_t e, const std::string& which) {
    using namespace hypermoe;
    const auto f32 = [&](const std::string& name) {
        const Checkpoint::Ref r = ck.tensor(name);
        return r.file->to_f32(*r.info);
    };
    const std::string own = p + "experts." + std::to_string(e) + "." + which + "_proj.";
    if (ck.contains(own + "weight")) return {f32(own + "weight"), f32(own + "bias")}; // a 1-D bias reads as one row
    const bool down = which == "down";
    const std::string fused = p + "experts." + (down ? "down_proj" : "gate_up_proj");
    const Checkpoint::Ref w = ck.tensor(fused), b = ck.tensor(fused + "_bias");
    const index_t in = w.info->shape[1], width = w.info->shape[2], out = down ? width : width / 2;
    const index_t step = down ? 1 : 2, first = which == "up" ? 1 : 0;
    Matrix<float> m(out, in), bias(1, out);
    for (index_t o = 0; o < out; ++o) {
        for (index_t i = 0; i < in; ++i) m(o, i) = float(w.file->element(*w.info, (e * in + i) * width + o * step + first));
        bias(0, o) = float(b.file->element(*b.info, e * width + o * step + first));
    }
    return {std::move(m), std::move(bias)};
}

/// Every tensor of a gpt_oss checkpoint but its experts' (F32).
inline std::vector<hypermoe::TensorToWrite> all_but_experts(const hypermoe::Checkpoint& ck) {
    using namespace hypermoe;
    std::vector<TensorToWrite> out;
    for (const std::string& name : ck.tensor_names()) {
        if (name.find(".mlp.experts.") != std::string::npos) continue;
        const Checkpoint::Ref r = ck.tensor(name);
        const Matrix<float> m = r.file->to_f32(*r.info);
        out.push_back(f32_tensor(name, r.info->shape, {m.data(), std::size_t(m.rows() * m.cols())}));
    }
    return out;
}

/// A gpt_oss checkpoint's tensors with each MoE block's experts on their own (gpt_oss_expert:
/// as llama.cpp's converter splits Hugging Face's fused ones), every other tensor as it is (F32).
inline std::vector<hypermoe::TensorToWrite> gpt_oss_split(const hypermoe::Checkpoint& ck) {
    using namespace hypermoe;
    const ModelInfo info = describe(ck);
    std::vector<TensorToWrite> out = all_but_experts(ck);
    for (const MoeBlockRef& b : info.moe_blocks) {
        const std::string p = "model.layers." + std::to_string(b.layer) + ".mlp.";
        for (index_t e = 0; e < info.experts; ++e)
            for (const char* which : {"gate", "up", "down"}) {
                const auto [m, bias] = gpt_oss_expert(ck, p, e, which);
                const std::string own = p + "experts." + std::to_string(e) + "." + which + "_proj.";
                out.push_back(f32_tensor(own + "weight", {m.rows(), m.cols()}, {m.data(), std::size_t(m.rows() * m.cols())}));
                out.push_back(f32_tensor(own + "bias", {bias.cols()}, {bias.data(), std::size_t(bias.cols())}));
            }
    }
    return out;
}

/// A gpt_oss checkpoint whose experts are each on their own (io/family/gpt_oss.hpp) with them
/// fused as Hugging Face holds them (experts.gate_up_proj [E, d, 2 ff], y = x W, gate's and up's
/// outputs interleaved, and its bias; experts.down_proj [E, ff, d] and its bias): the inverse of
/// gpt_oss_split. Every other tensor as it is (F32).
inline std::vector<hypermoe::TensorToWrite> gpt_oss_fused(const hypermoe::Checkpoint& ck) {
    using namespace hypermoe;
    const ModelInfo info = describe(ck);
    const index_t e = info.experts, d = info.d_model, ff = info.d_ff;
    std::vector<TensorToWrite> out = all_but_experts(ck);
    for (const MoeBlockRef& b : info.moe_blocks) {
        const std::string p = "model.layers." + std::to_string(b.layer) + ".mlp.experts.";
        std::vector<float> gate_up(std::size_t(e * d * 2 * ff)), gate_up_bias(std::size_t(e * 2 * ff)), down(std::size_t(e * ff * d)),
            down_bias(std::size_t(e * d));
        for (index_t x = 0; x < e; ++x) {
            const auto f32 = [&](const std::string& name) {
                const Checkpoint::Ref r = ck.tensor(p + std::to_string(x) + "." + name);
                return r.file->to_f32(*r.info);
            };
            const Matrix<float> g = f32("gate_proj.weight"), u = f32("up_proj.weight"), dn = f32("down_proj.weight");
            const Matrix<float> gb = f32("gate_proj.bias"), ub = f32("up_proj.bias"), db = f32("down_proj.bias");
            for (index_t o = 0; o < ff; ++o) {
                for (index_t i = 0; i < d; ++i) {
                    gate_up[std::size_t((x * d + i) * 2 * ff + 2 * o)] = g(o, i);
                    gate_up[std::size_t((x * d + i) * 2 * ff + 2 * o + 1)] = u(o, i);
                    down[std::size_t((x * ff + o) * d + i)] = dn(i, o);
                }
                gate_up_bias[std::size_t(x * 2 * ff + 2 * o)] = gb(0, o);
                gate_up_bias[std::size_t(x * 2 * ff + 2 * o + 1)] = ub(0, o);
            }
            for (index_t i = 0; i < d; ++i) down_bias[std::size_t(x * d + i)] = db(0, i);
        }
        out.push_back(f32_tensor(p + "gate_up_proj", {e, d, 2 * ff}, gate_up));
        out.push_back(f32_tensor(p + "gate_up_proj_bias", {e, 2 * ff}, gate_up_bias));
        out.push_back(f32_tensor(p + "down_proj", {e, ff, d}, down));
        out.push_back(f32_tensor(p + "down_proj_bias", {e, d}, down_bias));
    }
    return out;
}

/// A gpt_oss checkpoint with Hugging Face's fused expert matrices (experts.gate_up_proj,
/// experts.down_proj: [E, K, O], y = x W) as OpenAI publishes them: MXFP4 `_blocks`
/// [E, O, K / 32, 16] (element 2i of a block in byte i's low nibble, 2i + 1 in its high one) and
/// `_scales` [E, O, K / 32] (E8M0), each output's K weights quantised by quantize_mxfp4 (what
/// gguf_from's MXFP4 file holds for the same matrix); every other tensor as it is (F32).
inline std::vector<hypermoe::TensorToWrite> gpt_oss_mxfp4(const hypermoe::Checkpoint& ck) {
    using namespace hypermoe;
    std::vector<TensorToWrite> out;
    for (const std::string& name : ck.tensor_names()) {
        const Checkpoint::Ref r = ck.tensor(name);
        const Matrix<float> m = r.file->to_f32(*r.info);
        if (!name.ends_with("experts.gate_up_proj") && !name.ends_with("experts.down_proj")) {
            out.push_back(f32_tensor(name, r.info->shape, {m.data(), std::size_t(m.rows() * m.cols())}));
            continue;
        }
        const index_t experts = r.info->shape[0], k = r.info->shape[1], o = r.info->shape[2], nb = k / 32;
        TensorToWrite blocks{name + "_blocks", tensor_dtype::u8, {experts, o, nb, 16}, {}}, scales{name + "_scales", tensor_dtype::u8, {experts, o, nb}, {}};
        std::vector<float> row(static_cast<std::size_t>(k));
        for (index_t e = 0; e < experts; ++e)
            for (index_t j = 0; j < o; ++j) {
                for (index_t i = 0; i < k; ++i) row[std::size_t(i)] = m(e * k + i, j); // to_f32 folds [E, K, O] into (E K, O)
                for (index_t b = 0; b < nb; ++b) {
                    const BlockMXFP4 q = quantize_mxfp4(std::span<const float, 32>(row.data() + 32 * b, 32));
                    const auto element = [&](int i) { return i < 16 ? q.qs[std::size_t(i)] & 0xF : q.qs[std::size_t(i - 16)] >> 4; };
                    for (int i = 0; i < 16; ++i) blocks.bytes.push_back(std::byte(element(2 * i) | element(2 * i + 1) << 4));
                    scales.bytes.push_back(std::byte(q.e));
                }
            }
        out.push_back(std::move(blocks));
        out.push_back(std::move(scales));
    }
    return out;
}

/// The GGUF llama.cpp would write for the MoE blocks of a Hugging Face checkpoint of family
/// mixtral (-> llama), qwen2_moe (-> qwen2moe), qwen3_moe (-> qwen3moe), olmoe, deepseek_v3 (-> deepseek2) or
/// gpt_oss (-> gpt-oss). Only the tensors the MoE blocks read are written.
inline GgufWriter gguf_from(const hypermoe::Checkpoint& ck, const GgufConversion& how = {}) {
    using namespace hypermoe;
    const nlohmann::json& c = ck.config();
    const ModelInfo info = describe(ck);
    const std::string family(to_string(info.family));
    const std::string arch = family == "mixtral"     ? "llama"
                             : family == "qwen2_moe" ? "qwen2moe"
                             : family == "qwen3_moe" ? "qwen3moe"
                             : family == "olmoe"     ? "olmoe"
                             : family == "gpt_oss"   ? "gpt-oss"
                                                     : "deepseek2";
    GgufWriter w;
    w.string("general.architecture", arch);
    w.string("general.name", "converted " + family);
    const std::string a = arch + ".";
    w.u32(a + "block_count", std::uint32_t(c.at("num_hidden_layers").get<int>()));
    w.u32(a + "embedding_length", std::uint32_t(info.d_model));
    w.u32(a + "expert_count", std::uint32_t(info.experts));
    w.u32(a + "expert_used_count", std::uint32_t(info.top_k));
    if (arch == "llama" || arch == "olmoe") w.u32(a + "feed_forward_length", std::uint32_t(info.d_ff));
    else w.u32(a + "expert_feed_forward_length", std::uint32_t(info.d_ff));
    if (arch == "qwen2moe") w.u32(a + "expert_shared_feed_forward_length", std::uint32_t(info.shared_ff));
    if (arch == "deepseek2") {
        w.u32(a + "leading_dense_block_count", std::uint32_t(c.value("first_k_dense_replace", 0)));
        w.u32(a + "expert_shared_count", std::uint32_t(c.value("n_shared_experts", 0)));
        w.f32(a + "expert_weights_scale", c.value("routed_scaling_factor", 1.0f));
        w.boolean(a + "expert_weights_norm", c.value("norm_topk_prob", false));
        w.u32(a + "expert_gating_func", how.gating);
        w.u32(a + "expert_group_count", std::uint32_t(c.value("n_group", 1)));
        w.u32(a + "expert_group_used_count", std::uint32_t(c.value("topk_group", 1)));
    }
    w.u32s("tokenizer.ggml.token_type", {1, 1, 3}); // an array the reader must skip
    const auto matrix = [&](const std::string& name) {
        const Checkpoint::Ref r = ck.tensor(name);
        return r.file->to_f32(*r.info);
    };
    const auto type_of = [&](index_t cols) {
        if (how.experts == Q4_K) return cols % 256 != 0 ? F32 : how.experts;
        return (how.experts == Q8_0 || how.experts == Q4_0 || how.experts == MXFP4) && cols % 32 != 0 ? F32 : how.experts;
    };
    const auto plain = [&](const std::string& gguf, const std::string& hf, std::uint32_t type, bool one_dim = false) {
        const Matrix<float> m = matrix(hf);
        const std::vector<std::int64_t> ne = one_dim ? std::vector<std::int64_t>{m.rows() * m.cols()} : std::vector<std::int64_t>{m.cols(), m.rows()};
        w.tensor(gguf, type, ne, encode(m.view(), type));
    };
    for (const MoeBlockRef& b : info.moe_blocks) {
        const std::string l = std::to_string(b.layer), blk = "blk." + l + ".";
        const std::string p = "model.layers." + l + (family == "mixtral" ? ".block_sparse_moe." : ".mlp.");
        if (family == "gpt_oss") {
            plain(blk + "ffn_gate_inp.weight", p + "router.weight", F32);
            plain(blk + "ffn_gate_inp.bias", p + "router.bias", F32, true);
            for (const char* g : {"gate", "up", "down"}) {
                std::vector<std::byte> all, biases;
                index_t rows = 0, cols = 0;
                for (index_t e = 0; e < info.experts; ++e) {
                    const auto [m, bias] = gpt_oss_expert(ck, p, e, g);
                    rows = m.rows(), cols = m.cols();
                    const auto bytes = encode(m.view(), type_of(cols)), bias_bytes = encode(bias.view(), F32);
                    all.insert(all.end(), bytes.begin(), bytes.end());
                    biases.insert(biases.end(), bias_bytes.begin(), bias_bytes.end());
                }
                w.tensor(blk + "ffn_" + g + "_exps.weight", type_of(cols), {cols, rows, info.experts}, std::move(all));
                w.tensor(blk + "ffn_" + g + "_exps.bias", F32, {rows, info.experts}, std::move(biases));
            }
            continue;
        }
        plain(blk + "ffn_gate_inp.weight", p + "gate.weight", F32);
        const char* names[3][2] = {{"gate", family == "mixtral" ? "w1" : "gate_proj"},
                                   {"up", family == "mixtral" ? "w3" : "up_proj"},
                                   {"down", family == "mixtral" ? "w2" : "down_proj"}};
        for (const auto& [g, h] : names) {
            std::vector<std::byte> all;
            index_t rows = 0, cols = 0;
            for (index_t e = 0; e < info.experts; ++e) {
                const std::string hf = p + "experts." + std::to_string(e) + "." + h + ".weight";
                const Matrix<float> m = matrix(hf);
                rows = m.rows(), cols = m.cols();
                auto bytes = encode(m.view(), type_of(cols));
                if (!how.merged) w.tensor(blk + "ffn_" + g + "." + std::to_string(e) + ".weight", type_of(cols), {cols, rows}, std::move(bytes));
                else all.insert(all.end(), bytes.begin(), bytes.end());
            }
            if (how.merged) w.tensor(blk + "ffn_" + g + "_exps.weight", type_of(cols), {cols, rows, info.experts}, std::move(all));
        }
        if (info.shared_ff > 0) {
            const std::string sp = p + (family == "qwen2_moe" ? "shared_expert." : "shared_experts.");
            for (const auto& [g, h] : {std::pair{"gate", "gate_proj"}, {"up", "up_proj"}, {"down", "down_proj"}}) {
                const Matrix<float> m = matrix(sp + h + ".weight");
                w.tensor(blk + "ffn_" + g + "_shexp.weight", type_of(m.cols()), {m.cols(), m.rows()}, encode(m.view(), type_of(m.cols())));
            }
        }
        if (family == "qwen2_moe" && info.shared_ff > 0) plain(blk + "ffn_gate_inp_shexp.weight", p + "shared_expert_gate.weight", F32, true);
        if (family == "deepseek_v3" && ck.contains(p + "gate.e_score_correction_bias"))
            plain(blk + "exp_probs_b.bias", p + "gate.e_score_correction_bias", F32, true);
    }
    return w;
}

/// A tensor of a GGUF file being rewritten: its ggml type, dims (innermost first) and bytes.
struct TensorEdit {
    std::uint32_t type;
    std::vector<std::int64_t> ne;
    std::vector<std::byte> bytes;
};

/// A copy of F32 GGUF image `base` (its u32 and string metadata, its tensors), each tensor passed
/// through `edit` first, which may change it or return false to drop it.
inline GgufWriter rewritten(const std::vector<std::byte>& base, const std::function<bool(const std::string&, TensorEdit&)>& edit) {
    const GgufView v(base, "base");
    GgufWriter w;
    for (const auto& [k, val] : v.metadata())
        if (val.type == gguf_type::u32) w.u32(k, std::uint32_t(*v.integer(k)));
        else if (val.type == gguf_type::string) w.string(k, *v.string(k));
    for (const TensorInfo& t : v.tensors()) {
        const auto d = v.data(t);
        TensorEdit e{F32, std::vector<std::int64_t>(t.shape.rbegin(), t.shape.rend()), {d.begin(), d.end()}};
        if (edit(t.name, e)) w.tensor(t.name, e.type, std::move(e.ne), std::move(e.bytes));
    }
    return w;
}

/// `blocks` blocks of random bytes of a ggml quant the library widens (Q4_1, Q5_0, Q5_1, IQ4_NL,
/// MXFP4, Q2_K to Q6_K, IQ4_XS), each block's half scale (and min) drawn from `scale` so that it
/// is finite (MXFP4: its scale byte e the power of two 2^(e - 128) at or below the draw): the
/// bytes first, then the scales block by block, from `rng`.
inline std::vector<std::byte> random_ggml_quant(std::uint32_t type, index_t blocks, std::mt19937_64& rng,
                                                std::uniform_real_distribution<float> scale) {
    const std::map<std::uint32_t, std::vector<std::size_t>> halves_at = { // where a block's halves are
        {Q4_1, {0, 2}}, {Q5_0, {0}}, {Q5_1, {0, 2}}, {IQ4_NL, {0}}, {MXFP4, {}},    {Q2_K, {80, 82}},
        {Q3_K, {108}},  {Q4_K, {0, 2}}, {Q5_K, {0, 2}}, {Q6_K, {208}}, {IQ4_XS, {0}}};
    const std::vector<std::size_t>& halves = halves_at.at(type);
    const std::size_t size = detail::find_ggml_type(type)->bytes;
    std::vector<std::byte> out(std::size_t(blocks) * size);
    for (auto& v : out) v = std::byte(rng() & 0xFF);
    for (std::size_t i = 0; i < std::size_t(blocks); ++i) {
        if (type == MXFP4) out[i * size] = std::byte(128 + std::ilogb(scale(rng)));
        for (const std::size_t at : halves) {
            const std::uint16_t h = f32_to_f16_bits(scale(rng));
            std::memcpy(out.data() + i * size + at, &h, 2);
        }
    }
    return out;
}

} // namespace hypermoe::test
