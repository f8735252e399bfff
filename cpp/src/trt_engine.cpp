// The TensorRT step engine: deserialize (after the manifest's checksum and compatibility checks),
// contexts with user-managed scratch (the loop hands every context ONE shared allocation), tensor
// addresses and shapes bound once per buffer allocation, enqueueV3 on the device's stream.
// Compiles against TensorRT 10.x and 11.x headers (strongly typed engines; V2 memory APIs).
#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_device.hpp"
#include "engine.hpp"
#include "errors.hpp"

namespace tstitch {
namespace {

using namespace nvinfer1;

// Keeps TensorRT's last error, so a failed load or enqueue can say why.
class CollectingLogger : public ILogger {
 public:
  void log(Severity severity, AsciiChar const* msg) noexcept override {
    if (severity == Severity::kINTERNAL_ERROR || severity == Severity::kERROR) {
      std::lock_guard<std::mutex> lock(mutex_);
      last_ = msg ? msg : "";
    }
  }
  std::string last(const std::string& fallback = "no error message from TensorRT") {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_.empty() ? fallback : last_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    last_.clear();
  }

 private:
  std::mutex mutex_;
  std::string last_;
};

std::string dtype_name(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kINT64: return "int64";
    case DataType::kINT32: return "int32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    default: return "another dtype (" + std::to_string(static_cast<int>(t)) + ")";
  }
}

// The running library's version with the headers' build number when they are the same release:
// what the Python builder records as tensorrt.__version__ ("10.13.0.35").
std::string library_version() {
  const int32_t v = getInferLibVersion();
  const int major = v / 10000, minor = (v / 100) % 100, patch = v % 100;
  std::string s = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  if (major == NV_TENSORRT_MAJOR && minor == NV_TENSORRT_MINOR && patch == NV_TENSORRT_PATCH)
    s += "." + std::to_string(NV_TENSORRT_BUILD);
  return s;
}

class TrtContext : public StepContext {
 public:
  TrtContext(std::unique_ptr<IExecutionContext> ctx, CollectingLogger& log, Device& dev, std::string model)
      : ctx_(std::move(ctx)), log_(log), dev_(dev), model_(std::move(model)) {}
  bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
    return ctx_->setInputShape(name.c_str(), d);
  }
  void set_address(const std::string& name, void* ptr) override {
    if (!ctx_->setTensorAddress(name.c_str(), ptr))
      fail(TSTITCH_ERR_RUNTIME, "TensorRT refused the address of " + name + " (" + model_ + "): " + log_.last());
  }
  size_t scratch_needed() override { return ctx_->updateDeviceMemorySizeForShapes(); }
  void set_scratch(void* ptr, size_t nbytes) override { ctx_->setDeviceMemoryV2(ptr, static_cast<int64_t>(nbytes)); }
  bool capturable() override { return true; }  // TensorRT has no query; a failed capture falls back with a note
  void enqueue() override {
    if (!ctx_->enqueueV3(static_cast<cudaStream_t>(dev_.stream())))
      fail(TSTITCH_ERR_RUNTIME, "TensorRT enqueue failed on " + model_ + ": " + log_.last());
  }

 private:
  std::unique_ptr<IExecutionContext> ctx_;
  CollectingLogger& log_;
  Device& dev_;
  std::string model_;
};

class TrtEngine : public StepEngine {
 public:
  TrtEngine(std::unique_ptr<ICudaEngine> e, CollectingLogger& log, Device& dev, std::string what)
      : engine_(std::move(e)), log_(log), dev_(dev), what_(std::move(what)) {}
  std::vector<EngineTensor> tensors() const override {
    std::vector<EngineTensor> out;
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* n = engine_->getIOTensorName(i);
      out.push_back({n, engine_->getTensorIOMode(n) == TensorIOMode::kINPUT, dtype_name(engine_->getTensorDataType(n)),
                     engine_->getTensorLocation(n) == TensorLocation::kDEVICE});
    }
    return out;
  }
  size_t scratch_bytes() const override {
    const int64_t n = engine_->getDeviceMemorySizeV2();
    return n > 0 ? static_cast<size_t>(n) : 0;
  }
  std::pair<int64_t, int64_t> batch_range(const std::string& latent) const override {
    const Dims lo = engine_->getProfileShape(latent.c_str(), 0, OptProfileSelector::kMIN);
    const Dims hi = engine_->getProfileShape(latent.c_str(), 0, OptProfileSelector::kMAX);
    if (lo.nbDims < 1 || hi.nbDims < 1) {  // a static engine: its batch is the build shape
      const Dims d = engine_->getTensorShape(latent.c_str());
      return {d.nbDims > 0 ? d.d[0] : 1, d.nbDims > 0 ? d.d[0] : 1};
    }
    return {lo.d[0], hi.d[0]};
  }
  std::unique_ptr<StepContext> create_context() override {
    std::unique_ptr<IExecutionContext> ctx(
        engine_->createExecutionContext(ExecutionContextAllocationStrategy::kUSER_MANAGED));
    if (!ctx) fail(TSTITCH_ERR_RUNTIME, "TensorRT could not create an execution context for " + what_ + ": " + log_.last());
    return std::make_unique<TrtContext>(std::move(ctx), log_, dev_, what_);
  }

 private:
  std::unique_ptr<ICudaEngine> engine_;
  CollectingLogger& log_;
  Device& dev_;
  std::string what_;
};

class TrtBackend : public Backend {
 public:
  TrtBackend(const std::string& kind, int device_index) : kind_(kind), device_(make_cuda_device(device_index)) {
    runtime_.reset(createInferRuntime(logger_));
    if (!runtime_) fail(TSTITCH_ERR_RUNTIME, "TensorRT could not create a runtime: " + logger_.last());
  }
  std::string kind() const override { return kind_; }
  RuntimeIdentity identity() const override { return {"tensorrt", library_version(), kind_}; }
  Device& device() override { return *device_; }
  std::unique_ptr<StepEngine> load(const std::vector<char>& plan, const std::string& what) override {
    logger_.clear();
    std::unique_ptr<ICudaEngine> e(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!e)
      fail(TSTITCH_ERR_INCOMPATIBLE, "tensorrt could not load " + what + ": " + logger_.last() +
                                         "; rebuild the bundle on this machine (`tstitch-trt build --backend " + kind_ + "`)");
    return std::make_unique<TrtEngine>(std::move(e), logger_, *device_, what);
  }

 private:
  std::string kind_;
  CollectingLogger logger_;
  std::unique_ptr<Device> device_;
  std::unique_ptr<IRuntime> runtime_;
};

}  // namespace

std::unique_ptr<Backend> make_trt_backend(const std::string& kind, int device_index) {
  return std::make_unique<TrtBackend>(kind, device_index);
}

}  // namespace tstitch
