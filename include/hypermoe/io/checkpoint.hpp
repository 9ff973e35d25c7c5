#pragma once
// A checkpoint: a Hugging Face directory (config.json plus model.safetensors, or the shards named
// by model.safetensors.index.json) or a GGUF file (io/gguf_model.hpp: its metadata becomes the
// config, its MoE tensors get the Hugging Face names). Files are mapped once; tensors are looked
// up by name.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/io/gguf_model.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// A JSON file parsed, with errors that name the file.
[[nodiscard]] inline nlohmann::json read_json_file(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw config_error(detail::concat(path, ": cannot open the file"));
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        throw config_error(detail::concat(path, ": not valid JSON (", e.what(), ")"));
    }
}

/// Writes a checkpoint directory: `dir`/config.json from `config` and `dir`/model.safetensors
/// from a safetensors image (creating `dir`); a weight_error names what cannot be written.
inline void write_checkpoint(const std::string& dir, const nlohmann::json& config, std::span<const std::byte> safetensors) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw weight_error(detail::concat(dir, ": cannot create the directory (", ec.message(), ")"));
    write_file_bytes((fs::path(dir) / "model.safetensors").string(), safetensors);
    const std::string path = (fs::path(dir) / "config.json").string();
    std::ofstream c(path, std::ios::trunc);
    c << config.dump(2) << '\n';
    if (!c) throw weight_error(detail::concat(path, ": cannot write the file"));
}

class Checkpoint {
public:
    /// Opens `path`: a directory with config.json and its safetensors (single file or sharded), or
    /// a GGUF file.
    explicit Checkpoint(const std::string& path) : dir_(path) {
        namespace fs = std::filesystem;
        if (fs::is_regular_file(path)) {
            auto file = std::make_unique<GgufFile>(path);
            GgufCheckpoint g = gguf_checkpoint(file->view());
            config_ = std::move(g.config);
            config_source_ = path + " (GGUF metadata)";
            architecture_ = g.architecture;
            renamed_ = std::make_unique<TensorTable>(file->view().data_section(), path, std::move(g.tensors));
            g.tensors.clear();
            gguf_ = std::make_unique<GgufCheckpoint>(std::move(g));
            tables_.push_back(renamed_.get());
            files_.push_back(std::move(file));
            for (const auto& t : renamed_->tensors()) where_[t.name] = 0;
            return;
        }
        if (!fs::is_directory(path)) throw config_error(detail::concat(path, ": neither a checkpoint directory nor a GGUF file"));
        const std::string& dir = path;
        config_source_ = (fs::path(dir) / "config.json").string();
        config_ = read_json_file(config_source_);
        if (!config_.is_object()) throw config_error(detail::concat(config_source_, ": not a JSON object"));
        const fs::path index = fs::path(dir) / "model.safetensors.index.json";
        if (fs::exists(index)) {
            const nlohmann::json j = read_json_file(index.string());
            const auto map = j.find("weight_map");
            if (map == j.end() || !map->is_object())
                throw weight_error(detail::concat(index.string(), ": no weight_map object"));
            std::map<std::string, std::size_t> opened;
            for (const auto& [name, file] : map->items()) {
                if (!file.is_string()) throw weight_error(detail::concat(index.string(), ": weight_map['", name, "'] is not a file name"));
                const std::string f = file.get<std::string>();
                if (f.find('/') != std::string::npos || f == ".." )
                    throw weight_error(detail::concat(index.string(), ": shard '", f, "' is not a file in the checkpoint directory"));
                auto it = opened.find(f);
                if (it == opened.end()) it = opened.emplace(f, add_safetensors((fs::path(dir) / f).string())).first;
                if (!tables_[it->second]->contains(name))
                    throw weight_error(detail::concat(index.string(), ": '", name, "' is mapped to ", f, ", which has no such tensor"));
                where_[name] = it->second;
            }
        } else {
            const fs::path single = fs::path(dir) / "model.safetensors";
            if (!fs::exists(single))
                throw weight_error(detail::concat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
            const std::size_t i = add_safetensors(single.string());
            for (const auto& t : tables_[i]->tensors()) where_[t.name] = i;
        }
    }

    /// A checkpoint held in memory: `config` (what config.json would hold) and a safetensors
    /// image the caller owns and keeps alive as long as this object (ParameterStore, the trainer's
    /// weights, is one). `name` stands for the path in messages.
    Checkpoint(nlohmann::json config, std::span<const std::byte> safetensors, std::string name)
        : dir_(std::move(name)), config_source_(dir_ + " (in memory)"), config_(std::move(config)) {
        if (!config_.is_object()) throw config_error(detail::concat(config_source_, ": the config is not a JSON object"));
        memory_ = std::make_unique<SafeTensorsView>(safetensors, dir_ + "/model.safetensors (in memory)");
        tables_.push_back(memory_.get());
        for (const auto& t : memory_->tensors()) where_[t.name] = 0;
    }

    /// The path it was opened from (a directory, or a GGUF file).
    [[nodiscard]] const std::string& dir() const noexcept { return dir_; }
    /// Every tensor's name, sorted.
    [[nodiscard]] std::vector<std::string> tensor_names() const {
        std::vector<std::string> out;
        out.reserve(where_.size());
        for (const auto& [name, f] : where_) out.push_back(name);
        return out;
    }
    [[nodiscard]] const nlohmann::json& config() const noexcept { return config_; }
    /// Where the config came from, for messages: ".../config.json" or "FILE.gguf (GGUF metadata)".
    [[nodiscard]] const std::string& config_source() const noexcept { return config_source_; }
    /// A GGUF file's general.architecture ("" for a safetensors checkpoint).
    [[nodiscard]] const std::string& gguf_architecture() const noexcept { return architecture_; }
    /// Where a tensor the loaders look for is read from when that is not its name (GGUF), or "".
    [[nodiscard]] std::string source_of(const std::string& name) const { return gguf_ ? gguf_source(*gguf_, name) : std::string(); }
    [[nodiscard]] std::size_t tensor_count() const noexcept { return where_.size(); }

    /// Drops the resident pages of `bytes` where they lie in one of the checkpoint's files
    /// (MappedFile::release); bytes elsewhere (a converted copy) are left alone.
    void release(std::span<const std::byte> bytes) const noexcept {
        for (const auto& f : files_) f->release(bytes);
    }

    struct Ref {
        const TensorTable* file;
        const TensorInfo* info;
    };

    [[nodiscard]] bool contains(const std::string& name) const { return where_.count(name) != 0; }
    [[nodiscard]] Ref find(const std::string& name) const {
        const auto it = where_.find(name);
        if (it == where_.end()) return {nullptr, nullptr};
        const TensorTable& v = *tables_[it->second];
        return {&v, v.find(name)};
    }
    [[nodiscard]] Ref tensor(const std::string& name) const {
        const Ref r = find(name);
        if (r.info == nullptr) throw weight_error(detail::concat(dir_, ": missing tensor '", name, "'"));
        return r;
    }
    /// The dtypes present among the tensors whose names start with `prefix`.
    [[nodiscard]] std::set<std::string> dtypes(const std::string& prefix = "") const {
        return keys(bytes_by_dtype(prefix));
    }

    /// The dtypes of the routed and shared experts' weight matrices (is_expert_matrix).
    [[nodiscard]] std::set<std::string> expert_dtypes() const {
        std::set<std::string> out;
        for (const auto& [name, f] : where_)
            if (is_expert_matrix(name)) out.insert(name.ends_with("_blocks") ? "MXFP4" : tables_[f]->info(name).type_string());
        return out;
    }

    /// The storage (LoadOptions::storage) that holds the experts' weight matrices, routed and
    /// shared, as compactly as the file does without losing what it holds (docs/checkpoints.md
    /// measures each choice's error):
    /// - the format they are stored in when it is one a layer holds as stored (BF16, from GGUF
    ///   files and safetensors checkpoints alike, Q8_0, Q4_0, MXFP4, Q4_K: no conversion);
    /// - for other ggml quants (the other K-quants, Q5_0, IQ4_NL...) or a mix of quants: q4_0 when some are
    ///   Q2_K or Q3_K (llama.cpp's Q2_K and Q3_K_* files), which hold those coarser than q4_0
    ///   does, so requantising adds under a tenth to their error and puts the file's other quants
    ///   at less error than theirs, in half q8_0's bytes; else q8_0, whose requantisation adds
    ///   almost nothing to the file's error, in 8.5 bits a weight where f32 takes 32;
    /// - f32 otherwise (F32 or F16 experts, a mix with them), which keeps the values exactly.
    /// With keep_stored, the storage for the experts LoadOptions::keep_stored does not keep as
    /// stored: chosen as above among those alone (Q4_K_M's Q6_K, with its Q4_K kept: q8_0).
    /// `hypermoe`'s --weights stored (its default) takes that.
    [[nodiscard]] dtype expert_storage(bool keep_stored = false) const {
        std::set<tensor_dtype> types = expert_matrix_dtypes();
        if (keep_stored)
            std::erase_if(types, [](tensor_dtype t) { return kept_dtype(t).has_value(); });
        if (types.empty()) return dtype::f32;
        if (types.size() == 1)
            if (const auto held = held_dtype(*types.begin()); held && *held != dtype::f32) return *held;
        const auto quantised = [](tensor_dtype t) { return is_block_dtype(t) || is_ggml_quant_dtype(t); };
        if (!std::all_of(types.begin(), types.end(), quantised)) return dtype::f32;
        return types.count(tensor_dtype::q2_k) + types.count(tensor_dtype::q3_k) != 0 ? dtype::q4_0 : dtype::q8_0;
    }

    /// The bytes of the tensors whose names start with `prefix`, by dtype.
    [[nodiscard]] std::map<std::string, std::size_t> bytes_by_dtype(const std::string& prefix = "") const {
        return bytes_if([&](const std::string& name) { return name.rfind(prefix, 0) == 0; });
    }

private:
    /// Whether a tensor is an expert's weight matrix, which LoadOptions::storage holds: a routed
    /// expert's, named "....experts.<e>...." or, fused, "....experts.<name>", but not a bias
    /// (gpt-oss's) or MXFP4 scales; or a shared expert's, "....shared_expert.<m>" (Qwen2-MoE) or
    /// "....shared_experts.<m>" (DeepSeek), but not Qwen2-MoE's shared_expert_gate (f32 as every
    /// gate). Hugging Face's fused MXFP4 blocks (experts.<m>_blocks, U8) are one, and count as MXFP4.
    static bool is_expert_matrix(const std::string& name) {
        const auto has = [&](const char* part) { return name.find(part) != std::string::npos; };
        if (has(".shared_expert.") || has(".shared_experts.")) return !name.ends_with("bias");
        return has(".experts.") && !name.ends_with("bias") && !name.ends_with("_scales");
    }
    /// The stored dtypes of the experts' weight matrices (is_expert_matrix).
    [[nodiscard]] std::set<tensor_dtype> expert_matrix_dtypes() const {
        std::set<tensor_dtype> types;
        for (const auto& [name, f] : where_)
            if (is_expert_matrix(name)) types.insert(name.ends_with("_blocks") ? tensor_dtype::mxfp4 : tables_[f]->info(name).dtype);
        return types;
    }

    /// The bytes of the tensors whose names pass `keep`, by dtype (the file's name for it).
    template <class Keep>
    [[nodiscard]] std::map<std::string, std::size_t> bytes_if(Keep keep) const {
        std::map<std::string, std::size_t> out;
        for (const auto& [name, f] : where_)
            if (keep(name)) {
                const TensorInfo& t = tables_[f]->info(name);
                out[t.type_string()] += t.end - t.begin;
            }
        return out;
    }
    static std::set<std::string> keys(const std::map<std::string, std::size_t>& m) {
        std::set<std::string> out;
        for (const auto& [k, v] : m) out.insert(k);
        return out;
    }

    std::size_t add_safetensors(const std::string& path) {
        auto file = std::make_unique<SafeTensorsFile>(path);
        tables_.push_back(&file->view());
        files_.push_back(std::move(file));
        return tables_.size() - 1;
    }

    std::string dir_, config_source_, architecture_;
    nlohmann::json config_;
    std::vector<std::unique_ptr<MappedFile>> files_;
    std::vector<const TensorTable*> tables_;   ///< per file: its tensors (a GGUF file's renamed)
    std::unique_ptr<TensorTable> renamed_;     ///< GGUF only: the MoE tensors under Hugging Face names
    std::unique_ptr<GgufCheckpoint> gguf_;      ///< GGUF only: the translation (config and tensors moved out)
    std::unique_ptr<SafeTensorsView> memory_;  ///< in-memory checkpoints only: the caller's image
    std::map<std::string, std::size_t> where_;
};

} // namespace hypermoe
