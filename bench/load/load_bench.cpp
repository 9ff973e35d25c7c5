// Forward under load: an edge application shares its cores. A spinner process keeps one of the
// two cores busy while a forward runs on 2 threads; each iteration times the same forward with
// the spinner paused and running, alternately, so drift hits both alike. Counters:
//   unloaded_ms, loaded_ms  medians of the two, ratio = loaded / unloaded (target: <= 2.5).
// Every layer type the loader builds: top-k MoE (mixtral), MoE + gated shared expert
// (qwen2_moe), group-limited sigmoid routing + shared expert (deepseek_v3), top-1 with capacity
// (switch_transformers) and HyperMoE (hypermoe_gpt2), at d = 512 (synthetic checkpoints written
// to a temporary directory at start-up), oneDNN backend, f32, T = 1, 32, 512.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hypermoe/backend/onednn.hpp>
#include <hypermoe/io/io.hpp>

#include "../bench_support.hpp"

namespace hm = hypermoe;
namespace fs = std::filesystem;

namespace {

/// A child process that spins on one core while `on` is set (and sleeps otherwise).
class Spinner {
public:
    Spinner() {
        void* shared = mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shared == MAP_FAILED) throw std::runtime_error("Spinner: mmap failed");
        flag_ = new (shared) std::atomic<int>(0);
        pid_ = fork();
        if (pid_ == 0) {
            volatile double sink = 1.0;
            for (;;) {
                const int f = flag_->load(std::memory_order_relaxed);
                if (f < 0) _exit(0);
                if (f == 0) {
                    usleep(50);
                    continue;
                }
                for (int i = 0; i < 10000; ++i) sink = sink * 1.0000001 + 1e-9;
            }
        }
    }
    ~Spinner() {
        flag_->store(-1);
        waitpid(pid_, nullptr, 0);
        munmap(flag_, sizeof(std::atomic<int>));
    }
    void set(bool on) {
        flag_->store(on ? 1 : 0);
        std::this_thread::sleep_for(std::chrono::microseconds(500)); // let it start or stop
    }

private:
    std::atomic<int>* flag_ = nullptr;
    pid_t pid_ = -1;
};

Spinner& spinner() {
    static Spinner s;
    return s;
}

struct Case {
    hm::Family family;
    hm::index_t layer;
    std::string stack;
};

const std::vector<Case> cases = {{hm::family("mixtral"), 1, ""},
                                 {hm::family("qwen2_moe"), 1, ""},
                                 {hm::family("deepseek_v3"), 1, ""},
                                 {hm::family("switch_transformers"), 1, "encoder"},
                                 {hm::family("hypermoe_gpt2"), 1, ""}};

const fs::path& root() {
    static const fs::path r = fs::temp_directory_path() / ("hypermoe-load-bench-" + std::to_string(::getpid()));
    return r;
}

const hm::LoadedMoeBlock<hm::onednn>& block(std::size_t i) {
    static std::vector<std::optional<hm::LoadedMoeBlock<hm::onednn>>> blocks(cases.size());
    if (!blocks[i]) {
        const fs::path dir = root() / std::string(hm::to_string(cases[i].family));
        hm::write_synthetic_checkpoint(dir.string(), {.family = cases[i].family, .d_model = 512, .d_ff = 1408,
                                                      .experts = 8, .top_k = 2, .layers = 2, .capacity = 640,
                                                      .adapter_rank = 64, .hyper_dim = 128});
        blocks[i].emplace(hm::load_moe_block<hm::onednn>(hm::Checkpoint(dir.string()), cases[i].layer, cases[i].stack));
        fs::remove_all(dir); // the block holds its own copy of the weights
    }
    return *blocks[i];
}

void BM_UnderLoad(benchmark::State& state) {
    const auto& b = block(std::size_t(state.range(0)));
    const hm::index_t t = state.range(1);
    const auto x = hm::bench::random_matrix(t, b.d_model(), 7, 1.0f);
    hm::Matrix<float> y(t, b.d_model());
    hm::Workspace ws;
    hm::RoutingPlan plan;
    const auto forward = [&] { b.forward(x.view(), y.view(), ws, plan); };
    forward(); // warm-up: workspace, plan, HyperExpert cache
    std::vector<double> unloaded, loaded;
    using clock = std::chrono::steady_clock;
    for (auto _ : state) {
        spinner().set(false);
        auto t0 = clock::now();
        forward();
        unloaded.push_back(std::chrono::duration<double>(clock::now() - t0).count());
        spinner().set(true);
        t0 = clock::now();
        forward();
        const double l = std::chrono::duration<double>(clock::now() - t0).count();
        loaded.push_back(l);
        state.SetIterationTime(l);
    }
    spinner().set(false);
    const auto median = [](std::vector<double> v) {
        std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    const double u = median(unloaded), l = median(loaded);
    state.counters["unloaded_ms"] = 1e3 * u;
    state.counters["loaded_ms"] = 1e3 * l;
    state.counters["ratio"] = l / u;
    state.SetLabel(std::string(hm::to_string(cases[std::size_t(state.range(0))].family)));
}

} // namespace

BENCHMARK(BM_UnderLoad)
    ->ArgsProduct({{0, 1, 2, 3, 4}, {1, 32, 512}})
    ->ArgNames({"layer", "T"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.5);

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    spinner(); // fork before any OpenMP or oneDNN thread exists
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    fs::remove_all(root());
    return 0;
}
