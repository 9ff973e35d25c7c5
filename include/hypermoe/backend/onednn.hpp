#pragma once
// The oneDNN backend (opt-in: include this header and link libdnnl; oneDNN 2.6 as Debian
// ships it). One matmul primitive per (K, N, dtype, epilogue), with a run-time M
// (DNNL_RUNTIME_DIM_VAL) and run-time row strides, created at construction and shared through
// a process-wide cache, so a forward call never creates one. Weights are reordered once into
// the layout the primitive asks for (format_tag::any).
//
// Measured on this machine (2 threads, K = 1024, N = 2816, weights streamed from memory): the
// run-time-M primitive (gemm:jit) runs within 1-6% of a fixed-M brgemm primitive at M = 1, 64,
// 512. Two limits of oneDNN 2.6 shape the code:
//  * eltwise + sum post-op chains fall back to the `ref` implementation (~0.1 GFLOP/s), so
//    `accumulate` with an activation runs the GEMM into scratch and adds in our own pass; any
//    other combination that lands on `ref` is re-created without post-ops the same way.
//  * bf16 matmul is emulated without avx512_bf16 (about 55 GFLOP/s vs 300 f32 here) and rounds
//    activations to bf16, so bf16 weights are widened to f32 once at construction (exact).

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <tuple>
#include <vector>

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/linear_spec.hpp"

namespace hypermoe {

namespace detail {

inline const dnnl::engine& onednn_engine() {
    static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

/// One stream per thread: oneDNN CPU streams are cheap, and not to be shared between threads.
inline dnnl::stream& onednn_stream() {
    thread_local dnnl::stream stream(onednn_engine());
    return stream;
}

/// A matmul primitive with a run-time M and the post-ops it fuses.
struct OnednnMatmul {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul primitive;
    bool fused_activation = false; ///< Act runs inside the primitive.
    bool fused_sum = false;        ///< C += runs inside the primitive.
};

inline void append_activation(dnnl::post_ops& po, activation_kind kind) {
    using alg = dnnl::algorithm;
    switch (kind) {
    case activation_kind::identity: break;
    case activation_kind::relu: po.append_eltwise(1.f, alg::eltwise_relu, 0.f, 0.f); break;
    case activation_kind::gelu: po.append_eltwise(1.f, alg::eltwise_gelu_erf, 0.f, 0.f); break;
    case activation_kind::gelu_tanh: po.append_eltwise(1.f, alg::eltwise_gelu_tanh, 0.f, 0.f); break;
    case activation_kind::silu: po.append_eltwise(1.f, alg::eltwise_swish, 1.f, 0.f); break;
    case activation_kind::relu2:
        po.append_eltwise(1.f, alg::eltwise_relu, 0.f, 0.f);
        po.append_eltwise(1.f, alg::eltwise_square, 0.f, 0.f);
        break;
    }
}

[[nodiscard]] inline std::shared_ptr<const OnednnMatmul> make_onednn_matmul(index_t k, index_t n, bool bias,
                                                                          activation_kind act, bool accumulate) {
    using dt = dnnl::memory::data_type;
    constexpr dnnl::memory::dim rt = DNNL_RUNTIME_DIM_VAL;
    const auto is_ref = [](const dnnl::matmul::primitive_desc& pd) {
        return std::string_view(pd.impl_info_str()).starts_with("ref");
    };
    try {
        const dnnl::memory::desc a({rt, k}, dt::f32, {rt, 1});
        const dnnl::memory::desc w({k, n}, dt::f32, dnnl::memory::format_tag::any);
        const dnnl::memory::desc b({1, n}, dt::f32, {n, 1});
        const dnnl::memory::desc c({rt, n}, dt::f32, {rt, 1});
        const auto create = [&](bool with_act, bool with_sum) {
            dnnl::post_ops po;
            if (with_act) append_activation(po, act);
            if (with_sum) po.append_sum(1.f);
            dnnl::primitive_attr attr;
            attr.set_post_ops(po);
            auto desc = bias ? dnnl::matmul::desc(a, w, b, c) : dnnl::matmul::desc(a, w, c);
            return dnnl::matmul::primitive_desc(desc, attr, onednn_engine());
        };
        const bool sum = accumulate && act == activation_kind::identity;
        auto pd = create(true, sum);
        bool fused = true;
        if (is_ref(pd)) {
            pd = create(false, false);
            fused = false;
        }
        if (is_ref(pd))
            throw backend_error(concat("onednn: no optimised matmul for K = ", k, ", N = ", n, " (got ",
                                       pd.impl_info_str(), ")"));
        return std::make_shared<const OnednnMatmul>(
            OnednnMatmul{pd, dnnl::matmul(pd), fused, fused && sum});
    } catch (const dnnl::error& e) {
        throw backend_error(concat("onednn: cannot create a matmul for K = ", k, ", N = ", n, ": ", e.what()));
    }
}

/// Process-wide cache: one primitive per (K, N, bias, activation, accumulate). Only
/// construction takes the lock; forward calls hold a shared_ptr to their entry.
[[nodiscard]] inline std::shared_ptr<const OnednnMatmul> onednn_matmul(index_t k, index_t n, bool bias,
                                                                     activation_kind act, bool accumulate) {
    using Key = std::tuple<index_t, index_t, bool, activation_kind, bool>;
    static std::mutex mutex;
    static std::map<Key, std::shared_ptr<const OnednnMatmul>> cache;
    const std::lock_guard lock(mutex);
    auto& entry = cache[Key{k, n, bias, act, accumulate}];
    if (!entry) entry = make_onednn_matmul(k, n, bias, act, accumulate);
    return entry;
}

} // namespace detail

struct onednn {
    static constexpr std::string_view name = "onednn";

    template <class Act>
    class linear : public detail::LinearBase {
    public:
        linear(WeightView w, std::span<const float> bias, LinearOptions opt)
            : LinearBase(w, bias, opt),
              matmul_(k_ > 0 && n_ > 0 ? detail::onednn_matmul(k_, n_, !bias.empty(), Act::kind, accumulate_)
                                       : nullptr) {
            // Source weights as the (K, N) matrix W^T, then one reorder into the primitive's layout.
            using dt = dnnl::memory::data_type;
            std::vector<float> wt(static_cast<std::size_t>(k_ * n_));
            for (index_t r = 0; r < n_; ++r)
                for (index_t c = 0; c < k_; ++c)
                    wt[static_cast<std::size_t>(c * n_ + r)] = detail::stored_value(w.at(r, c), storage_);
            const auto& engine = detail::onednn_engine();
            if (!matmul_) { // K = 0 or N = 0: A W^T is zero, only the bias remains
                bias_f32_.assign(bias.begin(), bias.end());
                return;
            }
            try {
                dnnl::memory src({{k_, n_}, dt::f32, {n_, 1}}, engine, wt.data());
                weights_ = dnnl::memory(matmul_->pd.weights_desc(), engine);
                dnnl::reorder(src, weights_).execute(detail::onednn_stream(), src, weights_);
                if (!bias.empty()) {
                    bias_ = dnnl::memory({{1, n_}, dt::f32, {n_, 1}}, engine);
                    std::copy(bias.begin(), bias.end(), static_cast<float*>(bias_.get_data_handle()));
                }
                detail::onednn_stream().wait();
            } catch (const dnnl::error& e) {
                throw backend_error(detail::concat(name_, ": oneDNN weight reorder failed: ", e.what()));
            }
        }

        [[nodiscard]] std::size_t workspace_bytes(index_t rows) const noexcept {
            return accumulate_ ? detail::padded_bytes<float>(rows * n_) : 0;
        }

        void operator()(ConstMatrixView<float> a, MatrixView<float> c, Workspace& ws, float scale = 1.0f) const {
            check_call(a, c);
            if (a.rows() == 0) return;
            if (!matmul_) {
                detail::epilogue_bias_only<Act>(c, bias_f32_.empty() ? nullptr : bias_f32_.data(), scale, accumulate_);
                return;
            }
            Workspace::Scope scope(ws, workspace_bytes(a.rows()));
            // The primitive always adds the bias; it applies Act and C += only where fused.
            const bool sum_in_primitive = accumulate_ && matmul_->fused_sum && scale == 1.0f;
            if (!accumulate_ || sum_in_primitive) {
                run(a, c);
                if (!matmul_->fused_activation) detail::epilogue_in_place<Act>(c, nullptr, scale);
                else if (scale != 1.0f) detail::epilogue_in_place<Identity>(c, nullptr, scale);
                return;
            }
            MatrixView<float> t = ws.take_matrix<float>(a.rows(), n_);
            if (matmul_->fused_sum) run_without_sum(a, t);
            else run(a, t);
            if (matmul_->fused_activation || matmul_->fused_sum) detail::epilogue_accumulate<Identity>(t, c, nullptr, scale);
            else detail::epilogue_accumulate<Act>(t, c, nullptr, scale);
        }

    private:
        /// out = A W^T + b, with the primitive's fused post-ops.
        void run(ConstMatrixView<float> a, MatrixView<float> out) const { execute(matmul_->primitive, a, out); }

        /// out = A W^T + b for an identity-accumulate linear called with scale != 1: the fused
        /// sum cannot scale only the new term, so C is written to scratch and added here.
        void run_without_sum(ConstMatrixView<float> a, MatrixView<float> out) const {
            std::fill_n(out.data(), out.rows() * out.cols(), 0.0f);
            execute(matmul_->primitive, a, out);
        }

        void execute(const dnnl::matmul& primitive, ConstMatrixView<float> a, MatrixView<float> out) const {
            using dt = dnnl::memory::data_type;
            const auto& engine = detail::onednn_engine();
            try {
                // oneDNN takes a non-const handle; the source is only read.
                dnnl::memory am({{a.rows(), k_}, dt::f32, {a.stride(), 1}}, engine, const_cast<float*>(a.data()));
                dnnl::memory cm({{out.rows(), n_}, dt::f32, {out.stride(), 1}}, engine, out.data());
                const std::array<dnnl_exec_arg_t, 4> args{{{DNNL_ARG_SRC, am.get()},
                                                           {DNNL_ARG_WEIGHTS, weights_.get()},
                                                           {DNNL_ARG_DST, cm.get()},
                                                           {DNNL_ARG_BIAS, bias_ ? bias_.get() : nullptr}}};
                const int nargs = bias_ ? 4 : 3;
                const auto status =
                    dnnl_primitive_execute(primitive.get(), detail::onednn_stream().get(), nargs, args.data());
                if (status != dnnl_success)
                    throw backend_error(detail::concat(name_, ": oneDNN matmul failed with status ",
                                                       static_cast<int>(status)));
                detail::onednn_stream().wait();
            } catch (const dnnl::error& e) {
                throw backend_error(detail::concat(name_, ": oneDNN matmul failed: ", e.what()));
            }
        }

        std::shared_ptr<const detail::OnednnMatmul> matmul_; ///< null when K = 0 or N = 0
        dnnl::memory weights_;
        dnnl::memory bias_;
        std::vector<float> bias_f32_; ///< the bias when there is no primitive
    };
};

static_assert(Backend<onednn>);

} // namespace hypermoe
