// ODR test: this file and test_odr_b.cpp both include every header and are linked together.
#include <doctest/doctest.h>

#include "test_support.hpp"

double odr_b_run();

static double odr_a_run() {
    const hypermoe::Matrix<float> up = hypermoe::test::random_matrix(8, 4, 1), down = hypermoe::test::random_matrix(4, 8, 2);
    const hypermoe::FfnExpert<hypermoe::reference, hypermoe::Relu> e(hypermoe::FfnWeights{
        .up = hypermoe::ConstMatrixView<float>(up.view()), .down = hypermoe::ConstMatrixView<float>(down.view())});
    const hypermoe::Matrix<float> x = hypermoe::test::random_matrix(2, 4, 3);
    hypermoe::Matrix<float> y(2, 4);
    hypermoe::Workspace ws;
    e.forward(x.view(), y.view(), ws);
    return y(1, 2);
}

TEST_CASE("two translation units that include every header link and agree") {
    CHECK(odr_a_run() == odr_b_run());
}
