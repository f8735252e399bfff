// The SD text encoder engine (pipeline/text_encoder.py): token ids (N, L) int64 -> embeddings
// (N, L, D) float32, run once per request before the loop. Its buffers and scratch live only for
// the call (it runs once; the loop's buffers are untouched).
#pragma once

#include <memory>
#include <vector>

#include "engine.hpp"
#include "manifest.hpp"

namespace tstitch {

class TextEncoder {
 public:
  // The manifest's text_encoder.io names the engine's one input and one output.
  TextEncoder(const Manifest& m, Device& device, std::unique_ptr<StepEngine> engine);
  // ids: n rows of `tokens` ids; returns n * tokens * width floats; *width set from the output.
  std::vector<float> encode(const std::vector<int64_t>& ids, int64_t n, int64_t tokens, int64_t* width);

 private:
  Device& device_;
  std::unique_ptr<StepEngine> engine_;
  TensorSpec input_, output_;
};

}  // namespace tstitch
