// Must not compile: a layer of static width 8 followed by one of static width 6.
#include <hypermoe/hypermoe.hpp>

using Bad = hypermoe::Sequential<hypermoe::RmsNorm<8>, hypermoe::RmsNorm<6>>;
Bad* instantiate(Bad* p) { return new Bad(*p); }
