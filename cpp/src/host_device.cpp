#include "host_device.hpp"

#include <cstdlib>
#include <cstring>

#include "errors.hpp"

namespace tstitch {

HostDevice::~HostDevice() {
  for (void* p : live_) std::free(p);
}

void* HostDevice::alloc(size_t nbytes, const std::string& what) {
  constexpr size_t kAlign = 64;  // a cache line / an AVX-512 vector
  const size_t n = (std::max<size_t>(nbytes, 1) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, n);
  if (p == nullptr)
    fail(TSTITCH_ERR_OUT_OF_MEMORY, "out of host memory allocating " + std::to_string(nbytes) + " B for " + what);
  live_.insert(p);
  return p;
}

void HostDevice::free(void* ptr) {
  if (live_.erase(ptr)) std::free(ptr);
}

void HostDevice::upload(void* dst, const void* host, size_t nbytes) { std::memcpy(dst, host, nbytes); }
void HostDevice::copy(void* dst, const void* src, size_t nbytes) { std::memcpy(dst, src, nbytes); }
void HostDevice::zero(void* dst, size_t nbytes) { std::memset(dst, 0, nbytes); }
void HostDevice::download(void* host, const void* src, size_t nbytes) { std::memcpy(host, src, nbytes); }

double HostDevice::time_ms(const std::function<void()>& enqueue) {
  engine_ms_ = 0.0;
  enqueue();
  return engine_ms_;
}

std::unique_ptr<Graph> HostDevice::capture(const std::function<void()>&) {
  fail(TSTITCH_ERR_RUNTIME, "the host device has no graphs (plain launches)");
}

}  // namespace tstitch
