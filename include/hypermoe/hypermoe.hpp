#pragma once
// hypermoe: Mixture-of-Experts and hypernetwork components for the CPU, header-only, C++20.
// This header includes every portable part and the reference backend; the Eigen and oneDNN
// backends are opt-in (hypermoe/backend/eigen.hpp, hypermoe/backend/onednn.hpp).

#include "hypermoe/backend/backend.hpp"
#include "hypermoe/core/core.hpp"
#include "hypermoe/expert/expert.hpp"
#include "hypermoe/hyper/hyper.hpp"
#include "hypermoe/layer/layer.hpp"
#include "hypermoe/router/router.hpp"
#include "hypermoe/stack/stack.hpp"
#include "hypermoe/stats/stats.hpp"
#include "hypermoe/train/train.hpp"
#include "hypermoe/version.hpp"
