#include "fake_backend.hpp"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "errors.hpp"
#include "manifest.hpp"

namespace tstitch::testing {

FakeDevice::~FakeDevice() {
  for (auto& kv : live_) std::free(kv.first);
}

void* FakeDevice::alloc(size_t nbytes, const std::string& what) {
  if (stats_.live_bytes + nbytes > opt_.memory_limit)
    fail(TSTITCH_ERR_OUT_OF_MEMORY, "out of GPU memory allocating " + std::to_string(nbytes) + " B for " + what + " (fake)");
  char* p = static_cast<char*>(std::malloc(nbytes));
  std::memset(p, 0xAB, nbytes);  // garbage, like cudaMalloc
  live_[p] = nbytes;
  stats_.live_bytes += nbytes;
  ++stats_.live_allocations;
  return p;
}

void FakeDevice::free(void* p) {
  auto it = live_.find(static_cast<char*>(p));
  if (it == live_.end()) return;
  stats_.live_bytes -= it->second;
  --stats_.live_allocations;
  std::free(it->first);
  live_.erase(it);
}

void FakeDevice::check_range(const void* p, size_t n) const {
  const char* c = static_cast<const char*>(p);
  auto it = live_.upper_bound(const_cast<char*>(c));
  if (it == live_.begin() || c + n > std::prev(it)->first + std::prev(it)->second)
    throw std::logic_error("access to unallocated fake device memory");
}

void FakeDevice::enqueue(std::function<void()> op) {
  if (capturing_) capturing_->push_back(std::move(op));
  else op();  // the fake "GPU" runs work as soon as it is queued
}

void FakeDevice::upload(void* dst, const void* host, size_t n) {
  check_range(dst, n);
  std::vector<char> data(static_cast<const char*>(host), static_cast<const char*>(host) + n);
  enqueue([dst, data] { std::memcpy(dst, data.data(), data.size()); });
}

void FakeDevice::copy(void* dst, const void* src, size_t n) {
  check_range(dst, n);
  check_range(src, n);
  enqueue([this, dst, src, n] {
    check_range(dst, n);  // a replayed graph must not touch freed buffers
    std::memcpy(dst, src, n);
  });
}

void FakeDevice::zero(void* dst, size_t n) {
  check_range(dst, n);
  enqueue([dst, n] { std::memset(dst, 0, n); });
}

void FakeDevice::download(void* host, const void* src, size_t n) {
  check_range(src, n);
  std::memcpy(host, src, n);
}

void FakeDevice::synchronize() {
  if (capturing_) throw std::logic_error("synchronize() during a capture");
}

double FakeDevice::time_ms(const std::function<void()>& enqueue_fn) {
  const auto t0 = std::chrono::steady_clock::now();
  enqueue_fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

namespace {

class FakeGraph : public Graph {
 public:
  FakeGraph(FakeDevice& d, std::vector<std::function<void()>> ops, FakeStats& s) : dev_(d), ops_(std::move(ops)), stats_(s) {}
  void launch() override {
    ++stats_.graph_launches;
    for (auto& op : ops_) dev_.enqueue(op);
  }

 private:
  FakeDevice& dev_;
  std::vector<std::function<void()>> ops_;
  FakeStats& stats_;
};

}  // namespace

std::unique_ptr<Graph> FakeDevice::capture(const std::function<void()>& body) {
  std::vector<std::function<void()>> ops;
  capturing_ = &ops;
  try {
    body();
  } catch (...) {
    capturing_ = nullptr;
    throw;
  }
  capturing_ = nullptr;
  if (opt_.fail_capture)
    fail(TSTITCH_ERR_RUNTIME, "cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated (fake)");
  ++stats_.captures;
  return std::make_unique<FakeGraph>(*this, std::move(ops), stats_);
}

float toy_vae_pixel(float z, int64_t k) { return z * 0.25f + (0.5f * static_cast<float>(k) - 0.5f); }

float toy_text_embedding(int64_t id, int64_t d) {
  return static_cast<float>(id % 997) * 1e-3f - static_cast<float>(d) * 1e-2f;
}

void toy_step(const float* x, const int64_t* t, const int64_t* y, float g, const float* c, const float* prev,
              const float* noise, float scale, size_t batch, size_t per_item, float* x_next, float* x0,
              const float* eps_in, float* eps_out) {
  for (size_t b = 0; b < batch; ++b) {
    const float t_term = static_cast<float>(t[b]) * 1e-3f, y_term = static_cast<float>(y[b]) * 1e-2f;
    for (size_t j = 0; j < per_item; ++j) {
      const size_t i = b * per_item + j;
      const float sx = scale * x[i];
      const float cond = std::tanh(sx + t_term) + y_term, uncond = std::tanh(sx);
      // feature caching's toy: the full graph keeps its eps (eps_out), the cached one reuses the kept eps (eps_in)
      const float eps = eps_in ? eps_in[i] : uncond + g * (cond - uncond);
      if (eps_out) eps_out[i] = eps;
      const float x0v = c[0] * x[i] - c[1] * eps;
      const float d = c[2] * x0v + c[3] * prev[i];
      const float logvar = c[10] + (-1.0f + 1.0f) * 0.5f * (c[9] - c[10]);  // v = -1: the posterior variance
      const float std_ = c[7] + c[8] * std::exp(0.5f * logvar);
      x_next[i] = c[4] * x[i] + c[5] * d + c[6] * eps + std_ * noise[i];
      x0[i] = x0v;
    }
  }
}

namespace {

struct ToyPlan {
  int c, h, w, k;
  float scale;
  bool added = false, control = false;  // SD toys: SDXL's added conditions, a ControlNet
  bool keeps = false, reads = false;     // DiT toys with feature caching: F = full (outputs feat_out), R = cached
                                         // (reads feat): the kept feature is the step's eps (toy_step)
};

// The SD toy step graph's tensors in StepConditions.inputs order, then its outputs.
std::vector<std::string> sd_toy_tensors(const ToyPlan& p) {
  std::vector<std::string> n = {"x", "t", "context"};
  if (p.added) n.insert(n.end(), {"text_embeds", "time_ids"});
  if (p.control) n.insert(n.end(), {"control_image", "control_guess"});
  n.insert(n.end(), {"guidance", "coef", "prev_x0", "eps_hist", "saved", "noise"});
  if (p.control) n.push_back("control_scale");
  n.insert(n.end(), {"x_next", "x0", "eps_hist_next", "saved_next"});
  return n;
}

class FakeContext : public StepContext {
 public:
  FakeContext(FakeDevice& d, const ToyPlan& p, size_t scratch, FakeOptions opt, FakeStats& s)
      : dev_(d), plan_(p), scratch_needed_(scratch), opt_(std::move(opt)), stats_(s) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    if ((name == "x" || name == "t" || name == "y") && (shape.empty() || shape[0] < 1 || shape[0] > 16)) return false;
    shapes_[name] = shape;
    return true;
  }
  void set_address(const std::string& name, void* ptr) override { addr_[name] = ptr; }
  size_t scratch_needed() override { return scratch_needed_; }
  void set_scratch(void* ptr, size_t n) override {
    if (n < scratch_needed_) throw std::logic_error("scratch smaller than the engine needs");
    scratch_ = ptr;
    stats_.scratch_bindings.emplace_back(ptr, n);
  }
  bool capturable() override { return opt_.capturable; }
  void enqueue() override {
    if (!scratch_) throw std::logic_error("enqueue without device memory (user-managed)");
    for (const char* n : {"x", "t", "y", "guidance", "coef", "prev_x0", "noise", "x_next", "x0"})
      if (!addr_.count(n)) throw std::logic_error(std::string("unbound I/O tensor ") + n);
    if ((plan_.keeps && !addr_.count("feat_out")) || (plan_.reads && !addr_.count("feat")))
      throw std::logic_error("unbound kept feature");
    dev_.check_range(scratch_, scratch_needed_);
    ++stats_.enqueues_by_context[this];
    const size_t batch = static_cast<size_t>(shapes_.at("x")[0]);
    const size_t per = static_cast<size_t>(plan_.c) * plan_.h * plan_.w;
    auto a = addr_;
    const float scale = plan_.scale;
    const bool keeps = plan_.keeps, reads = plan_.reads;
    FakeDevice& dev = dev_;
    dev_.enqueue([a, batch, per, scale, keeps, reads, &dev] {
      dev.check_range(a.at("x"), batch * per * 4);
      dev.check_range(a.at("x_next"), batch * per * 4);
      if (keeps) dev.check_range(a.at("feat_out"), batch * per * 4);
      if (reads) dev.check_range(a.at("feat"), batch * per * 4);
      toy_step(static_cast<const float*>(a.at("x")), static_cast<const int64_t*>(a.at("t")),
               static_cast<const int64_t*>(a.at("y")), *static_cast<const float*>(a.at("guidance")),
               static_cast<const float*>(a.at("coef")), static_cast<const float*>(a.at("prev_x0")),
               static_cast<const float*>(a.at("noise")), scale, batch, per, static_cast<float*>(a.at("x_next")),
               static_cast<float*>(a.at("x0")), reads ? static_cast<const float*>(a.at("feat")) : nullptr,
               keeps ? static_cast<float*>(a.at("feat_out")) : nullptr);
    });
  }

 private:
  FakeDevice& dev_;
  ToyPlan plan_;
  size_t scratch_needed_;
  FakeOptions opt_;
  FakeStats& stats_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addr_;
  void* scratch_ = nullptr;
};

class FakeEngine : public StepEngine {
 public:
  FakeEngine(FakeDevice& d, ToyPlan p, size_t scratch, const FakeOptions& opt, FakeStats& s)
      : dev_(d), plan_(p), scratch_(scratch), opt_(opt), stats_(s) {}
  std::vector<EngineTensor> tensors() const override {
    std::vector<EngineTensor> t;
    for (const char* n : {"x", "t", "y", "guidance", "coef", "prev_x0", "noise"})
      t.push_back({n, true, (std::string(n) == "t" || std::string(n) == "y") ? "int64" : "float32", true});
    if (plan_.reads) t.push_back({"feat", true, "float32", true});
    t.push_back({"x_next", false, "float32", true});
    t.push_back({"x0", false, "float32", true});
    if (plan_.keeps) t.push_back({"feat_out", false, "float32", true});
    return t;
  }
  size_t scratch_bytes() const override { return scratch_; }
  std::pair<int64_t, int64_t> batch_range(const std::string&) const override { return {1, 16}; }
  std::unique_ptr<StepContext> create_context() override {
    ++stats_.contexts;
    return std::make_unique<FakeContext>(dev_, plan_, scratch_, opt_, stats_);
  }

 private:
  FakeDevice& dev_;
  ToyPlan plan_;
  size_t scratch_;
  FakeOptions opt_;
  FakeStats& stats_;
};

// The SD toy step ("TOYSD c,h,w,k,scale,[A][C]"): the U-Net step graph's I/O (export/unet_step.py's
// StepConditions: A = SDXL text_embeds + time_ids, C = a ControlNet's control_image / control_guess /
// control_scale; the guidance mode follows the context's rows, 2B = cfg, B = "embedding") with a cheap
// eps from (c_in x, t, each conditioning row) and the real 17-coefficient update (sd_sampler_update).
// tests/cpp_goldens.py's toy_unet_eps is the same function.
class FakeSdContext : public StepContext {
 public:
  FakeSdContext(FakeDevice& d, const ToyPlan& p, size_t scratch, FakeOptions opt, FakeStats& s)
      : dev_(d), plan_(p), scratch_needed_(scratch), opt_(std::move(opt)), stats_(s) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    if (name == "x" && (shape.size() != 4 || shape[0] < 1 || shape[0] > 4)) return false;
    shapes_[name] = shape;
    return true;
  }
  void set_address(const std::string& name, void* ptr) override { addr_[name] = ptr; }
  size_t scratch_needed() override { return scratch_needed_; }
  void set_scratch(void* ptr, size_t n) override {
    if (n < scratch_needed_) throw std::logic_error("scratch smaller than the engine needs");
    scratch_ = ptr;
    stats_.scratch_bindings.emplace_back(ptr, n);
  }
  bool capturable() override { return opt_.capturable; }
  void enqueue() override {
    if (!scratch_) throw std::logic_error("enqueue without device memory (user-managed)");
    for (const std::string& n : sd_toy_tensors(plan_))
      if (!addr_.count(n)) throw std::logic_error("unbound I/O tensor " + n);
    ++stats_.enqueues_by_context[this];
    const std::vector<int64_t> xs = shapes_.at("x"), cs = shapes_.at("context");
    const size_t batch = static_cast<size_t>(xs[0]), per = static_cast<size_t>(xs[1] * xs[2] * xs[3]);
    const size_t tokens = static_cast<size_t>(cs[1]), width = static_cast<size_t>(cs[2]);
    const bool cfg = static_cast<size_t>(cs[0]) == 2 * batch;
    if (!cfg && static_cast<size_t>(cs[0]) != batch) throw std::logic_error("context is neither (2B, L, D) nor (B, L, D)");
    const size_t rows = cfg ? 2 * batch : batch;
    size_t embeds = 0, image = 0;
    if (plan_.added) {
      const std::vector<int64_t> te = shapes_.at("text_embeds"), ti = shapes_.at("time_ids");
      if (te.size() != 2 || static_cast<size_t>(te[0]) != rows || ti != std::vector<int64_t>{static_cast<int64_t>(rows), 6})
        throw std::logic_error("text_embeds / time_ids are not (N, P) / (N, 6) with the context's N");
      embeds = static_cast<size_t>(te[1]);
    }
    if (plan_.control) {
      const std::vector<int64_t> ci = shapes_.at("control_image");
      if (ci.size() != 4 || static_cast<size_t>(ci[0]) != batch || ci[2] != 8 * xs[2] || ci[3] != 8 * xs[3] ||
          !shapes_.at("control_guess").empty() || !shapes_.at("control_scale").empty())
        throw std::logic_error("control_image is not (B, C, 8H, 8W) or control_guess / control_scale not scalars");
      image = static_cast<size_t>(ci[1] * ci[2] * ci[3]);
    }
    auto a = addr_;
    const float scale = plan_.scale;
    FakeDevice& dev = dev_;
    dev_.enqueue([a, batch, per, tokens, width, rows, embeds, image, cfg, scale, &dev] {
      const size_t lat = batch * per, row = tokens * width;
      for (const char* n : {"x", "prev_x0", "saved", "noise", "x_next", "x0", "saved_next"}) dev.check_range(a.at(n), lat * 4);
      for (const char* n : {"eps_hist", "eps_hist_next"}) dev.check_range(a.at(n), 3 * lat * 4);
      dev.check_range(a.at("context"), rows * row * 4);
      if (embeds) dev.check_range(a.at("text_embeds"), rows * embeds * 4), dev.check_range(a.at("time_ids"), rows * 6 * 4);
      if (image) dev.check_range(a.at("control_image"), batch * image * 4);
      auto f = [&](const char* n) { return static_cast<float*>(a.at(n)); };
      const float *x = f("x"), *t = f("t"), *ctx = f("context"), *c = f("coef"), *prev = f("prev_x0"), *hist = f("eps_hist"),
                  *saved = f("saved"), *noise = f("noise");
      const float g = *f("guidance");
      float *x_next = f("x_next"), *x0 = f("x0"), *hist_next = f("eps_hist_next"), *saved_next = f("saved_next");
      // one conditioning value per row: both ends of the context row (+ SDXL's text_embeds and time_ids)
      std::vector<float> cond(rows);
      for (size_t k = 0; k < rows; ++k) {
        cond[k] = ctx[k * row] + ctx[k * row + row - 1];
        if (embeds) {
          const float* te = f("text_embeds") + k * embeds;
          const float* ti = f("time_ids") + k * 6;
          cond[k] = cond[k] + (te[0] - te[embeds - 1]) * 0.5f + (ti[0] + ti[2] + ti[5]) * 1e-3f;
        }
      }
      enum { c_in, k_x, k_s, a0, a1, a2, a3, r, m, d0, d1, w_x, w_d, w_e, sigma, shift, save };
      for (size_t b = 0; b < batch; ++b) {
        // a ControlNet residual per item: both ends of its image, scaled; guess mode halves it and
        // (under cfg) gives the uncond half none
        float res_u = 0.0f, res_c = 0.0f;
        if (image) {
          const float* img = f("control_image") + b * image;
          const float guess = *f("control_guess"), s = *f("control_scale");
          const float res = (img[0] + img[image - 1]) * s * (1.0f - 0.5f * guess);
          res_c = res, res_u = cfg ? res * (1.0f - guess) : res;
        }
        const float tt = t[b] * 1e-3f;
        for (size_t j = 0; j < per; ++j) {
          const size_t i = b * per + j;
          const float xin = c[c_in] * x[i];
          float eps;
          if (cfg) {  // a swapped or misplaced uncond / cond half changes the result
            const float u = std::tanh(scale * xin + tt + cond[b] + res_u), v = std::tanh(scale * xin + tt + cond[batch + b] + res_c);
            eps = u + g * (v - u);
          } else {  // "embedding": the guidance enters as (g - 1), as LCM's embedding does
            eps = std::tanh(scale * xin + tt + cond[b] + res_c + (g - 1.0f) * 0.05f);
          }
          const float h0 = hist[(b * 3 + 0) * per + j], h1 = hist[(b * 3 + 1) * per + j], h2 = hist[(b * 3 + 2) * per + j];
          const float src = c[k_x] * x[i] + c[k_s] * saved[i];
          const float e = c[a0] * eps + c[a1] * h0 + c[a2] * h1 + c[a3] * h2;
          const float x0v = c[r] * src - c[m] * e;
          const float d = c[d0] * x0v + c[d1] * prev[i];
          x_next[i] = c[w_x] * src + c[w_d] * d + c[w_e] * e + c[sigma] * noise[i];
          x0[i] = x0v;
          const float p = c[shift], q = 1.0f - p;
          const float shifted[3] = {eps, h0, h1}, old[3] = {h0, h1, h2};
          for (int k = 0; k < 3; ++k) hist_next[(b * 3 + k) * per + j] = p * shifted[k] + q * old[k];
          saved_next[i] = c[save] * x[i] + (1.0f - c[save]) * saved[i];
        }
      }
    });
  }

 private:
  FakeDevice& dev_;
  ToyPlan plan_;
  size_t scratch_needed_;
  FakeOptions opt_;
  FakeStats& stats_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addr_;
  void* scratch_ = nullptr;
};

class FakeSdEngine : public StepEngine {
 public:
  FakeSdEngine(FakeDevice& d, ToyPlan p, size_t scratch, const FakeOptions& opt, FakeStats& s)
      : dev_(d), plan_(p), scratch_(scratch), opt_(opt), stats_(s) {}
  std::vector<EngineTensor> tensors() const override {
    std::vector<EngineTensor> t;
    for (const std::string& n : sd_toy_tensors(plan_))
      t.push_back({n, n != "x_next" && n != "x0" && n != "eps_hist_next" && n != "saved_next", "float32", true});
    return t;
  }
  size_t scratch_bytes() const override { return scratch_; }
  std::pair<int64_t, int64_t> batch_range(const std::string&) const override { return {1, 4}; }
  std::unique_ptr<StepContext> create_context() override {
    ++stats_.contexts;
    return std::make_unique<FakeSdContext>(dev_, plan_, scratch_, opt_, stats_);
  }

 private:
  FakeDevice& dev_;
  ToyPlan plan_;
  size_t scratch_;
  FakeOptions opt_;
  FakeStats& stats_;
};

// The SD toy text encoder ("TOYTEXT L,D,"): input_ids (N, L) int64 -> text_embeddings (N, L, D),
// emb[n, l, d] = toy_text_embedding(id, d): exact float arithmetic the tests repeat on the host.
class FakeTextContext : public StepContext {
 public:
  FakeTextContext(FakeDevice& d, int64_t width, FakeStats& s) : dev_(d), width_(width), stats_(s) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    if (name != "input_ids" || shape.size() != 2 || shape[0] < 1 || shape[0] > 8) return false;
    shape_ = shape;
    return true;
  }
  void set_address(const std::string& name, void* ptr) override { addr_[name] = ptr; }
  size_t scratch_needed() override { return 64; }
  void set_scratch(void* ptr, size_t n) override {
    if (n < 64) throw std::logic_error("scratch smaller than the engine needs");
    scratch_ = ptr;
  }
  bool capturable() override { return true; }
  void enqueue() override {
    if (!scratch_ || shape_.empty() || !addr_.count("input_ids") || !addr_.count("text_embeddings"))
      throw std::logic_error("text encoder enqueued unbound");
    ++stats_.enqueues_by_context[this];
    const size_t rows = static_cast<size_t>(shape_[0] * shape_[1]), width = static_cast<size_t>(width_);
    auto a = addr_;
    FakeDevice& dev = dev_;
    dev_.enqueue([a, rows, width, &dev] {
      dev.check_range(a.at("input_ids"), rows * 8);
      dev.check_range(a.at("text_embeddings"), rows * width * 4);
      const int64_t* ids = static_cast<const int64_t*>(a.at("input_ids"));
      float* out = static_cast<float*>(a.at("text_embeddings"));
      for (size_t i = 0; i < rows; ++i)
        for (size_t d = 0; d < width; ++d) out[i * width + d] = toy_text_embedding(ids[i], static_cast<int64_t>(d));
    });
  }

 private:
  FakeDevice& dev_;
  int64_t width_;
  FakeStats& stats_;
  std::vector<int64_t> shape_;
  std::map<std::string, void*> addr_;
  void* scratch_ = nullptr;
};

class FakeTextEngine : public StepEngine {
 public:
  FakeTextEngine(FakeDevice& d, int64_t width, FakeStats& s) : dev_(d), width_(width), stats_(s) {}
  std::vector<EngineTensor> tensors() const override {
    return {{"input_ids", true, "int64", true}, {"text_embeddings", false, "float32", true}};
  }
  size_t scratch_bytes() const override { return 64; }
  std::pair<int64_t, int64_t> batch_range(const std::string&) const override { return {2, 8}; }
  std::unique_ptr<StepContext> create_context() override { return std::make_unique<FakeTextContext>(dev_, width_, stats_); }

 private:
  FakeDevice& dev_;
  int64_t width_;
  FakeStats& stats_;
};

// The toy VAE decoder ("TOYVAE f,"): latent (B, C, h, w) -> image (B, 3, h*f, w*f) float32,
// image[b, k, Y, X] = toy_vae_pixel(latent[b, k % C, Y / f, X / f], k) (cpp_goldens.py's toy_vae).
class FakeVaeContext : public StepContext {
 public:
  FakeVaeContext(FakeDevice& d, int64_t factor, FakeStats& s) : dev_(d), factor_(factor), stats_(s) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    if (name != "latent" || shape.size() != 4 || shape[0] < 1 || shape[0] > 4) return false;
    shape_ = shape;
    return true;
  }
  void set_address(const std::string& name, void* ptr) override { addr_[name] = ptr; }
  size_t scratch_needed() override { return 32; }
  void set_scratch(void* ptr, size_t n) override {
    if (n < 32) throw std::logic_error("scratch smaller than the engine needs");
    scratch_ = ptr;
  }
  bool capturable() override { return true; }
  void enqueue() override {
    if (!scratch_ || shape_.empty() || !addr_.count("latent") || !addr_.count("image"))
      throw std::logic_error("VAE enqueued unbound");
    ++stats_.enqueues_by_context[this];
    const int64_t b = shape_[0], c = shape_[1], h = shape_[2], w = shape_[3], f = factor_;
    auto a = addr_;
    FakeDevice& dev = dev_;
    dev_.enqueue([a, b, c, h, w, f, &dev] {
      dev.check_range(a.at("latent"), static_cast<size_t>(b * c * h * w) * 4);
      dev.check_range(a.at("image"), static_cast<size_t>(b * 3 * h * f * w * f) * 4);
      const float* z = static_cast<const float*>(a.at("latent"));
      float* out = static_cast<float*>(a.at("image"));
      const int64_t H = h * f, W = w * f;
      for (int64_t i = 0; i < b; ++i)
        for (int64_t k = 0; k < 3; ++k)
          for (int64_t y = 0; y < H; ++y)
            for (int64_t x = 0; x < W; ++x)
              out[((i * 3 + k) * H + y) * W + x] = toy_vae_pixel(z[((i * c + k % c) * h + y / f) * w + x / f], k);
    });
  }

 private:
  FakeDevice& dev_;
  int64_t factor_;
  FakeStats& stats_;
  std::vector<int64_t> shape_;
  std::map<std::string, void*> addr_;
  void* scratch_ = nullptr;
};

class FakeVaeEngine : public StepEngine {
 public:
  FakeVaeEngine(FakeDevice& d, int64_t factor, FakeStats& s) : dev_(d), factor_(factor), stats_(s) {}
  std::vector<EngineTensor> tensors() const override {
    return {{"latent", true, "float32", true}, {"image", false, "float32", true}};
  }
  size_t scratch_bytes() const override { return 32; }
  std::pair<int64_t, int64_t> batch_range(const std::string&) const override { return {1, 4}; }
  std::unique_ptr<StepContext> create_context() override { return std::make_unique<FakeVaeContext>(dev_, factor_, stats_); }

 private:
  FakeDevice& dev_;
  int64_t factor_;
  FakeStats& stats_;
};

class FakeBackend : public Backend {
 public:
  FakeBackend(const FakeOptions& opt, FakeStats& s) : opt_(opt), stats_(s), dev_(opt, s) {
    if (opt.devices == 0) fail(TSTITCH_ERR_NO_DEVICE, "no NVIDIA GPU is visible (fake)");
  }
  std::string kind() const override { return "trt"; }
  RuntimeIdentity identity() const override { return {opt_.module, opt_.version, "trt"}; }
  Device& device() override { return dev_; }
  std::unique_ptr<StepEngine> load(const std::vector<char>& data, const std::string& what) override {
    const std::string text(data.begin(), data.end());
    ToyPlan p{};
    char comma;
    if (text.rfind("TOYTEXT", 0) == 0) {
      int64_t tokens = 0, width = 0;
      char sep;
      std::istringstream t(text.substr(7));
      if (!(t >> tokens >> sep >> width)) fail(TSTITCH_ERR_INCOMPATIBLE, "not a toy text encoder plan (fake)");
      return std::make_unique<FakeTextEngine>(dev_, width, stats_);
    }
    if (text.rfind("TOYVAE", 0) == 0) {
      int64_t factor = 0;
      std::istringstream t(text.substr(6));
      if (!(t >> factor) || factor < 1) fail(TSTITCH_ERR_INCOMPATIBLE, "not a toy VAE plan (fake)");
      return std::make_unique<FakeVaeEngine>(dev_, factor, stats_);
    }
    const bool sd = text.rfind("TOYSD", 0) == 0;
    std::istringstream in(text.size() > 5 ? text.substr(sd ? 5 : 3) : "");
    if (text.rfind("TOY", 0) != 0 || !(in >> p.c >> comma >> p.h >> comma >> p.w >> comma >> p.k >> comma >> p.scale))
      fail(TSTITCH_ERR_INCOMPATIBLE, opt_.module + " could not load " + what +
                                    ": IRuntime::deserializeCudaEngine: not a plan (fake); rebuild the bundle on this machine");
    if (sd) {
      std::string flags;
      std::getline(in, flags, '#');
      p.added = flags.find('A') != std::string::npos, p.control = flags.find('C') != std::string::npos;
      return std::make_unique<FakeSdEngine>(dev_, p, data.size() * opt_.scratch_per_plan_byte, opt_, stats_);
    }
    std::string flags;
    std::getline(in, flags, '#');
    p.keeps = flags.find('F') != std::string::npos, p.reads = flags.find('R') != std::string::npos;
    return std::make_unique<FakeEngine>(dev_, p, data.size() * opt_.scratch_per_plan_byte, opt_, stats_);
  }

 private:
  FakeOptions opt_;
  FakeStats& stats_;
  FakeDevice dev_;
};

}  // namespace

std::unique_ptr<Backend> make_fake_backend(const FakeOptions& opt, FakeStats& stats) {
  return std::make_unique<FakeBackend>(opt, stats);
}

BackendFactory fake_factory(const FakeOptions& opt, FakeStats& stats) {
  return [opt, &stats](const std::string&, int) { return make_fake_backend(opt, stats); };
}

void write_toy_bundle(const std::string& dir, int c, int h, int w) {
  namespace fs = std::filesystem;
  fs::create_directories(dir + "/trt");
  nlohmann::json models = nlohmann::json::array();
  const float scales[2] = {0.5f, 0.9f};
  for (int i = 0; i < 2; ++i) {
    const std::string rel = "trt/" + std::to_string(i) + "-toy.plan";
    std::ofstream(dir + "/" + rel) << "TOY" << c << "," << h << "," << w << ",11," << scales[i] << ","
                                   << std::string(64 * (i + 1), '#');
    models.push_back({{"name", i == 0 ? "Toy-S" : "Toy-L"},
                      {"family", "dit"},
                      {"arch", {{"depth", 1}, {"hidden_size", 8}, {"num_heads", 1}, {"patch_size", 1}, {"input_size", h},
                                {"in_channels", c}, {"num_classes", 10}, {"learn_sigma", false}, {"mlp_ratio", 4.0}}},
                      {"engines",
                       {{"trt",
                         {{"file", rel},
                          {"sha256", sha256_file(dir + "/" + rel)},
                          {"batch_range", {1, 16}},
                          {"builder", {{"module", "tensorrt"}, {"version", "10.13.0.35"}}}}}}}});
  }
  (void)w;
  nlohmann::json m = {{"pipeline", "dit-class-conditional"}, {"models", models},      {"num_classes", 10},
                      {"image_size", h},                     {"latent_scale_factor", 1.0}, {"guidance_channels", c},
                      {"schedule", {{"kind", "linear"}, {"num_timesteps", 1000}}},
                      {"format", "tstitch-bundle"},          {"format_version", 1}};
  std::ofstream(dir + "/manifest.json") << m.dump(2);
}

}  // namespace tstitch::testing
