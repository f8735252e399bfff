// What the stitched loop needs from a device: memory, one stream, timing, graph capture. The CUDA
// implementation is cuda_device.cpp; tests drive the same loop on a host-memory fake.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tstitch {

class Graph {
 public:
  virtual ~Graph() = default;
  virtual void launch() = 0;  // enqueue the whole captured work on the device's stream
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string describe() const = 0;
  virtual std::pair<int, int> compute_capability() const = 0;
  // Device memory; Error(TSTITCH_ERR_OUT_OF_MEMORY) when it cannot.
  virtual void* alloc(size_t nbytes, const std::string& what) = 0;
  virtual void free(void* ptr) = 0;
  // Stream-ordered copies. upload's host source must stay alive until synchronize().
  virtual void upload(void* dst, const void* host, size_t nbytes) = 0;
  virtual void copy(void* dst, const void* src, size_t nbytes) = 0;
  virtual void zero(void* dst, size_t nbytes) = 0;
  virtual void download(void* host, const void* src, size_t nbytes) = 0;  // waits for the stream
  virtual void synchronize() = 0;
  virtual void* stream() = 0;  // cudaStream_t for TensorRT's enqueueV3
  // Runs `enqueue` between two stream events and waits: the device milliseconds it took.
  virtual double time_ms(const std::function<void()>& enqueue) = 0;
  // Captures what `body` enqueues into one graph; Error(TSTITCH_ERR_RUNTIME) naming why not.
  virtual std::unique_ptr<Graph> capture(const std::function<void()>& body) = 0;
  // What the engines on this device had to say since the last call (a compiled model not cached, ...): the
  // run's notes carry them.
  virtual std::vector<std::string> take_notes() { return {}; }
};

}  // namespace tstitch
