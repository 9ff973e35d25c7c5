// libFuzzer target: arbitrary bytes as a safetensors image. Parsing must either succeed and
// then read every tensor within bounds, or throw a weight_error; nothing else.
#include <cstddef>
#include <cstdint>
#include <span>

#include <hypermoe/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const hypermoe::SafeTensorsView v(std::span(reinterpret_cast<const std::byte*>(data), size), "fuzz");
        double sink = 0;
        for (const auto& t : v.tensors()) {
            if (t.numel() > 0) sink += v.element(t, t.numel() - 1) + v.element(t, 0);
            if (t.numel() < 4096) sink += double(v.to_f32(t).rows());
        }
        for (const auto& [k, m] : v.metadata()) sink += double(k.size() + m.size());
        static volatile double keep;
        keep = sink;
    } catch (const hypermoe::weight_error&) {
    }
    return 0;
}
