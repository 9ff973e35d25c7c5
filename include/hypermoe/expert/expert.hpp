#pragma once
// expert/: the Expert concept, FfnExpert and GluExpert.

#include "hypermoe/expert/expert_concept.hpp"
#include "hypermoe/expert/ffn_expert.hpp"
#include "hypermoe/expert/glu_expert.hpp"
