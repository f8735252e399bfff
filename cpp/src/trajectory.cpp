#include "trajectory.hpp"

#include <algorithm>

#include "errors.hpp"
#include "sampling.hpp"

namespace tstitch {

TrajectoryPlan plan_trajectory(const PlanSpec& spec, Pcg64& rng) {
  const RespacedSchedule s = dit_schedule(spec.steps, spec.num_timesteps);
  TrajectoryPlan p;
  p.sampler = spec.sampler;
  p.timesteps.assign(s.timesteps.rbegin(), s.timesteps.rend());
  p.coef = coefficient_table(spec.sampler, s, spec.eta);
  p.k = kNumCoefs;
  p.step_model = spec.fractions.empty()
                     ? stitch_by_timestep(p.timesteps, spec.num_models, spec.ratio, spec.num_timesteps)
                     : (check_fractions(spec.fractions, spec.num_models),
                        stitch_by_fractions(p.timesteps, spec.fractions, spec.num_timesteps));
  if (sampler_needs_noise(spec.sampler, spec.eta)) {
    p.noise.resize(p.timesteps.size() * spec.latent_count);
    standard_normal_f32(rng, p.noise.data(), p.noise.size());
  }
  return p;
}

std::vector<uint8_t> cached_calls(const std::vector<float>& timesteps, const std::vector<int>& step_model, int interval) {
  const size_t n = timesteps.size();
  if (step_model.size() != n) fail(TSTITCH_ERR_INTERNAL, "cached_calls: one model per call expected");
  std::vector<uint8_t> out(n, 0);
  if (interval <= 1) return out;
  std::vector<size_t> index(n);
  for (size_t i = 0; i < n; ++i)
    index[i] = static_cast<size_t>(std::find(timesteps.begin(), timesteps.end(), timesteps[i]) - timesteps.begin());
  size_t start = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i == 0 || step_model[i] != step_model[i - 1]) start = index[i];  // a switch restarts the count
    out[i] = (index[i] - start) % static_cast<size_t>(interval) != 0;
  }
  return out;
}

std::vector<uint8_t> cached_calls(const std::vector<int64_t>& timesteps, const std::vector<int>& step_model, int interval) {
  // only equality between timesteps matters: compared as integers, as Python compares their float()s
  std::vector<float> t;
  for (int64_t v : timesteps) {
    if (v < 0 || v >= (int64_t{1} << 24)) fail(TSTITCH_ERR_INTERNAL, "cached_calls: timestep out of float range");
    t.push_back(static_cast<float>(v));
  }
  return cached_calls(t, step_model, interval);
}

}  // namespace tstitch
