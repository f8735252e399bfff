// A thin RAII C++ wrapper over the C API (header-only): a move-only Runtime that closes its handle,
// and tstitch::cpp::Error (status + the one-line message) thrown where the C API returns a status.
#pragma once

#include <array>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tstitch/tstitch.h"

namespace tstitch::cpp {

class Error : public std::runtime_error {
 public:
  Error(tstitch_status s, const std::string& m) : std::runtime_error(m), status_(s) {}
  tstitch_status status() const { return status_; }

 private:
  tstitch_status status_;
};

inline void check(tstitch_status s) {
  if (s != TSTITCH_OK) throw Error(s, tstitch_last_error());
}

inline tstitch_open_params default_open_params() {
  tstitch_open_params p;
  tstitch_open_params_init(&p);
  return p;
}

inline tstitch_request default_request() {
  tstitch_request r;
  tstitch_request_init(&r);
  return r;
}

class Runtime {
 public:
  explicit Runtime(const std::string& bundle_dir, const tstitch_open_params& params = default_open_params()) {
    check(tstitch_open(bundle_dir.c_str(), &params, &handle_));
  }
  ~Runtime() { tstitch_close(handle_); }
  Runtime(Runtime&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  Runtime& operator=(Runtime&& o) noexcept {
    if (this != &o) {
      tstitch_close(handle_);
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  std::array<int, 3> latent_shape() const {
    std::array<int, 3> s{};
    check(tstitch_latent_shape(handle_, &s[0], &s[1], &s[2]));
    return s;
  }

  // (H, W, channels) of one decoded image at the bundle's size; throws where the bundle makes latents only.
  std::array<int, 3> image_shape() const {
    std::array<int, 3> s{};
    check(tstitch_image_shape(handle_, &s[0], &s[1], &s[2]));
    return s;
  }

  // Latents (batch, C, h, w) for `request` (h, w: an SD request's height/width, else the bundle's);
  // info is filled when given.
  std::vector<float> sample(const tstitch_request& request, tstitch_sample_info* info = nullptr) const {
    float* x = nullptr;
    size_t n = 0;
    check(tstitch_sample_alloc(handle_, &request, &x, &n, info));
    const std::unique_ptr<float, void (*)(void*)> owned(x, tstitch_free);
    return std::vector<float>(x, x + n);
  }

  tstitch_runtime* handle() const { return handle_; }

 private:
  tstitch_runtime* handle_ = nullptr;
};

}  // namespace tstitch::cpp
