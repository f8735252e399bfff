// The stitched loop on the fake device + toy engines: the cases tests/fake_gpu.py covers for the
// Python TrtBackend, and the trajectories themselves against the Python loop (loop.json).
#include <gtest/gtest.h>

#include <cmath>
#include <set>

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

TEST(Loop, ForaBundlesAreRefusedWithOneLine) {
  // a DiT bundle built with --cache-scheme fora: its engines have every block's kept features as one more I/O, which
  // this runtime does not bind yet; refused when opened, before any device work (FORA has no branch)
  TempBundle b;
  b.edit([&](nlohmann::json& j) { j["cache"] = {{"scheme", "fora"}}; });
  FakeStats stats;
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { open_fake(b.dir(), {}, stats); }, &s),
            "this bundle was built with --cache-scheme fora (FORA's full and cached step graphs), which the C++ "
            "runtime does not run yet; run it with tstitch-trt (Python), or rebuild it without --cache-scheme");
  EXPECT_EQ(s, TSTITCH_ERR_UNAVAILABLE);
  EXPECT_EQ(stats.contexts, 0u);
}
