#pragma once
// A Hugging Face checkpoint directory: config.json plus model.safetensors, or the shards named
// by model.safetensors.index.json. Files are mapped once; tensors are looked up by name.

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/backend/linear_spec.hpp"
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

class Checkpoint {
public:
    /// Opens `dir`/config.json and its safetensors (single file or sharded).
    explicit Checkpoint(const std::string& dir) : dir_(dir) {
        namespace fs = std::filesystem;
        if (!fs::is_directory(dir)) throw config_error(detail::concat(dir, ": not a directory"));
        config_ = read_json_file((fs::path(dir) / "config.json").string());
        if (!config_.is_object()) throw config_error(detail::concat(dir, "/config.json: not a JSON object"));
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
                if (it == opened.end()) {
                    files_.push_back(std::make_unique<SafeTensorsFile>((fs::path(dir) / f).string()));
                    it = opened.emplace(f, files_.size() - 1).first;
                }
                if (!files_[it->second]->view().contains(name))
                    throw weight_error(detail::concat(index.string(), ": '", name, "' is mapped to ", f, ", which has no such tensor"));
                where_[name] = it->second;
            }
        } else {
            const fs::path single = fs::path(dir) / "model.safetensors";
            if (!fs::exists(single))
                throw weight_error(detail::concat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
            files_.push_back(std::make_unique<SafeTensorsFile>(single.string()));
            for (const auto& t : files_.back()->view().tensors()) where_[t.name] = 0;
        }
    }

    [[nodiscard]] const std::string& dir() const noexcept { return dir_; }
    [[nodiscard]] const nlohmann::json& config() const noexcept { return config_; }
    [[nodiscard]] std::size_t tensor_count() const noexcept { return where_.size(); }

    /// Drops the resident pages of `bytes` where they lie in one of the checkpoint's files
    /// (SafeTensorsFile::release); bytes elsewhere (a converted copy) are left alone.
    void release(std::span<const std::byte> bytes) const noexcept {
        for (const auto& f : files_) f->release(bytes);
    }

    struct Ref {
        const SafeTensorsView* file;
        const TensorInfo* info;
    };

    [[nodiscard]] bool contains(const std::string& name) const { return where_.count(name) != 0; }
    [[nodiscard]] Ref find(const std::string& name) const {
        const auto it = where_.find(name);
        if (it == where_.end()) return {nullptr, nullptr};
        const SafeTensorsView& v = files_[it->second]->view();
        return {&v, v.find(name)};
    }
    [[nodiscard]] Ref tensor(const std::string& name) const {
        const Ref r = find(name);
        if (r.info == nullptr) throw weight_error(detail::concat(dir_, ": missing tensor '", name, "'"));
        return r;
    }
    /// The dtypes present among the tensors whose names start with `prefix`.
    [[nodiscard]] std::set<std::string> dtypes(const std::string& prefix = "") const {
        std::set<std::string> out;
        for (const auto& [name, f] : where_)
            if (name.rfind(prefix, 0) == 0) out.insert(std::string(to_string(files_[f]->view().info(name).dtype)));
        return out;
    }

private:
    std::string dir_;
    nlohmann::json config_;
    std::vector<std::unique_ptr<SafeTensorsFile>> files_;
    std::map<std::string, std::size_t> where_;
};

} // namespace hypermoe
