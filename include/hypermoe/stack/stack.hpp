#pragma once
// stack/: Sequential (static composition) and DynamicStack (run-time composition).

#include "hypermoe/stack/dynamic_stack.hpp"
#include "hypermoe/stack/sequential.hpp"
