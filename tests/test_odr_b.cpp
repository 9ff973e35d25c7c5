#include "test_support.hpp"

double odr_b_run() {
    using namespace hypermoe;
    const Matrix<float> up = test::random_matrix(8, 4, 1), down = test::random_matrix(4, 8, 2);
    const FfnExpert<reference, Relu> e(
        FfnWeights{.up = ConstMatrixView<float>(up.view()), .down = ConstMatrixView<float>(down.view())});
    const Matrix<float> x = test::random_matrix(2, 4, 3);
    Matrix<float> y(2, 4);
    Workspace ws;
    e.forward(x.view(), y.view(), ws);
    return y(1, 2);
}
