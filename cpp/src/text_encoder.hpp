// A text encoder engine (pipeline/text_encoder.py): token ids (N, L) int64 -> its outputs, float32 with N
// rows each: SD 1.x and SDXL's first encoder: text_embeddings (N, L, D); SDXL's second (OpenCLIP bigG) also
// the pooled, projected text_embeds (N, P). Run once per request before the loop. Its buffers and scratch
// live only for the call (it runs once; the loop's buffers are untouched).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"
#include "manifest.hpp"

namespace tstitch {

constexpr const char* kTextOutput = "text_embeddings";  // = export.unet_export.TEXT_OUTPUT
constexpr const char* kPooledOutput = "text_embeds";     // SDXL's text_encoder_2: the pooled projection

struct TextOutput {
  std::vector<float> values;
  std::vector<int64_t> dims;  // (N, L, D) or (N, P)
};

class TextEncoder {
 public:
  // io: the manifest entry's io (text_encoder.io / text_encoder_2.io): one int64 (N, L) input, a float32
  // text_embeddings (N, L, D) output, and any more float32 outputs of N rows (text_embeds (N, P)).
  // label names it in messages ("text encoder", "text encoder 2").
  TextEncoder(const std::vector<TensorSpec>& io, Device& device, std::unique_ptr<StepEngine> engine,
              std::string label = "text encoder");
  // ids: n rows of `tokens` ids; returns n * tokens * width floats of text_embeddings; *width set from the output.
  std::vector<float> encode(const std::vector<int64_t>& ids, int64_t n, int64_t tokens, int64_t* width);
  // Every output of the io, by name, from one run.
  std::map<std::string, TextOutput> encode_all(const std::vector<int64_t>& ids, int64_t n, int64_t tokens);
  bool has_output(const std::string& name) const;

 private:
  Device& device_;
  std::unique_ptr<StepEngine> engine_;
  std::string label_;
  TensorSpec input_;
  std::vector<TensorSpec> outputs_;
};

}  // namespace tstitch
