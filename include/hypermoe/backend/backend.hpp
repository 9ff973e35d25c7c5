#pragma once
// backend/: the Backend concept and the reference backend. The Eigen and oneDNN backends are
// opt-in: include "hypermoe/backend/eigen.hpp" or "hypermoe/backend/onednn.hpp".

#include "hypermoe/backend/backend_concept.hpp"
#include "hypermoe/backend/linear_spec.hpp"
#include "hypermoe/backend/reference.hpp"
