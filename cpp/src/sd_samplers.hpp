// Stable Diffusion samplers as coefficient tables over one linear update: a port of
// python/tstitch_trt/sampling/sd_samplers.py (pndm = PLMS, ddim, euler, dpm-solver++ (2M); lcm = diffusers'
// LCMScheduler, checked against diffusers itself (golden/lcm.json)) from the
// bundle's diffusers scheduler config, float64 math in numpy's order, stored float32 (bit-equal to
// Python on goldens). One row per U-Net CALL (PNDM makes N + 1 calls for N steps); the U-Net step
// graph (export/unet_step.py) applies the row:
//   eps = guided U-Net(c_in x, t, context); src = k_x x + k_s saved; e = a0 eps + a1 h1 + a2 h2 + a3 h3
//   x0 = r src - m e; D = d0 x0 + d1 prev_x0; x_next = w_x src + w_d D + w_e e + sigma noise
//   h_next = shift (eps, h1, h2) + (1 - shift) (h1, h2, h3); saved_next = save x + (1 - save) saved
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tstitch {

constexpr int kSdNumCoefs = 17;  // SD_COEF_NAMES
constexpr int kSdHistory = 3;    // eps history depth
const std::vector<std::string>& sd_sampler_names();  // "pndm", "ddim", "euler", "dpm-solver++", "lcm"

struct SdTable {
  std::vector<float> timesteps;  // (calls,) the U-Net's timestep per call
  std::vector<float> coef;       // (calls, kSdNumCoefs) row-major
  float init_noise_sigma = 1.0f; // the unit-Gaussian start is scaled by this
  int calls() const { return static_cast<int>(timesteps.size()); }
};

// The sampler the scheduler config's _class_name names (default_sampler).
std::string sd_default_sampler(const nlohmann::json& config);
SdTable sd_table(const std::string& sampler, const nlohmann::json& config, int steps, double eta = 0.0);
bool sd_needs_noise(const std::string& sampler, double eta);

}  // namespace tstitch
