// Must not compile: a negative static extent other than hypermoe::dynamic.
#include <hypermoe/core/extents.hpp>

hypermoe::extents<4, -3> bad;
