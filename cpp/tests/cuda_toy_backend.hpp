// Toy step engines on a REAL CUDA device (a kernel computing fake_gpu.toy_step): the stitched loop
// on real streams, buffers and CUDA graphs without TensorRT. Built with -DTSTITCH_CUDA_TESTS=ON
// (nvcc needed); benchmarks/gpu_check.sh runs it on a lent GPU.
#pragma once

#include <string>

#include "fake_backend.hpp"  // write_toy_bundle
#include "runtime.hpp"

namespace tstitch::testing {

BackendFactory cuda_toy_factory();

}  // namespace tstitch::testing
