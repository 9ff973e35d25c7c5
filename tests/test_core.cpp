#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <hypermoe/core/core.hpp>

using namespace hypermoe;

TEST_CASE("extents store only their dynamic values") {
    static_assert(extents<3, 4>::rank() == 2 && extents<3, 4>::rank_dynamic() == 0);
    static_assert(extents<dynamic, 4>::rank_dynamic() == 1);
    static_assert(sizeof(extents<dynamic, 4, dynamic>) == 2 * sizeof(index_t));
    static_assert(std::is_empty_v<extents<3, 4>> || sizeof(extents<3, 4>) <= 1);
    constexpr extents<3, 4> s;
    static_assert(s.extent(0) == 3 && s.extent(1) == 4);

    const extents<dynamic, 4> a(7);
    CHECK(a.extent(0) == 7);
    CHECK(a.extent(1) == 4);
    const extents<dynamic, 4> b(7, 4); // every extent, static ones checked
    CHECK(a == b);
    CHECK_THROWS_WITH_AS((extents<dynamic, 4>(7, 5)), "extents: extent 1 is 5, expected the static extent 4",
                         shape_error);
    CHECK_THROWS_WITH_AS(extents<dynamic>(-2), "extents: extent 0 is -2, expected >= 0", shape_error);
}

TEST_CASE("extents convert static -> dynamic implicitly and dynamic -> static explicitly, checked") {
    static_assert(std::is_convertible_v<extents<3, 4>, extents<dynamic, dynamic>>);
    static_assert(!std::is_convertible_v<extents<dynamic, 4>, extents<3, 4>>);
    static_assert(std::is_constructible_v<extents<3, 4>, extents<dynamic, 4>>);
    static_assert(!std::is_constructible_v<extents<3, 4>, extents<5, 4>>);

    const extents<dynamic, dynamic> d = extents<3, 4>{};
    CHECK(d.extent(0) == 3);
    CHECK((extents<3, 4>(extents<dynamic, 4>(3)) == extents<3, 4>{}));
    CHECK_THROWS_WITH_AS((extents<3, 4>(extents<dynamic, 4>(2))), "extents: extent 0 is 2, expected the static extent 3",
                         shape_error);
}

TEST_CASE("check_static_width names both sides") {
    CHECK_NOTHROW(check_static_width("X", "d_model", dynamic, 12));
    CHECK_NOTHROW(check_static_width("X", "d_model", 12, 12));
    CHECK_THROWS_WITH_AS(check_static_width("X", "d_model", 16, 12),
                         "X: d_model is 12 at run time, but the type fixes it to 16", shape_error);
    CHECK_THROWS_WITH_AS(check_static_width("X", "d_model", dynamic, -1), "X: d_model is -1, expected >= 0",
                         config_error);
}

TEST_CASE("bf16 rounds to nearest even, as PyTorch") {
    const auto bits_of = [](std::uint32_t u) { return bf16::from_float(std::bit_cast<float>(u)).bits; };
    CHECK(bf16::from_float(1.0f).bits == 0x3F80);
    CHECK(bits_of(0x3F808000u) == 0x3F80); // exactly half way, even below
    CHECK(bits_of(0x3F818000u) == 0x3F82); // exactly half way, even above
    CHECK(bits_of(0x3F808001u) == 0x3F81); // above half way
    CHECK(bits_of(0x3F807FFFu) == 0x3F80); // below half way
    CHECK(bits_of(0x7F7FFFFFu) == 0x7F80); // FLT_MAX rounds to +Inf
    CHECK(bits_of(0xFF800000u) == 0xFF80); // -Inf stays
    CHECK(bits_of(0x7FC00001u) == 0x7FC0); // NaN -> canonical quiet NaN
    CHECK(bits_of(0xFF812345u) == 0x7FC0);
    CHECK(bits_of(0x00000001u) == 0x0000); // smallest subnormal rounds to zero
    CHECK(bf16::from_float(-2.5f).to_float() == -2.5f);
    // Every non-NaN bf16 survives the round trip.
    for (std::uint32_t b = 0; b < 0x10000u; ++b) {
        const bf16 v{static_cast<std::uint16_t>(b)};
        if ((b & 0x7FFFu) > 0x7F80u) continue;
        REQUIRE(bf16::from_float(v.to_float()) == v);
    }
}

TEST_CASE("MatrixView: blocks, strides and checked construction") {
    Matrix<float> m(4, 6);
    for (index_t r = 0; r < 4; ++r)
        for (index_t c = 0; c < 6; ++c) m(r, c) = float(10 * r + c);
    CHECK(reinterpret_cast<std::uintptr_t>(m.data()) % buffer_alignment == 0);
    const auto v = m.view();
    const auto cols = v.col_block(2, 3);
    CHECK(cols.stride() == 6);
    CHECK(cols(1, 0) == 12.0f);
    CHECK_FALSE(cols.contiguous());
    const auto rows = v.row_block(2, 2);
    CHECK(rows(0, 5) == 25.0f);
    CHECK(rows.row(1)[3] == 33.0f);
    const ConstMatrixView<float> cv = v; // mutable -> const converts
    // An empty matrix may hold no storage: its blocks are empty views with no storage either
    // (never null plus an offset, which clang's UBSan reports).
    const Matrix<float> empty(0, 6);
    const auto none = empty.view().col_block(2, 3);
    CHECK(none.rows() == 0);
    CHECK(none.cols() == 3);
    CHECK(none.data() == empty.data());
    CHECK(empty.view().row_block(0, 0).rows() == 0);
    CHECK(cv(3, 5) == 35.0f);
    float data[4] = {};
    CHECK_THROWS_WITH_AS(MatrixView<float>(data, 2, 3, 2),
                         "MatrixView: shape (2, 3) with row stride 2, expected non-negative sizes and stride >= cols",
                         shape_error);
    CHECK_THROWS_WITH_AS(MatrixView<float>(nullptr, 2, 2), "MatrixView: null data for shape (2, 2)", shape_error);
    CHECK_THROWS_WITH_AS(Matrix<float>(-1, 2), "Matrix: shape (-1, 2), expected non-negative sizes", shape_error);
    CHECK_THROWS_WITH_AS(check_shape(cv, 4, 5, "f", "x"), "f: x has shape (4, 6), expected (4, 5)", shape_error);

    Matrix<float> copy = m;
    CHECK(copy(3, 5) == 35.0f);
    CHECK(copy.data() != m.data());
}

TEST_CASE("Workspace: aligned buffers, scopes, growth only at the outermost scope") {
    Workspace ws;
    {
        Workspace::Scope outer(ws, 1000);
        CHECK(ws.capacity() >= 1000);
        auto a = ws.take<float>(3);
        auto b = ws.take<float>(5);
        CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % buffer_alignment == 0);
        CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % buffer_alignment == 0);
        CHECK(ws.used() == 128);
        {
            Workspace::Scope inner(ws, 64);
            (void)ws.take<float>(16);
            CHECK(ws.used() == 192);
        }
        CHECK(ws.used() == 128);
        CHECK_THROWS_WITH_AS(Workspace::Scope(ws, 5000),
                             "Workspace::Scope: 5000 bytes needed, 872 left (a workspace_bytes() underestimate)",
                             error);
        CHECK_THROWS_AS((void)ws.take<float>(10000), error);
        CHECK_THROWS_WITH_AS(ws.reserve(1 << 20),
                             "Workspace::reserve: cannot grow to 1048576 bytes while 128 bytes are in use", error);
    }
    CHECK(ws.used() == 0);
    const auto before = ws.capacity();
    { Workspace::Scope again(ws, 10); }
    CHECK(ws.capacity() == before); // no shrink, no regrow
}

TEST_CASE("BufferReuse: large buffers freed in its scope are taken back by allocations of their size, the rest freed at its end") {
    using detail::BufferReuse;
    constexpr std::size_t big = BufferReuse::min_bytes / sizeof(float);
    const BufferReuse outer;
    const void* first = nullptr;
    {
        Matrix<float> m(index_t(big), 1); // a Matrix's buffer is an aligned_array
        m(0, 0) = 7.0f;
        first = m.data();
    } // kept
    const auto other = detail::aligned_array<float>(2 * big); // another size: not the kept buffer
    CHECK(static_cast<const void*>(other.get()) != first);
    {
        const Matrix<float> again(index_t(big), 1); // the kept buffer, zeroed as every Matrix is
        CHECK(static_cast<const void*>(again.data()) == first);
        CHECK(again(0, 0) == 0.0f);
    }
    const void* inner_one = nullptr;
    {
        const BufferReuse inner; // the innermost scope keeps and gives back, alone
        auto b = detail::aligned_array<float>(big);
        CHECK(static_cast<const void*>(b.get()) != first); // the outer scope's is not taken
        inner_one = b.get();
        b.reset();
        const auto c = detail::aligned_array<float>(big);
        CHECK(static_cast<const void*>(c.get()) == inner_one);
    } // c kept by the inner scope, then freed with it
    void* kept = BufferReuse::take(big * sizeof(float)); // the outer scope's own, now the caller's
    CHECK(kept == first);
    detail::free_buffer(kept, big * sizeof(float));
    CHECK(BufferReuse::take(big * sizeof(float)) == nullptr);
    CHECK(BufferReuse::take(64) == nullptr);
    CHECK_FALSE(BufferReuse::keep(nullptr, 64)); // too small to keep: the caller frees it
}

TEST_CASE("buffers of 2 MiB and more start at a 2 MiB boundary (huge pages), smaller ones at 64 bytes") {
    using detail::huge_page_bytes;
    CHECK(detail::alignment_of_buffer(huge_page_bytes - 1) == buffer_alignment);
    CHECK(detail::alignment_of_buffer(huge_page_bytes) == huge_page_bytes);
    MESSAGE("huge pages: ", std::string(detail::huge_pages_enabled() ? "advised" : "off (HYPERMOE_HUGE_PAGES=off)"));
    // A buffer of 1.5 huge pages: its first 2 MiB advised, its tail not; written and read whole.
    const std::size_t n = (huge_page_bytes + huge_page_bytes / 2) / sizeof(float);
    auto a = detail::aligned_array<float>(n);
    CHECK(reinterpret_cast<std::uintptr_t>(a.get()) % huge_page_bytes == 0);
    for (std::size_t i = 0; i < n; ++i) a[i] = float(i % 1000);
    CHECK(a[n - 1] == float((n - 1) % 1000));
    const auto small = detail::aligned_array<float>(huge_page_bytes / sizeof(float) - 16);
    CHECK(reinterpret_cast<std::uintptr_t>(small.get()) % buffer_alignment == 0);
    // Kept by a BufferReuse and given back, then freed with its own alignment at the scope's end.
    const detail::BufferReuse scope;
    const void* p = a.get();
    a.reset();
    const auto b = detail::aligned_array<float>(n);
    CHECK(static_cast<const void*>(b.get()) == p);
    Matrix<float> m(1024, 1024); // 4 MiB: a Matrix's buffer, zeroed
    CHECK(reinterpret_cast<std::uintptr_t>(m.data()) % huge_page_bytes == 0);
    CHECK(m(1023, 1023) == 0.0f);
    // elements(): every element, row after row.
    m(1, 0) = 5.0f;
    CHECK(m.elements().size() == 1024u * 1024u);
    CHECK(m.elements()[1024] == 5.0f);
    CHECK(std::as_const(m).elements().data() == m.data());
}

TEST_CASE("finite checks read the bits") {
    CHECK(is_finite(1.0f));
    CHECK(is_finite(std::numeric_limits<float>::max()));
    CHECK_FALSE(is_finite(std::numeric_limits<float>::infinity()));
    CHECK_FALSE(is_finite(-std::numeric_limits<float>::infinity()));
    CHECK_FALSE(is_finite(std::numeric_limits<float>::quiet_NaN()));
    Matrix<float> m(2, 3);
    CHECK_NOTHROW(check_finite(m.view(), "x"));
    m(1, 2) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(check_finite(ConstMatrixView<float>(m.view()), "x"),
                         "x: element (1, 2) is nan, expected a finite value", numeric_error);
    const float v[3] = {0.f, -std::numeric_limits<float>::infinity(), 1.f};
    CHECK_THROWS_WITH_AS(check_finite(std::span<const float>(v), "bias"),
                         "bias: element 1 is -inf, expected a finite value", numeric_error);
    // bf16: the first non-finite element, also past the scan's blocks of 256 and in the last,
    // partial one; the largest finite bf16 (0x7F7F) and the subnormals are finite.
    std::vector<bf16> h(1030, bf16::from_float(1.5f));
    h[7] = bf16{0x7F7F}, h[8] = bf16{0x0001}, h[9] = bf16{0x807F};
    CHECK(find_non_finite(std::span<const bf16>(h)) == -1);
    for (const std::size_t at : {std::size_t{0}, std::size_t{255}, std::size_t{256}, std::size_t{700}, std::size_t{1029}})
        for (const std::uint16_t bits : {std::uint16_t{0x7F80}, std::uint16_t{0xFF80}, std::uint16_t{0x7FC0}, std::uint16_t{0xFF81}}) {
            CAPTURE(at);
            CAPTURE(bits);
            std::vector<bf16> x = h;
            x[at] = bf16{bits};
            if (at + 3 < x.size()) x[at + 3] = bf16{0x7F80}; // a later one is not the first
            CHECK(find_non_finite(std::span<const bf16>(x)) == index_t(at));
        }
}

TEST_CASE("float activations match their double forms") {
    double worst_exp = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.00731f) {
        const double ref = std::exp(double(x));
        worst_exp = std::max(worst_exp, std::abs(double(detail::exp_approx(x)) - ref) / ref);
    }
    CHECK(worst_exp < 2.5e-7); // measured 2.11e-7 with FMA contraction, 2.27e-7 without (-Dnative=false)
    const auto worst = [](auto act) {
        double w = 0;
        for (float x = -20.0f; x <= 20.0f; x += 0.0137f) {
            const double ref = decltype(act)::apply(double(x));
            w = std::max(w, std::abs(double(decltype(act)::apply(x)) - ref) / std::max(1.0, std::abs(ref)));
        }
        return w;
    };
    CHECK(worst(Silu{}) < 1e-6);
    CHECK(worst(GeluTanh{}) < 1e-6);
    CHECK(worst(Gelu{}) < 1e-6);
    CHECK(Relu2::apply(-3.0f) == 0.0f);
    CHECK(Relu2::apply(3.0f) == 9.0f);
    CHECK(Relu::apply(-0.5) == 0.0);
    CHECK(Silu::apply(-200.0f) == doctest::Approx(0.0f));
}

TEST_CASE("gated activations: SwiGLU's Act(g) * u, and gpt-oss's clamped SwiGLU on hand-worked values") {
    CHECK(GatedBy<Silu>::apply(1.5, -2.0) == Silu::apply(1.5) * -2.0);
    static_assert(std::is_same_v<gated_t<Silu>, GatedBy<Silu>> && std::is_same_v<gated_t<SwiGluOai>, SwiGluOai>);
    static_assert(GluActivation<Relu> && GluActivation<SwiGluOai> && !GluActivation<int>);
    const auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
    // g above the limit is 7; u beyond +-7 is +-7; then h = g sigmoid(1.702 g) (u + 1).
    CHECK(SwiGluOai::apply(9.0, 0.5) == doctest::Approx(7 * sigmoid(1.702 * 7) * 1.5).epsilon(1e-15));
    CHECK(SwiGluOai::apply(1.0, 9.0) == doctest::Approx(sigmoid(1.702) * 8).epsilon(1e-15));
    CHECK(SwiGluOai::apply(1.0, -9.0) == doctest::Approx(sigmoid(1.702) * -6).epsilon(1e-15));
    CHECK(SwiGluOai::apply(-3.0, 2.0) == doctest::Approx(-3 * sigmoid(-1.702 * 3) * 3).epsilon(1e-15));
    CHECK(SwiGluOai::apply(0.0, 100.0) == 0.0);
    // Beyond the clamps the gradient is zero; inside, it is the unclamped function's.
    CHECK(SwiGluOai::gate_derivative(7.5, 1.0) == 0.0);
    CHECK(SwiGluOai::up_derivative(1.0, -7.5) == 0.0);
    CHECK(SwiGluOai::up_derivative(1.0, 3.0) == doctest::Approx(sigmoid(1.702)).epsilon(1e-15));
    // float agrees with double, and NaN is not clamped away.
    for (float g = -12.0f; g <= 12.0f; g += 0.37f)
        for (float u = -12.0f; u <= 12.0f; u += 0.41f)
            CHECK(double(SwiGluOai::apply(g, u)) == doctest::Approx(SwiGluOai::apply(double(g), double(u))).epsilon(1e-6).scale(1.0));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(std::isnan(SwiGluOai::apply(nan, 1.0f)));
    CHECK(std::isnan(SwiGluOai::apply(1.0f, nan)));
}

TEST_CASE("parallel_for and parallel_tasks rethrow a worker's exception on the calling thread, after every item ran") {
    // Nothing may escape an OpenMP region (that would terminate the process): the first exception
    // caught is kept, the region finishes, and the caller gets it. Two threads at least, and work
    // above the grain, so that the regions really open.
    const detail::ThreadCountScope threads(2);
    constexpr index_t items = 64;
    std::vector<int> ran(items, 0);
    const auto body = [&](index_t i) {
        ran[std::size_t(i)] = 1;
        if (i % 16 == 5) throw config_error(detail::concat("item ", i, " failed"));
    };
    CHECK_THROWS_WITH_AS(detail::parallel_for(items, detail::parallel_grain * 4, body), doctest::Contains("failed"), config_error);
    CHECK(std::count(ran.begin(), ran.end(), 1) == items);

    std::fill(ran.begin(), ran.end(), 0);
    std::vector<int> slots(items, -1);
    CHECK_THROWS_WITH_AS(detail::parallel_tasks(items, 2, [&](index_t i, int slot) {
                             slots[std::size_t(i)] = slot;
                             body(i);
                         }),
                         doctest::Contains("failed"), config_error);
    CHECK(std::count(ran.begin(), ran.end(), 1) == items);
    CHECK(std::all_of(slots.begin(), slots.end(), [](int s) { return s == 0 || s == 1; }));

    // Serially (one thread, or work below the grain) the first failing item throws straight away.
    std::fill(ran.begin(), ran.end(), 0);
    CHECK_THROWS_WITH_AS(detail::parallel_for(items, 1, body), "item 5 failed", config_error);
    CHECK(std::count(ran.begin(), ran.end(), 1) == 6);
}
