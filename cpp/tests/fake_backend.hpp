// A host-memory device and a toy step engine: the stitched loop's logic runs without a GPU, the
// same cases tests/fake_gpu.py gives the Python TrtBackend. Device "memory" is real host memory
// (so ASan sees every overrun); stream work is queued, captured into graphs and replayed, reading
// the buffers at replay time like a real CUDA graph. Toy plans ("TOY c,h,w,k,scale,") run
// fake_gpu.toy_step in float32; "TOYVAE f," plans are a toy VAE decoder.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"
#include "runtime.hpp"

namespace tstitch::testing {

struct FakeOptions {
  std::pair<int, int> cc{8, 9};
  std::string module = "tensorrt", version = "10.13.0.35";
  int devices = 1;
  size_t memory_limit = SIZE_MAX;  // bytes of fake device memory
  bool fail_capture = false;
  bool capturable = true;
  size_t scratch_per_plan_byte = 1000;  // engine scratch = plan size * this (differs per model)
};

struct FakeStats {
  size_t live_bytes = 0, live_allocations = 0, captures = 0, graph_launches = 0;
  std::vector<std::pair<void*, size_t>> scratch_bindings;  // every set_scratch call
  size_t contexts = 0;
  std::map<const void*, size_t> enqueues_by_context;
};

class FakeDevice : public Device {
 public:
  FakeDevice(const FakeOptions& opt, FakeStats& stats) : opt_(opt), stats_(stats) {}
  ~FakeDevice() override;
  std::string describe() const override { return "fake device"; }
  std::pair<int, int> compute_capability() const override { return opt_.cc; }
  void* alloc(size_t nbytes, const std::string& what) override;
  void free(void* p) override;
  void upload(void* dst, const void* host, size_t n) override;
  void copy(void* dst, const void* src, size_t n) override;
  void zero(void* dst, size_t n) override;
  void download(void* host, const void* src, size_t n) override;
  void synchronize() override;
  void* stream() override { return this; }
  double time_ms(const std::function<void()>& enqueue) override;
  std::unique_ptr<Graph> capture(const std::function<void()>& body) override;
  void enqueue(std::function<void()> op);  // runs now, or records during a capture
  void check_range(const void* p, size_t n) const;  // the access must lie inside one live allocation
  FakeOptions& options() { return opt_; }

 private:
  FakeOptions opt_;
  FakeStats& stats_;
  std::map<char*, size_t> live_;
  std::vector<std::function<void()>>* capturing_ = nullptr;
};

std::unique_ptr<Backend> make_fake_backend(const FakeOptions& opt, FakeStats& stats);
BackendFactory fake_factory(const FakeOptions& opt, FakeStats& stats);

// A two-model toy bundle (trt/<i>-toy.plan, manifest.json with checksums, no io: the DiT defaults)
// for latent (c, h, h), batches 1..16.
void write_toy_bundle(const std::string& dir, int c, int h, int w);

// The toy text encoder's embedding of token `id` at channel d ("TOYTEXT" plans).
float toy_text_embedding(int64_t id, int64_t d);

// The toy VAE decoder's image channel k from the (scaled) latent value z ("TOYVAE f," plans).
float toy_vae_pixel(float z, int64_t k);

// fake_gpu.toy_step (numpy, float32) for one batch: the reference the loop tests compare with. Feature caching's
// toy ("TOY...,F" / "TOY...,R" plans): eps_out receives the step's eps (a full call), eps_in replaces it (cached).
void toy_step(const float* x, const int64_t* t, const int64_t* y, float g, const float* c, const float* prev,
              const float* noise, float scale, size_t batch, size_t per_item, float* x_next, float* x0,
              const float* eps_in = nullptr, float* eps_out = nullptr);

}  // namespace tstitch::testing
