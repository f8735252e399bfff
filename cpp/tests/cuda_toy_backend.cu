#include <cuda_runtime.h>

#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cuda_device.hpp"
#include "cuda_toy_backend.hpp"
#include "errors.hpp"
#include "manifest.hpp"

namespace tstitch::testing {
namespace {

__global__ void toy_step_kernel(const float* x, const int64_t* t, const int64_t* y, const float* g, const float* c,
                                const float* prev, const float* noise, float scale, int per_item, int n, float* x_next,
                                float* x0) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int b = i / per_item;
  const float t_term = static_cast<float>(t[b]) * 1e-3f, y_term = static_cast<float>(y[b]) * 1e-2f;
  const float sx = __fmul_rn(scale, x[i]);
  const float cond = tanhf(sx + t_term) + y_term, uncond = tanhf(sx);
  const float eps = uncond + g[0] * (cond - uncond);
  const float x0v = __fsub_rn(__fmul_rn(c[0], x[i]), __fmul_rn(c[1], eps));
  const float d = __fadd_rn(__fmul_rn(c[2], x0v), __fmul_rn(c[3], prev[i]));
  const float logvar = c[10];  // v = -1: the posterior variance
  const float sd = c[7] + c[8] * expf(0.5f * logvar);
  x_next[i] = __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(c[4], x[i]), __fmul_rn(c[5], d)), __fmul_rn(c[6], eps)),
                        __fmul_rn(sd, noise[i]));
  x0[i] = x0v;
}

class ToyContext : public StepContext {
 public:
  ToyContext(Device& d, float scale) : dev_(d), scale_(scale) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    shapes_[name] = shape;
    return true;
  }
  void set_address(const std::string& name, void* ptr) override { addr_[name] = ptr; }
  size_t scratch_needed() override { return 256; }
  void set_scratch(void* ptr, size_t) override { scratch_ = ptr; }
  bool capturable() override { return true; }
  void enqueue() override {
    const auto& s = shapes_.at("x");
    int per = 1;
    for (size_t i = 1; i < s.size(); ++i) per *= static_cast<int>(s[i]);
    const int n = static_cast<int>(s[0]) * per;
    auto f = [&](const char* k) { return static_cast<float*>(addr_.at(k)); };
    auto l = [&](const char* k) { return static_cast<const int64_t*>(addr_.at(k)); };
    toy_step_kernel<<<(n + 255) / 256, 256, 0, static_cast<cudaStream_t>(dev_.stream())>>>(
        f("x"), l("t"), l("y"), f("guidance"), f("coef"), f("prev_x0"), f("noise"), scale_, per, n, f("x_next"), f("x0"));
    cuda_check(cudaGetLastError(), "toy_step_kernel launch");
  }

 private:
  Device& dev_;
  float scale_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addr_;
  void* scratch_ = nullptr;
};

class ToyEngine : public StepEngine {
 public:
  ToyEngine(Device& d, float scale) : dev_(d), scale_(scale) {}
  std::vector<EngineTensor> tensors() const override {
    std::vector<EngineTensor> t;
    for (const char* n : {"x", "guidance", "coef", "prev_x0", "noise"}) t.push_back({n, true, "float32", true});
    t.push_back({"t", true, "int64", true});
    t.push_back({"y", true, "int64", true});
    t.push_back({"x_next", false, "float32", true});
    t.push_back({"x0", false, "float32", true});
    return t;
  }
  size_t scratch_bytes() const override { return 256; }
  std::pair<int64_t, int64_t> batch_range(const std::string&) const override { return {1, 64}; }
  std::unique_ptr<StepContext> create_context() override { return std::make_unique<ToyContext>(dev_, scale_); }

 private:
  Device& dev_;
  float scale_;
};

class ToyBackend : public Backend {
 public:
  explicit ToyBackend(int index) : dev_(make_cuda_device(index)) {}
  std::string kind() const override { return "trt"; }
  RuntimeIdentity identity() const override { return {"tensorrt", "10.13.0.35", "trt"}; }
  Device& device() override { return *dev_; }
  std::unique_ptr<StepEngine> load(const std::vector<char>& data, const std::string& what) override {
    const std::string text(data.begin(), data.end());
    std::istringstream in(text.size() > 3 ? text.substr(3) : "");
    int c, h, w, k;
    float scale;
    char comma;
    if (text.rfind("TOY", 0) != 0 || !(in >> c >> comma >> h >> comma >> w >> comma >> k >> comma >> scale))
      fail(TSTITCH_ERR_INCOMPATIBLE, "could not load " + what + ": not a toy plan");
    return std::make_unique<ToyEngine>(*dev_, scale);
  }

 private:
  std::unique_ptr<Device> dev_;
};

}  // namespace

BackendFactory cuda_toy_factory() {
  return [](const std::string&, int index) { return std::make_unique<ToyBackend>(index); };
}

}  // namespace tstitch::testing
