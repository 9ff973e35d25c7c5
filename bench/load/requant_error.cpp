// What holding a GGUF file's quantised experts in another storage (`--weights bf16|q8_0|q4_0`)
// adds to the file's own quantisation error: docs/checkpoints.md's requantisation table.
//
// For weights drawn from three distributions (normal; Laplace; Student's t with 4 degrees of
// freedom, whose rare large weights set q4_0's block scales as a trained matrix's outliers do),
// it quantises them as llama.cpp writes each ggml quant type the library reads, without an
// importance matrix (ggml_reference_quants.hpp: the K-quants Q2_K to Q6_K and IQ4_XS, and the
// blocks of 32 Q4_1, Q5_0, Q5_1, IQ4_NL and MXFP4), reads the bytes back through the library's GGUF
// decoder (GgmlQuantBlock), converts those exact values as the loader does (detail::store_row:
// bf16 rounding, quantize_row into q8_0 / q4_0), and prints each result's relative RMS error
// sqrt(sum (w' - w)^2 / sum w^2) against the original weights; the rows "none" convert the
// original weights straight.
// Usage: requant_error [ROWS COLS]   (default 512 x 4096; COLS a multiple of 256)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <hypermoe/core/core.hpp>
#include <hypermoe/core/quant.hpp>
#include <hypermoe/backend/linear_spec.hpp>

#include "ggml_reference_quants.hpp"

namespace hm = hypermoe;

namespace {

// A row's values as the loader holds them in `storage`: TensorBinder's conversion
// (detail::store_row), read back through the view an expert gets of it (WeightView::packed).
std::vector<float> held_as(std::span<const float> row, hm::dtype storage) {
    std::vector<std::byte> bytes(hm::weight_bytes(storage, 1, row.size()));
    hm::detail::store_row(row, storage, bytes.data(), "row", 0);
    const hm::WeightView held = hm::WeightView::packed(bytes.data(), storage, 1, hm::index_t(row.size()));
    std::vector<float> out(row.size());
    for (std::size_t i = 0; i < row.size(); ++i) out[i] = held.at(0, hm::index_t(i));
    return out;
}

struct Error {
    double diff = 0, ref = 0;
    void add(std::span<const float> approx, std::span<const float> exact) {
        for (std::size_t i = 0; i < exact.size(); ++i) {
            const double e = double(approx[i]) - exact[i];
            diff += e * e, ref += double(exact[i]) * exact[i];
        }
    }
    [[nodiscard]] double relative() const { return std::sqrt(diff / ref); }
};

// A file type: its name, bits a weight, and how a super-block of 256 weights becomes the values
// its bytes decode to (`out`); "none" keeps the weights.
struct FileType {
    const char* name;
    double bits;
    void (*values)(std::span<const float, 256> x, std::span<float, 256> out);
};

// The values GgmlQuantBlock decodes from `bytes` (one block of `type`) into out.
template <std::size_t Bytes>
void decode(const ggml_ref::Block<Bytes>& bytes, hm::ggml_quant type, std::span<float> out) {
    const hm::GgmlQuantBlock block(bytes.data(), type);
    for (std::size_t j = 0; j < out.size(); ++j) out[j] = block[hm::index_t(j)];
}

template <hm::ggml_quant Type, auto Quantize>
void super_block(std::span<const float, 256> x, std::span<float, 256> out) {
    decode(Quantize(x), Type, out);
}

template <hm::ggml_quant Type, auto Quantize>
void blocks_of_32(std::span<const float, 256> x, std::span<float, 256> out) {
    for (std::size_t b = 0; b < 256; b += 32) decode(Quantize(x.subspan(b).first<32>()), Type, out.subspan(b, 32));
}

void keep(std::span<const float, 256> x, std::span<float, 256> out) { std::copy(x.begin(), x.end(), out.begin()); }

using hm::ggml_quant;
constexpr FileType file_types[] = {
    {"none", 32, keep},
    {"Q2_K", 2.625, super_block<ggml_quant::q2_k, ggml_ref::quantize_q2_k>},
    {"Q3_K", 3.4375, super_block<ggml_quant::q3_k, ggml_ref::quantize_q3_k>},
    {"IQ4_XS", 4.25, super_block<ggml_quant::iq4_xs, ggml_ref::quantize_iq4_xs>},
    {"MXFP4", 4.25, blocks_of_32<ggml_quant::mxfp4, ggml_ref::quantize_mxfp4>},
    {"IQ4_NL", 4.5, blocks_of_32<ggml_quant::iq4_nl, ggml_ref::quantize_iq4_nl>},
    {"Q4_K", 4.5, super_block<ggml_quant::q4_k, ggml_ref::quantize_k<4>>},
    {"Q4_1", 5, blocks_of_32<ggml_quant::q4_1, ggml_ref::quantize_32<ggml_quant::q4_1>>},
    {"Q5_0", 5.5, blocks_of_32<ggml_quant::q5_0, ggml_ref::quantize_32<ggml_quant::q5_0>>},
    {"Q5_K", 5.5, super_block<ggml_quant::q5_k, ggml_ref::quantize_k<5>>},
    {"Q5_1", 6, blocks_of_32<ggml_quant::q5_1, ggml_ref::quantize_32<ggml_quant::q5_1>>},
    {"Q6_K", 6.5625, super_block<ggml_quant::q6_k, ggml_ref::quantize_q6_k>},
};

} // namespace

int main(int argc, char** argv) {
    if (argc != 1 && argc != 3) {
        std::fputs("usage: requant_error [ROWS COLS]\n", stderr);
        return 2;
    }
    const std::size_t rows = argc == 3 ? std::stoul(argv[1]) : 512, cols = argc == 3 ? std::stoul(argv[2]) : 4096;
    if (cols % 256 != 0) {
        std::fputs("requant_error: COLS must be a multiple of 256\n", stderr);
        return 2;
    }
    const hm::dtype storages[] = {hm::dtype::bf16, hm::dtype::q8_0, hm::dtype::q4_0};
    std::printf("| weights | file | bits | file's error | -> bf16 | -> q8_0 | -> q4_0 |\n|---|---|---|---|---|---|---|\n");
    for (const char* dist : {"normal", "Laplace", "Student's t, 4 dof"}) {
        for (const FileType& file : file_types) {
            std::mt19937_64 rng(7); // the same weights for every file type
            std::normal_distribution<float> normal(0.0f, 0.02f);
            std::exponential_distribution<float> exponential(1 / 0.014f);
            std::student_t_distribution<float> student(4.0f);
            Error own, held[3];
            std::vector<float> w(cols), k(cols);
            for (std::size_t r = 0; r < rows; ++r) {
                for (float& v : w)
                    v = dist[0] == 'n' ? normal(rng) : dist[0] == 'L' ? (rng() & 1 ? 1.0f : -1.0f) * exponential(rng) : 0.014f * student(rng);
                for (std::size_t b = 0; b < cols; b += 256)
                    file.values(std::span<const float, 256>(w.data() + b, 256), std::span<float, 256>(k.data() + b, 256));
                own.add(k, w);
                for (int s = 0; s < 3; ++s) held[s].add(held_as(k, storages[s]), w);
            }
            std::printf("| %s | %s | %g | %.2f%% | %.2f%% | %.2f%% | %.2f%% |\n", dist, file.name, file.bits, 100 * own.relative(),
                        100 * held[0].relative(), 100 * held[1].relative(), 100 * held[2].relative());
        }
    }
}
