// A downstream program: includes the umbrella header and both opt-in backends, runs one
// expert on each, and exits non-zero if they disagree.
#include <cmath>
#include <cstdio>
#include <vector>

#include <hypermoe/backend/eigen.hpp>
#include <hypermoe/backend/onednn.hpp>
#include <hypermoe/hypermoe.hpp>

namespace hm = hypermoe;

template <class B>
float run(const hm::FfnWeights& w, const hm::Matrix<float>& x) {
    const hm::FfnExpert<B, hm::Relu, 8, 16> expert(w);
    hm::Matrix<float> y(x.rows(), 8);
    hm::Workspace ws;
    expert.forward(x.view(), y.view(), ws);
    return y(2, 3);
}

int main() {
    hm::Matrix<float> up(16, 8), down(8, 16), x(3, 8);
    for (hm::index_t i = 0; i < 128; ++i) {
        up.data()[i] = std::sin(float(i));
        down.data()[i] = std::cos(float(i));
    }
    for (hm::index_t i = 0; i < 24; ++i) x.data()[i] = float(i % 5) - 2.0f;
    const hm::FfnWeights w{.up = hm::ConstMatrixView<float>(up.view()), .down = hm::ConstMatrixView<float>(down.view())};
    const float r = run<hm::reference>(w, x), e = run<hm::eigen>(w, x), o = run<hm::onednn>(w, x);
    std::printf("hypermoe %d.%d.%d consumer: reference %.6f eigen %.6f onednn %.6f\n", hm::version_major,
                hm::version_minor, hm::version_patch, r, e, o);
    return std::fabs(r - e) < 1e-4f && std::fabs(r - o) < 1e-4f ? 0 : 1;
}
