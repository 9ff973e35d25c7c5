// The `hypermoe` command, run as a user would: every fixture through `hypermoe run` on every
// backend of the build, `inspect`, `bench --json`, and the usage errors (exit 2, one line).
#include <doctest/doctest.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <sys/wait.h>
#include <vector>

#include <hypermoe/io/io.hpp>

#include "gguf_writer.hpp"
#include "test_support.hpp"

using namespace hypermoe;
namespace fs = std::filesystem;

namespace {

const std::string cli = HYPERMOE_CLI;

struct Result {
    int status;
    std::string out, err;
};

/// Runs the command with `args` (and the environment variables `env`, "NAME=value ..."),
/// capturing stdout and stderr.
Result run_cli(const std::string& args, const std::string& env = "") {
    const fs::path err_file = fs::temp_directory_path() / ("hypermoe-cli-err-" + std::to_string(::getpid()));
    const std::string cmd = (env.empty() ? "" : "env " + env + " ") + cli + " " + args + " 2>" + err_file.string();
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    std::array<char, 4096> buf{};
    while (const std::size_t n = std::fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
    const int raw = ::pclose(p);
    std::string err;
    if (FILE* f = std::fopen(err_file.string().c_str(), "r")) {
        while (const std::size_t n = std::fread(buf.data(), 1, buf.size(), f)) err.append(buf.data(), n);
        std::fclose(f);
    }
    fs::remove(err_file);
    return {WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, out, err};
}

/// What the command names as the path of weights stored as `t` with precision `p` on its
/// default backend: our kernels' instructions, or oneDNN's bf16 matmul for bf16 `fast` where the
/// oneDNN backend takes it (`forced`: as under HYPERMOE_ONEDNN_BF16=primitive).
std::string kernel_name(hypermoe::dtype t, hypermoe::precision p, bool forced = false) {
#if HYPERMOE_HAS_ONEDNN
    const std::string& impl = hypermoe::detail::onednn_bf16_impl();
    const bool primitive = forced ? !impl.empty() && !impl.starts_with("ref") : hypermoe::detail::onednn_bf16_primitive();
    if (t == hypermoe::dtype::bf16 && p == hypermoe::precision::fast && primitive) return "onednn " + impl;
#else
    (void)forced;
#endif
    return std::string(hypermoe::detail::kernel_isa_name(t, p));
}

std::vector<std::string> backends() {
    std::vector<std::string> b{"reference"};
#if HYPERMOE_HAS_EIGEN
    b.push_back("eigen");
#endif
#if HYPERMOE_HAS_ONEDNN
    b.push_back("onednn");
#endif
    return b;
}

} // namespace

/// `hypermoe run --model <model> --input <input>` once per extra argument string (e.g. "" and
/// " --weights bf16"), each output's y by that string; the outputs go through `scratch`.
std::map<std::string, Matrix<float>> run_outputs(const std::string& model, const std::string& input, const std::vector<std::string>& extras,
                                                 const std::string& scratch) {
    std::map<std::string, Matrix<float>> y;
    for (const std::string& extra : extras) {
        CAPTURE(extra);
        const Result r = run_cli("run --model " + model + extra + " --input " + input + " --output " + scratch);
        REQUIRE_MESSAGE(r.status == 0, r.err);
        const SafeTensorsFile got(scratch);
        y[extra] = got.view().to_f32(got.view().info("y"));
    }
    return y;
}

TEST_CASE("hypermoe run reproduces every fixture on every backend") {
    const fs::path out = fs::temp_directory_path() / ("hypermoe-cli-y-" + std::to_string(::getpid()) + ".safetensors");
    for (const auto& entry : fs::directory_iterator(test::data_dir)) {
        if (!entry.is_directory()) continue;
        const std::string dir = entry.path().string();
        for (const auto& backend : backends()) {
            CAPTURE(dir);
            CAPTURE(backend);
            const Result r = run_cli("run --model " + dir + " --input " + dir + "/input.safetensors --output " + out.string() +
                                     " --backend " + backend + " --threads 2");
            REQUIRE_MESSAGE(r.status == 0, r.err);
            const SafeTensorsFile got(out.string()), want(dir + "/expected.safetensors");
            const auto& g = got.view();
            const auto& w = want.view();
            CHECK(g.info("y").shape == w.info("y").shape);
            CHECK(test::relative_error(g.to_f32(g.info("y")).view(), w.to_f32(w.info("y")).view()) <= 1e-5);
            const Matrix<float> ids = g.to_f32(g.info("expert_ids")), ref_ids = w.to_f32(w.info("expert_ids"));
            REQUIRE(ids.cols() == ref_ids.cols());
            for (index_t t = 0; t < ids.rows(); ++t) { // as sets per token
                std::set<float> a, b;
                for (index_t j = 0; j < ids.cols(); ++j) a.insert(ids(t, j)), b.insert(ref_ids(t, j));
                CHECK(a == b);
            }
            CHECK(g.contains("expert_weights"));
            CHECK(g.contains("kept") == w.contains("kept"));
            if (w.contains("kept")) {
                const Matrix<float> k = g.to_f32(g.info("kept")), kr = w.to_f32(w.info("kept"));
                CHECK(test::relative_error(k.view(), kr.view()) == 0.0);
            }
        }
    }
    fs::remove(out);
}

TEST_CASE("hypermoe run --grad writes dx and d/<tensor> matching every fixture's float64 gradients") {
    const fs::path out = fs::temp_directory_path() / ("hypermoe-cli-y-" + std::to_string(::getpid()) + ".safetensors");
    const fs::path grads = fs::temp_directory_path() / ("hypermoe-cli-g-" + std::to_string(::getpid()) + ".safetensors");
    for (const auto& entry : fs::directory_iterator(test::data_dir)) {
        if (!entry.is_directory()) continue;
        const std::string dir = entry.path().string();
        CAPTURE(dir);
        // The fixture's grads.safetensors holds `dy`: it is the --grad file as it stands.
        const Result r = run_cli("run --model " + dir + " --input " + dir + "/input.safetensors --output " + out.string() + " --grad " +
                                 dir + "/grads.safetensors --output-grads " + grads.string() + " --threads 2");
        REQUIRE_MESSAGE(r.status == 0, r.err);
        const SafeTensorsFile got(grads.string()), want(dir + "/grads.safetensors");
        const auto& g = got.view();
        const auto& w = want.view();
        std::set<std::string> have, expected;
        for (const TensorInfo& t : g.tensors()) have.insert(t.name);
        for (const TensorInfo& t : w.tensors())
            if (t.name == "dx" || t.name.starts_with("d/")) expected.insert(t.name);
        CHECK(have == expected);
        for (const std::string& name : expected) {
            CAPTURE(name);
            if (!g.contains(name)) continue;
            CHECK(g.info(name).shape == w.info(name).shape);
            const Matrix<float> a = g.to_f32(g.info(name)), b = w.to_f32(w.info(name));
            CHECK(test::relative_error(a.view(), b.view()) <= 1e-5);
        }
    }
    fs::remove(out);
    fs::remove(grads);
}

TEST_CASE("hypermoe run and bench with bf16, 8- and 4-bit expert weights; bench names the f32 kernels") {
    const std::string dir = test::data_dir + "/qwen2_moe-basic";
    const fs::path out = fs::temp_directory_path() / ("hypermoe-cli-q-" + std::to_string(::getpid()) + ".safetensors");
    for (const auto& weights_bound :
         {std::pair<std::string, double>{"bf16", 1e-2}, {"q8_0", 3e-2}, {"q4_0", 5e-1}, {"mxfp4", 5e-1}, {"q4_k", 4e-1}}) {
        const std::string& weights = weights_bound.first; // not a structured binding: clang 14 cannot capture those
        const double bound = weights_bound.second;
        CAPTURE(weights);
        for (const std::string precision : {"exact", "fast"}) {
            CAPTURE(precision);
            const Result r = run_cli("run --model " + dir + " --input " + dir + "/input.safetensors --output " + out.string() +
                                     " --weights " + weights + " --precision " + precision);
            REQUIRE_MESSAGE(r.status == 0, r.err);
            const SafeTensorsFile got(out.string()), want(dir + "/expected.safetensors");
            const double err = test::relative_error(got.view().to_f32(got.view().info("y")).view(),
                                                    want.view().to_f32(want.view().info("y")).view());
            CHECK(err > 0.0);
            CHECK(err <= bound);
            const Result b = run_cli("bench --d-model 64 --d-ff 64 --tokens 8 --repeat 1 --weights " + weights +
                                     " --precision " + precision + " --json");
            REQUIRE_MESSAGE(b.status == 0, b.err);
            const auto row = nlohmann::json::parse(b.out.substr(0, b.out.find('\n')));
            CHECK(row["weights"] == weights);
            CHECK(row["precision"] == precision);
            const hypermoe::dtype t = weights == "bf16"   ? hypermoe::dtype::bf16
                                      : weights == "q8_0" ? hypermoe::dtype::q8_0
                                      : weights == "q4_0" ? hypermoe::dtype::q4_0
                                      : weights == "q4_k" ? hypermoe::dtype::q4_k
                                                          : hypermoe::dtype::mxfp4;
            const hypermoe::precision p = precision == "fast" ? hypermoe::precision::fast : hypermoe::precision::exact;
            CHECK(row["isa"] == kernel_name(t, p));
            if (t == hypermoe::dtype::bf16 && p == hypermoe::precision::fast) {
                // The AMX path's name, on any CPU whose oneDNN has a bf16 matmul (onednn.hpp).
                const Result forced = run_cli("bench --d-model 64 --d-ff 64 --tokens 8 --repeat 1 --weights bf16 --precision fast --json",
                                              "HYPERMOE_ONEDNN_BF16=primitive");
                REQUIRE_MESSAGE(forced.status == 0, forced.err);
                CHECK(nlohmann::json::parse(forced.out.substr(0, forced.out.find('\n')))["isa"] == kernel_name(t, p, true));
            }
            // 8 experts x 3 matrices of 64 x 64: 8 x 3 x 64 rows x 2 blocks of 32 (bf16: 2 bytes each;
            // q4_k: a zero-padded super-block of 144 bytes a row).
            const int block = t == hypermoe::dtype::bf16 ? 64 : t == hypermoe::dtype::q8_0 ? 34 : t == hypermoe::dtype::q4_0 ? 18 : 17;
            CHECK(row["weight_bytes"] == 8 * 3 * 64 * (t == hypermoe::dtype::q4_k ? 144 : 2 * block));
        }
    }
    // f32: the backend's name, or the instructions of our f32 panels where oneDNN runs them.
    for (const auto& backend : backends()) {
        CAPTURE(backend);
        const Result b = run_cli("bench --d-model 64 --d-ff 64 --tokens 8 --repeat 1 --weights f32 --backend " + backend + " --json");
        REQUIRE_MESSAGE(b.status == 0, b.err);
        const auto row = nlohmann::json::parse(b.out.substr(0, b.out.find('\n')));
#if HYPERMOE_HAS_ONEDNN
        if (backend == "onednn") {
            CHECK(row["isa"] == std::string(hypermoe::detail::onednn_f32_kernel_name()));
            CHECK(row["isa"] == (hypermoe::detail::onednn_f32_brgemm() ? std::string("onednn")
                                                                       : std::string(to_string(hypermoe::detail::vector_kernel()))));
            continue;
        }
#endif
        CHECK(row["isa"] == backend);
    }
    fs::remove(out);
}

TEST_CASE("hypermoe inspect, run and bench on GGUF files") {
    const std::string dir = test::data_dir + "/mixtral-basic";
    const fs::path tmp = fs::temp_directory_path() / ("hypermoe-cli-gguf-" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    const std::string f32 = (tmp / "f32.gguf").string(), q4 = (tmp / "q4.gguf").string(), out = (tmp / "y.safetensors").string();
    const Checkpoint st(dir);
    test::gguf_from(st).write(f32);
    test::gguf_from(st, {.experts = test::Q4_0}).write(q4);

    const Result i = run_cli("inspect --model " + q4);
    REQUIRE_MESSAGE(i.status == 0, i.err);
    CHECK(i.out.find("family     mixtral") != std::string::npos);
    CHECK(i.out.find("MoE blocks 2: 0, 1") != std::string::npos);
    CHECK(i.out.find("tensors    26 (F32, Q4_0)") != std::string::npos); // per block: gate + 3 x 4 experts
    CHECK(i.out.find("bytes      F32 ") != std::string::npos);
    CHECK(i.out.find(", Q4_0 ") != std::string::npos);
    // down's rows of 40 stay F32 (below): by default each expert matrix is held as stored
    CHECK(i.out.find("format     GGUF, architecture llama; experts stored as F32, Q4_0; default --weights stored: F32 as f32, Q4_0 as q4_0") !=
          std::string::npos);
    const Result i32 = run_cli("inspect --model " + f32);
    REQUIRE_MESSAGE(i32.status == 0, i32.err);
    CHECK(i32.out.find("experts stored as F32; default --weights stored: F32 as f32\n") != std::string::npos);

    // The F32 file reproduces the fixture; the Q4_0 one (down's rows of 40 stay F32, as
    // llama.cpp's quantizer leaves them: the experts' types are mixed, so the default is f32)
    // is what --weights q4_0 gives from the safetensors checkpoint, bit for bit.
    for (const auto& backend : backends()) {
        CAPTURE(backend);
        Result r = run_cli("run --model " + f32 + " --input " + dir + "/input.safetensors --output " + out + " --backend " + backend);
        REQUIRE_MESSAGE(r.status == 0, r.err);
        const SafeTensorsFile want(dir + "/expected.safetensors");
        {
            const SafeTensorsFile got(out);
            CHECK(test::relative_error(got.view().to_f32(got.view().info("y")).view(), want.view().to_f32(want.view().info("y")).view()) <= 1e-5);
        }
        const std::string q_out = (tmp / "yq.safetensors").string();
        r = run_cli("run --model " + q4 + " --weights q4_0 --input " + dir + "/input.safetensors --output " + out + " --backend " + backend);
        REQUIRE_MESSAGE(r.status == 0, r.err);
        r = run_cli("run --model " + dir + " --weights q4_0 --input " + dir + "/input.safetensors --output " + q_out + " --backend " + backend);
        REQUIRE_MESSAGE(r.status == 0, r.err);
        const SafeTensorsFile got(out), ref(q_out);
        CHECK(test::relative_error(got.view().to_f32(got.view().info("y")).view(), ref.view().to_f32(ref.view().info("y")).view()) == 0.0);
    }
    const Result b = run_cli("bench --model " + q4 + " --weights q4_0 --precision fast --tokens 8 --repeat 1 --json");
    REQUIRE_MESSAGE(b.status == 0, b.err);
    CHECK(nlohmann::json::parse(b.out.substr(0, b.out.find('\n')))["weights"] == "q4_0");
    const Result bad = run_cli("inspect --model " + (tmp / "missing.gguf").string());
    CHECK(bad.status == 2);
    CHECK(bad.err.find("missing.gguf: neither a checkpoint directory nor a GGUF file") != std::string::npos);
    fs::remove_all(tmp);
}

TEST_CASE("hypermoe holds a GGUF file's Q4_K and MXFP4 experts as stored, its other K-quants in q8_0 (Q2_K and Q3_K files' in q4_0), unless --weights says otherwise") {
    const fs::path tmp = fs::temp_directory_path() / ("hypermoe-cli-kquant-" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    const std::string input = (tmp / "x.safetensors").string();
    for (const char* f : {"mixtral", "qwen3_moe"})
        write_synthetic_checkpoint((tmp / f).string(),
                                   {.family = *find_family(f), .d_model = 256, .d_ff = 256, .experts = 3, .top_k = 2, .layers = 1});
    const Matrix<float> x = test::random_matrix(4, 256, 9);
    write_safetensors(input, {f32_tensor("x", {4, 256}, {x.data(), 4 * 256})}, {{"layer", "0"}});
    // A file of a family whose experts' gate and up are stored in one ggml quant and down in
    // another (random blocks, d_model = d_ff = 256): its default --weights (stored: `kept` says
    // what each quant is held as), which `run` takes when none is given and which stays within
    // `bound` (relative) of the file's exact values: the blocks requantised (more than 0), or
    // held as stored (f32 arithmetic on the same values). Where every quant goes to `storage`,
    // the default equals --weights `storage`; else it holds fewer bytes (bench's weight_bytes).
    const auto check = [&](const std::string& stem, const std::string& family_name, std::uint32_t gate_up, std::uint32_t down,
                           const std::string& stored, const std::string& kept, const std::string& storage, double bound) {
        CAPTURE(stem);
        const std::string file = (tmp / (stem + ".gguf")).string();
        std::mt19937_64 rng(5);
        const std::uniform_real_distribution<float> scale(1.0f / 512, 1.0f / 128);
        test::rewritten(test::gguf_from(Checkpoint((tmp / family_name).string())).bytes(), [&](const std::string& name, test::TensorEdit& t) {
            if (name.find("_exps") == std::string::npos) return true;
            t.type = name.find("down") != std::string::npos ? down : gate_up;
            t.bytes = test::random_ggml_quant(t.type, 3 * 256 * 256 / hypermoe::detail::find_ggml_type(t.type)->block, rng, scale);
            return true;
        }).write(file);
        const Result i = run_cli("inspect --model " + file);
        REQUIRE_MESSAGE(i.status == 0, i.err);
        CHECK(i.out.find("family     " + family_name + "\n") != std::string::npos);
        CHECK(i.out.find("experts stored as " + stored + "; default --weights stored: " + kept + "\n") != std::string::npos);
        auto y = run_outputs(file, input, {"", " --weights " + storage, " --weights f32"}, (tmp / "y.safetensors").string());
        const auto count = [&](const std::string& what) {
            std::size_t n = 0;
            for (std::size_t at = kept.find(what); at != std::string::npos; at = kept.find(what, at + 1)) ++n;
            return n;
        };
        const bool all_converted = count(" as ") == count(" as " + storage); // every quant held as `storage`
        if (all_converted) CHECK(test::relative_error(y[""].view(), y[" --weights " + storage].view()) == 0.0);
        const double requantised = test::relative_error(y[""].view(), y[" --weights f32"].view());
        if (storage != "mxfp4") CHECK(requantised > 0.0);
        CHECK(requantised < bound);
        // bench names the formats the experts are held in: with the default, each one in `kept`
        std::set<std::string> held;
        for (std::size_t at = kept.find(" as "); at != std::string::npos; at = kept.find(" as ", at + 1))
            held.insert(kept.substr(at + 4, kept.find(',', at) == std::string::npos ? std::string::npos : kept.find(',', at) - at - 4));
        std::string held_names;
        for (const auto& h : held) held_names += (held_names.empty() ? "" : ", ") + h;
        const auto bytes = [&](const std::string& weights) {
            const Result b = run_cli("bench --model " + file + weights + " --tokens 4 --repeat 1 --json");
            REQUIRE_MESSAGE(b.status == 0, b.err);
            const auto row = nlohmann::json::parse(b.out.substr(0, b.out.find('\n')));
            CHECK(row["weights"] == (weights.empty() ? held_names : storage));
            return row["weight_bytes"].get<std::size_t>();
        };
        if (all_converted) CHECK(bytes("") == bytes(" --weights " + storage));
        else CHECK(bytes("") < bytes(" --weights " + storage));
    };
    // llama.cpp's Q4_K_M mix: Q4_K as stored, Q6_K requantised to 8 bits. 3 experts x ([gate; up]
    // 512 x 256 in Q4_K's 144 bytes a super-block, down 256 x 256 in q8_0's 34 a block of 32).
    check("q4_k_m", "mixtral", test::Q4_K, test::Q6_K, "Q4_K, Q6_K", "Q4_K as q4_k, Q6_K as q8_0", "q8_0", 0.02);
    check("q2_k", "mixtral", test::Q2_K, test::Q3_K, "Q2_K, Q3_K", "Q2_K as q4_0, Q3_K as q4_0", "q4_0", 0.2); // its Q2_K mix
    check("mxfp4_moe", "qwen3_moe", test::MXFP4, test::MXFP4, "MXFP4", "MXFP4 as mxfp4", "mxfp4", 1e-5); // a qwen3moe file of MXFP4_MOE
    fs::remove_all(tmp);
}

TEST_CASE("hypermoe holds a BF16 safetensors checkpoint's experts as bf16, exactly, unless --weights says otherwise") {
    const fs::path tmp = fs::temp_directory_path() / ("hypermoe-cli-bf16-" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    const std::string hf = (tmp / "hf").string(), input = (tmp / "x.safetensors").string();
    write_synthetic_checkpoint(hf, {.family = family("mixtral"), .d_model = 64, .d_ff = 96, .experts = 4, .top_k = 2, .layers = 1,
                                    .weights = hypermoe::dtype::bf16});
    const Matrix<float> x = test::random_matrix(5, 64, 3);
    write_safetensors(input, {f32_tensor("x", {5, 64}, {x.data(), 5 * 64})}, {{"layer", "0"}});
    const Result i = run_cli("inspect --model " + hf);
    REQUIRE_MESSAGE(i.status == 0, i.err);
    CHECK(i.out.find("format     safetensors; experts stored as BF16; default --weights stored: BF16 as bf16\n") != std::string::npos);
    auto y = run_outputs(hf, input, {"", " --weights bf16", " --weights f32"}, (tmp / "y.safetensors").string());
    CHECK(test::relative_error(y[""].view(), y[" --weights bf16"].view()) == 0.0);
    // the same bf16 values either way, in f32 arithmetic: equal up to the order of the additions
    CHECK(test::relative_error(y[""].view(), y[" --weights f32"].view()) < 1e-5);
    fs::remove_all(tmp);
}

TEST_CASE("hypermoe inspect and bench") {
    const Result i = run_cli("inspect --model " + test::data_dir + "/qwen2_moe-basic");
    REQUIRE(i.status == 0);
    CHECK(i.out.find("family     qwen2_moe") != std::string::npos);
    CHECK(i.out.find("shared     width 32") != std::string::npos);
    CHECK(i.out.find("format     safetensors; experts stored as F32; default --weights stored: F32 as f32\n") != std::string::npos);
    const auto on = [](hypermoe::dtype t, hypermoe::precision p) { return std::string(hypermoe::detail::kernel_isa_name(t, p)); };
    std::string bf16_fast = on(hypermoe::dtype::bf16, hypermoe::precision::fast);
#if HYPERMOE_HAS_ONEDNN
    if (hypermoe::detail::onednn_bf16_primitive()) bf16_fast += " (the oneDNN backend: " + kernel_name(hypermoe::dtype::bf16, hypermoe::precision::fast) + ")";
#endif
    CHECK(i.out.find("kernels    bf16 weights: exact on " + on(hypermoe::dtype::bf16, hypermoe::precision::exact) + ", fast on " +
                     bf16_fast + "; q8_0 / q4_0 / mxfp4 / q4_k weights: exact on " +
                     on(hypermoe::dtype::q8_0, hypermoe::precision::exact) + ", fast on " +
                     on(hypermoe::dtype::q8_0, hypermoe::precision::fast) + " (this CPU: " + hypermoe::detail::cpu_isa_names() +
                     ")") != std::string::npos);
    const Result b = run_cli("bench --family deepseek_v3 --d-model 64 --d-ff 32 --tokens 16 --repeat 2 --router all --json");
    REQUIRE_MESSAGE(b.status == 0, b.err);
    std::size_t lines = 0;
    for (std::size_t at = 0; (at = b.out.find('\n', at)) != std::string::npos; ++at) ++lines;
    CHECK(lines == 9); // native + 8 routers, one JSON object each
    const auto first = nlohmann::json::parse(b.out.substr(0, b.out.find('\n')));
    for (const char* key : {"router", "tokens", "median_ms", "min_ms", "route_ms", "tokens_per_s", "gflops", "load_cv",
                            "max_over_mean", "dropped", "entropy", "weights", "precision", "isa", "weight_bytes"})
        CHECK(first.contains(key));
    // Every row times its routing policy alone (a time: no assertion on its size).
    for (std::size_t at = 0, next; (next = b.out.find('\n', at)) != std::string::npos; at = next + 1) {
        const auto row = nlohmann::json::parse(b.out.substr(at, next - at));
        CAPTURE(row.dump());
        CHECK(row["route_ms"].is_number());
        CHECK(row["route_ms"].get<double>() >= 0);
    }
    const Result h = run_cli("bench --family hypermoe_switch --d-model 32 --d-ff 64 --tokens 8 --repeat 2 --hyper off");
    REQUIRE_MESSAGE(h.status == 0, h.err);
    CHECK(h.out.find("native+hyper:off") != std::string::npos);
}

TEST_CASE("hypermoe train: progress lines or JSON, a saved model that hypermoe run reads, and data files") {
    const fs::path tmp = fs::temp_directory_path() / ("hypermoe-cli-train-" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    // The synthetic multi-task problem, JSON lines: the loss falls, each line has the keys.
    const Result r = run_cli("train --family hypermoe_switch --d-model 32 --d-ff 32 --experts 4 --steps 30 --batch 32 --lr 3e-3 "
                             "--log-every 10 --train-rows 512 --eval-rows 256 --json --backend reference --save " + (tmp / "trained").string());
    REQUIRE(r.status == 0);
    std::vector<nlohmann::json> lines;
    std::size_t at = 0;
    while (at < r.out.size()) {
        const std::size_t end = r.out.find('\n', at);
        lines.push_back(nlohmann::json::parse(r.out.substr(at, end - at)));
        at = end + 1;
    }
    REQUIRE(lines.size() == 6); // eval, 3 progress lines, eval, the total time
    CHECK(lines[5]["steps"] == 30);
    CHECK(lines[5]["train_seconds"].get<double>() > 0);
    for (const char* key : {"step", "loss", "tokens_per_s", "load_cv"}) CHECK(lines[1].contains(key));
    // Where the logged steps' time went, ms a step: the three parts make up the step, 1000 x batch / tokens_per_s ms.
    const double parts = lines[1]["gradient_ms"].get<double>() + lines[1]["optimizer_ms"].get<double>() + lines[1]["rebuild_ms"].get<double>();
    CHECK(lines[1]["rebuild_ms"].get<double>() > 0);
    CHECK(parts <= 1000.0 * 32 / lines[1]["tokens_per_s"].get<double>() * 1.0001);
    CHECK(parts >= 0.5 * 1000.0 * 32 / lines[1]["tokens_per_s"].get<double>());
    CHECK(lines[0]["step"] == 0);
    CHECK(lines[4]["eval_loss"].get<double>() < lines[0]["eval_loss"].get<double>());
    CHECK(lines[3]["loss"].get<double>() < lines[1]["loss"].get<double>());

    // The saved checkpoint is a checkpoint: inspect and run read it.
    const Result i = run_cli("inspect --model " + (tmp / "trained").string());
    CHECK(i.status == 0);
    CHECK(i.out.find("hypermoe_switch") != std::string::npos);

    // A data file (mse): x and y; with auxiliary-loss-free balancing.
    Matrix<float> x(64, 32), y(64, 32);
    for (index_t j = 0; j < 64 * 32; ++j) x.data()[j] = float(j % 7) * 0.1f - 0.3f, y.data()[j] = float(j % 5) * 0.05f;
    write_safetensors((tmp / "data.safetensors").string(), {f32_tensor("x", {64, 32}, {x.data(), 64 * 32}), f32_tensor("y", {64, 32}, {y.data(), 64 * 32})});
    const Result m = run_cli("train --model " + (tmp / "trained").string() + " --data " + (tmp / "data.safetensors").string() + " --eval " +
                             (tmp / "data.safetensors").string() + " --loss mse --steps 4 --batch 16 --log-every 2 --balance 0.01");
    CHECK(m.status == 0);
    CHECK(m.out.find("step     4  loss ") != std::string::npos);
    CHECK(m.out.find("ms a step: gradients ") != std::string::npos);
    CHECK(m.out.find("eval at step 4: loss ") != std::string::npos);

    // A data file (ce, the default loss): x and integer labels, as PyTorch saves them (I64).
    std::vector<std::byte> labels(64 * sizeof(std::int64_t));
    for (std::size_t j = 0; j < 64; ++j) {
        const std::int64_t label = std::int64_t(j % 4);
        std::memcpy(labels.data() + j * sizeof label, &label, sizeof label);
    }
    write_safetensors((tmp / "labelled.safetensors").string(),
                      {f32_tensor("x", {64, 32}, {x.data(), 64 * 32}), {"labels", tensor_dtype::i64, {64}, labels}});
    const Result c = run_cli("train --model " + (tmp / "trained").string() + " --data " + (tmp / "labelled.safetensors").string() +
                             " --steps 4 --batch 16 --log-every 2");
    CHECK(c.status == 0);
    CHECK(c.out.find("step     4  loss ") != std::string::npos);
    labels.resize(63 * sizeof(std::int64_t));
    write_safetensors((tmp / "short-labels.safetensors").string(),
                      {f32_tensor("x", {64, 32}, {x.data(), 64 * 32}), {"labels", tensor_dtype::i64, {63}, labels}});

    // GPT-2 HyperMoE with the reference code's training routing and Shazeer's load loss.
    const Result n = run_cli("train --family hypermoe_gpt2 --d-model 32 --experts 4 --steps 4 --batch 16 --log-every 2 --train-rows 64 "
                             "--eval-rows 32 --noisy-gating --aux-load 0.01 --backend reference --save " + (tmp / "noisy").string());
    CHECK(n.status == 0);
    CHECK(n.out.find("step     4  loss ") != std::string::npos);
    const Result ni = run_cli("inspect --model " + (tmp / "noisy").string());
    CHECK(ni.status == 0);

    for (const std::string& args : {
             "train --model " + (tmp / "trained").string() + " --family mixtral",
             std::string("train --loss mse --steps 2"),
             std::string("train --loss hinge --steps 2"),
             "train --model " + (tmp / "trained").string() + " --data " + (tmp / "data.safetensors").string() + " --steps 2",
             std::string("train --family mixtral --d-model 16 --train-rows 8 --batch 64"),
             "train --family mixtral --d-model 16 --data " + (tmp / "data.safetensors").string() + " --loss mse",
             std::string("train --lr fast"),
             std::string("train --family hypermoe_gpt2 --aux-load 0.1 --steps 2"),
             std::string("train --family mixtral --d-model 16 --noisy-gating --steps 2"),
             "train --model " + (tmp / "trained").string() + " --data " + (tmp / "short-labels.safetensors").string() + " --steps 2",
         }) {
        CAPTURE(args);
        const Result e = run_cli(args);
        CHECK(e.status == 2);
        CHECK(e.err.rfind("hypermoe: ", 0) == 0);
        CHECK(std::count(e.err.begin(), e.err.end(), '\n') == 1);
    }
    fs::remove_all(tmp);
}

TEST_CASE("hypermoe --help prints the usage of every command on stdout") {
    for (const char* flag : {"--help", "-h", "help"}) {
        const Result r = run_cli(flag);
        CHECK(r.status == 0);
        for (const char* command : {"inspect", "run", "bench", "train"}) CHECK(r.out.find(std::string("hypermoe ") + command) != std::string::npos);
        CHECK(r.err.empty());
    }
}

TEST_CASE("usage errors exit 2 with one line on stderr") {
    const std::string m = test::data_dir + "/mixtral-basic";
    // Inputs that do not fit the model: x of one dimension, x without a layer, x too narrow,
    // and a dy of another shape than x.
    const test::TempDir tmp("cli-usage");
    const std::string flat = (tmp.path / "flat.safetensors").string(), unlabelled = (tmp.path / "unlabelled.safetensors").string(),
                      narrow = (tmp.path / "narrow.safetensors").string(), dy = (tmp.path / "dy.safetensors").string();
    const std::vector<float> v(3 * 32, 0.5f);
    write_safetensors(flat, {f32_tensor("x", {96}, v)}, {{"layer", "0"}});
    write_safetensors(unlabelled, {f32_tensor("x", {3, 32}, v)});
    write_safetensors(narrow, {f32_tensor("x", {6, 16}, v)}, {{"layer", "0"}});
    write_safetensors(dy, {f32_tensor("dy", {2, 32}, {v.data(), 64})});
    const std::map<std::string, std::string> errors = {
        {"run --model " + m + " --input " + flat + " --output /tmp/x", "'x' has shape [96], expected [T, d] or [B, L, d]"},
        {"run --model " + m + " --input " + unlabelled + " --output /tmp/x", "no --layer given and " + unlabelled + " has no 'layer' metadata"},
        {"run --model " + m + " --input " + narrow + " --output /tmp/x", "'x' has 16 columns, the model's d_model is 32"},
        {"run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --grad " + dy + " --output-grads /tmp/g",
         "'dy' has shape [2, 32], expected the shape of 'x'"},
        {"bench --family hypermoe_gpt2 --d-model 16 --tokens 4 --repeat 1 --hyper sometimes",
         "--hyper is 'sometimes', expected cached, per-token or off"},
        {"bench --d-model 32 --tokens 4 --repeat 1 --weights q5_k", "--weights is 'q5_k', expected stored, f32, bf16, q8_0, q4_0, mxfp4 or q4_k"},
    };
    for (const auto& entry : errors) { // (not a structured binding: clang 14 cannot capture one in CAPTURE)
        const std::string& args = entry.first;
        const std::string& message = entry.second;
        CAPTURE(args);
        const Result r = run_cli(args);
        CHECK(r.status == 2);
        CHECK(r.err.find(message) != std::string::npos);
        CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    }
    for (const std::string& args : {
             std::string("frobnicate"),
             "run --model " + m + " --bogus 1",
             "run --model " + m + " --input /nonexistent.safetensors --output /tmp/x",
             "run --model " + m + " --input " + m + "/expected.safetensors --output /tmp/x",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --layer 7",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --backend cuda",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --threads zero",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --weights q5_k",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --weights q4_0 --precision approximate",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --grad " + m + "/grads.safetensors",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --grad " + m +
                 "/grads.safetensors --output-grads /tmp/g --weights bf16",
             "run --model " + m + " --input " + m + "/input.safetensors --output /tmp/x --grad " + m +
                 "/input.safetensors --output-grads /tmp/g",
             std::string("inspect --model /nonexistent"),
             std::string("bench --family llama"),
             std::string("bench --router best --tokens 4 --d-model 16 --d-ff 16 --repeat 1"),
         }) {
        CAPTURE(args);
        const Result r = run_cli(args);
        CHECK(r.status == 2);
        CHECK(r.err.rfind("hypermoe: ", 0) == 0);
        CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    }
}
