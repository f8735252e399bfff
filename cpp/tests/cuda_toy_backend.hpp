// Toy step engines on a REAL CUDA device (a kernel computing fake_gpu.toy_step): the stitched loop
// on real streams, buffers and CUDA graphs without TensorRT. Built with -DTSTITCH_CUDA_TESTS=ON
// (nvcc needed); benchmarks/gpu_check.sh runs it on a lent GPU.
#pragma once

#include <string>

#include "runtime.hpp"

namespace tstitch::testing {

BackendFactory cuda_toy_factory();
// A two-model toy bundle (trt/<i>-toy.plan, manifest.json with checksums) for latent (c, h, w).
void write_toy_bundle(const std::string& dir, int c, int h, int w);

}  // namespace tstitch::testing
