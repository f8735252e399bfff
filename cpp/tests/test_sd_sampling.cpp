// SD sampler tables (pndm, ddim, euler, dpm-solver++) from diffusers scheduler configs and the SD
// stitch rule by U-Net call: bit-equal to python/tstitch_trt/sampling/sd_samplers.py and stitch.py
// (golden/sd_sampling.json, written by tests/cpp_goldens.py).
#include <gtest/gtest.h>

#include <cstring>

#include "errors.hpp"
#include "sampling.hpp"
#include "sd_samplers.hpp"
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
