// The stitched loop on the fake device + toy engines: the cases tests/fake_gpu.py covers for the
// Python TrtBackend, and the trajectories themselves against the Python loop (loop.json).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <set>
#include <tuple>

#include <cstddef>
#include <cstring>

#include "c_api_internal.hpp"
#include "fake_backend.hpp"
#include "runtime.hpp"
#include "test_util.hpp"

using namespace tstitch;
using namespace tstitch::testing;

namespace {

std::string toy() { return test_dir() + "/data/toy_pair"; }

std::unique_ptr<Runtime> open_fake(const std::string& dir, const FakeOptions& opt, FakeStats& stats, bool graph = true,
                                   const std::string& engine = "trt") {
  OpenOptions o;
  o.cuda_graph = graph;
  o.engine = engine;
  return std::make_unique<Runtime>(dir, o, fake_factory(opt, stats));
}

SampleRequest request(int batch = 2, const std::string& sampler = "ddpm", int steps = 8, double ratio = 0.4,
                      uint64_t seed = 0) {
  SampleRequest r;
  r.batch = batch;
  for (int i = 0; i < batch; ++i) r.class_labels.push_back(i % 10);
  r.sampler = sampler;
  r.steps = steps;
  r.ratio = ratio;
  r.seed = seed;
  r.cfg_scale = 1.5f;
  return r;
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

}  // namespace

TEST(Loop, TrajectoriesEqualThePythonLoop) {
  const nlohmann::json gold = golden("loop");
  int compared = 0;
  for (bool graph : {false, true}) {
    for (const auto& c : gold["runs"]) {
      FakeStats stats;
      auto rt = open_fake(toy(), {}, stats, graph);
      SampleRequest r = request(c["batch"], c["sampler"], c["steps"], c["ratio"], c["seed"].get<uint64_t>());
      r.eta = c["eta"];
      r.cfg_scale = c["cfg"];
      r.class_labels = c["labels"].get<std::vector<int64_t>>();
      const LoopResult res = rt->sample(r);
      const std::vector<float> want = c["x"].get<std::vector<float>>();
      ASSERT_EQ(res.x.size(), want.size());
      float scale = 1.0f;
      for (float v : want) scale = std::max(scale, std::fabs(v));
      // same RNG, tables and loop; only tanh/exp may differ in the last bit between libm and numpy
      EXPECT_LE(max_abs_diff(res.x, want), 1e-5f * scale) << c["sampler"] << " seed " << c["seed"];
      EXPECT_GT(scale, 0.1f);  // not a comparison of zeros
      EXPECT_EQ(res.graph, graph);
      ++compared;
    }
  }
  EXPECT_EQ(compared, 24);
}

TEST(Loop, GraphEqualsPlainIsCachedAndRecaptured) {
  FakeStats ps, gs;
  auto plain = open_fake(toy(), {}, ps, false);
  auto rt = open_fake(toy(), {}, gs, true);
  const LoopResult first = rt->sample(request(2));
  EXPECT_TRUE(first.graph);
  EXPECT_EQ(gs.captures, 1u);
  EXPECT_EQ(first.x, plain->sample(request(2)).x);  // bit-equal: the same work, replayed
  const size_t allocs = rt->loop().allocations();
  const LoopResult second = rt->sample(request(2, "ddpm", 8, 0.4, 1));  // same shapes, new inputs: replay
  EXPECT_TRUE(second.graph);
  EXPECT_EQ(gs.captures, 1u);
  EXPECT_EQ(rt->loop().allocations(), allocs);
  EXPECT_EQ(second.x, plain->sample(request(2, "ddpm", 8, 0.4, 1)).x);
  const LoopResult third = rt->sample(request(3));  // new batch: new buffers, new capture
  EXPECT_EQ(gs.captures, 2u);
  EXPECT_EQ(third.x, plain->sample(request(3)).x);
  const LoopResult other = rt->sample(request(3, "ddpm", 8, 1.0));  // another schedule: its own graph
  EXPECT_EQ(gs.captures, 3u);
  EXPECT_TRUE(other.graph);
  EXPECT_EQ(other.x, plain->sample(request(3, "ddpm", 8, 1.0)).x);
  EXPECT_NE(other.x, third.x);
  rt->sample(request(3));  // back to the first schedule on these buffers: cached
  EXPECT_EQ(gs.captures, 3u);
}

TEST(Loop, CaptureFailureFallsBackOnceWithANote) {
  FakeOptions opt;
  opt.fail_capture = true;
  FakeStats stats, ps;
  auto rt = open_fake(toy(), opt, stats);
  auto plain = open_fake(toy(), {}, ps, false);
  const LoopResult first = rt->sample(request(2, "ddim"));
  EXPECT_FALSE(first.graph);
  ASSERT_EQ(first.notes.size(), 1u);
  EXPECT_NE(first.notes[0].find("CUDA graph disabled"), std::string::npos);
  EXPECT_NE(first.notes[0].find("cudaErrorStreamCaptureInvalidated"), std::string::npos);
  const LoopResult second = rt->sample(request(2, "ddim"));
  EXPECT_FALSE(second.graph);
  EXPECT_TRUE(second.notes.empty());  // said once
  EXPECT_EQ(second.x, plain->sample(request(2, "ddim")).x);
}

TEST(Loop, NotCapturableFallsBack) {
  FakeOptions opt;
  opt.capturable = false;
  FakeStats stats;
  auto rt = open_fake(toy(), opt, stats);
  const LoopResult r = rt->sample(request(2));
  EXPECT_FALSE(r.graph);
  ASSERT_FALSE(r.notes.empty());
  EXPECT_NE(r.notes[0].find("not stream-capturable"), std::string::npos);
  EXPECT_EQ(stats.captures, 0u);
}

TEST(Loop, AllContextsShareOneScratchOfTheLargestSize) {
  FakeStats stats;
  auto rt = open_fake(toy(), {}, stats);
  rt->sample(request(2));
  const size_t small = 80 * 1000, large = 144 * 1000;  // plan bytes x scratch_per_plan_byte
  const MemoryReport rep = rt->loop().memory_report();
  EXPECT_EQ(rep.contexts, 4u);  // two ping-pong contexts per engine
  EXPECT_EQ(stats.contexts, 4u);
  EXPECT_EQ(rep.shared_scratch_bytes, large);
  EXPECT_EQ(rep.one_per_engine_bytes, small + large);
  EXPECT_EQ(rep.one_per_context_bytes, 2 * (small + large));
  std::set<std::pair<void*, size_t>> bound(stats.scratch_bindings.begin(), stats.scratch_bindings.end());
  EXPECT_EQ(bound.size(), 1u);  // every context, every time: the same allocation
  EXPECT_EQ(bound.begin()->second, large);
  EXPECT_EQ(stats.enqueues_by_context.size(), 4u);  // ratio 0.4 over 8 steps: both models on both parities
}

TEST(Loop, ThreeModelsByFractionsAndReuseWithoutNewAllocations) {
  TempBundle b;
  b.edit([&](nlohmann::json& j) {
    nlohmann::json third = j["models"][1];
    third["name"] = "Toy-XL";
    std::ofstream(b.dir() + "/trt/2-toy.plan") << "TOY2,4,4,11,1.3," << std::string(200, '#');
    third["engines"]["trt"]["file"] = "trt/2-toy.plan";
    third["engines"]["trt"]["sha256"] = sha256_file(b.dir() + "/trt/2-toy.plan");
    j["models"].push_back(third);
  });
  FakeStats gs, ps;
  auto rt = open_fake(b.dir(), {}, gs);
  auto plain = open_fake(b.dir(), {}, ps, false);
  SampleRequest r = request(2, "dpm-solver++", 10);
  r.fractions = {0.3, 0.3, 0.4};
  const LoopResult got = rt->sample(r);
  EXPECT_TRUE(got.graph);
  EXPECT_EQ(got.x, plain->sample(r).x);
  EXPECT_EQ(rt->loop().memory_report().contexts, 6u);
  const size_t allocs = rt->loop().allocations();
  r.seed = 3;
  rt->sample(r);
  EXPECT_EQ(rt->loop().allocations(), allocs);
  r.fractions.clear();  // a ratio needs exactly two models
  EXPECT_EQ(error_of([&] { rt->sample(r); }), "a ratio stitches exactly 2 models, the bundle has 3; use fractions");
}

TEST(Loop, OutOfMemoryFreesEverythingAndClosesTheLoop) {
  FakeOptions opt;
  opt.memory_limit = 1024;  // smaller than the scratch the engines ask for
  FakeStats stats;
  tstitch_status s = TSTITCH_OK;
  EXPECT_NE(error_of([&] { open_fake(toy(), opt, stats); }, &s).find("out of GPU memory"), std::string::npos);
  EXPECT_EQ(s, TSTITCH_ERR_OUT_OF_MEMORY);
  EXPECT_EQ(stats.live_bytes, 0u);

  FakeStats st2;
  FakeOptions opt2;
  opt2.memory_limit = 144 * 1000 + 1024;  // room for the scratch, not for the tables
  auto rt = open_fake(toy(), opt2, st2);
  EXPECT_NE(error_of([&] { rt->sample(request(4)); }, &s).find("out of GPU memory"), std::string::npos);
  EXPECT_EQ(st2.live_bytes, 0u);
  EXPECT_EQ(st2.live_allocations, 0u);
  EXPECT_NE(error_of([&] { rt->sample(request(1)); }).find("closed"), std::string::npos);  // never on freed memory
}

TEST(Loop, RefusesForeignEnginesBeforeAllocating) {
  for (auto [cc, version, match] : std::vector<std::tuple<std::pair<int, int>, std::string, std::string>>{
           {{8, 6}, "10.13.0.35", "compute capability 8.9, but this GPU is 8.6"},
           {{8, 9}, "10.14.1.48", "built with tensorrt 10.13.0.35, but 10.14.1.48 is installed"}}) {
    FakeOptions opt;
    opt.cc = cc;
    opt.version = version;
    FakeStats stats;
    tstitch_status s = TSTITCH_OK;
    EXPECT_NE(error_of([&] { open_fake(toy(), opt, stats); }, &s).find(match), std::string::npos) << match;
    EXPECT_EQ(s, TSTITCH_ERR_INCOMPATIBLE);
    EXPECT_EQ(stats.live_bytes, 0u);
  }
}

TEST(Loop, RefusesUnloadablePlansMissingKindsAndNoGpu) {
  TempBundle b;
  std::ofstream(b.dir() + "/trt/0-toy.plan") << "not a plan";
  b.edit([&](nlohmann::json& j) { j["models"][0]["engines"]["trt"]["sha256"] = sha256_file(b.dir() + "/trt/0-toy.plan"); });
  FakeStats stats;
  const std::string e = error_of([&] { open_fake(b.dir(), {}, stats); });
  EXPECT_NE(e.find("could not load the trt engine of Toy-S (0-toy.plan)"), std::string::npos) << e;
  EXPECT_NE(e.find("rebuild"), std::string::npos);
  EXPECT_EQ(error_of([&] { open_fake(toy(), {}, stats, true, "trt-rtx"); }),
            "unknown engine 'trt-rtx'; choose openvino or trt (NULL: auto)");
  EXPECT_EQ(error_of([&] { open_fake(toy(), {}, stats, true, "openvino"); }),
            "the bundle has no ort engine for Toy-S; rebuild it with --backend ort");
  FakeOptions none;
  none.devices = 0;
  tstitch_status s = TSTITCH_OK;
  EXPECT_NE(error_of([&] { open_fake(toy(), none, stats); }, &s).find("no NVIDIA GPU"), std::string::npos);
  EXPECT_EQ(s, TSTITCH_ERR_NO_DEVICE);
}

TEST(Loop, NonFiniteIsLocatedToItsStepAndModel) {
  FakeStats stats;
  auto rt = open_fake(toy(), {}, stats);
  SampleRequest r = request(1, "ddim", 8, 0.4);
  r.init_noise.assign(2 * 4 * 4, 1.0f);
  r.init_noise[5] = 3e38f;  // overflows to inf in the first step's x0
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { rt->sample(r); }, &s),
            "NaN/Inf in the latent: first at step 0 (t=999) on Toy-S; check the weights, the cfg scale and the engine "
            "precision");
  EXPECT_EQ(s, TSTITCH_ERR_NON_FINITE);
  r.init_noise[5] = 1.0f;  // the runtime stays usable
  EXPECT_EQ(rt->sample(r).x.size(), 32u);
}

TEST(Loop, RequestChecksBeforeAnyWork) {
  FakeStats stats;
  auto rt = open_fake(toy(), {}, stats);
  const size_t allocs = rt->loop().allocations();
  EXPECT_EQ(error_of([&] { rt->sample(request(17)); }),
            "batch 17 is outside the engines' range [1, 16]; rebuild with --batch-sizes 1-17");
  EXPECT_EQ(error_of([&] { rt->sample(request(2, "ddim", 1001)); }), "steps must be in [1, 1000], got 1001");
  EXPECT_EQ(error_of([&] { rt->sample(request(2, "ddim", 0)); }), "steps must be in [1, 1000], got 0");
  EXPECT_EQ(error_of([&] { rt->sample(request(2, "euler")); }),
            "unknown sampler 'euler'; choose one of ddim, ddpm, dpm-solver++");
  SampleRequest bad_label = request(2);
  bad_label.class_labels[1] = 10;
  EXPECT_EQ(error_of([&] { rt->sample(bad_label); }), "class label 10 is outside [0, 10); this bundle's models know 10 classes");
  EXPECT_EQ(rt->loop().allocations(), allocs);
}

TEST(Loop, CacheEntryWithoutCachedGraphsIsRefusedWithOneLine) {
  // `cache` without io.roles.cache and every model's cached graphs: Manifest._validate_cache's rule and message, at
  // open, before any device work
  TempBundle b;
  b.edit([&](nlohmann::json& j) { j["cache"] = {{"scheme", "fora"}}; });
  FakeStats stats;
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { open_fake(b.dir(), {}, stats); }, &s),
            "cache, io.roles.cache and every model's cached entry come together (DeepCache's full and cached step "
            "graphs); rebuild the bundle");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  EXPECT_EQ(stats.contexts, 0u);
}

// --- feature caching (FORA-style) on the toy pair --------------------------------------------------------------
namespace {

// The toy pair rebuilt as a `build --cache-scheme fora` bundle: full plans ("F": they output the kept feature
// feat_out, the toy's eps) and cached plans ("R": they read it as feat), io.roles.cache, `cache` and each model's
// `cached` entry with its feature's shape.
void make_fora_toy(const TempBundle& b) {
  nlohmann::json j = b.manifest();
  for (size_t i = 0; i < j["models"].size(); ++i) {
    nlohmann::json& m = j["models"][i];
    const std::string full = m["engines"]["trt"]["file"];
    std::ifstream in(b.dir() + "/" + full);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t hashes = text.find('#');
    const std::string cached = "trt/" + std::to_string(i) + "-toy-cached.plan";
    std::ofstream(b.dir() + "/" + full) << text.substr(0, hashes) << "F" << text.substr(hashes);
    std::ofstream(b.dir() + "/" + cached) << text.substr(0, hashes) << "R" << text.substr(hashes);
    m["engines"]["trt"]["sha256"] = sha256_file(b.dir() + "/" + full);
    nlohmann::json c = m["engines"]["trt"];
    c["file"] = cached;
    c["sha256"] = sha256_file(b.dir() + "/" + cached);
    m["cached"] = {{"feature", {{"shape", {"B", 2, 4, 4}}, {"dtype", "float32"}}}, {"engines", {{"trt", c}}}};
  }
  const nlohmann::json lat = {{"shape", {"B", 2, 4, 4}}, {"dtype", "float32"}};
  j["io"] = {{"inputs", {{"x", lat}, {"t", {{"shape", {"B"}}, {"dtype", "int64"}}}, {"y", {{"shape", {"B"}}, {"dtype", "int64"}}},
                         {"guidance", {{"shape", nlohmann::json::array()}, {"dtype", "float32"}}},
                         {"coef", {{"shape", {11}}, {"dtype", "float32"}}}, {"prev_x0", lat}, {"noise", lat}}},
             {"outputs", {{"x_next", lat}, {"x0", lat}}},
             {"roles", {{"state", nlohmann::json::array({nlohmann::json::array({"x", "x_next"}),
                                                         nlohmann::json::array({"prev_x0", "x0"})})},
                        {"step", {"t", "coef", "noise"}}, {"request", {"y", "guidance"}},
                        {"cache", nlohmann::json::array({nlohmann::json::array({"feat", "feat_out"})})}}}};
  j["cache"] = {{"scheme", "fora"}};
  b.write_manifest(j);
}

// The trajectory by hand: Runtime::sample's RNG use and plan, then each call on its model's full or cached toy step
// with one kept eps per model (the model's first call after a switch is full: it never reads the other's)
std::vector<float> fora_reference(const SampleRequest& r, int interval) {
  Pcg64 rng(r.seed);
  const size_t per = 2 * 4 * 4, n = static_cast<size_t>(r.batch) * per;
  std::vector<float> x(n), prev(n, 0.0f), xn(n), x0(n), zeros(n, 0.0f);
  standard_normal_f32(rng, x.data(), n);
  PlanSpec spec;
  spec.sampler = r.sampler, spec.steps = r.steps, spec.ratio = r.ratio, spec.eta = r.eta, spec.latent_count = n;
  const TrajectoryPlan p = plan_trajectory(spec, rng);
  const std::vector<uint8_t> cached = cached_calls(p.timesteps, p.step_model, interval);
  std::vector<std::vector<float>> kept(2, std::vector<float>(n, 0.0f));
  const float scales[2] = {0.5f, 0.9f};
  for (int i = 0; i < p.steps(); ++i) {
    const int m = p.step_model[i];
    const std::vector<int64_t> t(static_cast<size_t>(r.batch), p.timesteps[i]);
    const float* noise = p.noise.empty() ? zeros.data() : p.noise.data() + static_cast<size_t>(i) * n;
    toy_step(x.data(), t.data(), r.class_labels.data(), r.cfg_scale, p.coef.data() + static_cast<size_t>(i) * p.k, prev.data(),
             noise, scales[m], static_cast<size_t>(r.batch), per, xn.data(), x0.data(), cached[i] ? kept[m].data() : nullptr,
             cached[i] ? nullptr : kept[m].data());
    std::swap(x, xn);
    std::swap(prev, x0);
  }
  return x;
}

}  // namespace

TEST(Loop, ForaToyFollowsTheCachePlanWithOneKeptFeaturePerModel) {
  TempBundle b;
  make_fora_toy(b);
  int compared = 0;
  for (bool graph : {false, true}) {
    FakeStats stats;
    auto rt = open_fake(b.dir(), {}, stats, graph);
    EXPECT_EQ(stats.contexts, 8u);  // full and cached engine per model, one context per parity each
    for (const auto& [sampler, ratio, interval] : {std::tuple{"ddim", 0.4, 3}, std::tuple{"ddpm", 0.5, 2},
                                                   std::tuple{"dpm-solver++", 0.0, 3}, std::tuple{"ddim", 1.0, 2}}) {
      SampleRequest r = request(2, sampler, 10, ratio, 5);
      r.cache_interval = interval;
      const std::vector<float> got = rt->sample(r).x, want = fora_reference(r, interval);
      float scale = 1.0f;
      for (float v : want) scale = std::max(scale, std::fabs(v));
      EXPECT_LE(max_abs_diff(got, want), 1e-6f * scale) << sampler << " interval " << interval << " graph " << graph;
      r.cache_interval = 1;
      const std::vector<float> full = rt->sample(r).x;  // the full graphs alone: the plain trajectory
      EXPECT_LE(max_abs_diff(full, fora_reference(r, 1)), 1e-6f * scale);
      EXPECT_GT(max_abs_diff(full, got), 1e-3f) << "the cached calls changed nothing: " << sampler;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 8);
}

TEST(Loop, CacheRequestsAreCheckedWithOneLine) {
  TempBundle b;
  make_fora_toy(b);
  FakeStats stats;
  auto fora = open_fake(b.dir(), {}, stats);
  auto plain = open_fake(toy(), {}, stats);
  SampleRequest r = request();
  tstitch_status s = TSTITCH_OK;
  r.cache_interval = 0;
  EXPECT_EQ(error_of([&] { fora->sample(r); }, &s), "cache_interval must be between 1 (no caching) and 1000, got 0");
  EXPECT_EQ(s, TSTITCH_ERR_INVALID_ARGUMENT);
  r.cache_interval = 1001;
  EXPECT_EQ(error_of([&] { fora->sample(r); }), "cache_interval must be between 1 (no caching) and 1000, got 1001");
  r.cache_interval = 2, r.cache_branch = 0;
  EXPECT_EQ(error_of([&] { fora->sample(r); }),
            "cache_branch 0: DiT bundles cache with FORA (every block's attention and MLP outputs), which has no branch "
            "(DeepCache's, for SD U-Nets); leave cache_branch at -1");
  r.cache_branch = -1;
  EXPECT_EQ(error_of([&] { plain->sample(r); }, &s),
            "cache_interval 2 needs FORA's cached step graphs, which this bundle was built without; rebuild it with "
            "`tstitch-trt build ... --cache-scheme fora`, or give cache_interval 1");
  EXPECT_EQ(s, TSTITCH_ERR_INVALID_ARGUMENT);
  r.cache_interval = 1;
  EXPECT_NO_THROW(plain->sample(r));
}

TEST(Loop, Version5CallersRunWithoutCaching) {
  // a caller built against API 5: its request ends at num_negative_prompts (plus the struct's padding, where the API 6
  // fields begin); the library reads neither, so its requests run uncached whatever its padding holds
  TempBundle b;
  make_fora_toy(b);
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(open_with_factory(b.dir().c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  const int64_t labels[2] = {1, 7};
  tstitch_request r;
  tstitch_request_init(&r);
  EXPECT_EQ(r.cache_interval, 1);
  EXPECT_EQ(r.cache_branch, -1);
  r.batch = 2, r.class_labels = labels, r.steps = 10, r.ratio = 0.4, r.sampler = "ddim", r.seed = 5;
  const size_t n = 2 * 2 * 4 * 4, v5 = (offsetof(tstitch_request, num_negative_prompts) + sizeof(int) + alignof(tstitch_request) - 1) /
                                        alignof(tstitch_request) * alignof(tstitch_request);
  std::vector<float> uncached(n), cached(n), old(n);
  ASSERT_EQ(tstitch_sample(h, &r, uncached.data(), n, nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  r.cache_interval = 3;
  ASSERT_EQ(tstitch_sample(h, &r, cached.data(), n, nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_GT(max_abs_diff(cached, uncached), 1e-3f);
  std::vector<unsigned char> mem(sizeof(tstitch_request) + 64, 0xEE);  // garbage past the v5 fields
  r.struct_size = v5;
  std::memcpy(mem.data(), &r, offsetof(tstitch_request, num_negative_prompts) + sizeof(int));
  ASSERT_EQ(tstitch_sample(h, reinterpret_cast<const tstitch_request*>(mem.data()), old.data(), n, nullptr, 0, nullptr), TSTITCH_OK)
      << tstitch_last_error();
  EXPECT_EQ(old, uncached);
  // tstitch_cache_plan: the plan these runs followed (ratio 0.4 of 10 DDIM steps, interval 3: Trajectory goldens)
  r.struct_size = sizeof(tstitch_request), r.cache_interval = 3;
  int calls = 0;
  ASSERT_EQ(tstitch_cache_plan(h, &r, nullptr, 0, &calls), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(calls, 10);
  std::vector<uint8_t> plan(10);
  EXPECT_EQ(tstitch_cache_plan(h, &r, plan.data(), 9, &calls), TSTITCH_ERR_BUFFER_TOO_SMALL);
  EXPECT_EQ(std::string(tstitch_last_error()), "cached holds 9 bytes, the trajectory has 10 calls");
  ASSERT_EQ(tstitch_cache_plan(h, &r, plan.data(), plan.size(), &calls), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(plan, (std::vector<uint8_t>{0, 1, 1, 0, 0, 1, 1, 0, 1, 1}));
  r.cache_interval = 1;
  ASSERT_EQ(tstitch_cache_plan(h, &r, plan.data(), plan.size(), &calls), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(plan, std::vector<uint8_t>(10, 0));
  r.cache_interval = 2, r.cache_branch = 4;
  EXPECT_EQ(tstitch_cache_plan(h, &r, plan.data(), plan.size(), &calls), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(tstitch_sample(h, &r, old.data(), n, nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(tstitch_last_error()),
            "cache_branch 4: DiT bundles cache with FORA (every block's attention and MLP outputs), which has no branch "
            "(DeepCache's, for SD U-Nets); leave cache_branch at -1");
  tstitch_close(h);
}
