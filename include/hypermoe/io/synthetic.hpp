#pragma once
// Synthetic checkpoints: config.json + model.safetensors of any supported family with random
// weights from a fixed seed, laid out exactly as the family's real checkpoints (each family's
// write_synthetic() writes the tensor names its load() reads). The `hypermoe` command's bench and
// demo build their layers this way, so random-weight layers go through the same loading path as
// real ones.

#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/io/families.hpp"
#include "hypermoe/io/safetensors.hpp"

namespace hypermoe {

/// A synthetic checkpoint in memory: what config.json would hold and model.safetensors' bytes
/// (view it with Checkpoint(config, safetensors, name), keeping this alive).
struct SyntheticImage {
    nlohmann::json config;
    std::vector<std::byte> safetensors;
};

/// The checkpoint of `m`, in memory.
[[nodiscard]] inline SyntheticImage synthetic_image(const SyntheticModel& m) {
    detail::SyntheticWriter w(m.seed, m.weights);
    SyntheticImage out;
    out.config["torch_dtype"] = m.weights == dtype::f32 ? "float32" : "bfloat16";
    visit_family(m.family, [&]<class F>(std::type_identity<F>) { F::write_synthetic(m, w, out.config); });
    out.safetensors = w.image();
    return out;
}

/// Writes `dir`/config.json and `dir`/model.safetensors for `m` (creating `dir`).
inline void write_synthetic_checkpoint(const std::string& dir, const SyntheticModel& m) {
    const SyntheticImage image = synthetic_image(m);
    write_checkpoint(dir, image.config, image.safetensors);
}

} // namespace hypermoe
