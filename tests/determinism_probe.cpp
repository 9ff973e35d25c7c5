// Prints one line per (family, backend, storage, HyperMoE mode, T): a 64-bit FNV-1a hash of the
// output bytes. test_determinism runs it under OMP_NUM_THREADS = 1, 2, 3, 4 and 8 (separate
// processes, so each gets OpenMP's setting from the start) and requires identical output.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <tuple>

#include <unistd.h>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;

namespace {

std::uint64_t fnv1a(const Matrix<float>& m) {
    std::uint64_t h = 1469598103934665603ull;
    const auto* p = reinterpret_cast<const unsigned char*>(m.data());
    for (std::size_t i = 0; i < sizeof(float) * std::size_t(m.rows() * m.cols()); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

template <class B>
void probe(const Checkpoint& ck, Family family, index_t layer, const std::string& stack) {
    for (const test::StorageCase& sc : test::storage_cases)
        for (const HyperMode mode : {HyperMode::cached, HyperMode::per_token}) {
            if (!sc.swept()) continue;
            if (mode == HyperMode::per_token && !sc.every_mode()) continue;
            const auto block = load_moe_block<B>(ck, layer, stack, {.storage = sc.storage, .prec = sc.prec, .hyper = {.mode = mode}});
            if (mode == HyperMode::per_token && !block.is_hyper()) continue;
            for (const index_t t : {1, 37, 300}) {
                const Matrix<float> x = test::random_matrix(t, block.d_model(), std::uint32_t(t));
                Matrix<float> y(t, block.d_model());
                Workspace ws;
                RoutingPlan plan;
                block.forward(x.view(), y.view(), ws, plan);
                std::printf("%s %s %s %s/%s %s T=%lld %016llx\n", std::string(to_string(family)).c_str(), stack.c_str(),
                            std::string(B::name).c_str(), std::string(to_string(sc.storage)).c_str(),
                            std::string(to_string(sc.prec)).c_str(),
                            mode == HyperMode::cached ? "cached" : "per_token", static_cast<long long>(t),
                            static_cast<unsigned long long>(fnv1a(y)));
            }
        }
}

template <class... Bs>
void probe_all(const Checkpoint& ck, Family family, index_t layer, const std::string& stack, std::tuple<Bs...>*) {
    (probe<Bs>(ck, family, layer, stack), ...);
}

} // namespace

int main() {
    namespace fs = std::filesystem;
    const fs::path root = fs::temp_directory_path() / ("hypermoe-determinism-" + std::to_string(::getpid()));
    int status = 0;
    try {
        const std::tuple<Family, index_t, const char*> cases[] = {
            {family("mixtral"), 1, ""},       {family("qwen2_moe"), 0, ""},
            {family("olmoe"), 1, ""},         {family("deepseek_v3"), 0, ""},
            {family("switch_transformers"), 1, "decoder"}, {family("hypermoe_gpt2"), 1, ""},
            {family("hypermoe_switch"), 1, "encoder"}};
        for (const auto& [family, layer, stack] : cases) {
            const fs::path dir = root / std::string(to_string(family));
            write_synthetic_checkpoint(dir.string(), {.family = family, .d_model = 128, .d_ff = 352, .experts = 8,
                                                      .top_k = 2, .layers = 2, .capacity = 96, .adapter_rank = 16});
            probe_all(Checkpoint(dir.string()), family, layer, stack, static_cast<test::all_backends*>(nullptr));
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "determinism_probe: %s\n", e.what());
        status = 1;
    }
    fs::remove_all(root);
    return status;
}
