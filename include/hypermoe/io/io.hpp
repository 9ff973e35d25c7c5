#pragma once
// io/: safetensors reading and writing, checkpoints, config reading, family adapters.
// Opt-in (not in hypermoe.hpp): it needs nlohmann-json and POSIX mmap.

#include "hypermoe/io/checkpoint.hpp"
#include "hypermoe/io/config_reader.hpp"
#include "hypermoe/io/families.hpp"
#include "hypermoe/io/model_info.hpp"
#include "hypermoe/io/safetensors.hpp"
#include "hypermoe/io/synthetic.hpp"
#include "hypermoe/io/tensor_binder.hpp"
