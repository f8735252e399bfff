// What the stitched loop needs from a step engine (TensorRT in trt_engine.cpp, a toy in the tests).
// An engine exposes its I/O tensors; a context is bound ONCE per buffer allocation (addresses and
// input shapes) and then only enqueued, so a captured CUDA graph never sees a changed binding.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "compat.hpp"
#include "device.hpp"
#include "manifest.hpp"

namespace tstitch {

struct EngineTensor {
  std::string name;
  bool input = true;
  std::string dtype;  // "float32", "int64", "int32", or what the engine says (refused by the loop)
  bool on_device = true;
};

class StepContext {
 public:
  virtual ~StepContext() = default;
  // Input shapes are set before addresses; returns false when the engine refuses the shape.
  virtual bool set_input_shape(const std::string& name, const std::vector<int64_t>& shape) = 0;
  virtual void set_address(const std::string& name, void* ptr) = 0;
  virtual size_t scratch_needed() = 0;  // for the shapes set; <= the engine's size normally
  virtual void set_scratch(void* ptr, size_t nbytes) = 0;
  virtual bool capturable() = 0;  // may its enqueue be captured into a CUDA graph?
  virtual void enqueue() = 0;     // on the device's stream; Error(TSTITCH_ERR_RUNTIME) on failure
};

class StepEngine {
 public:
  virtual ~StepEngine() = default;
  virtual std::vector<EngineTensor> tensors() const = 0;
  virtual size_t scratch_bytes() const = 0;  // getDeviceMemorySizeV2
  // The batch range of `latent_input` (optimization profile 0).
  virtual std::pair<int64_t, int64_t> batch_range(const std::string& latent_input) const = 0;
  virtual std::unique_ptr<StepContext> create_context() = 0;  // with user-managed scratch
};

// One engine kind: its device and how to load an artifact (a TensorRT plan; an ONNX graph for OpenVINO).
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string kind() const = 0;  // "trt", "openvino"
  virtual RuntimeIdentity identity() const = 0;
  virtual Device& device() = 0;
  // Error(TSTITCH_ERR_INCOMPATIBLE / RUNTIME) naming `what` when the plan does not load.
  virtual std::unique_ptr<StepEngine> load(const std::vector<char>& plan, const std::string& what) = 0;
  // The artifact at `path` (checked against the manifest already) in `precision` ("": the engine's own;
  // else one of configure()'s values). Default: the file's bytes through load().
  virtual std::unique_ptr<StepEngine> load_file(const std::string& path, const std::string& what, const std::string& precision);
  // Called once per bundle before any load: the backend prepares for it (OpenVINO: its model cache) and
  // returns each stitched model's precision for the caller's request ("" = auto). Default (engines with
  // their own precision): auto only, "" per model; Error(TSTITCH_ERR_INVALID_ARGUMENT) otherwise.
  virtual std::vector<std::string> configure(const Manifest& m, const std::string& requested, std::string* why);
  // The same choice for the parts outside the loop (pipeline/precision.py's aux_precisions: the text encoder(s) and
  // the VAE decoder, each by its own verdict), after configure(); *why: one line, empty where the engines have their
  // own precision. Default: "" per part (the engine's own), *why empty.
  virtual std::vector<std::string> configure_parts(const std::vector<std::pair<std::string, nlohmann::json>>& parts,
                                                   const std::string& requested, std::string* why);
  // Error(TSTITCH_ERR_INCOMPATIBLE) when what the builder recorded cannot run here. Default: compat.hpp's
  // TensorRT rules against identity() and the device's compute capability.
  virtual void check_compat(const nlohmann::json& builder, const std::string& what);
};

}  // namespace tstitch
