#pragma once
// layer/: the Layer concept, DenseFfn, RmsNorm, LayerNorm, Residual, MoeLayer, SharedExpert.

#include "hypermoe/layer/dense_ffn.hpp"
#include "hypermoe/core/layer_concept.hpp"
#include "hypermoe/layer/moe_layer.hpp"
#include "hypermoe/layer/norm.hpp"
#include "hypermoe/layer/residual.hpp"
#include "hypermoe/layer/shared_expert.hpp"
