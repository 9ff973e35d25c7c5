#pragma once
// router/: RoutingPlan, score functions, selection policies, ScoredRouter, losses, and the
// routers of the public model families as aliases.

#include "hypermoe/router/bias_balancer.hpp"
#include "hypermoe/router/expert_choice.hpp"
#include "hypermoe/router/group_limited_top_k.hpp"
#include "hypermoe/router/hash_routing.hpp"
#include "hypermoe/router/losses.hpp"
#include "hypermoe/router/noisy_top_k.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/router/score.hpp"
#include "hypermoe/router/scored_router.hpp"
#include "hypermoe/router/selection.hpp"
#include "hypermoe/router/sinkhorn.hpp"
#include "hypermoe/router/top1_capacity.hpp"
#include "hypermoe/router/top_k.hpp"
#include "hypermoe/router/top_p.hpp"

namespace hypermoe {

/// Mixtral, Qwen2-MoE, OLMoE, HyperMoE-GPT-2: softmax over all experts, top-k.
using TopKRouter = ScoredRouter<Softmax, TopK>;
/// DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k.
using DeepSeekRouter = ScoredRouter<Sigmoid, GroupLimitedTopK>;
/// Switch Transformer: softmax, top-1 with capacity per sequence.
using SwitchRouter = ScoredRouter<Softmax, Top1Capacity>;
using ExpertChoiceRouter = ScoredRouter<Softmax, ExpertChoice>;
using HashRouter = ScoredRouter<Softmax, HashRouting>;
using TopPRouter = ScoredRouter<Softmax, TopP>;
using SinkhornRouter = ScoredRouter<Softmax, SinkhornBalanced>;
using NoisyTopKRouter = ScoredRouter<RawLogits, NoisyTopK>;

static_assert(Router<TopKRouter> && Router<DeepSeekRouter> && Router<SwitchRouter> && Router<ExpertChoiceRouter> &&
              Router<HashRouter> && Router<TopPRouter> && Router<SinkhornRouter> && Router<NoisyTopKRouter>);

} // namespace hypermoe
