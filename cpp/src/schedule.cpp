// Port of sampling/schedule.py. Every expression keeps numpy's operation order (bit-equal tables).
#include <algorithm>
#include <cmath>
#include <set>

#include "errors.hpp"
#include "sampling.hpp"

namespace tstitch {

std::vector<double> linear_betas(int num_timesteps) {
  // np.linspace(start, stop, n): y = i * step + start, the last value set to stop exactly.
  const double scale = 1000.0 / num_timesteps;
  const double start = scale * 0.0001, stop = scale * 0.02;
  std::vector<double> y(static_cast<size_t>(num_timesteps));
  const int div = num_timesteps - 1;
  const double step = div > 0 ? (stop - start) / div : 0.0;
  for (int i = 0; i < num_timesteps; ++i) y[i] = static_cast<double>(i) * step + start;
  if (num_timesteps > 1) y.back() = stop;
  return y;
}

std::vector<int64_t> space_timesteps(int num_timesteps, int steps) {
  if (steps < 1 || steps > num_timesteps)
    fail(TSTITCH_ERR_INVALID_ARGUMENT,
         "steps must be in [1, " + std::to_string(num_timesteps) + "], got " + std::to_string(steps));
  const double stride = steps <= 1 ? 1.0 : static_cast<double>(num_timesteps - 1) / (steps - 1);
  std::set<int64_t> taken;
  double pos = 0.0;
  for (int i = 0; i < steps; ++i) {
    taken.insert(static_cast<int64_t>(std::nearbyint(pos)));  // Python round(): half to even
    pos += stride;
  }
  return {taken.begin(), taken.end()};
}

std::vector<int64_t> space_timesteps_ddim(int num_timesteps, int steps) {
  for (int stride = 1; stride < num_timesteps; ++stride) {
    if ((num_timesteps + stride - 1) / stride == steps) {
      std::vector<int64_t> out;
      for (int t = 0; t < num_timesteps; t += stride) out.push_back(t);
      return out;
    }
  }
  fail(TSTITCH_ERR_INVALID_ARGUMENT, "cannot make " + std::to_string(steps) + " equally strided steps from " +
                                         std::to_string(num_timesteps));
}

std::vector<double> RespacedSchedule::alphas_cumprod_prev() const {
  std::vector<double> prev(alphas_cumprod.size());
  for (size_t i = 0; i < prev.size(); ++i) prev[i] = i == 0 ? 1.0 : alphas_cumprod[i - 1];
  return prev;
}

RespacedSchedule respace(const std::vector<double>& betas, const std::vector<int64_t>& timesteps) {
  std::vector<double> abar(betas.size());
  double acc = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) abar[i] = acc = acc * (1.0 - betas[i]);  // np.cumprod: sequential
  RespacedSchedule s;
  s.timesteps = timesteps;
  std::sort(s.timesteps.begin(), s.timesteps.end());
  for (int64_t t : s.timesteps) {
    if (t < 0 || static_cast<size_t>(t) >= abar.size()) fail(TSTITCH_ERR_INTERNAL, "timestep out of the schedule");
    s.alphas_cumprod.push_back(abar[static_cast<size_t>(t)]);
  }
  for (size_t i = 0; i < s.alphas_cumprod.size(); ++i)
    s.betas.push_back(1.0 - s.alphas_cumprod[i] / (i == 0 ? 1.0 : s.alphas_cumprod[i - 1]));
  return s;
}

RespacedSchedule dit_schedule(int steps, int num_timesteps) {
  return respace(linear_betas(num_timesteps), space_timesteps(num_timesteps, steps));
}

}  // namespace tstitch
