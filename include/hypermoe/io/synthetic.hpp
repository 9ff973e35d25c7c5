#pragma once
// Synthetic checkpoints: config.json + model.safetensors of any supported family with random
// weights from a fixed seed, laid out exactly as the family's real checkpoints (each family's
// write_synthetic() writes the tensor names its load() reads). The `hypermoe` command's bench and
// demo build their layers this way, so random-weight layers go through the same loading path as
// real ones.

#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "hypermoe/io/families.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// Writes `dir`/config.json and `dir`/model.safetensors for `m` (creating `dir`).
inline void write_synthetic_checkpoint(const std::string& dir, const SyntheticModel& m) {
    namespace fs = std::filesystem;
    fs::create_directories(dir);
    detail::SyntheticWriter w(m.seed, m.weights);
    nlohmann::json c;
    c["torch_dtype"] = m.weights == dtype::f32 ? "float32" : "bfloat16";
    visit_family(m.family, [&]<class F>(std::type_identity<F>) { F::write_synthetic(m, w, c); });
    write_safetensors((fs::path(dir) / "model.safetensors").string(), w.tensors(), {{"format", "pt"}});
    std::ofstream(fs::path(dir) / "config.json") << c.dump(2);
}

} // namespace hypermoe
