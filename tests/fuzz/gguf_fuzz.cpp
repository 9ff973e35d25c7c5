// libFuzzer target: arbitrary bytes as a GGUF image. Parsing must either succeed and then read
// every tensor and metadata value within bounds, and the model mapping must either succeed or
// throw a config_error; or parsing throws a weight_error; nothing else.
#include <cstddef>
#include <cstdint>
#include <span>

#include <hypermoe/io/gguf_model.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const hypermoe::GgufView v(std::span(reinterpret_cast<const std::byte*>(data), size), "fuzz");
        double sink = 0;
        for (const auto& t : v.tensors()) {
            if (t.numel() > 0 && t.dtype != hypermoe::tensor_dtype::other) sink += v.element(t, t.numel() - 1) + v.element(t, 0);
            if (t.numel() < 4096 && t.dtype != hypermoe::tensor_dtype::other) sink += double(v.to_f32(t).rows());
        }
        for (const auto& [k, m] : v.metadata()) sink += double(k.size() + m.count + m.items.size());
        try {
            const auto g = hypermoe::gguf_checkpoint(v);
            sink += double(g.tensors.size());
        } catch (const hypermoe::config_error&) {
        }
        static volatile double keep;
        keep = sink;
    } catch (const hypermoe::weight_error&) {
    }
    return 0;
}
