// Bitwise-equal outputs for 1, 2, 3, 4 and 8 OpenMP threads (oversubscribed on this 2-core
// machine, which is fine), for every family, backend, storage dtype and HyperMoE mode. The probe
// (a test case skipped unless asked for) writes one line per (family, backend, storage, HyperMoE
// mode, T): a 64-bit FNV-1a hash of the output bytes. The test runs this executable's probe once
// per thread count, each in a process of its own (so each gets OpenMP's setting from the start),
// and requires identical lines.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <tuple>

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
void probe(std::FILE* out, const Checkpoint& ck, Family family, index_t layer, const std::string& stack) {
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
                std::fprintf(out, "%s %s %s %s/%s %s T=%lld %016llx\n", std::string(to_string(family)).c_str(), stack.c_str(),
                            std::string(B::name).c_str(), std::string(to_string(sc.storage)).c_str(),
                            std::string(to_string(sc.prec)).c_str(),
                            mode == HyperMode::cached ? "cached" : "per_token", static_cast<long long>(t),
                            static_cast<unsigned long long>(fnv1a(y)));
            }
        }
}

template <class... Bs>
void probe_all(std::FILE* out, const Checkpoint& ck, Family family, index_t layer, const std::string& stack,
               std::tuple<Bs...>*) {
    (probe<Bs>(out, ck, family, layer, stack), ...);
}

/// The probe's test case (skipped unless run by name with --no-skip).
constexpr const char* probe_name = "determinism probe: output hashes written to $HYPERMOE_DETERMINISM_OUT";

/// This executable's probe under `threads` OpenMP threads, in a process of its own: its lines.
/// The probe's doctest output (--minimal: its failures only) goes to this test's log.
std::string run_probe(int threads) {
    namespace fs = std::filesystem;
    const test::TempDir dir("determinism-" + std::to_string(threads));
    const fs::path out = dir.path / "hashes.txt";
    const std::string command = "OMP_NUM_THREADS=" + std::to_string(threads) + " HYPERMOE_DETERMINISM_OUT='" +
                                out.string() + "' '" + fs::read_symlink("/proc/self/exe").string() +
                                "' --source-file='*test_determinism.cpp' --test-case='determinism probe*' --no-skip --minimal";
    const int status = std::system(command.c_str());
    CHECK(status == 0);
    std::ifstream in(out);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

} // namespace

TEST_CASE(probe_name * doctest::skip()) {
    namespace fs = std::filesystem;
    const char* path = std::getenv("HYPERMOE_DETERMINISM_OUT");
    REQUIRE(path != nullptr);
    const std::unique_ptr<std::FILE, int (*)(std::FILE*)> out(std::fopen(path, "w"), std::fclose);
    REQUIRE(out != nullptr);
    const test::TempDir root("determinism-probe");
    const std::tuple<Family, index_t, const char*> cases[] = {
        {family("mixtral"), 1, ""},       {family("qwen2_moe"), 0, ""},
        {family("olmoe"), 1, ""},         {family("deepseek_v3"), 0, ""},
        {family("switch_transformers"), 1, "decoder"}, {family("hypermoe_gpt2"), 1, ""},
        {family("hypermoe_switch"), 1, "encoder"}};
    for (const auto& [family, layer, stack] : cases) {
        const fs::path dir = root.path / std::string(to_string(family));
        write_synthetic_checkpoint(dir.string(), {.family = family, .d_model = 128, .d_ff = 352, .experts = 8,
                                                  .top_k = 2, .layers = 2, .capacity = 96, .adapter_rank = 16});
        probe_all(out.get(), Checkpoint(dir.string()), family, layer, stack, static_cast<test::all_backends*>(nullptr));
    }
}

TEST_CASE("outputs are bitwise equal for 1, 2, 3, 4 and 8 OpenMP threads") {
    const std::string one = run_probe(1);
    CHECK(one.size() > 1000); // every family, backend, storage and mode printed a line
    // A sanitizer build (~10x slower) compares 3 against 1 only.
#ifdef HYPERMOE_TEST_SANITIZED
    for (const int threads : {3}) {
#else
    for (const int threads : {2, 3, 4, 8}) {
#endif
        CAPTURE(threads);
        const std::string other = run_probe(threads);
        if (other != one) {
            // Name the first line that differs.
            std::size_t a = 0;
            while (a < one.size() && a < other.size() && one[a] == other[a]) ++a;
            const std::size_t line = one.rfind('\n', a) == std::string::npos ? 0 : one.rfind('\n', a) + 1;
            MESSAGE("first difference: ", one.substr(line, one.find('\n', line) - line), " vs ",
                    other.substr(line, other.find('\n', line) - line));
        }
        CHECK(other == one);
    }
}
