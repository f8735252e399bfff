// Schedules, respacing, coefficient tables, stitch rules and trajectory plans equal to Python's.
#include <gtest/gtest.h>

#include <algorithm>

#include "errors.hpp"
#include "manifest.hpp"
#include "sampling.hpp"
#include "test_util.hpp"
#include "trajectory.hpp"

using namespace tstitch;
using tstitch::testing::bits;
using tstitch::testing::error_of;
using tstitch::testing::golden;

namespace {
const nlohmann::json& g() {
  static const nlohmann::json j = golden("sampling");
  return j;
}

}  // namespace

TEST(Schedule, LinearBetasBitEqual) {
  EXPECT_EQ(linear_betas(1000), g()["linear_betas_1000"].get<std::vector<double>>());
  EXPECT_EQ(linear_betas(100), g()["linear_betas_100"].get<std::vector<double>>());
}

TEST(Schedule, SpaceTimesteps) {
  for (const auto& c : g()["spacing"])
    EXPECT_EQ(space_timesteps(c["T"], c["steps"]), c["timesteps"].get<std::vector<int64_t>>()) << c["steps"];
  for (const auto& c : g()["ddim_spacing"])
    EXPECT_EQ(space_timesteps_ddim(c["T"], c["steps"]), c["timesteps"].get<std::vector<int64_t>>()) << c["steps"];
  EXPECT_EQ(error_of([] { space_timesteps(1000, 0); }), "steps must be in [1, 1000], got 0");
}

TEST(Schedule, RespacedScheduleBitEqual) {
  for (const auto& c : g()["schedules"]) {
    RespacedSchedule s = dit_schedule(c["steps"]);
    EXPECT_EQ(s.timesteps, c["timesteps"].get<std::vector<int64_t>>());
    EXPECT_EQ(s.alphas_cumprod, c["alphas_cumprod"].get<std::vector<double>>()) << c["steps"];
    EXPECT_EQ(s.betas, c["betas"].get<std::vector<double>>()) << c["steps"];
  }
}

TEST(Coefficients, EverySamplerTableBitEqual) {
  int compared = 0;
  for (const auto& c : g()["tables"]) {
    const std::vector<float> t = coefficient_table(c["sampler"], dit_schedule(c["steps"]), c["eta"]);
    ASSERT_EQ(t.size(), c["shape"][0].get<size_t>() * kNumCoefs);
    EXPECT_EQ(sha256_bytes(t.data(), t.size() * 4), c["sha256"].get<std::string>())
        << c["sampler"] << " eta " << c["eta"] << " steps " << c["steps"];
    if (c.contains("bits")) {
      EXPECT_EQ(bits(t), c["bits"].get<std::vector<uint32_t>>());
    }
    ++compared;
  }
  EXPECT_EQ(compared, 24);
  EXPECT_EQ(error_of([] { coefficient_table("euler", dit_schedule(4)); }),
            "unknown sampler 'euler'; choose one of ddim, ddpm, dpm-solver++");
}

TEST(Stitch, RatioAndFractionRulesEqualPython) {
  for (const auto& c : g()["stitch"]) {
    const RespacedSchedule s = dit_schedule(c["steps"]);
    const std::vector<int64_t> ts(s.timesteps.rbegin(), s.timesteps.rend());
    const std::vector<int> got = c.contains("ratio") ? stitch_by_timestep(ts, 2, c["ratio"])
                                                     : stitch_by_fractions(ts, c["fractions"].get<std::vector<double>>());
    EXPECT_EQ(got, c["models"].get<std::vector<int>>()) << c.dump().substr(0, 80);
  }
}

TEST(Stitch, SdCallIndexRule) {
  // PNDM 50 steps = 51 UNet calls; r = 0.4 -> 20 small calls (the DiT timestep rule would give 21).
  const std::vector<int> m = stitch_by_call_index(51, 2, 0.4);
  EXPECT_EQ(std::count(m.begin(), m.end(), 0), 20);
  EXPECT_TRUE(std::is_sorted(m.begin(), m.end()));  // small first, then large, never back
  EXPECT_EQ(stitch_by_call_index(10, 2, 0.0), std::vector<int>(10, 1));
  EXPECT_EQ(stitch_by_call_index(10, 2, 1.0), std::vector<int>(10, 0));
  EXPECT_EQ(stitch_by_call_index(4, 2, 0.5), (std::vector<int>{0, 0, 1, 1}));
}

TEST(Stitch, ErrorMessagesNameTheProblem) {
  const std::vector<int64_t> ts = {999, 500, 0};
  EXPECT_EQ(error_of([&] { stitch_by_timestep(ts, 3, 0.5); }),
            "a ratio stitches exactly 2 models, the bundle has 3; use fractions");
  EXPECT_EQ(error_of([&] { stitch_by_timestep(ts, 2, 1.5); }), "ratio must be in [0, 1], got 1.5");
  EXPECT_EQ(error_of([] { check_fractions({0.5, 0.5}, 3); }), "got 2 fractions for 3 models; give one per model");
  EXPECT_EQ(error_of([] { check_fractions({0.5, -0.5, 1.0}, 3); }), "fractions must be >= 0, got [0.5, -0.5, 1]");
  EXPECT_EQ(error_of([] { check_fractions({0.5, 0.6}, 2); }), "fractions must sum to 1, got [0.5, 0.6] (sum 1.1)");
}

TEST(Trajectory, ForaCachePlanEqualsPython) {
  // sampling/cache_plan.py on DiT plans (pipeline/dit.py: the plan's integer timesteps and stitch): each model's count
  // restarts at its first call after a switch, so that call is full
  EXPECT_EQ(kMaxCacheInterval, g()["max_cache_interval"].get<int>());
  size_t checked = 0, cached = 0;
  for (const auto& c : g()["cache_plans"]) {
    const RespacedSchedule s = dit_schedule(c["steps"]);
    const std::vector<int64_t> ts(s.timesteps.rbegin(), s.timesteps.rend());
    const std::vector<int> models = c.contains("ratio") ? stitch_by_timestep(ts, 2, c["ratio"])
                                                        : stitch_by_fractions(ts, c["fractions"].get<std::vector<double>>());
    EXPECT_EQ(models, c["models"].get<std::vector<int>>());
    const std::vector<uint8_t> got = cached_calls(ts, models, c["interval"].get<int>());
    EXPECT_EQ(std::vector<int>(got.begin(), got.end()), c["cached"].get<std::vector<int>>()) << c.dump().substr(0, 100);
    for (size_t i = 0; i < got.size(); ++i) {
      cached += got[i];
      if (i == 0 || models[i] != models[i - 1]) {
        EXPECT_EQ(got[i], 0) << "a model's first call after a switch is full";
      }
    }
    ++checked;
  }
  EXPECT_GE(checked, 75u);
  EXPECT_GT(cached, 0u);  // the goldens hold cached calls, not only interval 1
  // ratio 0.4 of 10 DDIM steps, interval 3: the switch to the large model at call 4 restarts its count
  const RespacedSchedule s = dit_schedule(10);
  const std::vector<int64_t> ts(s.timesteps.rbegin(), s.timesteps.rend());
  const std::vector<uint8_t> p = cached_calls(ts, stitch_by_timestep(ts, 2, 0.4), 3);
  EXPECT_EQ(std::vector<int>(p.begin(), p.end()), (std::vector<int>{0, 1, 1, 0, 0, 1, 1, 0, 1, 1}));
}

TEST(Trajectory, PlanEqualsPythonIncludingNoise) {
  for (const auto& c : g()["plans"]) {
    Pcg64 rng(c["seed"].get<uint64_t>());
    const size_t latent = 2 * 2 * 4 * 4;
    std::vector<float> x(latent);
    standard_normal_f32(rng, x.data(), x.size());
    PlanSpec spec;
    spec.sampler = c["sampler"];
    spec.eta = c["eta"];
    spec.steps = c["steps"];
    spec.ratio = c["ratio"];
    spec.latent_count = latent;
    const TrajectoryPlan p = plan_trajectory(spec, rng);
    EXPECT_EQ(bits(x), c["x_init_bits"].get<std::vector<uint32_t>>());
    EXPECT_EQ(p.timesteps, c["timesteps"].get<std::vector<int64_t>>());
    EXPECT_EQ(p.step_model, c["step_model"].get<std::vector<int>>());
    EXPECT_EQ(bits(p.coef), c["coef_bits"].get<std::vector<uint32_t>>());
    EXPECT_EQ(bits(p.noise), c["noise_bits"].get<std::vector<uint32_t>>()) << c["sampler"];
  }
}
