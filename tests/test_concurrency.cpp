// One const layer shared by many application threads (each with its own Workspace and plan):
// every result is bitwise equal to the same call made serially, on every backend, storage dtype
// and family, with cold HyperExpert caches. docs/threading.md cites these tests.
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <hypermoe/io/io.hpp>

#include "test_support.hpp"

using namespace hypermoe;

namespace {

/// Every family, as a synthetic checkpoint wide enough that oneDNN's kernels use their
/// scratchpad (the fixtures' widths are too small for that), with the block each one runs.
struct FamilyCase {
    Family family;
    index_t layer;
    std::string stack;
};
const std::vector<FamilyCase> family_cases = {
    {family("mixtral"), 1, ""},          {family("qwen2_moe"), 0, ""},
    {family("olmoe"), 1, ""},            {family("deepseek_v3"), 0, ""},
    {family("switch_transformers"), 1, "encoder"}, {family("switch_transformers"), 1, "decoder"},
    {family("hypermoe_gpt2"), 1, ""},    {family("hypermoe_switch"), 1, "decoder"}};

/// A synthetic checkpoint of `family` in a temporary directory, removed at scope exit.
struct SyntheticDir {
    std::filesystem::path path;
    explicit SyntheticDir(Family family) {
        path = std::filesystem::temp_directory_path() /
               ("hypermoe-concurrency-" + std::string(to_string(family)) + "-" + std::to_string(::getpid()));
        std::filesystem::remove_all(path);
        write_synthetic_checkpoint(path.string(), {.family = family, .d_model = 128, .d_ff = 352, .experts = 8,
                                                   .top_k = 2, .layers = 2, .capacity = 96, .adapter_rank = 16});
    }
    ~SyntheticDir() { std::filesystem::remove_all(path); }
};

/// Token counts of the threads: one per thread, across the oneDNN row buckets and the 256-row pieces.
const std::vector<index_t> thread_rows = {1, 5, 17, 64, 130, 300};

template <class B>
Matrix<float> run_block(const LoadedMoeBlock<B>& block, ConstMatrixView<float> x) {
    Matrix<float> y(x.rows(), x.cols());
    Workspace ws;
    RoutingPlan plan;
    block.forward(x, y.view(), ws, plan);
    return y;
}

bool bitwise_equal(const Matrix<float>& a, const Matrix<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.rows() * a.cols())) == 0;
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("one const block, many threads: bitwise the serial results", B, shared_block) {
    for (const FamilyCase& fc : family_cases) {
        const SyntheticDir dir(fc.family);
        const Checkpoint ck(dir.path.string());
        const FamilyCase ref = fc;
        const bool hyper = describe(ck).adapter_rank > 0;
        for (const test::StorageCase& sc : test::storage_cases) {
            if (!sc.swept()) continue;
            for (const HyperMode mode : {HyperMode::cached, HyperMode::per_token}) {
                CAPTURE(to_string(fc.family));
                CAPTURE(fc.stack);
                CAPTURE(to_string(sc.storage));
                CAPTURE(to_string(sc.prec));
                CAPTURE(int(mode));
                if (mode == HyperMode::per_token && (!hyper || !sc.every_mode())) continue;
                const LoadOptions opt{.storage = sc.storage, .prec = sc.prec, .hyper = {.mode = mode}};
                // Serial results, on a block of their own.
                const auto serial_block = load_moe_block<B>(ck, ref.layer, ref.stack, opt);
                const index_t d = serial_block.d_model();
                std::vector<Matrix<float>> xs, want;
                for (std::size_t i = 0; i < thread_rows.size(); ++i) {
                    xs.push_back(test::random_matrix(thread_rows[i], d, std::uint32_t(100 + i)));
                    want.push_back(run_block(serial_block, xs.back().view()));
                }
                // The shared block is built on another thread and starts with cold caches.
                std::optional<LoadedMoeBlock<B>> shared;
                std::thread([&] { shared.emplace(load_moe_block<B>(ck, ref.layer, ref.stack, opt)); }).join();
                std::atomic<int> mismatches{0}, failures{0};
                constexpr int rounds = test::sanitized ? 1 : 3;
                std::vector<std::thread> threads;
                for (std::size_t i = 0; i < thread_rows.size(); ++i)
                    threads.emplace_back([&, i] {
                        try {
                            Workspace ws;
                            RoutingPlan plan;
                            Matrix<float> y(xs[i].rows(), d);
                            for (int r = 0; r < rounds; ++r) {
                                shared->forward(xs[i].view(), y.view(), ws, plan);
                                if (!bitwise_equal(y, want[i])) mismatches.fetch_add(1);
                            }
                        } catch (...) {
                            failures.fetch_add(1);
                        }
                    });
                for (auto& t : threads) t.join();
                CHECK(failures.load() == 0);
                CHECK(mismatches.load() == 0);
            }
        }
    }
}
TEST_CASE_TEMPLATE_APPLY(shared_block, test::all_backends);
