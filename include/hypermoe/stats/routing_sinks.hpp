#pragma once
// Ready-made RoutingSinks (core/context.hpp): give one to a forward call through
// Context::routing_sink and read what every MoE block of the call routed, in the order the blocks
// ran. A sink belongs to one caller: it is not shared between concurrent calls.

#include <cstddef>
#include <vector>

#include "hypermoe/core/context.hpp"
#include "hypermoe/router/routing_plan.hpp"
#include "hypermoe/stats/routing_stats.hpp"

namespace hypermoe {

/// Keeps a copy of each MoE block's plan (plans()[i] = the i-th block the calls ran).
class RoutingRecorder final : public RoutingSink {
public:
    void record(const RoutingPlan& plan, ConstMatrixView<float> /*logits*/) override { plans_.push_back(plan); }
    [[nodiscard]] const std::vector<RoutingPlan>& plans() const noexcept { return plans_; }
    void clear() noexcept { plans_.clear(); }

private:
    std::vector<RoutingPlan> plans_;
};

/// Keeps the RoutingStats of each MoE block's plan, entropy included (it sees the logits).
class RoutingStatsRecorder final : public RoutingSink {
public:
    void record(const RoutingPlan& plan, ConstMatrixView<float> logits) override {
        stats_.push_back(routing_stats(plan, logits));
    }
    [[nodiscard]] const std::vector<RoutingStats>& stats() const noexcept { return stats_; }
    void clear() noexcept { stats_.clear(); }

private:
    std::vector<RoutingStats> stats_;
};

} // namespace hypermoe
