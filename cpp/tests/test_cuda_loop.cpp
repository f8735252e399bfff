// The stitched loop on a real GPU: CUDA buffers, one stream, whole-trajectory CUDA graphs, with toy
// step kernels standing in for TensorRT engines; trajectories against the Python loop's goldens.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_device.hpp"
#include "cuda_toy_backend.hpp"
#include "runtime.hpp"
#include "test_util.hpp"

using namespace tstitch;
using namespace tstitch::testing;

namespace {
bool have_gpu() { return cuda_device_count() > 0; }
}  // namespace

TEST(CudaLoop, ToyTrajectoriesMatchPythonOnRealStreamsAndGraphs) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount reports none)";
  const nlohmann::json gold = golden("loop");
  int compared = 0;
  for (bool graph : {false, true}) {
    OpenOptions o;
    o.cuda_graph = graph;
    Runtime rt(test_dir() + "/data/toy_pair", o, cuda_toy_factory());
    for (const auto& c : gold["runs"]) {
      SampleRequest r;
      r.batch = c["batch"];
      r.class_labels = c["labels"].get<std::vector<int64_t>>();
      r.sampler = c["sampler"];
      r.eta = c["eta"];
      r.steps = c["steps"];
      r.ratio = c["ratio"];
      r.seed = c["seed"].get<uint64_t>();
      r.cfg_scale = c["cfg"];
      const LoopResult res = rt.sample(r);
      const std::vector<float> want = c["x"].get<std::vector<float>>();
      float diff = 0, scale = 1;
      for (size_t i = 0; i < want.size(); ++i) {
        diff = std::max(diff, std::fabs(res.x[i] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
      }
      EXPECT_LE(diff, 1e-4f * scale) << c["sampler"] << " seed " << c["seed"] << " graph " << graph;
      EXPECT_EQ(res.graph, graph);
      EXPECT_TRUE(res.notes.empty()) << res.notes.front();
      ++compared;
    }
    if (graph) {
      EXPECT_GE(rt.loop().captures(), 4u);
    }
  }
  EXPECT_EQ(compared, 24);
}

TEST(CudaLoop, GraphReplayIsCachedAndAllocatesNothing) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount reports none)";
  Runtime rt(test_dir() + "/data/toy_pair", OpenOptions{}, cuda_toy_factory());
  SampleRequest r;
  r.batch = 4;
  r.class_labels = {0, 1, 2, 3};
  r.sampler = "ddpm";
  r.steps = 20;
  r.ratio = 0.4;
  const LoopResult a = rt.sample(r);
  const size_t allocs = rt.loop().allocations(), captures = rt.loop().captures();
  r.seed = 5;
  const LoopResult b = rt.sample(r);
  EXPECT_TRUE(a.graph && b.graph);
  EXPECT_EQ(rt.loop().allocations(), allocs);
  EXPECT_EQ(rt.loop().captures(), captures);
  EXPECT_NE(a.x, b.x);
}
