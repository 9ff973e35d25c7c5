// Must not compile: HyperMoE patterns need a fixed number of selected experts; top-p varies.
#include <hypermoe/hypermoe.hpp>

using Layer = hypermoe::HyperMoeLayer<hypermoe::FfnExpert<hypermoe::reference, hypermoe::Relu>, hypermoe::TopPRouter>;
Layer* instantiate(Layer* p) { return new Layer(*p); }
void construct(Layer::moe_type m, hypermoe::ExpertEmbedding e, hypermoe::Projector<hypermoe::reference> p) {
    Layer l(std::move(m), 0, std::move(e), std::move(p), nullptr);
}
