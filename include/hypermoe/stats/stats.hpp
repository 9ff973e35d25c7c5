#pragma once
// stats/: RoutingStats, and the routing sinks that collect them (or the plans) during a forward call.

#include "hypermoe/stats/routing_sinks.hpp"
#include "hypermoe/stats/routing_stats.hpp"
