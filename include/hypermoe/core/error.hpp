#pragma once
// The exception hierarchy. Every error the library raises derives from hypermoe::error, and
// every message names the argument or tensor and both sides of a mismatch, e.g.
//   "FfnExpert: weight 'up' has shape (64, 31), expected (64, 32)".

#include <stdexcept>
#include <string>

namespace hypermoe {

/// Root of everything the library throws.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Activations or outputs whose shape does not match what a component expects.
class shape_error : public error {
public:
    using error::error;
};

/// A configuration value out of range, or a run-time width that contradicts a static one.
class config_error : public error {
public:
    using error::error;
};

/// A weight tensor that is missing, mis-shaped or of an unsupported dtype.
class weight_error : public error {
public:
    using error::error;
};

/// NaN or Inf where a finite value is required.
class numeric_error : public error {
public:
    using error::error;
};

/// A failure inside a compute backend (e.g. oneDNN could not create a primitive).
class backend_error : public error {
public:
    using error::error;
};

} // namespace hypermoe
