// Host overhead of the C++ stitched loop on a real GPU: toy step kernels (microseconds of GPU work)
// so the host side dominates; plain launches (per step: wall - device time) vs one CUDA graph.
//   tstitch_loop_bench [steps=100] [batch=8] [repeats=7] [size=32]   -> one JSON object on stdout
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "cuda_device.hpp"
#include "cuda_toy_backend.hpp"
#include "errors.hpp"
#include "runtime.hpp"

using namespace tstitch;

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 100, batch = argc > 2 ? std::atoi(argv[2]) : 8;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 7, size = argc > 4 ? std::atoi(argv[4]) : 32;
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "error: no CUDA device visible; this benchmark needs a GPU\n");
    return 2;
  }
  const std::string dir = (std::filesystem::temp_directory_path() / "tstitch-loop-bench").string();
  std::filesystem::remove_all(dir);
  testing::write_toy_bundle(dir, 4, size, size);
  std::printf("{\"steps\": %d, \"batch\": %d, \"latent\": [4, %d, %d], \"repeats\": %d", steps, batch, size, size,
              repeats);
  for (bool graph : {false, true}) {
    OpenOptions o;
    o.cuda_graph = graph;
    Runtime rt(dir, o, testing::cuda_toy_factory());
    SampleRequest r;
    r.batch = batch;
    for (int i = 0; i < batch; ++i) r.class_labels.push_back(i % 10);
    r.sampler = "ddpm";
    r.steps = steps;
    r.ratio = 0.4;
    rt.sample(r);  // warm-up (and, for graphs, the capture)
    std::vector<double> total, overhead, per_step_wall, per_step_gpu;
    for (int k = 0; k < repeats; ++k) {
      r.seed = static_cast<uint64_t>(k);
      const auto t0 = std::chrono::steady_clock::now();
      const LoopResult res = rt.sample(r);
      total.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      double wall = 0, gpu = 0;
      for (size_t i = 0; i < res.step_ms.size(); ++i) wall += res.step_ms[i], gpu += res.engine_ms[i];
      per_step_wall.push_back(wall / steps);
      per_step_gpu.push_back(gpu / steps);
      overhead.push_back(res.host_overhead_ms_per_step());
    }
    std::printf(", \"%s\": {\"sample_ms_min\": %.4f, \"sample_ms_median\": %.4f, \"step_wall_ms_median\": %.5f, "
                "\"step_gpu_ms_median\": %.5f, \"host_overhead_ms_per_step_min\": %.5f, "
                "\"host_overhead_ms_per_step_median\": %.5f}",
                graph ? "graph" : "plain", min_of(total), median(total), median(per_step_wall), median(per_step_gpu),
                min_of(overhead), median(overhead));
  }
  std::printf("}\n");
  std::filesystem::remove_all(dir);
  return 0;
}
