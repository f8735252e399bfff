// Everything a trajectory needs, precomputed on the host and uploaded once (sampling/trajectory.py).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "rng.hpp"

namespace tstitch {

struct TrajectoryPlan {
  std::string sampler;
  std::vector<int64_t> timesteps;  // (N,) original timesteps, sampling order
  std::vector<float> t_float;      // (N,) the same as the step graph's float t (SD: Euler's are fractional)
  std::vector<float> coef;         // (N, k) row-major
  int k = 0;
  std::vector<int> step_model;     // (N,) model index in stitch order
  std::vector<float> noise;        // (N, latent_count) or empty
  std::map<std::string, std::vector<float>> tables;  // other per-step inputs by name (control_scale), (N, row...)
  std::vector<uint8_t> cached;     // (N,) 1: call i runs its model's cached step graph (cached_calls); empty: none
  int steps() const { return static_cast<int>(timesteps.size()); }
};

struct PlanSpec {
  std::string sampler = "ddim";
  int steps = 50;
  int num_models = 2;
  double ratio = 0.5;
  std::vector<double> fractions;  // used when not empty
  double eta = 0.0;
  int num_timesteps = 1000;
  size_t latent_count = 0;        // B * C * H * W
};

// Per-step noise comes from `rng` after the caller's own draws (x_init), as in Python.
TrajectoryPlan plan_trajectory(const PlanSpec& spec, Pcg64& rng);

constexpr int kMaxCacheInterval = 1000;  // sampling/cache_plan.py's MAX_CACHE_INTERVAL (the goldens carry it)

// DeepCache's full / cached call plan (sampling/cache_plan.py): call i runs its model's cached step graph unless
// (i_t - i_start) % interval == 0, i_t the index of its timestep's FIRST occurrence in `timesteps` (PNDM repeats
// one), i_start that of its model's first call after a stitch switch. interval 1: every call full.
std::vector<uint8_t> cached_calls(const std::vector<float>& timesteps, const std::vector<int>& step_model, int interval);
// The same on a plan's integer timesteps (DiT: the float conversion is exact below 2^24, as Python's float(t)).
std::vector<uint8_t> cached_calls(const std::vector<int64_t>& timesteps, const std::vector<int>& step_model, int interval);

}  // namespace tstitch
