// Must not compile: a residual around a layer that changes the static width.
#include <hypermoe/hypermoe.hpp>

template <hypermoe::index_t In, hypermoe::index_t Out>
struct Widen {
    static constexpr hypermoe::index_t static_in_width = In;
    static constexpr hypermoe::index_t static_out_width = Out;
    hypermoe::index_t in_width() const { return In; }
    hypermoe::index_t out_width() const { return Out; }
    std::size_t workspace_bytes(hypermoe::index_t) const { return 0; }
    void forward(hypermoe::ConstMatrixView<float>, hypermoe::MatrixView<float>, hypermoe::Workspace&,
                 const hypermoe::Context& = {}) const {}
};

hypermoe::Residual<Widen<8, 16>>* instantiate() { return nullptr; }
template class hypermoe::Residual<Widen<8, 16>>;
