#pragma once
// core/: sizes, views, dtypes, errors, scratch memory, activations, the call Context and the
// Layer concept. Depends on std only.

#include "hypermoe/core/activation.hpp"
#include "hypermoe/core/context.hpp"
#include "hypermoe/core/dtype.hpp"
#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/core/parallel.hpp"
#include "hypermoe/core/workspace.hpp"
