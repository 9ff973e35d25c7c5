#pragma once
// core/: sizes, views, dtypes, errors, scratch memory, activations. Depends on std only.

#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/workspace.hpp"
