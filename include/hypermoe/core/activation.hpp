#pragma once
// Element-wise activations as tag types. They live in core/ (not expert/) because the backends'
// fused GEMM epilogues apply them and arrows point down: backend/ must not depend on expert/.
// `apply` is a template so the reference backend can evaluate in double.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace hypermoe {

namespace detail {

/// exp(x) for float without branches or calls, so loops over it vectorise (std::exp does not
/// without -ffast-math). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
/// Taylor polynomial of e^r and 2^n through the exponent bits. Max relative error 2.3e-7 on
/// [-87, 88] (measured against std::exp in the tests); the input is clamped to that range, so
/// large negative inputs give ~1e-38 instead of 0 and large positive ones ~1.6e38 instead of Inf.
[[nodiscard]] inline float exp_approx(float x) noexcept {
    x = std::min(std::max(x, -87.0f), 88.0f); // NaN stays NaN
    // n = x / ln2 rounded to nearest. std::nearbyint (no inexact exception) vectorises in GCC;
    // std::floor does not unless -fno-trapping-math.
    const float n = std::nearbyint(x * 1.44269504088896341f);
    // A NaN's conversion to int is undefined: convert 0 instead, and r carries the NaN through.
    const auto ni = static_cast<std::int32_t>(n == n ? n : 0.0f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const auto bits = static_cast<std::uint32_t>(ni + 127) << 23;
    return p * std::bit_cast<float>(bits);
}

/// tanh(y) = 1 - 2 / (e^{2y} + 1), exact at the clamped ends (+-1).
[[nodiscard]] inline float tanh_approx(float y) noexcept { return 1.0f - 2.0f / (exp_approx(2.0f * y) + 1.0f); }

} // namespace detail

/// Which activation a tag type stands for (the oneDNN backend maps it to post-ops).
enum class activation_kind { identity, relu, gelu, gelu_tanh, silu, relu2 };

/// No activation.
struct Identity {
    static constexpr activation_kind kind = activation_kind::identity;
    static constexpr std::string_view name = "identity";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept { return x; }
    template <class T>
    [[nodiscard]] static T derivative(T /*x*/) noexcept { return T(1); }
};

/// max(x, 0).
struct Relu {
    static constexpr activation_kind kind = activation_kind::relu;
    static constexpr std::string_view name = "relu";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept { return x > T(0) ? x : T(0); }
    /// 0 at x = 0, as PyTorch's.
    template <class T>
    [[nodiscard]] static T derivative(T x) noexcept { return x > T(0) ? T(1) : T(0); }
};

/// GELU, exact form: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
struct Gelu {
    static constexpr activation_kind kind = activation_kind::gelu;
    static constexpr std::string_view name = "gelu";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept {
        return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
    }
    /// Phi(x) + x phi(x).
    template <class T>
    [[nodiscard]] static T derivative(T x) noexcept {
        return T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440))) +
               x * T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    }
};

/// GELU, tanh approximation (GPT-2's `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
struct GeluTanh {
    static constexpr activation_kind kind = activation_kind::gelu_tanh;
    static constexpr std::string_view name = "gelu_tanh";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept {
        const T y = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
        if constexpr (std::is_same_v<T, float>) return 0.5f * x * (1.0f + detail::tanh_approx(y));
        else return T(0.5) * x * (T(1) + std::tanh(y));
    }
    template <class T>
    [[nodiscard]] static T derivative(T x) noexcept {
        const T t = std::tanh(T(0.79788456080286535588) * (x + T(0.044715) * x * x * x));
        return T(0.5) * (T(1) + t) +
               T(0.5) * x * (T(1) - t * t) * T(0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x * x);
    }
};

/// SiLU (swish with beta 1): x * sigmoid(x).
struct Silu {
    static constexpr activation_kind kind = activation_kind::silu;
    static constexpr std::string_view name = "silu";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept {
        return x / (T(1) + exp_minus(x));
    }
    /// s (1 + x (1 - s)), s = sigmoid(x), on the same exp as apply: a GLU's backward loop then
    /// vectorises and shares one exp between the two (std::exp's scalar calls for float were 2%
    /// of a Mixtral-like layer's backward).
    template <class T>
    [[nodiscard]] static T derivative(T x) noexcept {
        const T s = T(1) / (T(1) + exp_minus(x));
        return s * (T(1) + x * (T(1) - s));
    }

private:
    /// e^-x: exp_approx for float (vectorisable), std::exp for double.
    template <class T>
    [[nodiscard]] static T exp_minus(T x) noexcept {
        if constexpr (std::is_same_v<T, float>) return detail::exp_approx(-x);
        else return std::exp(-x);
    }
};

/// Squared ReLU (Primer, arXiv 2109.08668): max(x, 0)^2.
struct Relu2 {
    static constexpr activation_kind kind = activation_kind::relu2;
    static constexpr std::string_view name = "relu2";
    template <class T>
    [[nodiscard]] static T apply(T x) noexcept { return x > T(0) ? x * x : T(0); }
    template <class T>
    [[nodiscard]] static T derivative(T x) noexcept { return x > T(0) ? T(2) * x : T(0); }
};

/// An activation tag: a kind, a name, `apply` for float (fast, vectorisable) and double
/// (std:: functions, for the reference backend), and its `derivative` for both (the backward
/// passes use it; for double through std:: functions).
template <class A>
concept Activation = requires(float f, double d) {
    { A::kind } -> std::convertible_to<activation_kind>;
    { A::name } -> std::convertible_to<std::string_view>;
    { A::apply(f) } -> std::same_as<float>;
    { A::apply(d) } -> std::same_as<double>;
    { A::derivative(f) } -> std::same_as<float>;
    { A::derivative(d) } -> std::same_as<double>;
};

static_assert(Activation<Identity> && Activation<Relu> && Activation<Gelu> && Activation<GeluTanh> &&
              Activation<Silu> && Activation<Relu2>);

/// How a GLU combines its gate and up pre-activations g and u into its hidden activation
/// h = apply(g, u) (GluExpert), with the partial derivatives its backward uses: gate_derivative
/// = dh/dg and up_derivative = dh/du. float (vectorisable) and double, as Activation.
template <class G>
concept GatedActivation = requires(float f, double d) {
    { G::name } -> std::convertible_to<std::string_view>;
    { G::apply(f, f) } -> std::same_as<float>;
    { G::apply(d, d) } -> std::same_as<double>;
    { G::gate_derivative(f, f) } -> std::same_as<float>;
    { G::gate_derivative(d, d) } -> std::same_as<double>;
    { G::up_derivative(f, f) } -> std::same_as<float>;
    { G::up_derivative(d, d) } -> std::same_as<double>;
};

/// Act(g) * u: the GLU of an element-wise activation (GluExpert<B, Silu> is SwiGLU, Shazeer,
/// arXiv 2002.05202).
template <Activation Act>
struct GatedBy {
    static constexpr std::string_view name = Act::name;
    template <class T>
    [[nodiscard]] static T apply(T g, T u) noexcept { return Act::apply(g) * u; }
    template <class T>
    [[nodiscard]] static T gate_derivative(T g, T u) noexcept { return u * Act::derivative(g); }
    template <class T>
    [[nodiscard]] static T up_derivative(T g, T /*u*/) noexcept { return Act::apply(g); }
};

/// gpt-oss's clamped SwiGLU (OpenAI's gpt-oss-20b and -120b; Hugging Face's GptOssExperts,
/// llama.cpp's SWIGLU_OAI): with g' = min(g, limit) and u' = clamp(u, -limit, limit),
/// h = g' sigmoid(alpha g') (u' + 1), alpha = 1.702, limit = 7 (the checkpoints'
/// swiglu_limit). The clamps pass the gradient on their closed range, as PyTorch's clamp does.
struct SwiGluOai {
    static constexpr std::string_view name = "swiglu_oai";
    static constexpr double alpha = 1.702, limit = 7.0;

    template <class T>
    [[nodiscard]] static T apply(T g, T u) noexcept {
        const T gc = std::min(g, T(limit)); // NaN stays NaN (min returns its first argument)
        return gc * sigmoid(T(alpha) * gc) * (std::clamp(u, T(-limit), T(limit)) + T(1));
    }
    /// d/dg of g sigmoid(alpha g) is s + alpha g s (1 - s), times (u' + 1); 0 above the limit.
    template <class T>
    [[nodiscard]] static T gate_derivative(T g, T u) noexcept {
        if (g > T(limit)) return T(0);
        const T s = sigmoid(T(alpha) * g);
        return (s + T(alpha) * g * s * (T(1) - s)) * (std::clamp(u, T(-limit), T(limit)) + T(1));
    }
    /// g' sigmoid(alpha g'); 0 outside [-limit, limit].
    template <class T>
    [[nodiscard]] static T up_derivative(T g, T u) noexcept {
        if (u < T(-limit) || u > T(limit)) return T(0);
        const T gc = std::min(g, T(limit));
        return gc * sigmoid(T(alpha) * gc);
    }

private:
    /// 1 / (1 + e^-x): exp_approx for float (vectorisable), std::exp for double.
    template <class T>
    [[nodiscard]] static T sigmoid(T x) noexcept {
        if constexpr (std::is_same_v<T, float>) return 1.0f / (1.0f + detail::exp_approx(-x));
        else return T(1) / (T(1) + std::exp(-x));
    }
};

static_assert(GatedActivation<GatedBy<Silu>> && GatedActivation<SwiGluOai>);

/// What GluExpert's Act may be: an element-wise Activation (then h = Act(g) * u) or a
/// GatedActivation.
template <class A>
concept GluActivation = Activation<A> || GatedActivation<A>;

namespace detail {
template <class A>
struct gated_of {
    using type = GatedBy<A>;
};
template <GatedActivation A>
struct gated_of<A> {
    using type = A;
};
} // namespace detail

/// The GatedActivation a GluExpert<B, A> combines g and u with: A itself, or GatedBy<A>.
template <GluActivation A>
using gated_t = typename detail::gated_of<A>::type;

} // namespace hypermoe
