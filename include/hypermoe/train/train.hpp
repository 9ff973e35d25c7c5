#pragma once
// train/: what turns backward passes into training: the optimisers (AdamW, SGD with momentum),
// parameter groups and gradient clipping.

#include "hypermoe/train/optimizer.hpp"
