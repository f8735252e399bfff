// The host as a Device: for CPU engines (OpenVINO) the stitched loop's buffers are ordinary aligned
// host memory and "stream" work runs at once. No graphs: contexts say they are not capturable, so the
// loop runs plain launches. time_ms reports the engine time the contexts record (add_engine_ms), so the
// loop's host overhead per step is its own work, not the network's.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "device.hpp"

namespace tstitch {

class HostDevice : public Device {
 public:
  ~HostDevice() override;
  std::string describe() const override { return "host (CPU)"; }
  std::pair<int, int> compute_capability() const override { return {0, 0}; }
  void* alloc(size_t nbytes, const std::string& what) override;
  void free(void* ptr) override;
  void upload(void* dst, const void* host, size_t nbytes) override;
  void copy(void* dst, const void* src, size_t nbytes) override;
  void zero(void* dst, size_t nbytes) override;
  void download(void* host, const void* src, size_t nbytes) override;
  void synchronize() override {}
  void* stream() override { return nullptr; }
  double time_ms(const std::function<void()>& enqueue) override;
  std::unique_ptr<Graph> capture(const std::function<void()>& body) override;
  void add_engine_ms(double ms) { engine_ms_ += ms; }
  void add_note(std::string note) { notes_.push_back(std::move(note)); }
  std::vector<std::string> take_notes() override { return std::exchange(notes_, {}); }

 private:
  std::set<void*> live_;  // freed on destruction: nothing leaks past the device
  double engine_ms_ = 0.0;
  std::vector<std::string> notes_;
};

}  // namespace tstitch
