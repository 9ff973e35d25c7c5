#pragma once
// stats/: RoutingStats.

#include "hypermoe/stats/routing_stats.hpp"
