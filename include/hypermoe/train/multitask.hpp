#pragma once
// A synthetic multi-task classification problem whose tasks share structure, for showing what
// HyperMoE's HyperExpert adds (the paper's claim at small scale, docs/training.md): each task t
// labels a feature vector z by argmax_c ((A + strength * U_t V_t^T) z)_c, with A shared by every
// task and a rank-`task_rank` change per task. A router that sends each task to its own experts
// leaves each expert to learn A from its tasks' examples alone; the knowledge the unselected
// experts hold about A is what a HyperExpert can bring back.
//
// A token's row (width = d_model) is laid out as
//   [0, classes)                      zeros: the readout slot, where a model writes its logits
//   [classes, classes + task_dims)    the task's code: a fixed random +-code_scale/sqrt(task_dims) vector
//   [classes + task_dims, width)      z, standard normal features
// Everything is a pure function of the seeds (splitmix64 counters, Box-Muller), so a data set
// is the same on every machine.

#include <cmath>
#include <cstdint>
#include <vector>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/matrix.hpp"
#include "hypermoe/detail/format.hpp"
#include "hypermoe/router/hash_routing.hpp"

namespace hypermoe {

/// The problem's sizes and seed.
struct MultiTaskProblem {
    index_t tasks = 8;
    index_t width = 64;       ///< a token row's width (the model's d_model)
    index_t classes = 4;
    index_t task_dims = 8;    ///< the task code's width
    index_t task_rank = 2;    ///< rank of each task's change to the shared map
    double strength = 1.0;    ///< size of each task's change relative to the shared map
    double code_scale = 2.0;  ///< norm of a task code
    std::uint64_t seed = 1;   ///< fixes A, U_t, V_t and the codes
};

/// Rows of a data set: the tokens, their labels and their tasks.
struct MultiTaskBatch {
    Matrix<float> x;
    std::vector<std::int32_t> labels, tasks;
};

class MultiTaskGenerator {
public:
    explicit MultiTaskGenerator(const MultiTaskProblem& p) : p_(p) {
        features_ = p.width - p.classes - p.task_dims;
        if (p.tasks < 1 || p.classes < 2 || p.task_dims < 1 || p.task_rank < 1 || features_ < 1)
            throw config_error(detail::concat("MultiTaskProblem: tasks ", p.tasks, ", classes ", p.classes, ", task_dims ", p.task_dims,
                                              ", task_rank ", p.task_rank, " and width ", p.width,
                                              ", expected tasks >= 1, classes >= 2, task_dims >= 1, task_rank >= 1 and width > classes + task_dims"));
        std::uint64_t counter = p.seed * 0x9E3779B97F4A7C15ull;
        const auto normal = [&] { return gaussian(counter); };
        shared_ = Matrix<double>(p.classes, features_);
        for (index_t c = 0; c < p.classes; ++c)
            for (index_t f = 0; f < features_; ++f) shared_(c, f) = normal() / std::sqrt(double(features_));
        const double per_rank = p.strength / std::sqrt(double(p.task_rank));
        for (index_t t = 0; t < p.tasks; ++t) {
            Matrix<double> u(p.classes, p.task_rank), v(features_, p.task_rank), map = shared_;
            for (index_t c = 0; c < p.classes; ++c)
                for (index_t k = 0; k < p.task_rank; ++k) u(c, k) = normal();
            for (index_t f = 0; f < features_; ++f)
                for (index_t k = 0; k < p.task_rank; ++k) v(f, k) = normal() / std::sqrt(double(features_));
            for (index_t c = 0; c < p.classes; ++c)
                for (index_t f = 0; f < features_; ++f)
                    for (index_t k = 0; k < p.task_rank; ++k) map(c, f) += per_rank * u(c, k) * v(f, k);
            maps_.push_back(std::move(map));
            std::vector<float> code(std::size_t(p.task_dims));
            for (float& e : code) e = float((detail::splitmix64(counter++) & 1 ? 1.0 : -1.0) * p.code_scale / std::sqrt(double(p.task_dims)));
            codes_.push_back(std::move(code));
        }
    }

    [[nodiscard]] const MultiTaskProblem& problem() const noexcept { return p_; }

    /// `rows` tokens drawn with `stream` (tasks uniform; a different stream gives other tokens of
    /// the same problem).
    [[nodiscard]] MultiTaskBatch sample(index_t rows, std::uint64_t stream) const {
        MultiTaskBatch b{Matrix<float>(rows, p_.width), std::vector<std::int32_t>(std::size_t(rows)), std::vector<std::int32_t>(std::size_t(rows))};
        std::uint64_t counter = detail::splitmix64(p_.seed ^ detail::splitmix64(stream + 0x5EEDull));
        std::vector<double> z(static_cast<std::size_t>(features_));
        for (index_t r = 0; r < rows; ++r) {
            const auto t = std::int32_t(detail::splitmix64(counter++) % std::uint64_t(p_.tasks));
            for (index_t k = 0; k < p_.task_dims; ++k) b.x(r, p_.classes + k) = codes_[std::size_t(t)][std::size_t(k)];
            for (index_t f = 0; f < features_; ++f) {
                z[std::size_t(f)] = gaussian(counter);
                b.x(r, p_.classes + p_.task_dims + f) = float(z[std::size_t(f)]);
            }
            const Matrix<double>& map = maps_[std::size_t(t)];
            std::int32_t best = 0;
            double best_score = 0;
            for (index_t c = 0; c < p_.classes; ++c) {
                double s = 0;
                for (index_t f = 0; f < features_; ++f) s += map(c, f) * z[std::size_t(f)];
                if (c == 0 || s > best_score) best = std::int32_t(c), best_score = s;
            }
            b.labels[std::size_t(r)] = best;
            b.tasks[std::size_t(r)] = t;
        }
        return b;
    }

private:
    /// A standard normal draw (Box-Muller on two splitmix64 counters).
    static double gaussian(std::uint64_t& counter) {
        const double u1 = (double(detail::splitmix64(counter++) >> 11) + 1.0) * 0x1.0p-53, u2 = double(detail::splitmix64(counter++) >> 11) * 0x1.0p-53;
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }

    MultiTaskProblem p_;
    index_t features_ = 0;
    Matrix<double> shared_;
    std::vector<Matrix<double>> maps_;
    std::vector<std::vector<float>> codes_;
};

} // namespace hypermoe
