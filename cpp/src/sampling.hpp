// Noise schedules, respacing, sampler coefficient tables and the stitch rules: a port of
// python/tstitch_trt/sampling/ (schedule.py, coefficients.py, stitch.py), float64 math in the same
// order as numpy so the float32 tables are bit-identical (checked on goldens from Python).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tstitch {

// Ho et al.'s linear betas (np.linspace semantics), scaled so any length spans 1000 steps' range.
std::vector<double> linear_betas(int num_timesteps = 1000);

// DiT's space_timesteps(T, N): N evenly strided, rounded (half to even) positions, ascending.
std::vector<int64_t> space_timesteps(int num_timesteps, int steps);
// "ddimN": the stride that gives exactly N steps from 0 (DDIM's code).
std::vector<int64_t> space_timesteps_ddim(int num_timesteps, int steps);

struct RespacedSchedule {
  std::vector<int64_t> timesteps;       // ascending original timesteps
  std::vector<double> alphas_cumprod;   // abar at each kept timestep
  std::vector<double> betas;            // 1 - abar_i / abar_{i-1}
  std::vector<double> alphas_cumprod_prev() const;
  size_t size() const { return timesteps.size(); }
};

RespacedSchedule respace(const std::vector<double>& betas, const std::vector<int64_t>& timesteps);
RespacedSchedule dit_schedule(int steps, int num_timesteps = 1000);

constexpr int kNumCoefs = 11;  // see coefficients.py: COEF_NAMES
const std::vector<std::string>& sampler_names();  // "ddim", "ddpm", "dpm-solver++"

// (N x kNumCoefs) row-major float32 table in sampling order (noisiest first).
std::vector<float> coefficient_table(const std::string& sampler, const RespacedSchedule& s, double eta = 0.0);
bool sampler_needs_noise(const std::string& sampler, double eta);

// DiT rule on the ORIGINAL timestep of each step (sampling order): small while t/T >= 1 - r.
std::vector<int> stitch_by_timestep(const std::vector<int64_t>& timesteps, int num_models, double ratio,
                                    int num_timesteps = 1000);
// K models by cumulative fractions (accumulated in float32, as the reference does).
std::vector<int> stitch_by_fractions(const std::vector<int64_t>& timesteps, const std::vector<double>& fractions,
                                     int num_timesteps = 1000);
// SD rule on the UNet call index: small while (i + 1) / n_calls <= r.
std::vector<int> stitch_by_call_index(int n_calls, int num_models, double ratio);
// K models by the call index: the first whose cumulative fraction (float32) is >= (i + 1) / n_calls.
std::vector<int> stitch_by_call_fractions(int n_calls, const std::vector<double>& fractions);
void check_fractions(const std::vector<double>& fractions, int num_models);

}  // namespace tstitch
