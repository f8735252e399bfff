// The CUDA device: without a GPU, a status and a one-line reason; with one, memory, copies, events
// and a captured graph round-trip (run by benchmarks/gpu_check.sh on a lent GPU).
#include <gtest/gtest.h>

#include <vector>

#include "cuda_device.hpp"
#include "errors.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::error_of;

TEST(Cuda, NoGpuIsAStatusAndOneLine) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is visible: the no-GPU path does not apply";
  tstitch_status s = TSTITCH_OK;
  const std::string e = error_of([] { make_cuda_device(0); }, &s);
  EXPECT_EQ(s, TSTITCH_ERR_NO_DEVICE);
  EXPECT_NE(e.find("no usable CUDA device (cudaGetDeviceCount: cudaError"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos);
}

TEST(Cuda, BadDeviceIndex) {
  const int n = cuda_device_count();
  tstitch_status s = TSTITCH_OK;
  error_of([&] { make_cuda_device(n + 3); }, &s);
  EXPECT_EQ(s, TSTITCH_ERR_NO_DEVICE);
}

TEST(Cuda, BuffersCopiesAndAGraphOnARealDevice) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount reports none)";
  auto dev = make_cuda_device(0);
  std::vector<float> host(1024), back(1024, 0.0f);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i) * 0.5f;
  void* a = dev->alloc(4096, "a");
  void* b = dev->alloc(4096, "b");
  dev->upload(a, host.data(), 4096);
  dev->zero(b, 4096);
  dev->synchronize();
  auto g = dev->capture([&] { dev->copy(b, a, 4096); });  // a graph holds addresses, not values
  host[7] = 42.0f;
  dev->upload(a, host.data(), 4096);
  const double ms = dev->time_ms([&] { g->launch(); });
  dev->download(back.data(), b, 4096);
  EXPECT_EQ(back, host);
  EXPECT_GE(ms, 0.0);
  tstitch_status s = TSTITCH_OK;
  error_of([&] { dev->alloc(size_t(1) << 50, "a petabyte"); }, &s);
  EXPECT_EQ(s, TSTITCH_ERR_OUT_OF_MEMORY);
  dev->free(a);
  dev->free(b);
}
