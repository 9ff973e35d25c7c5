#pragma once
// BiasBalancer: DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437, section
// 2.1.2). Each expert has a bias that is added to its score for selection only (the combine
// weights stay the unbiased scores, so no gradient and no loss term is involved). After each
// training step, an expert that received more than the mean load has its bias lowered by gamma,
// one that received less has it raised:
//
//   bias_e += gamma * sign(mean_e' load_e' - load_e)
//
// The balancer counts the loads of the plans it observes (a layer's plans during the step, e.g.
// through a RoutingSink) and, in update(), moves a bias vector and starts counting again. It
// works with any ScoredRouter: MoeLayer::set_selection_bias installs the result.

#include <cmath>
#include <span>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/core/finite.hpp"
#include "hypermoe/detail/format.hpp"
#include "hypermoe/router/routing_plan.hpp"

namespace hypermoe {

class BiasBalancer {
public:
    /// `gamma`: the bias update speed (DeepSeek-V3 used 0.001 for most of its training).
    BiasBalancer(index_t experts, double gamma) : gamma_(gamma), load_(static_cast<std::size_t>(experts > 0 ? experts : 0)) {
        if (experts < 1) throw config_error(detail::concat("BiasBalancer: experts is ", experts, ", expected >= 1"));
        if (!(gamma >= 0) || !std::isfinite(gamma))
            throw config_error(detail::concat("BiasBalancer: gamma is ", gamma, ", expected a finite value >= 0"));
    }

    [[nodiscard]] index_t experts() const noexcept { return index_t(load_.size()); }
    [[nodiscard]] double gamma() const noexcept { return gamma_; }
    /// The load counted since the last update: per expert, the (token, slot) assignments that
    /// selected it (before capacity).
    [[nodiscard]] std::span<const double> load() const noexcept { return load_; }

    /// Adds the plan's selections to the load.
    void observe(const RoutingPlan& plan) {
        if (plan.experts() != experts())
            throw shape_error(detail::concat("BiasBalancer::observe: the plan routes over ", plan.experts(), " experts, expected ",
                                             experts()));
        for (index_t t = 0; t < plan.tokens(); ++t)
            for (const std::int32_t e : plan.ids(t))
                if (e >= 0) load_[std::size_t(e)] += 1.0;
    }

    /// bias_e += gamma * sign(mean load - load_e) for the load counted so far (no change when
    /// nothing was counted), then starts counting again. An empty bias is first made zeros.
    void update(std::vector<float>& bias) {
        if (bias.empty()) bias.assign(load_.size(), 0.0f);
        if (bias.size() != load_.size())
            throw shape_error(detail::concat("BiasBalancer::update: bias has ", bias.size(), " elements, expected experts = ",
                                             experts()));
        double mean = 0;
        for (const double l : load_) mean += l;
        mean /= double(load_.size());
        for (std::size_t e = 0; e < load_.size(); ++e) {
            const double sign = load_[e] < mean ? 1.0 : load_[e] > mean ? -1.0 : 0.0;
            bias[e] = float(double(bias[e]) + gamma_ * sign);
            load_[e] = 0;
        }
    }

private:
    double gamma_;
    std::vector<double> load_;
};

} // namespace hypermoe
