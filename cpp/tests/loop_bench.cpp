// Host overhead of the C++ stitched loop: per step, wall time minus device time, with toy step
// engines (little device work, so the host side shows). Plain launches vs one CUDA graph.
//   tstitch_loop_bench [--fake] [steps=100] [batch=8] [repeats=7] [size=32]   -> one JSON object
// On a GPU (built with -DTSTITCH_CUDA_TESTS=ON) the toys are CUDA kernels on real streams and
// graphs; with --fake (or without CUDA tests) the host-memory fake device runs them, which measures
// the loop's own bookkeeping (no CUDA API calls) on this CPU.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "errors.hpp"
#include "fake_backend.hpp"
#include "runtime.hpp"
#ifdef TSTITCH_BENCH_CUDA
#include "cuda_device.hpp"
#include "cuda_toy_backend.hpp"
#endif

using namespace tstitch;

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
}  // namespace

int main(int argc, char** argv) {
  bool fake = argc > 1 && std::strcmp(argv[1], "--fake") == 0;
  char** a = argv + (fake ? 2 : 1);
  const int n = argc - (fake ? 2 : 1);
  const int steps = n > 0 ? std::atoi(a[0]) : 100, batch = n > 1 ? std::atoi(a[1]) : 8;
  const int repeats = n > 2 ? std::atoi(a[2]) : 7, size = n > 3 ? std::atoi(a[3]) : 32;
#ifdef TSTITCH_BENCH_CUDA
  if (!fake && cuda_device_count() == 0) {
    std::fprintf(stderr, "error: no CUDA device visible; run with --fake to measure the loop on the fake device\n");
    return 2;
  }
#else
  fake = true;
#endif
  testing::FakeStats stats;
  BackendFactory factory = testing::fake_factory({}, stats);
#ifdef TSTITCH_BENCH_CUDA
  if (!fake) factory = testing::cuda_toy_factory();
#endif
  const std::string dir = (std::filesystem::temp_directory_path() / "tstitch-loop-bench").string();
  std::filesystem::remove_all(dir);
  testing::write_toy_bundle(dir, 4, size, size);
  std::printf("{\"device\": \"%s\", \"steps\": %d, \"batch\": %d, \"latent\": [4, %d, %d], \"repeats\": %d",
              fake ? "fake (host memory)" : "cuda", steps, batch, size, size, repeats);
  try {
    for (bool graph : {false, true}) {
      OpenOptions o;
      o.cuda_graph = graph;
      Runtime rt(dir, o, factory);
      SampleRequest r;
      r.batch = batch;
      for (int i = 0; i < batch; ++i) r.class_labels.push_back(i % 10);
      r.sampler = "ddpm";
      r.steps = steps;
      r.ratio = 0.4;
      rt.sample(r);  // warm-up (and, for graphs, the capture)
      std::vector<double> total, overhead, wall, dev;
      for (int k = 0; k < repeats; ++k) {
        r.seed = static_cast<uint64_t>(k);
        const auto t0 = std::chrono::steady_clock::now();
        const LoopResult res = rt.sample(r);
        total.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        double w = 0, d = 0;
        for (size_t i = 0; i < res.step_ms.size(); ++i) w += res.step_ms[i], d += res.engine_ms[i];
        wall.push_back(w / steps);
        dev.push_back(d / steps);
        overhead.push_back(res.host_overhead_ms_per_step());
      }
      std::printf(", \"%s\": {\"sample_ms_min\": %.4f, \"sample_ms_median\": %.4f, \"step_wall_ms_median\": %.5f, "
                  "\"step_device_ms_median\": %.5f, \"host_overhead_ms_per_step_min\": %.5f, "
                  "\"host_overhead_ms_per_step_median\": %.5f}",
                  graph ? "graph" : "plain", min_of(total), median(total), median(wall), median(dev), min_of(overhead),
                  median(overhead));
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 2;
  }
  std::printf("}\n");
  std::filesystem::remove_all(dir);
  return 0;
}
