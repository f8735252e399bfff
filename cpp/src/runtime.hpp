// A runtime on one bundle: manifest + backend (device, engines) + the stitched loop; what the C API
// handle wraps. Request checks (batch, steps, labels, sampler, stitch) happen here, before any work.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "clip_tokenizer.hpp"
#include "engine.hpp"
#include "loop.hpp"
#include "manifest.hpp"
#include "rng.hpp"
#include "text_encoder.hpp"
#include "trajectory.hpp"
#include "vae_decoder.hpp"

namespace tstitch {

struct OpenOptions {
  std::string engine = "trt";  // "trt", "openvino"; "" = auto (auto_engine)
  std::string precision;       // "" / "auto", "fp32", "bf16": CPU engines (openvino); others take auto only
  int device_index = 0;
  bool cuda_graph = true;
  bool verify_checksums = true;
};

struct SampleRequest {
  int batch = 1;
  std::vector<int64_t> class_labels;
  int steps = 50;
  double ratio = 0.5;
  std::vector<double> fractions;
  std::string sampler;  // empty: ddim (DiT), the bundle scheduler's sampler (SD)
  double eta = 0.0;
  float cfg_scale = 1.0f;
  uint64_t seed = 0;
  std::vector<float> init_noise;  // empty: drawn from seed
  std::vector<float> text_context;  // SD: (2B, tokens, width), uncond rows first
  int text_tokens = 0, text_width = 0;
  std::vector<int64_t> prompt_tokens, negative_tokens;  // SD, instead of text_context: B x token_count each
  int token_count = 0;
  std::vector<std::string> prompts, negative_prompts;  // SD, instead of token ids: UTF-8, one per image
  bool has_negative = false;                           // negative_prompts given (else "" each under cfg)
  int height = 0, width = 0;  // SD: the image size in pixels; 0: the U-Net's sample size x the VAE factor
  // Other request inputs of the step graphs by name (SDXL text_embeds (N, P), time_ids (N, 6); a ControlNet's
  // control_image (B, C, 8H, 8W) in [0, 1]), float32 row-major; N is 2B under cfg (negative rows first), B under
  // "embedding" guidance. time_ids left out: diffusers' default (height, width, 0, 0, height, width) per row.
  std::map<std::string, std::vector<float>> inputs;
  // ControlNet (diffusers' names): control_scale of U-Net call i of n = controlnet_scale x keep_i,
  // keep_i = 1 - (i / n < start or (i + 1) / n > end); guess mode feeds control_guess = 1.
  float controlnet_scale = 1.0f;
  double control_guidance_start = 0.0, control_guidance_end = 1.0;
  bool control_guess_mode = false;
  // Feature caching (pipeline/caching.py): interval N > 1 runs each model's cached step graph between its full calls
  // (sampling/cache_plan.py; bundles built with --cache-branch K or --cache-scheme fora); 1: none. cache_branch:
  // DeepCache's branch the caller expects (-1: not given), checked against the bundle's.
  int cache_interval = 1;
  int cache_branch = -1;
};

// diffusers' ControlNet keep rule: call i of n runs the ControlNet when start <= i / n and (i + 1) / n <= end.
std::vector<float> control_scale_table(int calls, float scale, double start, double end);

using BackendFactory = std::function<std::unique_ptr<Backend>(const std::string& kind, int device_index)>;

// The factory of this build: TensorRT and OpenVINO where they were compiled in, else
// Error(TSTITCH_ERR_UNAVAILABLE) saying how to build them in.
BackendFactory default_backend_factory();

// The engines this C++ runtime knows, and the manifest entry whose artifacts each runs (OpenVINO: the
// fp32 ONNX graphs of the `ort` entry, as Python's ARTIFACTS_OF says).
const std::vector<std::string>& engine_names();
std::string artifact_kind(const std::string& engine);
// What Python's `--backend auto` picks here for this bundle: TensorRT where it is built, a GPU is present
// and the bundle has its engines; else OpenVINO on the bundle's ONNX graphs; else the kind the bundle has
// (opening it then says why it cannot run).
std::string auto_engine(const Manifest& m);

class Runtime {
 public:
  Runtime(const std::string& bundle_dir, const OpenOptions& opt, const BackendFactory& factory);
  LoopResult sample(const SampleRequest& req);
  // The request's full / cached call plan (what sample() follows; Python's report["cache"]): 1 where call i runs
  // its model's cached step graph. Checks the cache fields, sampler, steps and stitch only.
  std::vector<uint8_t> cache_plan(const SampleRequest& req) const;
  const Manifest& manifest() const { return manifest_; }
  const std::string& engine() const { return engine_kind_; }
  const std::string& precision_reason() const { return precision_reason_; }
  // The prompts (and negative prompts) of the last sample() that were longer than the tokenizer's length and were cut
  // to it (as diffusers does); their notes lead LoopResult.notes, in pipeline/sd.py's words.
  int truncated_prompts() const { return truncated_prompts_; }
  // The last sample()'s notes (LoopResult.notes), one per line; "" when none.
  const std::string& last_notes() const { return last_notes_; }
  std::pair<int64_t, int64_t> batch_range() const { return batch_range_; }
  StitchedLoop& loop() { return *loop_; }
  // The decoded image of one item (H, W, C): C = 3 through the VAE; pixel-space bundles (no VAE, scale 1)
  // give the latent itself. Error(TSTITCH_ERR_UNAVAILABLE) with the reason when there is no image.
  // latent_h/latent_w: the request's latent size (latent_hw); 0: the bundle's.
  void image_shape(int* height, int* width, int* channels, int64_t latent_h = 0, int64_t latent_w = 0) const;
  // The loop's latents (batch x C x latent_h x latent_w) -> batch x H x W x C bytes (pipeline/dit.py's _decode).
  void decode_rgb(const std::vector<float>& latents, int batch, int64_t latent_h, int64_t latent_w, uint8_t* rgb);
  // The request's latent (h, w): SD height/width checked as pipeline/sd.py's validate (VAE factor,
  // U-Net downsampling, io.dim_ranges), with its messages; the manifest's latent size otherwise.
  std::pair<int64_t, int64_t> latent_hw(const SampleRequest& req) const;
  int vae_factor() const;  // image pixels per latent pixel: image_size / the latent height
  // The step graphs' request inputs besides guidance (context first), and one's shape for a request
  // of `batch` images at latent size (h, w) (symbolic dims resolved: 2B, 8H, ...).
  const std::vector<std::string>& request_input_names() const { return request_inputs_; }
  std::vector<int64_t> request_input_shape(const std::string& name, int64_t batch, int64_t latent_h, int64_t latent_w) const;
  // Rows of the text context for `batch` images: 2 x batch under cfg guidance, batch under "embedding".
  int64_t context_rows(int64_t batch) const;

 private:
  void check(const SampleRequest& req) const;
  void check_sd(const SampleRequest& req) const;
  void check_guidance(const SampleRequest& req) const;  // guidance.check_guidance (LCM's embedding)
  void check_cache(const SampleRequest& req) const;     // pipeline/caching.py's check_cache / check_dit_cache
  // The plan's full / cached calls for the request's interval (sampling/cache_plan.py).
  void plan_cache(const SampleRequest& req, TrajectoryPlan& plan) const;
  // The named request inputs (given, or made here: control_guess, default time_ids), checked one line each.
  std::map<std::string, std::vector<float>> named_inputs(const SampleRequest& req, int64_t lh, int64_t lw) const;
  TrajectoryPlan sd_plan(const SampleRequest& req, size_t latent, Pcg64& rng, float* init_sigma) const;
  std::string dir_;
  Manifest manifest_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<StitchedLoop> loop_;
  std::unique_ptr<TextEncoder> text_encoder_;    // SD 1.x's; SDXL's first (CLIP-L)
  std::unique_ptr<TextEncoder> text_encoder_2_;  // SDXL's second (OpenCLIP bigG, with the pooled text_embeds)
  std::pair<std::string, std::string> sdxl_text_paths_;  // SDXL: both encoders' artifacts (checked), loaded on first use
  std::unique_ptr<VaeDecoder> vae_;  // bundles with a VAE plan of this engine kind
  std::string engine_kind_;  // the engine running (opt.engine, auto resolved)
  std::string precision_reason_;  // one line: the precision in use and why (Backend::configure)
  SampleRequest encode_tokens(const SampleRequest& req);
  SampleRequest tokenize(const SampleRequest& req);  // prompts -> token ids (clip_tokenizer.hpp)
  SampleRequest encode_sdxl(const SampleRequest& req);  // SDXL prompts -> context + text_embeds (two encoders)
  std::unique_ptr<ClipTokenizer> tokenizer_;         // read on the first text prompt
  std::unique_ptr<ClipTokenizer> tokenizer_2_;       // SDXL's second
  std::pair<int64_t, int64_t> batch_range_{1, 1};
  LoopResult sample_encoded(const SampleRequest& req);  // sample() past the per-request notes
  std::string part_precision(const std::string& label) const;  // "" (the engine's own) where configure_parts gave none
  void note_truncated(const std::vector<std::pair<std::string, bool>>& texts, int64_t max_length);
  std::map<std::string, std::string> part_precisions_;  // "text encoder", "text encoder 2", "VAE decoder" -> precision
  int truncated_prompts_ = 0;
  std::vector<std::string> text_notes_;
  std::string last_notes_;
  std::vector<std::string> request_inputs_;  // the step graphs' request inputs but guidance, context first
};

}  // namespace tstitch
