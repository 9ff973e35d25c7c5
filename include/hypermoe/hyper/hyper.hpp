#pragma once
// hyper/: HyperMoE's expert embedding, projector, shared hypernetwork, per-layer cache and layer.

#include "hypermoe/hyper/expert_embedding.hpp"
#include "hypermoe/hyper/hyper_expert_cache.hpp"
#include "hypermoe/hyper/hyper_moe_layer.hpp"
#include "hypermoe/hyper/hypernetwork.hpp"
#include "hypermoe/hyper/pattern.hpp"
#include "hypermoe/hyper/projector.hpp"
