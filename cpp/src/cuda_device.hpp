// The CUDA device: checked CUDA runtime calls, one non-blocking stream, events, stream capture.
#pragma once

#include <memory>

#include "device.hpp"

namespace tstitch {

int cuda_device_count();  // 0 without a driver or GPU (never throws)
// Error(TSTITCH_ERR_NO_DEVICE) with the CUDA error's name when device `index` is not usable.
std::unique_ptr<Device> make_cuda_device(int index);
// Error(TSTITCH_ERR_RUNTIME, "<what> failed: <cudaError name> (<text>)") unless err is cudaSuccess.
void cuda_check(int err, const char* what);

}  // namespace tstitch
