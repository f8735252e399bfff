// The OpenVINO step engine (runtime/openvino_backend.py in C++): the bundle's fp32 ONNX graphs (the
// artifacts the `ort` entry records) on the CPU, on host buffers (host_device.hpp). As in Python:
// every graph is compiled for the shapes in use (static shapes: faster than the dynamic graph), with
// PERFORMANCE_HINT LATENCY, INFERENCE_PRECISION_HINT f32 or bf16 (precision.hpp decides which; in bf16 the
// numerically sensitive nodes are marked to stay fp32 first, openvino_bf16.hpp), threads
// from TSTITCH_OPENVINO_THREADS, and OpenVINO's model cache in the directory Python uses (outside the
// bundle, keyed by the step graphs' checksums). A context's infer request is bound ONCE per buffer
// allocation (ov::Tensor views of the loop's buffers), so a step is only infer(): no copies.
#include <openvino/core/version.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/openvino.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "disk_reserve.hpp"
#include "engine.hpp"
#include "errors.hpp"
#include "host_device.hpp"
#include "openvino_bf16.hpp"
#include "precision.hpp"

namespace tstitch {
namespace {

std::string first_line(const std::string& s) {
  std::string t = s;
  while (!t.empty() && (t.front() == '\n' || t.front() == ' ')) t.erase(t.begin());
  t = t.substr(0, t.find('\n'));
  return t.size() > 240 ? t.substr(0, 240) + "..." : t;
}

std::string dtype_name(const ov::element::Type& t) {
  if (t == ov::element::f32) return "float32";
  if (t == ov::element::i64) return "int64";
  if (t == ov::element::i32) return "int32";
  if (t == ov::element::f16) return "float16";
  if (t == ov::element::bf16) return "bfloat16";
  return "another dtype (" + t.get_type_name() + ")";
}

// The graph's own name of a port: a port can carry several (the ONNX frontend may merge an input with an
// internal tensor such as /clip/Reshape_output_0): the graph's I/O names are the ones without a '/'.
template <typename Port>
std::string port_name(const Port& port) {
  for (const std::string& n : port.get_names())
    if (n.find('/') == std::string::npos) return n;
  return port.get_any_name();
}

// What the caller bound under any of the port's names, or end().
template <typename Port, typename Map>
auto find_bound(const Port& port, Map& bound) {
  for (const std::string& n : port.get_names()) {
    auto it = bound.find(n);
    if (it != bound.end()) return it;
  }
  return bound.end();
}

template <typename F>
auto ov_call(const std::string& what, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail(TSTITCH_ERR_RUNTIME, "OpenVINO failed " + what + ": " + first_line(e.what()));
  }
}

// Python's model_cache_dir root (the digest is added per bundle).
std::filesystem::path cache_root() {
  if (const char* r = std::getenv("TSTITCH_OPENVINO_CACHE"); r && *r) return r;
  std::filesystem::path base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) base = x;
  else if (const char* h = std::getenv("HOME"); h && *h) base = std::filesystem::path(h) / ".cache";
  else return {};
  return base / "tstitch-trt" / "openvino";
}

class OvEngine;

class OvContext : public StepContext {
 public:
  OvContext(OvEngine& engine, HostDevice& dev) : engine_(engine), dev_(dev) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override;
  void set_address(const std::string& name, void* ptr) override {
    addrs_[name] = ptr;
    bound_ = false;
  }
  size_t scratch_needed() override {  // the last call before enqueue: compile and bind here, not in the first step
    if (!bound_) bind();
    return 0;
  }
  void set_scratch(void*, size_t) override {}  // OpenVINO keeps its own activations per compiled model
  bool capturable() override { return false; }
  void enqueue() override;

 private:
  void bind();
  OvEngine& engine_;
  HostDevice& dev_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addrs_;
  ov::InferRequest request_;
  bool bound_ = false;
};

class OvEngine : public StepEngine {
 public:
  OvEngine(ov::Core& core, std::shared_ptr<ov::Model> model, std::string precision, int threads, HostDevice& dev,
           std::string what, std::string cache_dir)
      : core_(core), model_(std::move(model)), precision_(std::move(precision)), threads_(threads), dev_(dev),
        what_(std::move(what)), cache_dir_(std::move(cache_dir)) {}
  std::vector<EngineTensor> tensors() const override {
    std::vector<EngineTensor> out;
    for (const auto& p : std::as_const(*model_).inputs()) out.push_back({port_name(p), true, dtype_name(p.get_element_type()), true});
    for (const auto& p : std::as_const(*model_).outputs()) out.push_back({port_name(p), false, dtype_name(p.get_element_type()), true});
    return out;
  }
  size_t scratch_bytes() const override { return 0; }
  std::pair<int64_t, int64_t> batch_range(const std::string& latent) const override {
    for (const auto& p : std::as_const(*model_).inputs()) {
      if (!p.get_names().count(latent)) continue;
      const ov::PartialShape& s = p.get_partial_shape();
      if (s.rank().is_dynamic() || s.size() < 1) break;
      const ov::Dimension& d = s[0];
      const int64_t hi = d.get_max_length() < 0 ? INT64_MAX : d.get_max_length();
      return {std::max<int64_t>(1, d.get_min_length()), hi};
    }
    return {1, INT64_MAX};
  }
  std::unique_ptr<StepContext> create_context() override { return std::make_unique<OvContext>(*this, dev_); }

  // The graph's input shape, or nullptr when it has no such input.
  const ov::PartialShape* input_shape(const std::string& name) const {
    for (const auto& p : std::as_const(*model_).inputs())
      if (p.get_names().count(name)) return &p.get_partial_shape();
    return nullptr;
  }
  // The graph compiled for these input shapes (static), shared by every context of this engine.
  ov::CompiledModel& compiled_for(const std::map<std::string, std::vector<int64_t>>& shapes) {
    std::string key;
    for (const auto& [n, s] : shapes) {
      key += n + ":";
      for (int64_t d : s) key += std::to_string(d) + ",";
      key += ";";
    }
    auto it = compiled_.find(key);
    if (it != compiled_.end()) return it->second;
    if (compiled_.size() >= 4) compiled_.clear();  // a few shapes at a time (both parities, text encoder rows)
    return compiled_[key] = ov_call("to compile " + what_, [&] {
             std::shared_ptr<ov::Model> s = model_->clone();
             std::map<ov::Output<ov::Node>, ov::PartialShape> static_shapes;
             for (const auto& p : s->inputs()) {
               auto given = find_bound(p, shapes);
               if (given == shapes.end()) fail(TSTITCH_ERR_INTERNAL, what_ + ": no shape set for input " + port_name(p));
               static_shapes[p] = ov::PartialShape(std::vector<ov::Dimension>(given->second.begin(), given->second.end()));
             }
             s->reshape(static_shapes);
             if (precision_ == "bf16") mark_for_bf16(s);  // bf16 only in the matmul/conv body, as Python
             ov::AnyMap config = {ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY),
                                  ov::hint::inference_precision(precision_ == "bf16" ? ov::element::bf16 : ov::element::f32)};
             if (threads_ > 0) config.emplace(ov::inference_num_threads(threads_));
             const std::string refusal = blob_refusal_for(*s);
             if (refusal.empty()) return core_.compile_model(s, "CPU", config);
             dev_.add_note(refusal);
             core_.set_property(ov::cache_dir(""));  // this compile only: its blob would eat the disk's reserve
             struct Restore {
               ov::Core& core;
               const std::string& dir;
               ~Restore() {
                 try {
                   core.set_property(ov::cache_dir(dir));
                 } catch (...) {  // the cache stays off for this runtime: compile time, never a wrong result
                 }
               }
             } restore{core_, cache_dir_};
             return core_.compile_model(s, "CPU", config);
           });
  }
  const std::string& what() const { return what_; }

 private:
  // Why this graph's compiled blob is not written into the model cache ("" = it is, or there is no cache). OpenVINO's
  // cache key is its own, so a blob already cached for this graph is not imported while the disk is under its
  // reserve: the graph is compiled instead (Python, which keys its blobs itself, imports it).
  std::string blob_refusal_for(const ov::Model& m) const {
    if (cache_dir_.empty()) return "";
    uint64_t weights = 0;  // about the blob's size, as Python's weight_bytes
    for (const auto& op : m.get_ops())
      if (auto c = std::dynamic_pointer_cast<ov::op::v0::Constant>(op)) weights += c->get_byte_size();
    std::error_code ec;
    const std::filesystem::space_info space = std::filesystem::space(cache_dir_, ec);
    return ec ? "" : blob_refusal(cache_dir_, weights, space.available, space.capacity);
  }

  ov::Core& core_;
  std::shared_ptr<ov::Model> model_;
  std::string precision_;
  int threads_;
  HostDevice& dev_;
  std::string what_;
  std::string cache_dir_;  // the model cache OpenVINO writes into ("" = none)
  std::map<std::string, ov::CompiledModel> compiled_;
};

bool OvContext::set_input_shape(const std::string& name, const std::vector<int64_t>& shape) {
  const ov::PartialShape* s = engine_.input_shape(name);
  if (s == nullptr) return false;
  ov::PartialShape want(std::vector<ov::Dimension>(shape.begin(), shape.end()));
  if (!s->compatible(want)) return false;
  shapes_[name] = shape;
  bound_ = false;
  return true;
}

void OvContext::bind() {
  ov::CompiledModel& compiled = engine_.compiled_for(shapes_);
  ov_call("to bind the buffers of " + engine_.what(), [&] {
    request_ = compiled.create_infer_request();
    for (const auto& p : compiled.inputs()) {
      auto a = find_bound(p, addrs_);
      if (a == addrs_.end()) fail(TSTITCH_ERR_INTERNAL, engine_.what() + ": no buffer bound for input " + port_name(p));
      request_.set_tensor(p, ov::Tensor(p.get_element_type(), p.get_shape(), a->second));
    }
    for (const auto& p : compiled.outputs()) {
      auto a = find_bound(p, addrs_);
      if (a == addrs_.end()) fail(TSTITCH_ERR_INTERNAL, engine_.what() + ": no buffer bound for output " + port_name(p));
      request_.set_tensor(p, ov::Tensor(p.get_element_type(), p.get_shape(), a->second));
    }
    return 0;
  });
  bound_ = true;
}

void OvContext::enqueue() {
  if (!bound_) bind();
  const auto t0 = std::chrono::steady_clock::now();
  ov_call("to run " + engine_.what(), [&] {
    request_.infer();
    return 0;
  });
  dev_.add_engine_ms(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

class OvBackend : public Backend {
 public:
  OvBackend() {
    ov_call("to start", [&] {
      const auto caps = core_.get_property("CPU", ov::device::capabilities);
      native_bf16_ = std::find(caps.begin(), caps.end(), "BF16") != caps.end();
      return 0;
    });
    if (const char* t = std::getenv("TSTITCH_OPENVINO_THREADS"); t && *t) threads_ = std::atoi(t);
  }
  std::string kind() const override { return "openvino"; }
  RuntimeIdentity identity() const override { return {"openvino", ov::get_openvino_version().buildNumber, "openvino"}; }
  Device& device() override { return device_; }
  void check_compat(const nlohmann::json&, const std::string&) override {}  // ONNX runs anywhere; read_model says if not

  std::vector<std::string> configure(const Manifest& m, const std::string& requested, std::string* why) override {
    // Python's model_cache_dir: sha256 of the step graphs' checksums, first 16 hex digits
    std::string sums;
    for (const ModelEntry& e : m.models) sums += e.engines.at("ort").artifact.sha256;
    const std::filesystem::path root = cache_root();
    if (!root.empty()) {
      const std::filesystem::path dir = root / sha256_bytes(sums.data(), sums.size()).substr(0, 16);
      std::error_code ec;
      std::filesystem::create_directories(dir, ec);
      if (!ec) ov_call("to set its model cache", [&] {
        core_.set_property(ov::cache_dir(dir.string()));
        cache_dir_ = dir.string();
        return 0;
      });
      // an unwritable cache only costs compile time, as in Python
    }
    return resolve_cpu_precisions(m, requested, native_bf16_, cpu_bf16_isa(), why);
  }

  std::vector<std::string> configure_parts(const std::vector<PartVerdict>& parts, const std::string& requested,
                                           std::string* why) override {
    return choose_cpu_precisions(parts, requested, native_bf16_, cpu_bf16_isa(), why);
  }

  std::unique_ptr<StepEngine> load(const std::vector<char>& plan, const std::string& what) override {
    std::shared_ptr<ov::Model> model = ov_call("to read " + what, [&] {
      return core_.read_model(std::string(plan.begin(), plan.end()), ov::Tensor());
    });
    return std::make_unique<OvEngine>(core_, model, "fp32", threads_, device_, what, cache_dir_);
  }
  std::unique_ptr<StepEngine> load_file(const std::string& path, const std::string& what, const std::string& precision) override {
    std::shared_ptr<ov::Model> model;
    try {
      model = core_.read_model(path);  // from the path: ONNX external data beside the graph is found
    } catch (const std::exception& e) {
      fail(TSTITCH_ERR_INCOMPATIBLE, "OpenVINO " + std::string(ov::get_openvino_version().buildNumber) + " cannot read " + what +
                                         ": " + first_line(e.what()) + "; rebuild the bundle or upgrade OpenVINO");
    }
    return std::make_unique<OvEngine>(core_, model, precision.empty() ? "fp32" : precision, threads_, device_, what,
                                      cache_dir_);
  }

 private:
  HostDevice device_;  // declared first: freed after every engine (engines live in the Runtime, destroyed before)
  ov::Core core_;
  bool native_bf16_ = false;
  int threads_ = 0;
  std::string cache_dir_;  // this bundle's model cache ("" = none)
};

}  // namespace

std::unique_ptr<Backend> make_openvino_backend() {
  try {
    return std::make_unique<OvBackend>();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail(TSTITCH_ERR_RUNTIME, "OpenVINO could not start: " + first_line(e.what()));
  }
}

}  // namespace tstitch
