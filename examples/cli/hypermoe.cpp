// The `hypermoe` command: run, inspect and benchmark MoE blocks of Hugging Face checkpoints and
// GGUF files, or
// (with no arguments) a demo on an embedded default. Usage errors, missing files and bad inputs
// exit with status 2 and one line on stderr.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <malloc.h>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <hypermoe/hypermoe.hpp>
#include <hypermoe/io/io.hpp>
#include <hypermoe/train/multitask.hpp>
#include <hypermoe/train/trainer.hpp>
#if HYPERMOE_HAS_EIGEN
#include <hypermoe/backend/eigen.hpp>
#endif
#if HYPERMOE_HAS_ONEDNN
#include <hypermoe/backend/onednn.hpp>
#endif

namespace hm = hypermoe;
namespace fs = std::filesystem;

namespace {

constexpr const char* usage_text = R"(usage:
  hypermoe                         run the demo (a small HyperMoE stack, fixed seed)
  hypermoe run --model DIR|FILE.gguf --input X.safetensors --output Y.safetensors [--layer N]
               [--stack encoder|decoder] [--backend onednn|eigen|reference] [--threads N]
               [--weights stored|f32|bf16|q8_0|q4_0|mxfp4|q4_k] [--precision exact|fast]
               [--grad DY.safetensors --output-grads G.safetensors]   (backward: dx and d/<tensor>)
  hypermoe inspect --model DIR|FILE.gguf
  hypermoe bench [--family F] [--d-model N] [--d-ff N] [--experts N] [--top-k N] [--tokens N]
               [--router NAME|all|native] [--hyper cached|per-token|off] [--weights stored|f32|bf16|q8_0|q4_0|mxfp4|q4_k]
               [--precision exact|fast] [--threads N] [--repeat N] [--backend B] [--model DIR|FILE.gguf [--layer N] [--stack S]] [--json]
  hypermoe train [--model DIR|FILE.gguf | --family F [--d-model N] [--d-ff N] [--experts N] [--top-k N] [--layers N] [--seed N]]
               [--data TRAIN.safetensors [--eval EVAL.safetensors] | --tasks N [--train-rows N] [--eval-rows N] [--data-seed N]]
               [--loss ce|mse] [--classes N] [--steps N] [--batch N] [--lr X] [--weight-decay X] [--clip X] [--aux-lb X]
               [--noisy-gating [--aux-load X]] [--balance GAMMA] [--no-hyper] [--log-every N] [--eval-every N] [--save DIR]
               [--backend B] [--threads N] [--json]
               (trains every MoE block of the model, chained as h + block(h); a data file holds x [N, d] and
                labels [N] (ce) or y [N, d] (mse); without one, the synthetic multi-task problem of docs/training.md;
                --noisy-gating routes hypermoe_gpt2 as its reference code trains, noisy top-k with the learned
                noise scale softplus(x w_noise) + 0.01, and --aux-load adds Shazeer's load loss;
                --no-hyper trains HyperMoE blocks without their HyperExpert)
)";

/// A mistake in how the command was called: exit status 2.
struct usage_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/// --flag value pairs (and bare switches) checked against the flags a command knows.
class Args {
public:
    Args(int argc, char** argv, int first, std::vector<std::string> value_flags, std::vector<std::string> switches) {
        for (int i = first; i < argc; ++i) {
            const std::string a = argv[i];
            if (std::find(switches.begin(), switches.end(), a) != switches.end()) {
                values_[a] = "1";
            } else if (std::find(value_flags.begin(), value_flags.end(), a) != value_flags.end()) {
                if (i + 1 >= argc) throw usage_error(a + " needs a value");
                values_[a] = argv[++i];
            } else {
                throw usage_error("unknown argument '" + a + "' (see hypermoe --help)");
            }
        }
    }
    [[nodiscard]] bool has(const std::string& f) const { return values_.count(f) != 0; }
    [[nodiscard]] std::string get(const std::string& f, const std::string& fallback = "") const {
        const auto it = values_.find(f);
        return it == values_.end() ? fallback : it->second;
    }
    [[nodiscard]] std::string need(const std::string& f) const {
        if (!has(f)) throw usage_error(f + " is required");
        return get(f);
    }
    [[nodiscard]] hm::index_t integer(const std::string& f, hm::index_t fallback, hm::index_t min = 1) const {
        if (!has(f)) return fallback;
        const std::string v = get(f);
        char* end = nullptr;
        const long long n = std::strtoll(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || n < min)
            throw usage_error(f + " is '" + v + "', expected an integer >= " + std::to_string(min));
        return n;
    }

private:
    std::map<std::string, std::string> values_;
};

void set_threads(const Args& a) {
    if (!a.has("--threads")) return;
    const auto n = a.integer("--threads", 1);
#if defined(_OPENMP)
    omp_set_num_threads(int(n));
#else
    (void)n;
#endif
}

/// The names in `names`, comma-separated (a set: sorted, once each).
std::string joined(const std::set<std::string>& names) {
    std::string out;
    for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
    return out;
}

/// The tensor dtype TensorInfo::type_string() names `name` (e.g. "Q4_K"), if any.
std::optional<hm::tensor_dtype> tensor_dtype_named(const std::string& name) {
    for (int i = 0; i <= int(hm::tensor_dtype::other); ++i)
        if (hm::to_string(hm::tensor_dtype(i)) == name) return hm::tensor_dtype(i);
    return std::nullopt;
}

/// --weights into `o`: a storage for every expert weight matrix, or `stored` (the default): each
/// one in the format it is stored in where a layer holds that format as stored (BF16, Q8_0, Q4_0,
/// MXFP4, Q4_K), the others in Checkpoint::expert_storage(true) (LoadOptions::keep_stored).
void apply_weights(const Args& a, const hm::Checkpoint& ck, hm::LoadOptions& o) {
    const std::string w = a.get("--weights", "stored");
    if (w == "stored") {
        o.storage = ck.expert_storage(true), o.keep_stored = true;
        return;
    }
    for (const hm::dtype t : {hm::dtype::f32, hm::dtype::bf16, hm::dtype::q8_0, hm::dtype::q4_0, hm::dtype::mxfp4, hm::dtype::q4_k})
        if (w == hm::to_string(t)) {
            o.storage = t, o.keep_stored = false;
            return;
        }
    throw usage_error("--weights is '" + w + "', expected stored, f32, bf16, q8_0, q4_0, mxfp4 or q4_k");
}

/// What a block's experts are held in, as `bench` prints it: --weights' format, or with `stored`
/// each format they are held in.
template <class Block>
std::string weights_name(const hm::LoadOptions& o, const Block& block) {
    if (!o.keep_stored) return std::string(hm::to_string(o.storage));
    std::set<std::string> names;
    for (const hm::dtype t : block.expert_storages()) names.insert(std::string(hm::to_string(t)));
    return joined(names);
}

hm::precision precision_of(const Args& a) {
    const std::string p = a.get("--precision", "exact");
    if (p == "exact") return hm::precision::exact;
    if (p == "fast") return hm::precision::fast;
    throw usage_error("--precision is '" + p + "', expected exact or fast");
}

/// --weights and --precision as load options for checkpoint `ck`.
hm::LoadOptions load_options(const Args& a, const hm::Checkpoint& ck) {
    hm::LoadOptions o{.prec = precision_of(a)};
    apply_weights(a, ck, o);
    return o;
}

/// The oneDNN backend's path for bf16 `fast` where it is oneDNN's bf16 matmul (AMX), e.g. "onednn
/// brg:avx512_core_amx"; empty where it is our own kernel.
std::string onednn_bf16_fast_path() {
#if HYPERMOE_HAS_ONEDNN
    if (hm::detail::onednn_bf16_primitive()) return "onednn " + hm::detail::onednn_bf16_impl();
#endif
    return "";
}

/// The instructions linear maps over weights stored as `t` run on: our own kernel for bf16 and the
/// block formats (chosen from this CPU); for f32 the backend's name, except where oneDNN has no
/// f32 brgemm and the oneDNN backend runs our f32 panel kernels (then their instructions); for
/// bf16 `fast` on the oneDNN backend where that runs oneDNN's bf16 matmul (AMX), "onednn" and
/// its implementation.
template <class B>
std::string isa_of(hm::dtype t, hm::precision p) {
#if HYPERMOE_HAS_ONEDNN
    if constexpr (std::is_same_v<B, hm::onednn>) {
        if (t == hm::dtype::f32) return std::string(hm::detail::onednn_f32_kernel_name());
        if (t == hm::dtype::bf16 && p == hm::precision::fast && !onednn_bf16_fast_path().empty()) return onednn_bf16_fast_path();
    }
#endif
    if (t == hm::dtype::f32) return std::string(B::name);
    return std::string(hm::detail::kernel_isa_name(t, p));
}

/// The instructions a block's experts run on: isa_of each storage they are held in, once each.
template <class B, class Block>
std::string isa_of(const Block& block, hm::precision p) {
    std::set<std::string> names;
    for (const hm::dtype t : block.expert_storages()) names.insert(isa_of<B>(t, p));
    return joined(names);
}

/// Calls f.template operator()<Backend>() for the named backend: dispatch hoisted to here.
template <class F>
int with_backend(const std::string& name, F&& f) {
    if (name == "reference") return f.template operator()<hm::reference>();
#if HYPERMOE_HAS_EIGEN
    if (name == "eigen") return f.template operator()<hm::eigen>();
#endif
#if HYPERMOE_HAS_ONEDNN
    if (name == "onednn") return f.template operator()<hm::onednn>();
#endif
    throw usage_error("--backend is '" + name + "', this build has: reference"
#if HYPERMOE_HAS_EIGEN
                      ", eigen"
#endif
#if HYPERMOE_HAS_ONEDNN
                      ", onednn"
#endif
    );
}

std::string default_backend() {
#if HYPERMOE_HAS_ONEDNN
    return "onednn";
#elif HYPERMOE_HAS_EIGEN
    return "eigen";
#else
    return "reference";
#endif
}

// ---------------------------------------------------------------------------------------------- run

int run(const Args& a) {
    const hm::Checkpoint ck(a.need("--model"));
    const std::string input = a.need("--input"), output = a.need("--output");
    if (!fs::exists(input)) throw usage_error("--input " + input + ": no such file");
    const hm::SafeTensorsFile in(input);
    const hm::TensorInfo* xi = in.view().find("x");
    if (xi == nullptr) throw usage_error(input + ": no tensor 'x' (the input rows)");
    if (xi->shape.size() != 2 && xi->shape.size() != 3)
        throw usage_error(input + ": 'x' has shape " + xi->shape_string() + ", expected [T, d] or [B, L, d]");
    const auto& meta = in.view().metadata();
    if (!a.has("--layer") && !meta.count("layer"))
        throw usage_error("no --layer given and " + input + " has no 'layer' metadata");
    const hm::index_t layer = a.has("--layer") ? a.integer("--layer", 0, 0)
                                               : in.view().metadata_integer("layer", 0, std::numeric_limits<int>::max());
    const std::string stack = a.get("--stack", meta.count("stack") ? meta.at("stack") : "");
    set_threads(a);
    const hm::Matrix<float> x = in.view().to_f32(*xi);
    const hm::RouterContext context{.sequence_length = xi->shape.size() == 3 ? xi->shape[1] : 0};
    // Backward: dy (the shape of x) from --grad, the gradients to --output-grads; it computes
    // with the weights as trained, so they are held as f32.
    if (a.has("--grad") != a.has("--output-grads")) throw usage_error("--grad and --output-grads go together");
    hm::LoadOptions options = load_options(a, ck);
    std::optional<hm::Matrix<float>> dy;
    if (a.has("--grad")) {
        if (a.has("--weights") && a.get("--weights", "") != "f32")
            throw usage_error("--grad needs f32 weights (a backward computes with the weights as trained), but --weights is " +
                              a.get("--weights", ""));
        options.storage = hm::dtype::f32, options.keep_stored = false;
        const std::string grad = a.need("--grad");
        if (!fs::exists(grad)) throw usage_error("--grad " + grad + ": no such file");
        const hm::SafeTensorsFile g(grad);
        const hm::TensorInfo* di = g.view().find("dy");
        if (di == nullptr) throw usage_error(grad + ": no tensor 'dy' (the gradient of the output)");
        if (di->shape != xi->shape)
            throw usage_error(grad + ": 'dy' has shape " + di->shape_string() + ", expected the shape of 'x', " + xi->shape_string());
        dy = g.view().to_f32(*di);
    }
    return with_backend(a.get("--backend", default_backend()), [&]<class B>() {
        const auto model = hm::load_model<B>(ck, options);
        const auto& block = model.block(layer, stack);
        if (x.cols() != block.d_model())
            throw usage_error(input + ": 'x' has " + std::to_string(x.cols()) + " columns, the model's d_model is " +
                              std::to_string(block.d_model()));
        hm::Matrix<float> y(x.rows(), x.cols());
        hm::RoutingPlan plan;
        hm::Workspace ws;
        block.forward(x.view(), y.view(), ws, plan, context);
        const hm::index_t t = x.rows(), k = plan.slots();
        std::vector<hm::TensorToWrite> out{
            hm::f32_tensor("y", xi->shape, std::span<const float>(y.data(), std::size_t(t * x.cols()))),
            hm::i32_tensor("expert_ids", {t, k}, plan.all_ids()),
            hm::f32_tensor("expert_weights", {t, k}, plan.all_weights())};
        if (block.has_capacity()) {
            std::vector<std::int32_t> kept(static_cast<std::size_t>(t));
            for (hm::index_t i = 0; i < t; ++i) kept[std::size_t(i)] = plan.kept(i) ? 1 : 0;
            out.push_back(hm::i32_tensor("kept", {t}, kept));
        }
        std::map<std::string, std::string> md{{"family", std::string(hm::to_string(block.info().family))},
                                              {"layer", std::to_string(layer)}};
        if (!stack.empty()) md["stack"] = stack;
        hm::write_safetensors(output, out, md);
        if (dy) {
            hm::Matrix<float> dx(x.rows(), x.cols());
            std::vector<hm::TensorToWrite> grads = block.gradients(x.view(), dy->view(), dx.view(), ws, context);
            grads.push_back(hm::f32_tensor("dx", xi->shape, std::span<const float>(dx.data(), std::size_t(t * x.cols()))));
            hm::write_safetensors(a.need("--output-grads"), grads, md);
        }
        return 0;
    });
}

// ------------------------------------------------------------------------------------------ inspect

/// "<sep><type> <n> MiB" (KiB under a MiB).
std::string detail_bytes(const char* sep, const std::string& type, std::size_t n) {
    char buf[64];
    if (n < 1048576) std::snprintf(buf, sizeof buf, "%s %.1f KiB", type.c_str(), double(n) / 1024.0);
    else std::snprintf(buf, sizeof buf, "%s %.1f MiB", type.c_str(), double(n) / 1048576.0);
    return sep + std::string(buf);
}


int inspect(const Args& a) {
    const hm::Checkpoint ck(a.need("--model"));
    const hm::ModelInfo m = hm::describe(ck);
    std::printf("model      %s\n", ck.dir().c_str());
    std::printf("family     %s\n", std::string(hm::to_string(m.family)).c_str());
    std::printf("d_model    %lld\n", static_cast<long long>(m.d_model));
    std::printf("experts    %lld x %s, width %lld, top-%lld\n", static_cast<long long>(m.experts), m.expert_kind.c_str(),
                static_cast<long long>(m.d_ff), static_cast<long long>(m.top_k));
    if (m.shared_ff > 0) std::printf("shared     width %lld\n", static_cast<long long>(m.shared_ff));
    if (m.adapter_rank > 0) std::printf("hyper      HyperExpert adapter rank %lld\n", static_cast<long long>(m.adapter_rank));
    std::printf("routing    %s\n", m.routing.c_str());
    std::printf("tensors    %zu (%s)\n", ck.tensor_count(), joined(m.dtypes).c_str());
    std::string bytes;
    for (const auto& [type, n] : ck.bytes_by_dtype()) bytes += detail_bytes(bytes.empty() ? "" : ", ", type, n);
    std::printf("bytes      %s\n", bytes.c_str());
    const std::string format = ck.gguf_architecture().empty() ? "safetensors" : "GGUF, architecture " + ck.gguf_architecture();
    // --weights stored (the default): the experts held as stored where a layer holds their format, the others converted
    const std::string rest(hm::to_string(ck.expert_storage(true)));
    std::string kept;
    for (const auto& type : ck.expert_dtypes()) {
        const auto t = tensor_dtype_named(type);
        const auto held = t ? hm::kept_dtype(*t) : std::nullopt;
        kept += (kept.empty() ? "" : ", ") + type + " as " + (held ? std::string(hm::to_string(*held)) : rest);
    }
    std::printf("format     %s; experts stored as %s; default --weights stored: %s\n", format.c_str(), joined(ck.expert_dtypes()).c_str(),
                kept.c_str());
    std::string blocks;
    for (const auto& b : m.moe_blocks)
        blocks += (blocks.empty() ? "" : ", ") + (b.stack.empty() ? "" : b.stack + " ") + std::to_string(b.layer);
    std::printf("MoE blocks %zu: %s\n", m.moe_blocks.size(), blocks.c_str());
    const auto on = [](hm::dtype t, hm::precision p) {
        std::string name(hm::detail::kernel_isa_name(t, p));
        if (t == hm::dtype::bf16 && p == hm::precision::fast && !onednn_bf16_fast_path().empty())
            name += " (the oneDNN backend: " + onednn_bf16_fast_path() + ")";
        return name;
    };
    std::printf("kernels    bf16 weights: exact on %s, fast on %s; q8_0 / q4_0 / mxfp4 / q4_k weights: exact on %s, fast on %s "
                "(this CPU: %s)\n",
                on(hm::dtype::bf16, hm::precision::exact).c_str(), on(hm::dtype::bf16, hm::precision::fast).c_str(),
                on(hm::dtype::q8_0, hm::precision::exact).c_str(), on(hm::dtype::q8_0, hm::precision::fast).c_str(),
                hm::detail::cpu_isa_names().c_str());
    return 0;
}

// -------------------------------------------------------------------------------------------- bench

hm::Family family_named(const std::string& f) {
    if (const auto family = hm::find_family(f)) return *family;
    throw usage_error("--family is '" + f + "', supported: " + std::string(hm::supported_families));
}

struct BenchRow {
    std::string router;
    hm::index_t tokens = 0;
    double median_ms = 0, min_ms = 0, gflops = 0;
    double route_ms = 0; // the routing policy alone, on precomputed logits (median)
    hm::RoutingStats stats;
};

template <class F>
std::pair<double, double> time_it(hm::index_t repeat, F&& f) {
    f();
    f(); // warm-up: workspace, plans, caches
    std::vector<double> ms;
    for (hm::index_t i = 0; i < repeat; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    return {ms[ms.size() / 2], ms.front()};
}

/// Runs `router` over the block's own experts: logits -> route -> apply (the MoE part).
template <class B, class R>
BenchRow bench_router(const hm::LoadedMoeBlock<B>& block, const std::string& name, const R& router, const hm::Matrix<float>& x,
                      hm::index_t repeat, hm::index_t seq, double flops_per_row) {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(x.rows()));
    for (hm::index_t t = 0; t < x.rows(); ++t) ids[std::size_t(t)] = std::int32_t(t);
    const hm::RouterContext ctx{.token_ids = ids, .sequence_length = seq};
    BenchRow row;
    row.router = name;
    row.tokens = x.rows();
    hm::Matrix<float> y(x.rows(), x.cols()), logits(x.rows(), router.experts());
    hm::RoutingPlan plan;
    hm::Workspace ws;
    block.visit_moe([&](const auto& moe) {
        std::tie(row.median_ms, row.min_ms) = time_it(repeat, [&] {
            moe.router_logits(x.view(), logits.view(), ws);
            router.route(logits.view(), ctx, plan, ws);
            moe.apply(x.view(), plan, y.view(), ws);
        });
    });
    row.route_ms = time_it(repeat, [&] { router.route(logits.view(), ctx, plan, ws); }).first;
    row.stats = hm::routing_stats(plan, logits.view());
    row.gflops = flops_per_row * double(plan.rows()) / (row.median_ms * 1e6);
    return row;
}

int bench(const Args& a) {
    set_threads(a);
    const hm::index_t tokens = a.integer("--tokens", 128), repeat = a.integer("--repeat", 20);
    const std::string hyper = a.get("--hyper", "cached");
    if (hyper != "cached" && hyper != "per-token" && hyper != "off")
        throw usage_error("--hyper is '" + hyper + "', expected cached, per-token or off");
    // A checkpoint, or a synthetic one of the requested family (fixed seed).
    std::optional<fs::path> temp;
    std::string dir = a.get("--model");
    if (dir.empty()) {
        hm::SyntheticModel m{.family = family_named(a.get("--family", "mixtral")), .d_model = a.integer("--d-model", 512),
                             .d_ff = a.integer("--d-ff", 1408), .experts = a.integer("--experts", 8),
                             .top_k = a.integer("--top-k", 2), .layers = 2, .seed = 1};
        m.capacity = std::max<hm::index_t>(1, (tokens * 5 / 4 + m.experts - 1) / m.experts); // capacity factor 1.25
        if (m.top_k > m.experts) throw usage_error("--top-k is larger than --experts");
        temp = fs::temp_directory_path() / ("hypermoe-bench-" + std::to_string(::getpid()));
        hm::write_synthetic_checkpoint(temp->string(), m);
        dir = temp->string();
    }
    struct Cleanup {
        std::optional<fs::path>& p;
        ~Cleanup() {
            if (p) fs::remove_all(*p);
        }
    } cleanup{temp};
    const hm::Checkpoint ck(dir);
    const hm::ModelInfo info = hm::describe(ck);
    if (info.moe_blocks.empty()) throw usage_error(dir + " has no MoE blocks");
    const hm::index_t layer = a.has("--layer") ? a.integer("--layer", 0, 0) : info.moe_blocks.front().layer;
    const std::string stack = a.get("--stack", info.moe_blocks.front().stack);
    const std::string router_arg = a.get("--router", "native");
    const bool json = a.has("--json");

    return with_backend(a.get("--backend", default_backend()), [&]<class B>() {
        const hm::HyperOptions hopt{.mode = hyper == "per-token" ? hm::HyperMode::per_token : hm::HyperMode::cached};
        hm::LoadOptions opt = load_options(a, ck);
        opt.hyper = hopt;
        const auto model = hm::load_model<B>(ck, opt);
        const auto& block = model.block(layer, stack);
        const std::string isa = isa_of<B>(block, opt.prec);
        const std::size_t weight_bytes = block.expert_weight_bytes();
        const hm::index_t d = block.d_model(), e = info.experts, k = info.top_k;
        const bool two_stacks = hm::has_two_stacks(info.family);
        const hm::index_t seq = two_stacks ? tokens : 0;
        hm::Matrix<float> x(tokens, d);
        for (hm::index_t i = 0; i < tokens * d; ++i)
            x.data()[i] = float(double(hm::detail::splitmix64(std::uint64_t(i) + 7) >> 11) * 0x1.0p-53 * 2 - 1);
        const bool glu = info.expert_kind == "SwiGLU";
        const double flops_per_row = 2.0 * double(d) * double(info.d_ff) * (glu ? 3 : 2);
        std::vector<BenchRow> rows;
        const auto want = [&](const char* name) { return router_arg == "all" || router_arg == name; };
        if (want("native")) {
            BenchRow row;
            row.router = "native";
            row.tokens = tokens;
            hm::Matrix<float> y(tokens, d);
            hm::RoutingPlan plan;
            hm::Workspace ws;
            std::tie(row.median_ms, row.min_ms) =
                time_it(repeat, [&] { block.forward(x.view(), y.view(), ws, plan, {.sequence_length = seq}, hyper != "off"); });
            hm::Matrix<float> logits(tokens, e); // for the entropy and route_ms, outside the timed loop
            block.visit_moe([&](const auto& moe) {
                moe.router_logits(x.view(), logits.view(), ws);
                hm::RoutingPlan p;
                row.route_ms = time_it(repeat, [&] { moe.router().route(logits.view(), {.sequence_length = seq}, p, ws); }).first;
            });
            row.stats = hm::routing_stats(plan, logits.view());
            row.gflops = flops_per_row * double(plan.rows()) / (row.median_ms * 1e6);
            if (block.is_hyper()) row.router = "native+hyper:" + hyper;
            rows.push_back(row);
        }
        const hm::index_t groups = e % 4 == 0 && e >= 8 ? 4 : 1;
        if (want("top_k")) rows.push_back(bench_router(block, "top_k", hm::TopKRouter(e, hm::TopK{k}, {.weighting = {.renormalize = true}}), x, repeat, seq, flops_per_row));
        if (want("switch")) rows.push_back(bench_router(block, "switch", hm::SwitchRouter(e, hm::Top1Capacity{std::max<hm::index_t>(1, (tokens * 5 / 4 + e - 1) / e)}), x, repeat, seq, flops_per_row));
        if (want("deepseek")) rows.push_back(bench_router(block, "deepseek", hm::DeepSeekRouter(e, hm::GroupLimitedTopK{.k = k, .n_group = groups, .topk_group = groups > 1 ? 2 : 1}, {.weighting = {.renormalize = true, .epsilon = 1e-20}}), x, repeat, seq, flops_per_row));
        if (want("expert_choice")) rows.push_back(bench_router(block, "expert_choice", hm::ExpertChoiceRouter(e, hm::ExpertChoice{double(k)}), x, repeat, seq, flops_per_row));
        if (want("hash")) rows.push_back(bench_router(block, "hash", hm::HashRouter(e, hm::HashRouting{}), x, repeat, seq, flops_per_row));
        if (want("top_p")) rows.push_back(bench_router(block, "top_p", hm::TopPRouter(e, hm::TopP{.p = 0.5, .k_max = std::min(e, 2 * k)}), x, repeat, seq, flops_per_row));
        if (want("sinkhorn")) rows.push_back(bench_router(block, "sinkhorn", hm::SinkhornRouter(e, hm::SinkhornBalanced{8}), x, repeat, seq, flops_per_row));
        if (want("noisy_top_k")) rows.push_back(bench_router(block, "noisy_top_k", hm::NoisyTopKRouter(e, hm::NoisyTopK{.k = k, .noise_std = 1.0f, .seed = 1}), x, repeat, seq, flops_per_row));
        if (rows.empty())
            throw usage_error("--router is '" + router_arg +
                              "', expected native, all, top_k, switch, deepseek, expert_choice, hash, top_p, sinkhorn or noisy_top_k");
        if (!json) {
            std::printf("%s block %s%lld: d_model %lld, %lld experts x %s width %lld, top-%lld, %lld tokens, backend %s, %s weights "
                        "(%.1f MiB, %s, %s)\n",
                        std::string(hm::to_string(info.family)).c_str(), stack.empty() ? "" : (stack + " ").c_str(),
                        static_cast<long long>(layer), static_cast<long long>(d), static_cast<long long>(e), info.expert_kind.c_str(),
                        static_cast<long long>(info.d_ff), static_cast<long long>(k), static_cast<long long>(tokens),
                        std::string(B::name).c_str(), weights_name(opt, block).c_str(), double(weight_bytes) / 1048576.0,
                        std::string(hm::to_string(opt.prec)).c_str(), isa.c_str());
            std::printf("%-22s %9s %9s %9s %11s %8s %7s %8s %7s %7s\n", "router", "median_ms", "min_ms", "route_ms", "tokens/s",
                        "GFLOP/s", "load_cv", "max/mean", "dropped", "entropy");
        }
        for (const auto& r : rows) {
            const double tps = double(r.tokens) / (r.median_ms * 1e-3);
            const double entropy = r.stats.entropy.value_or(std::nan(""));
            if (json) {
                const nlohmann::json j{{"router", r.router}, {"tokens", r.tokens}, {"median_ms", r.median_ms}, {"min_ms", r.min_ms},
                                       {"route_ms", r.route_ms},
                                       {"tokens_per_s", tps}, {"gflops", r.gflops}, {"load_cv", r.stats.load_cv},
                                       {"max_over_mean", r.stats.max_over_mean}, {"dropped", r.stats.dropped},
                                       {"entropy", r.stats.entropy ? nlohmann::json(entropy) : nlohmann::json(nullptr)},
                                       {"weights", weights_name(opt, block)}, {"precision", hm::to_string(opt.prec)},
                                       {"isa", isa}, {"weight_bytes", weight_bytes}};
                std::printf("%s\n", j.dump().c_str());
            } else {
                std::printf("%-22s %9.3f %9.3f %9.4f %11.0f %8.1f %7.3f %8.2f %7lld %7.3f\n", r.router.c_str(), r.median_ms, r.min_ms,
                            r.route_ms, tps,
                            r.gflops, r.stats.load_cv, r.stats.max_over_mean, static_cast<long long>(r.stats.dropped), entropy);
            }
        }
        return 0;
    });
}

// --------------------------------------------------------------------------------------------- train

/// Rows for training or evaluation: the tokens and their targets (labels or values).
struct TrainData {
    hm::Matrix<float> x, y;
    std::vector<std::int32_t> labels;
    [[nodiscard]] hm::index_t rows() const { return x.rows(); }
};

/// A data file: safetensors with `x` (N, d) and `labels` (N, integers) or `y` (N, d).
TrainData read_train_data(const std::string& path, hm::index_t d, bool ce) {
    if (!fs::exists(path)) throw usage_error(path + ": no such file");
    const hm::SafeTensorsFile file(path);
    const hm::TensorTable& t = file.view();
    const auto need = [&](const char* name) -> const hm::TensorInfo& {
        const hm::TensorInfo* i = t.find(name);
        if (i == nullptr) throw usage_error(path + ": no tensor '" + name + "' (a data file holds x and " + (ce ? "labels" : "y") + ")");
        return *i;
    };
    const hm::TensorInfo& x = need("x");
    if (x.shape.size() != 2 || x.shape[1] != d)
        throw usage_error(path + ": x has shape " + x.shape_string() + ", expected [N, " + std::to_string(d) + "] (the model's d_model)");
    TrainData out{hm::Matrix<float>(x.shape[0], d), {}, {}};
    for (hm::index_t i = 0; i < x.numel(); ++i) out.x.data()[i] = float(t.element(x, i));
    if (ce) {
        const hm::TensorInfo& l = need("labels");
        if (l.shape != std::vector<hm::index_t>{x.shape[0]})
            throw usage_error(path + ": labels has shape " + l.shape_string() + ", expected [" + std::to_string(x.shape[0]) + "]");
        for (hm::index_t i = 0; i < l.numel(); ++i) out.labels.push_back(std::int32_t(t.element(l, i)));
    } else {
        const hm::TensorInfo& y = need("y");
        if (y.shape != x.shape) throw usage_error(path + ": y has shape " + y.shape_string() + ", expected " + x.shape_string());
        out.y = hm::Matrix<float>(x.shape[0], d);
        for (hm::index_t i = 0; i < y.numel(); ++i) out.y.data()[i] = float(t.element(y, i));
    }
    return out;
}

/// A real number flag in [min, max].
double real(const Args& a, const std::string& f, double fallback, double min, double max) {
    if (!a.has(f)) return fallback;
    const std::string v = a.get(f);
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !(x >= min && x <= max))
        throw usage_error(f + " is '" + v + "', expected a number in [" + hm::detail::concat(min, ", ", max) + "]");
    return x;
}

int train(const Args& a) {
    set_threads(a);
    const std::string loss = a.get("--loss", "ce");
    if (loss != "ce" && loss != "mse") throw usage_error("--loss is '" + loss + "', expected ce or mse");
    const bool ce = loss == "ce", json = a.has("--json");
    const hm::index_t steps = a.integer("--steps", 200), batch = a.integer("--batch", 64), log_every = a.integer("--log-every", 20);
    const hm::index_t eval_every = a.integer("--eval-every", steps);
    const hm::index_t classes = a.integer("--classes", 4, 2);
    if (a.has("--data") && a.has("--tasks")) throw usage_error("--data and --tasks are alternatives (a file, or the synthetic multi-task problem)");
    if (a.has("--model") && a.has("--family")) throw usage_error("--model and --family are alternatives (a checkpoint, or fixed-seed weights)");
    if (!ce && !a.has("--data")) throw usage_error("--loss mse needs --data (the synthetic problem is a classification)");

    // The starting weights: a checkpoint, or a synthetic one of --family (in memory).
    std::optional<hm::Checkpoint> from_disk;
    hm::SyntheticImage image;
    const hm::Checkpoint* start = nullptr;
    if (a.has("--model")) {
        start = &from_disk.emplace(a.get("--model"));
    } else {
        hm::SyntheticModel m{.family = family_named(a.get("--family", "hypermoe_gpt2")), .d_model = a.integer("--d-model", 64),
                             .d_ff = a.integer("--d-ff", 128), .experts = a.integer("--experts", 8), .top_k = a.integer("--top-k", 2),
                             .layers = a.integer("--layers", 2), .seed = std::uint64_t(a.integer("--seed", 1, 0))};
        if (m.top_k > m.experts) throw usage_error("--top-k is larger than --experts");
        m.capacity = std::max<hm::index_t>(1, (batch * 5 / 4 + m.experts - 1) / m.experts); // capacity factor 1.25
        image = hm::synthetic_image(m);
        start = &from_disk.emplace(image.config, image.safetensors, "synthetic " + a.get("--family", "hypermoe_gpt2"));
    }
    const hm::ModelInfo info = hm::describe(*start);
    const hm::index_t d = info.d_model;

    // The data: files, or the synthetic multi-task problem (a fixed training set, a held-out one).
    TrainData train_set, eval_set;
    std::string data_name;
    if (a.has("--data")) {
        train_set = read_train_data(a.get("--data"), d, ce);
        if (a.has("--eval")) eval_set = read_train_data(a.get("--eval"), d, ce);
        data_name = a.get("--data");
    } else {
        const hm::MultiTaskGenerator gen(hm::MultiTaskProblem{.tasks = a.integer("--tasks", 8), .width = d, .classes = classes,
                                                              .seed = std::uint64_t(a.integer("--data-seed", 1, 0))});
        hm::MultiTaskBatch tr = gen.sample(a.integer("--train-rows", 4096), 0), ev = gen.sample(a.integer("--eval-rows", 2048), 1);
        train_set = {std::move(tr.x), {}, std::move(tr.labels)};
        eval_set = {std::move(ev.x), {}, std::move(ev.labels)};
        data_name = "multitask";
    }
    if (train_set.rows() < batch)
        throw usage_error("the training data has " + std::to_string(train_set.rows()) + " rows, fewer than --batch " + std::to_string(batch));

    hm::TrainOptions opt{.loss = ce ? hm::LossKind::cross_entropy : hm::LossKind::mse, .classes = ce ? classes : 0};
    opt.matrices.lr = opt.vectors.lr = real(a, "--lr", 1e-3, 0, 10);
    opt.matrices.weight_decay = real(a, "--weight-decay", 1e-2, 0, 1);
    opt.clip_norm = real(a, "--clip", 1.0, 0, 1e9);
    if (hm::has_two_stacks(info.family)) opt.context.sequence_length = batch; // capacity per batch
    opt.context.aux_losses.load_balancing = real(a, "--aux-lb", 0, 0, 100);
    if (a.has("--aux-load") && !a.has("--noisy-gating")) throw usage_error("--aux-load needs --noisy-gating (Shazeer's load loss is a noisy router's)");
    opt.context.aux_losses.load = real(a, "--aux-load", 0, 0, 100);
    opt.load.noisy_gating = a.has("--noisy-gating");
    opt.with_hyper = !a.has("--no-hyper");
    opt.balance_gamma = real(a, "--balance", 0, 0, 10);

    return with_backend(a.get("--backend", default_backend()), [&]<class B>() {
        hm::Trainer<B> trainer(*start, opt);
        // The trainer holds its own copy of every tensor: the source (a synthetic image, or a
        // file's mapped pages) is no longer needed.
        const std::string source_name = start->dir();
        start = nullptr;
        from_disk.reset();
        image = {};
        if (!json)
            std::printf("training %s (%s, %lld MoE blocks, d_model %lld, %lld experts, top-%lld) on %s: %lld rows, batch %lld, "
                        "%lld steps, backend %s\n",
                        std::string(hm::to_string(info.family)).c_str(), source_name.c_str(),
                        static_cast<long long>(info.moe_blocks.size()), static_cast<long long>(d), static_cast<long long>(info.experts),
                        static_cast<long long>(info.top_k), data_name.c_str(), static_cast<long long>(train_set.rows()),
                        static_cast<long long>(batch), static_cast<long long>(steps), std::string(B::name).c_str());
        const auto targets = [&](const TrainData& s, hm::index_t first, hm::index_t rows) {
            return hm::Targets{s.y.rows() > 0 ? hm::ConstMatrixView<float>(s.y.view().row_block(first, rows)) : hm::ConstMatrixView<float>(),
                               ce ? std::span<const std::int32_t>(s.labels).subspan(std::size_t(first), std::size_t(rows))
                                  : std::span<const std::int32_t>()};
        };
        const auto evaluate = [&](hm::index_t step) {
            if (eval_set.rows() == 0) return;
            const hm::TrainMetrics e = trainer.evaluate(eval_set.x.view(), targets(eval_set, 0, eval_set.rows()));
            if (json)
                std::printf("%s\n", nlohmann::json{{"step", step}, {"eval_loss", e.loss}, {"eval_accuracy", ce ? nlohmann::json(e.accuracy) : nlohmann::json(nullptr)},
                                                   {"eval_load_cv", e.load_cv}}.dump().c_str());
            else if (ce)
                std::printf("  eval at step %lld: loss %.4f, accuracy %.3f, load CV %.3f\n", static_cast<long long>(step), e.loss, e.accuracy, e.load_cv);
            else
                std::printf("  eval at step %lld: loss %.4f, load CV %.3f\n", static_cast<long long>(step), e.loss, e.load_cv);
        };
        evaluate(0);
        double loss_sum = 0, cv_sum = 0, seconds = 0, total_seconds = 0;
        double gradient_s = 0, optimizer_s = 0, rebuild_s = 0; // where the logged steps' time went
        hm::index_t logged = 0, next = 0;
        for (hm::index_t step = 1; step <= steps; ++step) {
            // Batches cycle through the training rows in order (the last one of a pass wraps).
            if (next + batch > train_set.rows()) next = 0;
            const hm::TrainMetrics m = trainer.step(train_set.x.view().row_block(next, batch), targets(train_set, next, batch));
            next += batch;
            loss_sum += m.loss, cv_sum += m.load_cv, seconds += m.seconds, total_seconds += m.seconds, ++logged;
            gradient_s += m.gradient_seconds, optimizer_s += m.optimizer_seconds, rebuild_s += m.rebuild_seconds;
            if (step % log_every == 0 || step == steps) {
                const double tps = double(batch * logged) / seconds;
                const double ms = 1e3 / double(logged); // seconds summed over the logged steps -> ms a step
                if (json)
                    std::printf("%s\n", nlohmann::json{{"step", step}, {"loss", loss_sum / double(logged)}, {"tokens_per_s", tps},
                                                       {"load_cv", cv_sum / double(logged)}, {"gradient_ms", gradient_s * ms},
                                                       {"optimizer_ms", optimizer_s * ms}, {"rebuild_ms", rebuild_s * ms}}.dump().c_str());
                else
                    std::printf("step %5lld  loss %.4f  tokens/s %8.0f  load CV %.3f  ms a step: gradients %.1f, AdamW %.1f, rebuild %.1f\n",
                                static_cast<long long>(step), loss_sum / double(logged), tps, cv_sum / double(logged),
                                gradient_s * ms, optimizer_s * ms, rebuild_s * ms);
                std::fflush(stdout);
                loss_sum = cv_sum = seconds = gradient_s = optimizer_s = rebuild_s = 0, logged = 0;
            }
            if (step % eval_every == 0 || step == steps) evaluate(step);
        }
        if (json) std::printf("%s\n", nlohmann::json{{"steps", steps}, {"train_seconds", total_seconds}}.dump().c_str());
        if (a.has("--save")) {
            trainer.save(a.get("--save"));
            if (!json) std::printf("saved the trained blocks to %s (%.1f s of training)\n", a.get("--save").c_str(), total_seconds);
        }
        return 0;
    });
}

// --------------------------------------------------------------------------------------------- demo

int demo() {
    const fs::path dir = fs::temp_directory_path() / ("hypermoe-demo-" + std::to_string(::getpid()));
    struct Cleanup {
        fs::path p;
        ~Cleanup() { fs::remove_all(p); }
    } cleanup{dir};
    const hm::SyntheticModel m{.family = hm::family("hypermoe_gpt2"), .d_model = 64, .experts = 8, .top_k = 2, .layers = 2,
                               .adapter_rank = 8, .hyper_dim = 16, .layer_dim = 4, .seed = 2024};
    hm::write_synthetic_checkpoint(dir.string(), m);
    const hm::Checkpoint ck(dir.string());
    const std::string backend = default_backend();
    std::printf("hypermoe demo: a HyperMoE (GPT-2 variant) stack with fixed-seed weights, written as a checkpoint and\n"
                "loaded back through the same adapters real checkpoints use.\n");
    std::printf("  %lld blocks, d_model %lld, %lld experts (gelu_new FFN, width %lld), top-%lld, HyperExpert rank %lld,\n"
                "  one hypernetwork shared by both blocks; backend %s\n",
                static_cast<long long>(m.layers), static_cast<long long>(m.d_model), static_cast<long long>(m.experts),
                static_cast<long long>(4 * m.d_model), static_cast<long long>(m.top_k), static_cast<long long>(m.adapter_rank),
                backend.c_str());
    return with_backend(backend, [&]<class B>() {
        // Every MoE block at once (one hypernetwork for the stack), as a residual stack:
        // h = x + block0(x), y = h + block1(h). The per-token model is the reference.
        const auto cached = hm::load_model<B>(ck);
        const auto per_token = hm::load_model<B>(ck, {.hyper = {.mode = hm::HyperMode::per_token}});
        const auto residual_stack = [](const hm::LoadedModel<B>& model) {
            hm::DynamicStack s;
            for (const auto& block : model) s.push_back(hm::Residual(block)); // copies share the weights
            return s;
        };
        const hm::DynamicStack stack = residual_stack(cached), reference = residual_stack(per_token);
        const hm::LoadedMoeBlock<B>& b0 = cached.block(0);
        const hm::LoadedMoeBlock<B>& b1 = cached.block(1);
        const hm::index_t tokens = 256, d = m.d_model;
        hm::Matrix<float> x(tokens, d), y(tokens, d), y_ref(tokens, d);
        for (hm::index_t i = 0; i < tokens * d; ++i)
            x.data()[i] = float(double(hm::detail::splitmix64(std::uint64_t(i)) >> 11) * 0x1.0p-53 * 2 - 1);
        hm::Workspace ws;
        hm::RoutingRecorder recorder; // the plan of each block, from the routing sink
        const auto t0 = std::chrono::steady_clock::now();
        stack.forward(x.view(), y.view(), ws);
        const double cold = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        const auto t1 = std::chrono::steady_clock::now();
        stack.forward(x.view(), y.view(), ws, {.routing_sink = &recorder});
        const double warm = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
        reference.forward(x.view(), y_ref.view(), ws);
        double diff = 0, scale = 0;
        for (hm::index_t i = 0; i < tokens * d; ++i) {
            diff = std::max(diff, std::abs(double(y.data()[i]) - y_ref.data()[i]));
            scale = std::max(scale, std::abs(double(y_ref.data()[i])));
        }
        std::printf("ran %lld tokens through the stack: %.3f ms with a cold HyperExpert cache, %.3f ms warm\n",
                    static_cast<long long>(tokens), cold, warm);
        const hm::LoadedMoeBlock<B>* blocks[2] = {&b0, &b1};
        for (int i = 0; i < 2; ++i) {
            const auto s = hm::routing_stats(recorder.plans()[std::size_t(i)]);
            const auto* c = blocks[i]->hyper_cache();
            std::printf("block %d: tokens per expert", i);
            for (const auto n : s.tokens_per_expert) std::printf(" %lld", static_cast<long long>(n));
            std::printf("; load CV %.3f, max/mean %.2f; HyperExperts cached %lld of %lld patterns (%llu hits, %llu misses)\n",
                        s.load_cv, s.max_over_mean, static_cast<long long>(c->size()), static_cast<long long>(c->patterns()),
                        static_cast<unsigned long long>(c->hits()), static_cast<unsigned long long>(c->misses()));
        }
        std::printf("cached vs per-token HyperExperts: max relative difference %.2e (%s)\n", diff / scale,
                    diff / scale < 1e-5 ? "same function" : "MISMATCH");
        return diff / scale < 1e-5 ? 0 : 1;
    });
}

std::string one_line(std::string s) {
    std::replace(s.begin(), s.end(), '\n', ' ');
    return s;
}

} // namespace

int main(int argc, char** argv) {
    // Loading packs each expert through transient buffers of tens of MB (e.g. GLU's stacked
    // gate|up). glibc raises its mmap threshold after the first such buffer is freed, then keeps
    // the later ones on the heap after they are freed: a fixed 1 MiB threshold gives each its own
    // mapping, returned on free, so peak RSS stays near the packed weights (docs/benchmarks.md).
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    try {
        if (argc == 1) return demo();
        const std::string cmd = argv[1];
        if (cmd == "--help" || cmd == "-h" || cmd == "help") {
            std::fputs(usage_text, stdout);
            return 0;
        }
        if (cmd == "run")
            return run(Args(argc, argv, 2,
                            {"--model", "--input", "--output", "--layer", "--stack", "--backend", "--threads", "--weights", "--precision",
                             "--grad", "--output-grads"},
                            {}));
        if (cmd == "inspect") return inspect(Args(argc, argv, 2, {"--model"}, {}));
        if (cmd == "bench")
            return bench(Args(argc, argv, 2,
                              {"--family", "--d-model", "--d-ff", "--experts", "--top-k", "--tokens", "--router", "--hyper",
                               "--weights", "--precision", "--threads", "--repeat", "--backend", "--model", "--layer", "--stack"},
                              {"--json"}));
        if (cmd == "train")
            return train(Args(argc, argv, 2,
                              {"--model", "--family", "--d-model", "--d-ff", "--experts", "--top-k", "--layers", "--seed", "--data", "--eval",
                               "--tasks", "--classes", "--train-rows", "--eval-rows", "--data-seed", "--loss", "--steps", "--batch",
                               "--lr", "--weight-decay", "--clip", "--aux-lb", "--aux-load", "--balance", "--log-every", "--eval-every", "--save",
                               "--backend", "--threads"},
                              {"--json", "--no-hyper", "--noisy-gating"}));
        throw usage_error("unknown command '" + cmd + "' (expected run, inspect, bench or train; see hypermoe --help)");
    } catch (const usage_error& e) {
        std::fprintf(stderr, "hypermoe: %s\n", one_line(e.what()).c_str());
        return 2;
    } catch (const hm::error& e) {
        std::fprintf(stderr, "hypermoe: %s\n", one_line(e.what()).c_str());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hypermoe: internal error: %s\n", one_line(e.what()).c_str());
        return 1;
    }
}
