#include "trajectory.hpp"

#include <algorithm>

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

}  // namespace tstitch
