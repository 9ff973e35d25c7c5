// libFuzzer target: arbitrary bytes as config.json. Reading must give a ModelInfo or a
// config_error; no other exception, no crash.
#include <cstddef>
#include <cstdint>

#include <hypermoe/io/families.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(data, data + size);
    } catch (const nlohmann::json::exception&) {
        return 0; // not JSON: Checkpoint reports that as a config_error before describe() runs
    }
    try {
        const hypermoe::ModelInfo m = hypermoe::describe(j, "config.json");
        static volatile std::size_t keep;
        keep = m.moe_blocks.size() + m.routing.size();
    } catch (const hypermoe::config_error&) {
    }
    return 0;
}
