#pragma once
// Training a checkpoint's MoE blocks on the CPU: the weights are held once, as the checkpoint's
// own named F32 tensors (ParameterStore, a safetensors image in memory), the blocks are built
// from them by the same family loaders that read checkpoints from disk, and a step is forward,
// loss, backward (each block's LoadedMoeBlock::gradients, by tensor name), clipping and an AdamW
// step on the stored tensors, after which the blocks are rebuilt from the updated tensors (the
// backends pack weights into their own layouts, and a HyperMoE block's HyperExpert cache must
// not outlive the weights it was generated from). Saving writes the image as model.safetensors
// beside the config: it loads back, through Checkpoint and load_model, into bitwise the same
// blocks. This header needs nlohmann/json (as io/ does); hypermoe.hpp does not include it.
//
// The model is the checkpoint's MoE blocks in describe()'s order, chained: h_{i+1} = h_i +
// block_i(h_i) with TrainOptions::residual (the default, as in the transformers these blocks
// come from), else h_{i+1} = block_i(h_i). Tensors no block reads (a real checkpoint's attention,
// DeepSeek's selection bias) are carried unchanged.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "hypermoe/io/families.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/io/parameter_names.hpp"
#include "hypermoe/router/bias_balancer.hpp"
#include "hypermoe/stats/routing_stats.hpp"
#include "hypermoe/train/loss.hpp"
#include "hypermoe/train/optimizer.hpp"

namespace hypermoe {

/// A checkpoint's tensors copied into one safetensors image in memory, every floating tensor as
/// F32 (BF16, F16, F64, q8_0 / q4_0 blocks and the other ggml quants widened to their exact
/// values, as an f32 load would), integer tensors as they are; with the checkpoint's config.
/// checkpoint() views it as a Checkpoint (for the loaders), values() gives a tensor's floats to
/// update in place, save() writes config.json and model.safetensors. Movable, not copyable.
class ParameterStore {
public:
    explicit ParameterStore(const Checkpoint& source) {
        std::vector<TensorInfo> layout;
        for (const std::string& name : source.tensor_names()) {
            const TensorInfo& t = *source.tensor(name).info;
            if (t.dtype == tensor_dtype::other)
                throw weight_error(detail::concat(source.dir(), ": tensor ", t.describe(), " has dtype ", t.type_string(),
                                                  ", which cannot be held for training"));
            layout.push_back({name, is_floating_dtype(t.dtype) ? tensor_dtype::f32 : t.dtype, t.shape});
        }
        assign(filled(std::move(layout), source), source.config(), source.dir());
    }

    /// Lays each pair's second tensor right after its first in the image, so that a GLU expert's
    /// [gate; up], read by its fused linear map, is viewed in place at every rebuild instead of
    /// copied (TensorBinder::deferred_stack). The values are unchanged; the spans values() gave
    /// before are invalid when it returns true (the layout changed), valid when it returns false
    /// (every pair already in place). A name the store lacks is a weight_error; a tensor in two
    /// pairs, or a pair of one tensor, a config_error.
    bool place_adjacent(const std::vector<std::pair<std::string, std::string>>& pairs) {
        std::map<std::string, std::string> after; // first -> second
        std::set<std::string> placed, seconds;
        bool in_place = true;
        for (const auto& [first, second] : pairs) {
            const Checkpoint::Ref a = checkpoint_->tensor(first), b = checkpoint_->tensor(second);
            for (const std::string* name : {&first, &second})
                if (!placed.insert(*name).second)
                    throw config_error(detail::concat("ParameterStore::place_adjacent: tensor '", *name,
                                                      "' is in two pairs (or paired with itself), expected each tensor in one pair"));
            after[first] = second;
            seconds.insert(second);
            const std::span<const std::byte> x = a.file->data(*a.info), y = b.file->data(*b.info);
            in_place = in_place && y.data() == x.data() + x.size();
        }
        if (in_place) return false;
        // The image's tensors in their present order, each pair's second moved after its first.
        std::vector<const TensorInfo*> order;
        for (const std::string& name : checkpoint_->tensor_names()) order.push_back(checkpoint_->tensor(name).info);
        std::sort(order.begin(), order.end(), [](const TensorInfo* x, const TensorInfo* y) { return x->begin < y->begin; });
        std::vector<TensorInfo> layout;
        for (const TensorInfo* t : order) {
            if (seconds.count(t->name)) continue;
            layout.push_back({t->name, t->dtype, t->shape});
            if (const auto it = after.find(t->name); it != after.end()) {
                const TensorInfo& second = *checkpoint_->tensor(it->second).info;
                layout.push_back({second.name, second.dtype, second.shape});
            }
        }
        assign(filled(std::move(layout), *checkpoint_), checkpoint_->config(), checkpoint_->dir());
        return true;
    }

    /// The tensors as a Checkpoint (for load_model and the other loaders); valid while *this is.
    [[nodiscard]] const Checkpoint& checkpoint() const noexcept { return *checkpoint_; }

    /// Tensor `name`'s values, to update in place; weight_error when there is no such F32 tensor.
    [[nodiscard]] std::span<float> values(const std::string& name) {
        const Checkpoint::Ref r = checkpoint_->tensor(name);
        if (r.info->dtype != tensor_dtype::f32)
            throw weight_error(detail::concat(checkpoint_->dir(), ": tensor '", name, "' is ", r.info->type_string(), ", not F32"));
        const auto at = std::size_t(r.file->data_section().data() - image_.data()) + r.info->begin;
        return {reinterpret_cast<float*>(image_.data() + at), std::size_t(r.info->numel())};
    }
    [[nodiscard]] std::span<const float> values(const std::string& name) const {
        return const_cast<ParameterStore&>(*this).values(name);
    }

    /// Writes `dir`/config.json and `dir`/model.safetensors (creating `dir`); a weight_error names
    /// the file that cannot be written.
    void save(const std::string& dir) const { write_checkpoint(dir, checkpoint_->config(), image_); }

private:
    /// The image of `layout`'s tensors (F32 for floating dtypes, else the source's), each filled
    /// from `source`'s tensor of its name: written once, in place.
    static std::vector<std::byte> filled(std::vector<TensorInfo> layout, const Checkpoint& source) {
        SafetensorsImage image = safetensors_layout(std::move(layout), {{"format", "pt"}});
        for (std::size_t i = 0; i < image.tensors.size(); ++i) {
            const Checkpoint::Ref r = source.tensor(image.tensors[i].name);
            const std::span<std::byte> out = image.data(i);
            if (is_floating_dtype(r.info->dtype))
                r.file->convert_f32(*r.info, {reinterpret_cast<float*>(out.data()), out.size() / sizeof(float)});
            else if (!out.empty())
                std::memcpy(out.data(), r.file->data(*r.info).data(), out.size());
        }
        return std::move(image.bytes);
    }

    /// Holds `image` (a safetensors file's bytes) and the checkpoint that views it.
    void assign(std::vector<std::byte> image, const nlohmann::json& config, const std::string& dir) {
        auto checkpoint = std::make_unique<Checkpoint>(config, image, dir);
        image_ = std::move(image); // the buffer moves with its bytes: checkpoint's view stays valid
        checkpoint_ = std::move(checkpoint);
    }

    std::vector<std::byte> image_; ///< a safetensors file's bytes (its buffer does not move when *this does)
    std::unique_ptr<Checkpoint> checkpoint_;
};

/// What a trainer minimises.
enum class LossKind {
    mse,          ///< mean squared error against Targets::values (the output's shape)
    cross_entropy ///< softmax cross-entropy of Targets::labels over the output's first `classes` columns
};

/// What a Trainer is told once.
struct TrainOptions {
    LossKind loss = LossKind::mse;
    index_t classes = 0;  ///< cross-entropy: the class count (the logits are the output's first columns)
    bool residual = true; ///< h + block(h) (true) or block(h) for each MoE block
    bool with_hyper = true; ///< false: HyperMoE blocks run and train without their HyperExpert (plain MoE, same experts)
    /// Sequence length (capacity), the auxiliary losses' weights and the noise seed. Noisy routers
    /// (LoadOptions::noisy_gating) draw fresh noise each step (noise_seed + the step count + 1)
    /// and none in forward() and evaluate(), as the reference code routes when not training.
    Context context = {};
    LoadOptions load = {};///< how the blocks are built (storage must be f32: a backward needs the weights as trained)
    AdamWGroup matrices = {};                    ///< AdamW for every tensor of two or more dimensions
    AdamWGroup vectors = {.weight_decay = 0.0};  ///< and for biases and other 1-D tensors (no decay by default)
    double clip_norm = 0; ///< clip the global gradient norm to this (0: no clipping)
    /// Auxiliary-loss-free balancing (DeepSeek-V3, router/bias_balancer.hpp): after each step,
    /// each block's selection bias moves by balance_gamma * sign(mean load - load_e) from the
    /// step's routing (0: off). A block whose checkpoint holds the bias (DeepSeek-V3's
    /// e_score_correction_bias) starts from it and saves it; other blocks start from zeros.
    double balance_gamma = 0;
};

/// The targets of a batch: values for LossKind::mse, labels for LossKind::cross_entropy.
struct Targets {
    ConstMatrixView<float> values = {};
    std::span<const std::int32_t> labels = {};
};

/// What a step or an evaluation measured.
struct TrainMetrics {
    double loss = 0;     ///< the task loss (the auxiliary losses are not included)
    double accuracy = 0; ///< cross-entropy: the fraction of rows classified right (else 0)
    double load_cv = 0;  ///< the MoE blocks' mean load CV (sample std / mean of tokens per expert)
    index_t tokens = 0;
    double seconds = 0;  ///< wall time of the call
    // Of a step's seconds: forward, loss and backward; clipping and AdamW; the blocks' rebuild.
    double gradient_seconds = 0, optimizer_seconds = 0, rebuild_seconds = 0;
};

/// Trains the MoE blocks of a checkpoint with AdamW (see the file comment). Not for use by
/// several threads at once (a step's blocks run on the library's OpenMP threads).
template <Backend B>
class Trainer {
public:
    Trainer(const Checkpoint& start, TrainOptions options) : store_(start), opt_(std::move(options)) {
        if (opt_.load.storage != dtype::f32)
            throw config_error(detail::concat("Trainer: LoadOptions::storage is ", to_string(opt_.load.storage),
                                              ", expected f32 (a backward computes with the weights as trained)"));
        rebuild();
        // Each GLU expert's up laid right after its gate, so that every rebuild views the pair as
        // the fused [gate; up] in place instead of copying it (Mixtral's w1, w2, w3 are sorted apart).
        if (store_.place_adjacent(gate_up_pairs())) rebuild();
        if (opt_.loss == LossKind::cross_entropy && (opt_.classes < 2 || opt_.classes > width()))
            throw config_error(detail::concat("Trainer: classes is ", opt_.classes, ", expected 2 <= classes <= ", width(),
                                              " (the blocks' width)"));
        std::vector<Parameter> params;
        for (const auto& block : loaded().blocks())
            if (block.parameter_names().experts.size() != std::size_t(block.info().experts))
                throw config_error(detail::concat("Trainer: ", to_string(block.info().family), " block ", block.block().layer,
                                                  " reads its experts from MXFP4 blocks (gpt-oss's fused _blocks and _scales), which ",
                                                  "are not trained; start from a dequantised checkpoint"));
        for (const auto& block : loaded().blocks())
            for (const std::string& name : parameter_tensor_names(block.parameter_names(), opt_.with_hyper)) {
                if (index_.count(name)) continue;
                const std::span<float> v = store_.values(name);
                const bool vector = store_.checkpoint().tensor(name).info->shape.size() < 2 ||
                                    is_fused_vector(block.parameter_names(), name);
                index_[name] = params.size();
                grads_.emplace_back(1, index_t(v.size())); // zeroed, in huge pages when large
                params.push_back({name, v, grads_.back().elements(), vector ? 1u : 0u});
            }
        adamw_.emplace(std::move(params), std::vector<AdamWGroup>{opt_.matrices, opt_.vectors});
        if (opt_.balance_gamma != 0) {
            for (auto& block : loaded().blocks()) {
                const index_t experts = block.info().experts;
                balancers_.emplace_back(experts, opt_.balance_gamma);
                const TensorName& stored = block.parameter_names().selection_bias;
                if (stored.empty()) biases_.emplace_back(std::size_t(experts), 0.0f);
                else biases_.emplace_back(store_.values(stored.name).begin(), store_.values(stored.name).end());
                block.set_selection_bias(biases_.back());
            }
        }
    }

    /// The blocks' width (d_model): the input's and output's columns.
    [[nodiscard]] index_t width() const noexcept { return width_; }
    /// The blocks as now built from the stored tensors.
    /// (A config_error after a rebuild failed: see refresh().)
    [[nodiscard]] const LoadedModel<B>& model() const { return loaded(); }
    [[nodiscard]] const ParameterStore& parameters() const noexcept { return store_; }
    [[nodiscard]] const AdamW& optimizer() const noexcept { return *adamw_; }
    /// Changes the learning rate of both groups (a schedule's step).
    void set_lr(double matrices, double vectors) {
        adamw_->set_lr(0, matrices);
        adamw_->set_lr(1, vectors);
    }

    /// y = the chained blocks applied to x, (rows, width()).
    void forward(ConstMatrixView<float> x, MatrixView<float> y) {
        check_shape(x, x.rows(), width(), "Trainer::forward", "x");
        check_shape(y, x.rows(), width(), "Trainer::forward", "y");
        run_forward(x, eval_context());
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t c = 0; c < width(); ++c) y(r, c) = hs_.back()(r, c);
    }

    /// The loss (and accuracy, load CV) of the model on a batch; changes nothing.
    TrainMetrics evaluate(ConstMatrixView<float> x, const Targets& t) {
        const auto start = std::chrono::steady_clock::now();
        check_shape(x, x.rows(), width(), "Trainer::evaluate", "x");
        run_forward(x, eval_context());
        TrainMetrics m = measure(t, {});
        m.seconds = seconds_since(start);
        return m;
    }

    /// One step: gradients(x, t), clipping, AdamW, zeroed gradients, rebuild. Returns what the
    /// forward measured (the loss before the update).
    TrainMetrics step(ConstMatrixView<float> x, const Targets& t) {
        const auto start = std::chrono::steady_clock::now();
        TrainMetrics m = gradients(x, t);
        m.gradient_seconds = m.seconds;
        const auto update = std::chrono::steady_clock::now();
        if (opt_.clip_norm > 0) clip_grad_norm(adamw_->parameters(), opt_.clip_norm);
        adamw_->step();
        for (auto& g : grads_) {
            const std::span<float> e = g.elements();
            detail::for_each_chunk(e.size(), [&](std::size_t begin, std::size_t end) { std::fill(e.begin() + std::ptrdiff_t(begin), e.begin() + std::ptrdiff_t(end), 0.0f); });
        }
        balance();
        m.optimizer_seconds = seconds_since(update);
        const auto built = std::chrono::steady_clock::now();
        rebuild();
        ++steps_;
        m.rebuild_seconds = seconds_since(built);
        m.seconds = seconds_since(start);
        return m;
    }

    /// Forward, loss and backward of every block: adds dL/d<tensor> to gradient(name) for every
    /// parameter (a HyperMoE stack's shared hypernetwork gets every block's part). Nothing is
    /// updated; step() calls it.
    TrainMetrics gradients(ConstMatrixView<float> x, const Targets& t) {
        const auto start = std::chrono::steady_clock::now();
        check_shape(x, x.rows(), width(), "Trainer::gradients", "x");
        const Context context = step_context();
        run_forward(x, context);
        fit(dh_, x.rows());
        TrainMetrics m = measure(t, dh_.view());
        fit(dx_, x.rows());
        const auto& blocks = loaded().blocks();
        buffers_.resize(blocks.size());
        for (std::size_t i = blocks.size(); i-- > 0;) {
            const auto add = [&](const TensorName& n, ConstMatrixView<float> g, bool vector) { accumulate(n, g, vector); };
            if (blocks[i].keeps_activations(opt_.with_hyper))
                blocks[i].for_each_gradient(kept_[i], hs_[i].view(), dh_.view(), dx_.view(), ws_, context, opt_.with_hyper, buffers_[i], add);
            else
                blocks[i].for_each_gradient(hs_[i].view(), dh_.view(), dx_.view(), ws_, context, opt_.with_hyper, buffers_[i], add);
            for (index_t r = 0; r < x.rows(); ++r)
                for (index_t c = 0; c < width(); ++c) dh_(r, c) = opt_.residual ? dh_(r, c) + dx_(r, c) : dx_(r, c);
        }
        m.seconds = seconds_since(start);
        return m;
    }

    /// Block i's selection bias as balancing has moved it (empty when TrainOptions::balance_gamma is 0).
    [[nodiscard]] std::span<const float> selection_bias(std::size_t block) const {
        return block < biases_.size() ? std::span<const float>(biases_[block]) : std::span<const float>();
    }

    /// The trained tensors' names (the optimiser's parameters), in the order the blocks read them.
    [[nodiscard]] std::vector<std::string> parameter_names() const {
        std::vector<std::string> out;
        for (const Parameter& p : adamw_->parameters()) out.push_back(p.name);
        return out;
    }
    /// The accumulated gradient of tensor `name` (config_error when it is not a parameter).
    [[nodiscard]] std::span<const float> gradient(const std::string& name) const { return grads_[index_of(name)].elements(); }
    /// Tensor `name`'s values, to change by hand; call refresh() after.
    [[nodiscard]] std::span<float> values(const std::string& name) { return store_.values(name); }
    /// Rebuilds the blocks from the stored tensors (after values() were changed by hand). When
    /// they no longer load (a non-finite value, say), the load's error is thrown and the trainer
    /// holds no blocks until a refresh() succeeds: until then every call that needs them (step,
    /// forward, evaluate, model, ...) is a config_error that gives the load's message.
    void refresh() { rebuild(); }

    /// Writes the trained tensors as a checkpoint directory (ParameterStore::save).
    void save(const std::string& dir) const { store_.save(dir); }

private:
    /// A training step's context: TrainOptions::context with the step's noise seed.
    [[nodiscard]] Context step_context() const noexcept {
        Context c = opt_.context;
        c.noise_seed = opt_.context.noise_seed + steps_ + 1;
        return c;
    }
    /// An evaluation's: TrainOptions::context without router noise.
    [[nodiscard]] Context eval_context() const noexcept {
        Context c = opt_.context;
        c.router_noise = false;
        return c;
    }

    /// Rebuilds the blocks from the stored tensors, with the balanced selection biases. The old
    /// blocks go first, inside a BufferReuse scope, so that the new ones take their buffers
    /// instead of fresh pages, which the kernel would fault in one by one (the Mixtral-like
    /// layer's rebuild, 1 block: 593 -> 35 ms on a 2-core Zen 5, docs/training.md). So if the
    /// load fails, the trainer holds no blocks, and every later call that needs them is a
    /// config_error that says why.
    void rebuild() {
        detail::BufferReuse reuse; // the new blocks' buffers take the old ones' pages
        model_.reset();
        try {
            model_.emplace(load_model<B>(store_.checkpoint(), opt_.load));
        } catch (const std::exception& e) {
            failed_rebuild_ = e.what();
            throw;
        }
        width_ = model_->info().d_model;
        for (std::size_t i = 0; i < biases_.size(); ++i) model_->blocks()[i].set_selection_bias(biases_[i]);
    }

    /// Each GLU expert's (gate, up) tensor names, routed and shared, where both are whole
    /// tensors of their own (not slices of a fused tensor, not stored transposed).
    [[nodiscard]] std::vector<std::pair<std::string, std::string>> gate_up_pairs() const {
        std::vector<std::pair<std::string, std::string>> out;
        std::set<std::string> seen;
        const auto add = [&](const ExpertTensorNames& e) {
            const auto whole = [](const TensorName& n) { return !n.empty() && !n.fused() && !n.transposed; };
            if (whole(e.gate) && whole(e.up) && seen.insert(e.gate.name).second && seen.insert(e.up.name).second)
                out.emplace_back(e.gate.name, e.up.name);
        };
        for (const auto& block : loaded().blocks()) {
            for (const ExpertTensorNames& e : block.parameter_names().experts) add(e);
            if (block.parameter_names().shared) add(*block.parameter_names().shared);
        }
        return out;
    }

    /// The blocks, or a config_error when the last rebuild failed.
    [[nodiscard]] const LoadedModel<B>& loaded() const {
        if (!model_) throw config_error(detail::concat("Trainer: no blocks, since rebuilding them from the updated tensors failed: ", failed_rebuild_));
        return *model_;
    }
    [[nodiscard]] LoadedModel<B>& loaded() { return const_cast<LoadedModel<B>&>(std::as_const(*this).loaded()); }

    /// Moves each block's selection bias from the last forward's loads (and the stored tensor,
    /// where the checkpoint holds one, so that saving keeps it).
    void balance() {
        for (std::size_t i = 0; i < balancers_.size(); ++i) {
            balancers_[i].observe(plan(i));
            balancers_[i].update(biases_[i]);
            const TensorName& stored = loaded().blocks()[i].parameter_names().selection_bias;
            if (!stored.empty()) std::copy(biases_[i].begin(), biases_[i].end(), store_.values(stored.name).begin());
        }
    }

    /// Block i's routing in the last forward.
    [[nodiscard]] const RoutingPlan& plan(std::size_t i) const {
        return loaded().blocks()[i].keeps_activations(opt_.with_hyper) ? kept_[i].plan : plans_[i];
    }

    /// Runs the chain on x, keeping every block's input (hs_[i]) and the output (hs_.back()), and
    /// each MoE block's activations for its backward (kept_[i]; a HyperMoE block with its
    /// HyperExpert only its plan).
    void run_forward(ConstMatrixView<float> x, const Context& context) {
        const auto& blocks = loaded().blocks();
        if (blocks.empty()) throw config_error(detail::concat(store_.checkpoint().dir(), ": no MoE block to train"));
        hs_.resize(blocks.size() + 1);
        plans_.resize(blocks.size());
        kept_.resize(blocks.size());
        fit(hs_[0], x.rows());
        hs_[0].copy_from(x);
        check_finite(ConstMatrixView<float>(hs_[0].view()), "Trainer: x");
        for (std::size_t i = 0; i < blocks.size(); ++i) {
            Matrix<float>& out = hs_[i + 1];
            fit(out, x.rows());
            if (blocks[i].keeps_activations(opt_.with_hyper))
                blocks[i].forward(hs_[i].view(), out.view(), ws_, kept_[i], context, opt_.with_hyper);
            else
                blocks[i].forward(hs_[i].view(), out.view(), ws_, plans_[i], context, opt_.with_hyper);
            if (opt_.residual)
                for (index_t r = 0; r < x.rows(); ++r)
                    for (index_t c = 0; c < width(); ++c) out(r, c) += hs_[i](r, c);
        }
    }

    /// The loss of hs_.back() against t (and its gradient into dy when given) and the load CV.
    TrainMetrics measure(const Targets& t, MatrixView<float> dy) const {
        TrainMetrics m;
        const ConstMatrixView<float> y = hs_.back().view();
        m.tokens = y.rows();
        if (opt_.loss == LossKind::mse) {
            m.loss = mse_loss(y, t.values, dy);
        } else {
            const CrossEntropy ce = cross_entropy_loss(y, t.labels, opt_.classes, dy);
            m.loss = ce.loss;
            m.accuracy = y.rows() > 0 ? double(ce.correct) / double(y.rows()) : 0.0;
        }
        for (std::size_t i = 0; i < plans_.size(); ++i) m.load_cv += routing_stats(plan(i)).load_cv / double(plans_.size());
        return m;
    }

    [[nodiscard]] std::size_t index_of(const std::string& name) const {
        const auto it = index_.find(name);
        if (it == index_.end()) throw config_error(detail::concat("Trainer: '", name, "' is not a trained parameter"));
        return it->second;
    }

    /// Adds a block's gradient of tensor n's role (in the block's layout) to its parameter's (in
    /// the checkpoint's: transposed back, or into a fused tensor's slice, where n says so).
    void accumulate(const TensorName& n, ConstMatrixView<float> g, bool vector) {
        const std::span<float> into = grads_[index_of(n.name)].elements();
        index_t numel = 1;
        for (const index_t x : detail::gradient_shape(n, g, vector)) numel *= x;
        if (std::size_t(numel) != into.size())
            throw shape_error(detail::concat("Trainer: the gradient of '", n.name, "' has ", numel, " elements, expected ", into.size()));
        detail::add_gradient(n, g, vector, into);
    }

    /// Makes m (rows, width()), reallocating only when its shape changes.
    void fit(Matrix<float>& m, index_t rows) const {
        if (m.rows() != rows || m.cols() != width()) m = Matrix<float>(rows, width());
    }

    static double seconds_since(std::chrono::steady_clock::time_point start) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }

    ParameterStore store_;
    TrainOptions opt_;
    std::optional<LoadedModel<B>> model_;
    index_t width_ = 0;         ///< the blocks' d_model
    std::string failed_rebuild_; ///< why the last rebuild failed (model_ is then empty)
    std::map<std::string, std::size_t> index_; ///< parameter name -> its index in grads_ and the optimiser
    std::vector<Matrix<float>> grads_; ///< each a flat (1, n) buffer
    std::optional<AdamW> adamw_;
    std::vector<Matrix<float>> hs_;
    std::vector<RoutingPlan> plans_;          ///< each block's routing (HyperMoE blocks with their HyperExpert)
    std::vector<MoeActivations> kept_;        ///< each MoE block's activations for its backward
    std::vector<GradientBuffers> buffers_;    ///< each block's gradients, reused step after step
    std::vector<BiasBalancer> balancers_;      ///< per block, with balance_gamma
    std::vector<std::vector<float>> biases_;   ///< per block: its selection bias
    std::uint64_t steps_ = 0;                  ///< steps taken (the next step's noise seed)
    Matrix<float> dh_, dx_;
    Workspace ws_;
};

} // namespace hypermoe
