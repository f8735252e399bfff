// SD sampler tables (pndm, ddim, euler, dpm-solver++) from diffusers scheduler configs and the SD
// stitch rule by U-Net call: bit-equal to python/tstitch_trt/sampling/sd_samplers.py and stitch.py
// (golden/sd_sampling.json, written by tests/cpp_goldens.py).
#include <gtest/gtest.h>

#include <cstring>

#include "errors.hpp"
#include "sampling.hpp"
#include "sd_samplers.hpp"
#include "trajectory.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::bits;
using tstitch::testing::error_of;
using tstitch::testing::golden;

namespace {
const nlohmann::json& g() {
  static const nlohmann::json j = golden("sd_sampling");
  return j;
}
}  // namespace

TEST(SdSampling, TablesBitEqualToPython) {
  size_t checked = 0, mismatched = 0;
  for (const auto& c : g()["tables"]) {
    const std::string what = c["config"].get<std::string>() + " " + c["sampler"].get<std::string>() + " " +
                             std::to_string(c["steps"].get<int>()) + " steps, eta " + c["eta"].dump();
    const SdTable t = sd_table(c["sampler"], g()["configs"][c["config"].get<std::string>()], c["steps"], c["eta"]);
    const bool same = bits(t.timesteps) == c["timesteps_bits"].get<std::vector<uint32_t>>() &&
                      bits(t.coef) == c["coef_bits"].get<std::vector<uint32_t>>() &&
                      bits({t.init_noise_sigma}).front() == c["init_noise_sigma_bits"].get<uint32_t>();
    EXPECT_TRUE(same) << what;
    mismatched += !same;
    ++checked;
  }
  EXPECT_GE(checked, 150u);
  EXPECT_EQ(mismatched, 0u);
}

TEST(SdSampling, PndmMakesOneMoreCallThanSteps) {
  const SdTable t = sd_table("pndm", g()["configs"]["sd15-pndm"], 50);
  EXPECT_EQ(t.calls(), 51);
  EXPECT_EQ(t.timesteps[0], 981.0f);  // leading spacing (stride 20), steps_offset 1, as diffusers' PLMS
  EXPECT_EQ(t.timesteps[1], 961.0f);
  EXPECT_EQ(t.timesteps[2], 961.0f);  // the repeated call
  EXPECT_EQ(t.timesteps[50], 1.0f);
  EXPECT_EQ(sd_default_sampler(g()["configs"]["sd15-pndm"]), "pndm");
  EXPECT_EQ(sd_default_sampler(g()["configs"]["dpm-linspace"]), "dpm-solver++");
}

TEST(SdSampling, RefusalsAreOneLine) {
  const nlohmann::json& pndm = g()["configs"]["sd15-pndm"];
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { sd_table("pndm", pndm, 0); }, &s), "steps must be >= 1, got 0");
  EXPECT_EQ(s, TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(error_of([&] { sd_table("pndm", pndm, 1001); }), "steps 1001 is more than the scheduler's 1000 training timesteps");
  EXPECT_EQ(error_of([&] { sd_table("euler", pndm, 10, 0.5); }), "eta applies to ddim only, not euler");
  EXPECT_EQ(error_of([&] { sd_table("heun", pndm, 10); }),
            "unknown sampler 'heun' for an SD bundle; choose one of pndm, ddim, euler, dpm-solver++, lcm");
  nlohmann::json cfg = pndm;
  cfg["prediction_type"] = "v_prediction";
  EXPECT_EQ(error_of([&] { sd_table("ddim", cfg, 10); }, &s), "prediction_type 'v_prediction' is not supported; SD 1.x predicts epsilon");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  cfg = pndm;
  cfg["skip_prk_steps"] = false;
  EXPECT_NE(error_of([&] { sd_table("pndm", cfg, 10); }).find("skip_prk_steps false"), std::string::npos);
  cfg = g()["configs"]["euler-linspace"];
  cfg["use_karras_sigmas"] = true;
  EXPECT_EQ(error_of([&] { sd_table("euler", cfg, 10); }),
            "the scheduler config sets use_karras_sigmas; euler supports the default sigmas only");
}

TEST(SdSampling, StitchByCallIndexEqualsPython) {
  for (const auto& c : g()["by_call"]) {
    const int n = c["calls"];
    const std::vector<int> got = c.contains("ratio") ? stitch_by_call_index(n, 2, c["ratio"])
                                                     : stitch_by_call_fractions(n, c["fractions"].get<std::vector<double>>());
    EXPECT_EQ(got, c["models"].get<std::vector<int>>()) << c.dump();
  }
}

// lcm: diffusers' LCMScheduler itself (golden/lcm.json, no table of ours on the Python side): its
// timesteps exactly, our rows against its alphas_cumprod and boundary scalings, and whole
// trajectories of our rows through the step graph's update against its step() on the same
// model outputs and noise.
namespace {
const nlohmann::json& lcm() {
  static const nlohmann::json j = golden("lcm");
  return j;
}

// export/unet_step.py's sd_sampler_update for one call, float32, on host arrays (history and saved kept).
void sd_update(const float* c, std::vector<float>& x, const std::vector<float>& eps, std::vector<float>& prev,
               std::vector<float>& hist, std::vector<float>& saved, const std::vector<float>& noise) {
  enum { c_in, k_x, k_s, a0, a1, a2, a3, r, m, d0, d1, w_x, w_d, w_e, sigma, shift, save };
  const size_t n = x.size();
  std::vector<float> x_next(n), hist_next(3 * n), saved_next(n);
  for (size_t i = 0; i < n; ++i) {
    const float h0 = hist[i], h1 = hist[n + i], h2 = hist[2 * n + i];
    const float src = c[k_x] * x[i] + c[k_s] * saved[i];
    const float e = c[a0] * eps[i] + c[a1] * h0 + c[a2] * h1 + c[a3] * h2;
    const float x0 = c[r] * src - c[m] * e;
    const float d = c[d0] * x0 + c[d1] * prev[i];
    x_next[i] = c[w_x] * src + c[w_d] * d + c[w_e] * e + c[sigma] * noise[i];
    prev[i] = x0;
    const float shifted[3] = {eps[i], h0, h1}, old[3] = {h0, h1, h2};
    for (int k = 0; k < 3; ++k) hist_next[k * n + i] = c[shift] * shifted[k] + (1.0f - c[shift]) * old[k];
    saved_next[i] = c[save] * x[i] + (1.0f - c[save]) * saved[i];
  }
  x = x_next, hist = hist_next, saved = saved_next;
}
}  // namespace

TEST(SdSampling, LcmTimestepsAndRowsAreDiffusersLcmScheduler) {
  size_t rows = 0;
  for (const auto& c : lcm()["cases"]) {
    const std::string what = c["config"].get<std::string>() + " " + std::to_string(c["steps"].get<int>()) + " steps";
    const SdTable t = sd_table("lcm", lcm()["configs"][c["config"].get<std::string>()], c["steps"]);
    std::vector<float> want_ts;
    for (int v : c["timesteps"]) want_ts.push_back(static_cast<float>(v));
    ASSERT_EQ(t.timesteps, want_ts) << what;
    EXPECT_EQ(t.init_noise_sigma, 1.0f);
    for (size_t i = 0; i < t.timesteps.size(); ++i) {
      const nlohmann::json& g = c["rows"][i];
      const double a = g["alpha"], a_prev = g["alpha_prev"], c_skip = g["c_skip"], c_out = g["c_out"];
      const bool last = i + 1 == t.timesteps.size();
      const double keep = last ? 1.0 : std::sqrt(a_prev);
      // c_in k_x k_s a0 a1 a2 a3 r m d0 d1 w_x w_d w_e sigma shift save
      const double want[kSdNumCoefs] = {1, 1, 0, 1, 0, 0, 0, 1 / std::sqrt(a), std::sqrt(1 - a) / std::sqrt(a), 1, 0,
                                        keep * c_skip, keep * c_out, 0, last ? 0.0 : std::sqrt(1 - a_prev), 1, 0};
      for (int k = 0; k < kSdNumCoefs; ++k) {
        // diffusers keeps alphas_cumprod and the scalings in float32; ours are float64 rounded once
        EXPECT_NEAR(t.coef[i * kSdNumCoefs + k], want[k], 2e-6 * std::max(1.0, std::fabs(want[k]))) << what << " call " << i << " coef " << k;
      }
      ++rows;
    }
  }
  EXPECT_GE(rows, 100u);
}

TEST(SdSampling, LcmTrajectoriesEqualDiffusersStep) {
  double worst = 0.0;
  size_t compared = 0;
  for (const auto& c : lcm()["cases"]) {
    const SdTable t = sd_table("lcm", lcm()["configs"][c["config"].get<std::string>()], c["steps"]);
    std::vector<float> x = c["x_init"].get<std::vector<float>>();
    const size_t n = x.size();
    std::vector<float> prev(n, 0.0f), hist(3 * n, 0.0f), saved(n, 0.0f);
    for (int i = 0; i < t.calls(); ++i) {
      sd_update(&t.coef[static_cast<size_t>(i) * kSdNumCoefs], x, c["eps"][i].get<std::vector<float>>(), prev, hist, saved,
                c["noise"][i].get<std::vector<float>>());
      const std::vector<float> want = c["x"][i].get<std::vector<float>>();
      float scale = 1.0f, diff = 0.0f;
      for (size_t j = 0; j < n; ++j) scale = std::max(scale, std::fabs(want[j])), diff = std::max(diff, std::fabs(x[j] - want[j]));
      EXPECT_LE(diff, 1e-5f * scale) << c["config"] << " " << c["steps"] << " steps, call " << i;
      worst = std::max(worst, static_cast<double>(diff / scale));
      ++compared;
    }
  }
  EXPECT_GE(compared, 100u);
  std::printf("lcm vs diffusers LCMScheduler.step: worst max|diff| / max|x| over %zu calls = %.3g\n", compared, worst);
}

TEST(SdSampling, LcmRefusalsAreOneLine) {
  const nlohmann::json& cfg = lcm()["configs"]["lcm-sdxl"];
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { sd_table("lcm", cfg, 51); }, &s),
            "steps 51 is more than the LCM scheduler's original_inference_steps 50 (lcm's timesteps are a subset of those)");
  EXPECT_EQ(s, TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(error_of([&] { sd_table("lcm", cfg, 4, 0.3); }), "eta applies to ddim only, not lcm");
  nlohmann::json bad = cfg;
  bad["clip_sample"] = true;
  EXPECT_EQ(error_of([&] { sd_table("lcm", bad, 4); }, &s), "the LCM scheduler config sets clip_sample; lcm supports it off only");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  bad = cfg;
  bad["original_inference_steps"] = 2000;
  EXPECT_EQ(error_of([&] { sd_table("lcm", bad, 4); }),
            "the LCM scheduler config's original_inference_steps 2000 is more than its 1000 training timesteps");
  EXPECT_EQ(sd_default_sampler(cfg), "lcm");
  EXPECT_TRUE(sd_needs_noise("lcm", 0.0));
}

TEST(SdSampling, DeepCachePlanEqualsPython) {
  // sampling/cache_plan.py's full / cached calls on these samplers' calls and the stitch by call index
  size_t checked = 0;
  for (const auto& c : g()["cache_plans"]) {
    const SdTable t = sd_table(c["sampler"], g()["configs"]["sd15-pndm"], c["steps"]);
    const std::vector<int> models = stitch_by_call_index(t.calls(), 2, c["ratio"].get<double>());
    const std::vector<uint8_t> got = cached_calls(t.timesteps, models, c["interval"].get<int>());
    std::vector<int> have(got.begin(), got.end());
    EXPECT_EQ(have, c["cached"].get<std::vector<int>>())
        << c["sampler"] << " " << c["steps"] << " steps, ratio " << c["ratio"] << ", interval " << c["interval"];
    ++checked;
  }
  EXPECT_GE(checked, 64u);
  // PNDM's repeated timestep counts as its first call's index: 10 steps = 11 calls, interval 2, one model
  const SdTable p = sd_table("pndm", g()["configs"]["sd15-pndm"], 10);
  const std::vector<uint8_t> one = cached_calls(p.timesteps, std::vector<int>(p.calls(), 1), 2);
  EXPECT_EQ(std::vector<int>(one.begin(), one.end()), (std::vector<int>{0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0}));
}
