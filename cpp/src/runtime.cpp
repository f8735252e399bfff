#include "runtime.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <tuple>

#include "errors.hpp"
#include "pyrepr.hpp"
#include "sampling.hpp"
#include "sd_samplers.hpp"

namespace tstitch {

#ifdef TSTITCH_WITH_TENSORRT
std::unique_ptr<Backend> make_trt_backend(const std::string& kind, int device_index);  // trt_engine.cpp
#endif
#ifdef TSTITCH_WITH_OPENVINO
std::unique_ptr<Backend> make_openvino_backend();  // openvino_engine.cpp
#endif
#ifdef TSTITCH_WITH_CUDA
int cuda_device_count();  // cuda_device.cpp
#endif

const std::vector<std::string>& engine_names() {
  static const std::vector<std::string> names = {"openvino", "trt"};
  return names;
}

std::string artifact_kind(const std::string& engine) { return engine == "openvino" ? "ort" : engine; }

std::string auto_engine(const Manifest& m) {
  auto has = [&](const std::string& kind) {
    return std::all_of(m.models.begin(), m.models.end(), [&](const ModelEntry& e) { return e.engines.count(kind) > 0; });
  };
#if defined(TSTITCH_WITH_TENSORRT) && defined(TSTITCH_WITH_CUDA)
  if (has("trt") && cuda_device_count() > 0) return "trt";
#endif
#ifdef TSTITCH_WITH_OPENVINO
  if (has("ort")) return "openvino";
#endif
  if (has("trt")) return "trt";
  return has("ort") ? "openvino" : "trt";
}

BackendFactory default_backend_factory() {
  return [](const std::string& kind, int device_index) -> std::unique_ptr<Backend> {
    (void)device_index;
    if (kind == "trt") {
#ifdef TSTITCH_WITH_TENSORRT
      return make_trt_backend(kind, device_index);
#else
      fail(TSTITCH_ERR_UNAVAILABLE, "this tstitch library was built without TensorRT (no NvInfer.h at configure "
                                    "time); rebuild it with -DTensorRT_ROOT=<TensorRT dir>, or use the openvino engine");
#endif
    }
    if (kind == "openvino") {
#ifdef TSTITCH_WITH_OPENVINO
      return make_openvino_backend();
#else
      fail(TSTITCH_ERR_UNAVAILABLE, "this tstitch library was built without OpenVINO (not found at configure time); rebuild "
                                    "it with -DOpenVINO_DIR=$(python -c \"import openvino.utils as u; print(u.get_cmake_path())\")");
#endif
    }
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "engine kind '" + kind + "' is not one this C++ runtime runs; use openvino or trt");
  };
}

Runtime::Runtime(const std::string& bundle_dir, const OpenOptions& given, const BackendFactory& factory)
    : dir_(bundle_dir), manifest_(read_manifest(bundle_dir)) {
  OpenOptions opt = given;
  if (opt.engine.empty()) opt.engine = auto_engine(manifest_);
  const auto& known = engine_names();
  if (std::find(known.begin(), known.end(), opt.engine) == known.end())
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "unknown engine '" + opt.engine + "'; choose openvino or trt (NULL: auto)");
  const std::string art = artifact_kind(opt.engine);  // the manifest entry whose files this engine runs
  // Every file is checked (sealed path, presence, sha256) before any device work: a tampered
  // bundle is refused the same way with or without a GPU.
  std::vector<std::string> paths;
  for (const ModelEntry& m : manifest_.models) {
    auto it = m.engines.find(art);
    if (it == m.engines.end())
      fail(TSTITCH_ERR_BUNDLE, "the bundle has no " + art + " engine for " + m.name + "; rebuild it with --backend " + art);
    paths.push_back(artifact_path(dir_, it->second, opt.verify_checksums));
  }
  // Feature caching (DeepCache, FORA): each model's cached step graph beside its full one (the manifest holds that
  // every model has one of each kind it has a full graph of), checked with the rest
  std::vector<std::string> cached_paths;
  for (const ModelEntry& m : manifest_.models)
    if (m.has_cached) {
      auto it = m.cached_engines.find(art);
      if (it == m.cached_engines.end())
        fail(TSTITCH_ERR_BUNDLE, "the bundle has no cached " + art + " step graph for " + m.name + "; rebuild the bundle");
      cached_paths.push_back(artifact_path(dir_, it->second, opt.verify_checksums));
    }
  std::string text_path;  // the SD text encoder's plan, checked with the rest
  auto te = manifest_.text_encoder_engines.find(art);
  if (te != manifest_.text_encoder_engines.end()) text_path = artifact_path(dir_, te->second, opt.verify_checksums);
  std::string vae_path;  // the VAE decoder's plan, likewise
  auto ve = manifest_.vae_engines.find(art);
  if (ve != manifest_.vae_engines.end()) vae_path = artifact_path(dir_, ve->second, opt.verify_checksums);
  for (const TokenizerEntry* t : {&manifest_.tokenizer, &manifest_.tokenizer_2})
    if (t->present) artifact_path(dir_, t->file, opt.verify_checksums);  // a changed tokenizer is refused at open
  std::string text_2_path;  // SDXL's second (OpenCLIP bigG) text encoder, likewise
  auto te2 = manifest_.text_encoder_2_engines.find(art);
  if (te2 != manifest_.text_encoder_2_engines.end()) text_2_path = artifact_path(dir_, te2->second, opt.verify_checksums);
  // a ControlNet's own artifact of this kind: checked like the rest (the ControlNet runs inside the step graphs)
  auto cn = manifest_.conditioning.controlnet_engines.find(art);
  if (cn != manifest_.conditioning.controlnet_engines.end()) artifact_path(dir_, cn->second, opt.verify_checksums);
  engine_kind_ = opt.engine;
  batch_range_ = {1, INT64_MAX};
  for (const ModelEntry& m : manifest_.models) {
    const EngineEntry& e = m.engines.at(art);
    batch_range_.first = std::max(batch_range_.first, e.batch_min);
    batch_range_.second = std::min(batch_range_.second, e.batch_max);
  }
  backend_ = factory(opt.engine, opt.device_index);  // no GPU -> TSTITCH_ERR_NO_DEVICE
  const std::vector<std::string> precisions = backend_->configure(manifest_, opt.precision, &precision_reason_);
  if (manifest_.text_to_image() && !manifest_.aux_bf16.empty()) {
    // pipeline/precision.py's aux_precisions: the text encoder(s) and the VAE, each by its own verdict (a DiT's VAE
    // decodes in fp32, as pipeline/dit.py's)
    std::string why;
    const std::vector<std::string> aux = backend_->configure_parts(manifest_.aux_bf16, opt.precision, &why);
    for (size_t i = 0; i < aux.size(); ++i) part_precisions_[manifest_.aux_bf16[i].first] = aux[i];
    if (!why.empty()) precision_reason_ += "; text encoders, VAE: " + why;
  }
  auto load = [&](const EngineEntry& entry, const std::string& path, const std::string& what, const std::string& precision) {
    backend_->check_compat(entry.builder, what);
    return backend_->load_file(path, what, precision);
  };
  std::vector<std::unique_ptr<StepEngine>> engines;
  for (size_t i = 0; i < manifest_.models.size(); ++i) {
    const ModelEntry& m = manifest_.models[i];
    const std::string what = "the " + opt.engine + " engine of " + m.name + " (" +
                             std::filesystem::path(paths[i]).filename().string() + ")";
    engines.push_back(load(m.engines.at(art), paths[i], what, precisions.at(i)));
  }
  std::vector<std::unique_ptr<StepEngine>> cached;  // in the model's precision, as Python compiles them
  for (size_t i = 0; i < cached_paths.size(); ++i) {
    const ModelEntry& m = manifest_.models[i];
    const std::string what = "the cached " + opt.engine + " engine of " + m.name + " (" +
                             std::filesystem::path(cached_paths[i]).filename().string() + ")";
    cached.push_back(load(m.cached_engines.at(art), cached_paths[i], what, precisions.at(i)));
  }
  // cuda_graph is TensorRT's (tstitch.h): OpenVINO's host engine has no graph to capture, and no note says otherwise
  loop_ = std::make_unique<StitchedLoop>(manifest_, backend_->device(), std::move(engines),
                                         opt.cuda_graph && opt.engine != "openvino", std::move(cached));
  for (const Binding& b : loop_->bindings())
    if (b.role == Role::kRequest && b.source != "guidance") request_inputs_.push_back(b.spec.name);
  // the text encoder and the VAE in their own precision (part_precisions_), as pipeline/sd.py runs them
  if (!text_path.empty() && manifest_.pipeline != "sdxl") {
    const std::string what = "the " + opt.engine + " text encoder engine (" + std::filesystem::path(text_path).filename().string() + ")";
    text_encoder_ = std::make_unique<TextEncoder>(manifest_.text_encoder_io, backend_->device(), load(te->second, text_path, what, part_precision("text encoder")));
  }
  // SDXL: both encoders are loaded on the first prompt given as text (encode_sdxl); a caller passing text_context
  // and text_embeds never needs them
  if (manifest_.pipeline == "sdxl") sdxl_text_paths_ = {text_path, text_2_path};
  if (!vae_path.empty()) {
    const std::string what = "the " + opt.engine + " VAE decoder engine (" + std::filesystem::path(vae_path).filename().string() + ")";
    const int factor = manifest_.height() > 0 ? manifest_.image_size / manifest_.height() : 0;
    vae_ = std::make_unique<VaeDecoder>(backend_->device(), load(ve->second, vae_path, what, part_precision("VAE decoder")),
                                        factor);
  }
}

int Runtime::vae_factor() const { return manifest_.height() > 0 ? manifest_.image_size / manifest_.height() : 1; }

std::pair<int64_t, int64_t> Runtime::latent_hw(const SampleRequest& req) const {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  if (!manifest_.text_to_image()) {
    if (req.height != 0 || req.width != 0)
      bad("request.height and width are for SD bundles; leave them 0 (this bundle samples at " +
          std::to_string(manifest_.image_size) + "x" + std::to_string(manifest_.image_size) + ")");
    return {manifest_.height(), manifest_.width()};
  }
  const int64_t f = vae_factor();
  const int64_t height = req.height != 0 ? req.height : manifest_.height() * f;
  const int64_t width = req.width != 0 ? req.width : manifest_.width() * f;
  for (auto [name, v] : {std::pair{"height", height}, std::pair{"width", width}})
    if (v <= 0 || v % f) bad(std::string(name) + " " + std::to_string(v) + " is not a positive multiple of the VAE factor " + std::to_string(f));
  int64_t unet_down = 1;  // pipeline/sd.py's _unet_down_factor: 2^(len(block_out_channels) - 1)
  for (const ModelEntry& m : manifest_.models) {
    const size_t levels = m.arch.contains("block_out_channels") && m.arch["block_out_channels"].is_array() ? m.arch["block_out_channels"].size() : 1;
    unet_down = std::max<int64_t>(unet_down, int64_t{1} << (levels > 0 ? levels - 1 : 0));
  }
  const int64_t down = f * unet_down;
  if (height % down || width % down)
    bad("height/width " + std::to_string(height) + "x" + std::to_string(width) + " must be multiples of " + std::to_string(down) +
        " (VAE factor " + std::to_string(f) + " x the U-Nets' " + std::to_string(unet_down) + "x downsampling)");
  for (auto [name, dim, v] : {std::tuple{"height", "H", height}, std::tuple{"width", "W", width}}) {
    auto r = manifest_.dim_ranges.find(dim);
    if (r != manifest_.dim_ranges.end() && !(r->second[0] * f <= v && v <= r->second[2] * f))
      bad(std::string(name) + " " + std::to_string(v) + " is outside the sizes this bundle was built for [" +
          std::to_string(r->second[0] * f) + ", " + std::to_string(r->second[2] * f) + "]");
  }
  return {height / f, width / f};
}

void Runtime::image_shape(int* height, int* width, int* channels, int64_t latent_h, int64_t latent_w) const {
  if (latent_h == 0) latent_h = manifest_.height();
  if (latent_w == 0) latent_w = manifest_.width();
  if (vae_) {
    *height = static_cast<int>(latent_h * vae_->factor()), *width = static_cast<int>(latent_w * vae_->factor()), *channels = 3;
  } else if (!manifest_.has_vae && manifest_.latent_scale_factor == 1.0) {  // pixel space: the latent is the image
    *height = static_cast<int>(latent_h), *width = static_cast<int>(latent_w), *channels = manifest_.channels();
  } else if (manifest_.has_vae) {
    fail(TSTITCH_ERR_UNAVAILABLE, "the bundle's VAE has no " + engine_kind_ +
                                      " engine; pass rgb = NULL and decode the latents, or rebuild the bundle with one");
  } else {
    fail(TSTITCH_ERR_UNAVAILABLE, "the bundle has no VAE (build with --vae DIR): it makes latents, not images; pass rgb = NULL");
  }
}

void Runtime::decode_rgb(const std::vector<float>& latents, int batch, int64_t latent_h, int64_t latent_w, uint8_t* rgb) {
  int h = 0, w = 0, c = 0;
  image_shape(&h, &w, &c, latent_h, latent_w);
  if (latents.size() != static_cast<size_t>(batch) * manifest_.channels() * latent_h * latent_w)
    fail(TSTITCH_ERR_INTERNAL, "decode_rgb: the latents do not have the request's shape");
  if (!vae_) return to_uint8_hwc(latents.data(), batch, c, h, w, rgb);
  vae_->decode(latents.data(), batch, manifest_.channels(), latent_h, latent_w,
               static_cast<float>(manifest_.latent_scale_factor), rgb);
}

// Prompts -> token ids (pipeline/sd.py's encode_prompts: "" for a missing negative prompt under cfg).
SampleRequest Runtime::tokenize(const SampleRequest& req) {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  if (!req.prompt_tokens.empty() || !req.text_context.empty()) bad("give prompts, token ids or a text context, one of them");
  const bool cfg = manifest_.conditioning.guidance == "cfg";
  if (static_cast<int>(req.prompts.size()) != req.batch)
    bad("give one prompt per image: batch " + std::to_string(req.batch) + ", " + std::to_string(req.prompts.size()) + " prompts");
  if (!cfg && req.has_negative)  // guidance.check_negative_prompt
    bad("a negative prompt needs classifier-free guidance, but this bundle guides through LCM's guidance embedding (no "
        "uncond batch): leave negative_prompts NULL, or rebuild with --guidance cfg");
  if (req.has_negative && static_cast<int>(req.negative_prompts.size()) != req.batch)
    bad(std::to_string(req.negative_prompts.size()) + " negative prompts for " + std::to_string(req.batch) +
        " prompts; give one per prompt (or NULL: none)");
  if (!manifest_.tokenizer.present) bad("the bundle has no tokenizer; pass token ids or the text context, or rebuild it from a full SD pipeline directory");
  if (manifest_.pipeline == "sdxl") return encode_sdxl(req);
  if (!tokenizer_)
    tokenizer_ = std::make_unique<ClipTokenizer>(artifact_path(dir_, manifest_.tokenizer.file, false),
                                                 manifest_.tokenizer.max_length, manifest_.tokenizer.pad_id);
  SampleRequest q = req;
  q.token_count = static_cast<int>(tokenizer_->max_length());
  std::vector<std::pair<std::string, bool>> cut;  // (text, truncated): the negative prompts first, as Python's notes
  for (int i = 0; i < req.batch; ++i) {
    bool p_cut = false;
    const std::vector<int64_t> p = tokenizer_->encode(req.prompts[i], "prompt " + std::to_string(i), &p_cut);
    q.prompt_tokens.insert(q.prompt_tokens.end(), p.begin(), p.end());
    cut.emplace_back(req.prompts[i], p_cut);
    if (cfg) {
      bool n_cut = false;
      const std::string& text = req.has_negative ? req.negative_prompts[i] : std::string();
      const std::vector<int64_t> n = tokenizer_->encode(text, "negative prompt " + std::to_string(i), &n_cut);
      q.negative_tokens.insert(q.negative_tokens.end(), n.begin(), n.end());
      cut.insert(cut.begin() + i, {text, n_cut});
    }
  }
  note_truncated(cut, tokenizer_->max_length());
  q.prompts.clear(), q.negative_prompts.clear(), q.has_negative = false;
  return q;
}

// Token ids -> the text context (pipeline/sd.py's encode_prompts: negative prompts first).
// pipeline/sd.py's _encode_sdxl: texts = the negative prompts ("" for none) then the prompts (under "embedding"
// guidance the prompts only), through both tokenizers and text encoders in one run each; the context is both
// penultimate hidden states concatenated (CLIP-L's first), text_embeds text_encoder_2's pooled output; no negative
// prompt with force_zeros_for_empty_prompt: the uncond rows of both are zero (diffusers). time_ids are named_inputs'.
SampleRequest Runtime::encode_sdxl(const SampleRequest& req) {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  if (req.inputs.count(kPooledOutput))
    bad("text_embeds comes from the prompts (text_encoder_2's pooled output) when prompts are given as text; leave it out of "
        "request.inputs, or pass text_context and text_embeds instead of prompts");
  if (!manifest_.tokenizer_2.present)
    bad("the sdxl bundle has no tokenizer_2; pass text_context and text_embeds, or rebuild it from a full "
        "StableDiffusionXLPipeline directory");
  if (sdxl_text_paths_.first.empty() || sdxl_text_paths_.second.empty())
    fail(TSTITCH_ERR_UNAVAILABLE, "the sdxl bundle has no " + artifact_kind(engine_kind_) + " artifacts for both text encoders; "
                                  "pass request.text_context and the text_embeds input, or rebuild it with --backend " +
                                  artifact_kind(engine_kind_));
  const std::string art = artifact_kind(engine_kind_);
  for (int k = 0; k < 2; ++k) {  // each text encoder in its own precision (part_precisions_)
    std::unique_ptr<TextEncoder>& enc = k == 0 ? text_encoder_ : text_encoder_2_;
    if (enc) continue;
    const std::string& path = k == 0 ? sdxl_text_paths_.first : sdxl_text_paths_.second;
    const EngineEntry& entry = (k == 0 ? manifest_.text_encoder_engines : manifest_.text_encoder_2_engines).at(art);
    const std::string label = k == 0 ? "text encoder" : "text encoder 2";
    const std::string what = "the " + engine_kind_ + " " + label + " engine (" + std::filesystem::path(path).filename().string() + ")";
    backend_->check_compat(entry.builder, what);
    enc = std::make_unique<TextEncoder>(k == 0 ? manifest_.text_encoder_io : manifest_.text_encoder_2_io, backend_->device(),
                                        backend_->load_file(path, what, part_precision(label)), label);
  }
  if (!text_encoder_2_->has_output(kPooledOutput))
    fail(TSTITCH_ERR_BUNDLE, "the sdxl bundle's text_encoder_2.io has no pooled text_embeds output; rebuild the bundle");
  if (req.batch < batch_range_.first || req.batch > batch_range_.second)
    bad("batch " + std::to_string(req.batch) + " is outside the engines' range [" + std::to_string(batch_range_.first) + ", " +
        std::to_string(batch_range_.second) + "]; rebuild with a wider batch range");
  if (!tokenizer_)
    tokenizer_ = std::make_unique<ClipTokenizer>(artifact_path(dir_, manifest_.tokenizer.file, false),
                                                 manifest_.tokenizer.max_length, manifest_.tokenizer.pad_id);
  if (!tokenizer_2_)
    tokenizer_2_ = std::make_unique<ClipTokenizer>(artifact_path(dir_, manifest_.tokenizer_2.file, false),
                                                   manifest_.tokenizer_2.max_length, manifest_.tokenizer_2.pad_id);
  if (tokenizer_->max_length() != tokenizer_2_->max_length())
    fail(TSTITCH_ERR_BUNDLE, "the sdxl bundle's tokenizers pad to " + std::to_string(tokenizer_->max_length()) + " and " +
                                 std::to_string(tokenizer_2_->max_length()) + " tokens; both contexts must be as long; rebuild the bundle");
  const bool cfg = manifest_.conditioning.guidance == "cfg";
  std::vector<std::string> texts, whats;  // cfg: B negative rows first, then B prompt rows
  if (cfg)
    for (int i = 0; i < req.batch; ++i)
      texts.push_back(req.has_negative ? req.negative_prompts[i] : ""), whats.push_back("negative prompt " + std::to_string(i));
  for (int i = 0; i < req.batch; ++i) texts.push_back(req.prompts[i]), whats.push_back("prompt " + std::to_string(i));
  std::vector<int64_t> ids, ids_2;
  std::vector<std::pair<std::string, bool>> cut;  // (text, cut by either tokenizer), as Python's notes
  for (size_t i = 0; i < texts.size(); ++i) {
    bool a_cut = false, b_cut = false;
    const std::vector<int64_t> a = tokenizer_->encode(texts[i], whats[i], &a_cut),
                               b = tokenizer_2_->encode(texts[i], whats[i], &b_cut);
    ids.insert(ids.end(), a.begin(), a.end());
    ids_2.insert(ids_2.end(), b.begin(), b.end());
    cut.emplace_back(texts[i], a_cut || b_cut);
  }
  note_truncated(cut, tokenizer_->max_length());
  const int64_t rows = static_cast<int64_t>(texts.size()), tokens = tokenizer_->max_length();
  std::map<std::string, TextOutput> out = text_encoder_->encode_all(ids, rows, tokens);
  std::map<std::string, TextOutput> out_2 = text_encoder_2_->encode_all(ids_2, rows, tokens);
  const TextOutput &h = out.at(kTextOutput), &h_2 = out_2.at(kTextOutput);
  TextOutput& pooled = out_2.at(kPooledOutput);
  if (h.dims[1] != h_2.dims[1] || pooled.dims.size() != 2)
    fail(TSTITCH_ERR_BUNDLE, "the sdxl bundle's text encoders give contexts of " + std::to_string(h.dims[1]) + " and " +
                                 std::to_string(h_2.dims[1]) + " tokens (or no (N, P) pooled output); rebuild the bundle");
  const int64_t d = h.dims[2], d_2 = h_2.dims[2], width = d + d_2, per_row = h.dims[1] * width;
  SampleRequest q = req;
  q.text_context.resize(static_cast<size_t>(rows * per_row));
  for (int64_t r = 0; r < rows * h.dims[1]; ++r) {  // np.concatenate(axis=-1) over (rows x tokens)
    std::copy_n(h.values.begin() + r * d, d, q.text_context.begin() + r * width);
    std::copy_n(h_2.values.begin() + r * d_2, d_2, q.text_context.begin() + r * width + d);
  }
  if (cfg && !req.has_negative && manifest_.conditioning.force_zeros_for_empty_prompt) {
    const int64_t p = pooled.dims[1];  // the B uncond rows: zero, not the encoded ""
    std::fill_n(q.text_context.begin(), static_cast<size_t>(req.batch * per_row), 0.0f);
    std::fill_n(pooled.values.begin(), static_cast<size_t>(req.batch * p), 0.0f);
  }
  q.text_tokens = static_cast<int>(h.dims[1]), q.text_width = static_cast<int>(width);
  q.inputs[kPooledOutput] = std::move(pooled.values);
  q.prompts.clear(), q.negative_prompts.clear(), q.has_negative = false;
  return q;
}

SampleRequest Runtime::encode_tokens(const SampleRequest& req) {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  if (!req.text_context.empty()) bad("give the text context or token ids, not both");
  if (manifest_.pipeline == "sdxl")
    fail(TSTITCH_ERR_UNAVAILABLE, "an SDXL bundle's prompts go through two tokenizers and text encoders (and the pooled "
                                  "text_embeds): pass the prompts as text (request.prompts), or text_context and the text_embeds "
                                  "input, instead of token ids");
  if (!text_encoder_)
    fail(TSTITCH_ERR_UNAVAILABLE, "the bundle has no text encoder engine of this kind; pass request.text_context instead");
  if (req.batch < batch_range_.first || req.batch > batch_range_.second)
    bad("batch " + std::to_string(req.batch) + " is outside the engines' range [" + std::to_string(batch_range_.first) + ", " +
        std::to_string(batch_range_.second) + "]; rebuild with a wider batch range");
  const bool cfg = manifest_.conditioning.guidance == "cfg";
  if (!cfg && !req.negative_tokens.empty())
    bad("this bundle uses LCM's guidance embedding (no classifier-free guidance): it takes no negative prompt; "
        "leave negative_tokens NULL");
  const size_t n = static_cast<size_t>(req.batch) * static_cast<size_t>(req.token_count);
  if (req.token_count < 1 || req.prompt_tokens.size() != n || (cfg && req.negative_tokens.size() != n))
    bad(cfg ? "prompt and negative token ids must each be batch x token_count (" + std::to_string(n) + ") ids"
            : "prompt token ids must be batch x token_count (" + std::to_string(n) + ") ids");
  std::vector<int64_t> ids(req.negative_tokens);  // cfg: the uncond (negative) rows first
  ids.insert(ids.end(), req.prompt_tokens.begin(), req.prompt_tokens.end());
  for (int64_t id : ids)
    if (id < 0) bad("token id " + std::to_string(id) + " is negative; pass the tokenizer's ids");
  SampleRequest q = req;
  int64_t width = 0;
  q.text_context = text_encoder_->encode(ids, context_rows(req.batch), req.token_count, &width);
  q.text_tokens = req.token_count, q.text_width = static_cast<int>(width);
  q.prompt_tokens.clear(), q.negative_tokens.clear();
  return q;
}

// pipeline/caching.py: the interval in [1, MAX_CACHE_INTERVAL]; DeepCache's branch, where given, the bundle's own;
// FORA (DiT) has no branch; an interval > 1 needs the cached step graphs. Python's messages, with the C names.
void Runtime::check_cache(const SampleRequest& req) const {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  const int n = req.cache_interval, branch = req.cache_branch, built = manifest_.cache_branch;
  if (n < 1 || n > kMaxCacheInterval)
    bad("cache_interval must be between 1 (no caching) and " + std::to_string(kMaxCacheInterval) + ", got " + std::to_string(n));
  if (branch < -1)
    bad("cache_branch must be DeepCache's branch id (>= 0) or -1 (not given), got " + std::to_string(branch));
  const std::string k = std::to_string(branch);
  if (!manifest_.text_to_image()) {
    if (branch != -1)
      bad("cache_branch " + k + ": DiT bundles cache with FORA (every block's attention and MLP outputs), which has no "
          "branch (DeepCache's, for SD U-Nets); leave cache_branch at -1");
    if (n > 1 && manifest_.cache_scheme.empty())
      bad("cache_interval " + std::to_string(n) + " needs FORA's cached step graphs, which this bundle was built without; "
          "rebuild it with `tstitch-trt build ... --cache-scheme fora`, or give cache_interval 1");
    return;
  }
  if (branch != -1 && built < 0)
    bad("cache_branch " + k + ": this bundle was built without cached step graphs; rebuild it with `tstitch-trt build ... "
        "--cache-branch " + k + "`");
  if (branch != -1 && branch != built)
    bad("cache_branch " + k + ": this bundle's cached step graphs keep branch " + std::to_string(built) +
        "; give cache_branch " + std::to_string(built) + " (or -1), or rebuild it with --cache-branch " + k);
  if (n > 1 && built < 0)
    bad("cache_interval " + std::to_string(n) + " needs cached step graphs, which this bundle was built without; rebuild "
        "it with `tstitch-trt build ... --cache-branch K` (DeepCache's branch, e.g. 0), or give cache_interval 1");
}

void Runtime::plan_cache(const SampleRequest& req, TrajectoryPlan& plan) const {
  if (req.cache_interval <= 1) return;  // every call full: the plan's cached row stays empty
  // Python passes plan.timesteps: SD's float table (Euler's fractional t), DiT's integers
  plan.cached = plan.t_float.empty() ? cached_calls(plan.timesteps, plan.step_model, req.cache_interval)
                                     : cached_calls(plan.t_float, plan.step_model, req.cache_interval);
}

std::vector<uint8_t> Runtime::cache_plan(const SampleRequest& req) const {
  check_cache(req);
  const int models = static_cast<int>(manifest_.models.size());
  if (!req.fractions.empty()) check_fractions(req.fractions, models);
  TrajectoryPlan p;
  if (manifest_.text_to_image()) {  // sd_plan's table and stitch by call (no noise: it does not change the plan)
    const std::string sampler = req.sampler.empty() ? sd_default_sampler(manifest_.scheduler) : req.sampler;
    const SdTable table = sd_table(sampler, manifest_.scheduler, req.steps, req.eta);
    p.t_float = table.timesteps;
    const int n = table.calls();
    p.step_model = req.fractions.empty() ? stitch_by_call_index(n, models, req.ratio) : stitch_by_call_fractions(n, req.fractions);
  } else {  // plan_trajectory's timesteps and stitch
    if (req.steps < 1 || req.steps > manifest_.num_timesteps)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "steps must be in [1, " + std::to_string(manifest_.num_timesteps) + "], got " +
                                             std::to_string(req.steps));
    const RespacedSchedule s = dit_schedule(req.steps, manifest_.num_timesteps);
    p.timesteps.assign(s.timesteps.rbegin(), s.timesteps.rend());
    p.step_model = req.fractions.empty() ? stitch_by_timestep(p.timesteps, models, req.ratio, manifest_.num_timesteps)
                                         : stitch_by_fractions(p.timesteps, req.fractions, manifest_.num_timesteps);
  }
  plan_cache(req, p);
  if (p.cached.empty()) p.cached.assign(p.step_model.size(), 0);
  return p.cached;
}

void Runtime::check(const SampleRequest& req) const {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  check_cache(req);
  if (manifest_.text_to_image()) return check_sd(req);
  if (req.batch < batch_range_.first || req.batch > batch_range_.second)  // pipeline/dit.py's message
    bad("batch " + std::to_string(req.batch) + " is outside the engines' range [" + std::to_string(batch_range_.first) +
        ", " + std::to_string(batch_range_.second) + "]; rebuild with --batch-sizes " +
        std::to_string(batch_range_.first) + "-" + std::to_string(std::max<int64_t>(req.batch, batch_range_.second)));
  if (req.steps < 1 || req.steps > manifest_.num_timesteps)
    bad("steps must be in [1, " + std::to_string(manifest_.num_timesteps) + "], got " + std::to_string(req.steps));
  latent_hw(req);  // refuses an SD-only height / width
  if (static_cast<int>(req.class_labels.size()) != req.batch)
    bad("give one class label per image (" + std::to_string(req.batch) + "), got " +
        std::to_string(req.class_labels.size()));
  for (int64_t y : req.class_labels)
    if (y < 0 || y >= manifest_.num_classes)
      bad("class label " + std::to_string(y) + " is outside [0, " + std::to_string(manifest_.num_classes) +
          "); this bundle's models know " + std::to_string(manifest_.num_classes) + " classes");
  const auto& names = sampler_names();
  if (!req.sampler.empty() && std::find(names.begin(), names.end(), req.sampler) == names.end())
    bad("unknown sampler '" + req.sampler + "'; choose one of ddim, ddpm, dpm-solver++");
  if (!std::isfinite(req.cfg_scale)) bad("cfg scale must be a finite number");
  if (!(req.eta >= 0.0 && std::isfinite(req.eta))) bad("eta must be a finite number >= 0");
  const size_t latent = static_cast<size_t>(req.batch) * manifest_.channels() * manifest_.height() * manifest_.width();
  if (!req.init_noise.empty() && req.init_noise.size() != latent)
    bad("init noise has " + std::to_string(req.init_noise.size()) + " values, the request needs " + std::to_string(latent));
}

void Runtime::check_sd(const SampleRequest& req) const {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  if (req.batch < batch_range_.first || req.batch > batch_range_.second)
    bad("batch " + std::to_string(req.batch) + " is outside the engines' range [" + std::to_string(batch_range_.first) +
        ", " + std::to_string(batch_range_.second) + "]; rebuild with a wider batch range");
  if (!req.class_labels.empty()) bad("this bundle is text-to-image (SD): give a text context, not class labels");
  if (!std::isfinite(req.cfg_scale)) bad("cfg scale must be a finite number");
  if (!(req.eta >= 0.0 && std::isfinite(req.eta))) bad("eta must be a finite number >= 0");
  // the conditioning's (2B, tokens, width) from the step graph's io
  const std::vector<Binding>& b = loop_->bindings();
  auto cond = std::find_if(b.begin(), b.end(), [](const Binding& x) { return x.role == Role::kRequest && x.source == "cond"; });
  if (cond == b.end() || cond->spec.dtype != "float32" || cond->spec.shape.size() != 3)
    fail(TSTITCH_ERR_BUNDLE, "the SD step graph has no float (2B, tokens, width) text context input; rebuild the bundle");
  const int64_t tokens = cond->spec.shape[1].size, width = cond->spec.shape[2].size;
  const bool cfg = manifest_.conditioning.guidance == "cfg";
  if (req.text_context.empty())
    bad("an SD request needs token ids or the text context (request.text_context: " + std::string(cfg ? "2 x " : "") +
        "batch x " + std::to_string(tokens) + " x " + std::to_string(width) + " floats" +
        (cfg ? ", negative prompts first)" : "; this bundle's LCM guidance embedding takes no negative prompts)"));
  if (req.text_tokens != tokens || req.text_width != width)
    bad("the text context is " + std::to_string(req.text_tokens) + " tokens x " + std::to_string(req.text_width) +
        " wide, the U-Nets take " + std::to_string(tokens) + " x " + std::to_string(width));
  const size_t rows = static_cast<size_t>(context_rows(req.batch));
  if (req.text_context.size() != rows * static_cast<size_t>(tokens * width))
    bad("the text context has " + std::to_string(req.text_context.size()) + " floats, the request needs " + std::to_string(rows) +
        " rows (" + (cfg ? "2 x batch: negative prompts first" : "batch: no negative prompts under LCM's guidance embedding") +
        ") x " + std::to_string(tokens) + " x " + std::to_string(width));
  for (float v : req.text_context)
    if (!std::isfinite(v)) bad("the text context holds NaN or Inf; check the text encoder's output");
  const auto [lh, lw] = latent_hw(req);
  const size_t latent = static_cast<size_t>(req.batch) * manifest_.channels() * lh * lw;
  if (!req.init_noise.empty() && req.init_noise.size() != latent)
    bad("init noise has " + std::to_string(req.init_noise.size()) + " values, the request needs " + std::to_string(latent));
  named_inputs(req, lh, lw);  // every named input: known, complete, sized, finite
  const bool control = std::any_of(b.begin(), b.end(), [](const Binding& x) { return x.spec.name == "control_scale"; });
  if (!control && (req.controlnet_scale != 1.0f || req.control_guidance_start != 0.0 || req.control_guidance_end != 1.0 ||
                   req.control_guess_mode))
    bad("controlnet_scale, control_guidance_start/end and control_guess_mode are for bundles with a ControlNet; this one has none "
        "(leave them at 1, 0, 1, 0)");
  if (!std::isfinite(req.controlnet_scale)) bad("controlnet_scale must be a finite number");
  check_guidance(req);
  // diffusers' check_inputs rules for the ControlNet's start / end
  if (!(req.control_guidance_start >= 0.0 && req.control_guidance_end <= 1.0 && req.control_guidance_start < req.control_guidance_end))
    bad("control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1, got " +
        std::to_string(req.control_guidance_start) + " and " + std::to_string(req.control_guidance_end));
}

// guidance.check_guidance: g > 1 reaches the U-Nets through LCM's guidance embedding under "embedding" guidance or
// the lcm sampler; a U-Net without the embedding (no time_cond_proj_dim) would silently ignore it, and a cfg bundle's
// graphs have none: both refused, with Python's messages.
void Runtime::check_guidance(const SampleRequest& req) const {
  const std::string sampler = req.sampler.empty() ? sd_default_sampler(manifest_.scheduler) : req.sampler;
  const bool embedding = manifest_.conditioning.guidance == "embedding";
  if (!(embedding || sampler == "lcm") || !(req.cfg_scale > 1.0f)) return;
  char g[32];
  std::snprintf(g, sizeof g, "%g", static_cast<double>(req.cfg_scale));
  for (const ModelEntry& m : manifest_.models) {
    const nlohmann::json& dim = m.arch.contains("time_cond_proj_dim") ? m.arch["time_cond_proj_dim"] : nlohmann::json();
    const bool has = dim.is_number() ? dim.get<double>() != 0.0 : !(dim.is_null() || (dim.is_boolean() && !dim.get<bool>()));
    if (!has)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "cfg scale " + std::string(g) + " > 1 with " +
                                             (sampler == "lcm" ? "the lcm sampler" : "LCM guidance") +
                                             " needs the guidance embedding (time_cond_proj_dim), which U-Net " + m.name +
                                             " lacks; give cfg_scale 1 or less (no guidance)");
  }
  if (!embedding)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the lcm sampler with cfg scale " + std::string(g) + " > 1 guides through the U-Nets' "
                                       "guidance embedding, but this bundle was built with --guidance cfg; rebuild with "
                                       "--guidance embedding, or give cfg_scale 1 or less");
}

std::vector<int64_t> Runtime::request_input_shape(const std::string& name, int64_t batch, int64_t lh, int64_t lw) const {
  const std::vector<Binding>& b = loop_->bindings();
  auto it = std::find_if(b.begin(), b.end(), [&](const Binding& x) { return x.role == Role::kRequest && x.spec.name == name; });
  if (it == b.end() || it->source == "guidance") {
    std::string known;
    for (const std::string& n : request_input_names()) known += (known.empty() ? "" : ", ") + n;
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "this bundle's step graphs take no request input '" + name + "' (they take " + known + ")");
  }
  const Binding& latent = *std::find_if(b.begin(), b.end(), [](const Binding& x) { return x.latent; });
  std::vector<int64_t> shape = {batch, manifest_.channels(), lh, lw};
  if (!manifest_.text_to_image()) shape = {batch, manifest_.channels(), manifest_.height(), manifest_.width()};
  return resolve_dims(it->spec, latent_dims(latent.spec, shape));
}

int64_t Runtime::context_rows(int64_t batch) const {
  // the step graphs' own shape of it (2B under cfg, B under "embedding" guidance)
  return request_input_shape(request_inputs_.front(), batch, manifest_.height(), manifest_.width()).front();
}

std::map<std::string, std::vector<float>> Runtime::named_inputs(const SampleRequest& req, int64_t lh, int64_t lw) const {
  auto bad = [](const std::string& m) { fail(TSTITCH_ERR_INVALID_ARGUMENT, m); };
  const std::vector<std::string>& names = request_inputs_;
  std::string known;
  for (size_t i = 1; i < names.size(); ++i) known += (known.empty() ? "" : ", ") + names[i];
  for (const auto& [name, values] : req.inputs) {
    (void)values;
    if (!names.empty() && name == names.front())
      bad("give the text context ('" + name + "') as request.text_context, not as a named input");
    if (name == "control_guess") bad("control_guess comes from request.control_guess_mode; do not pass it as an input");
    if (std::find(names.begin(), names.end(), name) == names.end())
      bad("this bundle's step graphs take no input '" + name + "'" +
          (known.empty() ? " besides the text context; leave request.inputs empty" : " (they take " + known + ")"));
  }
  std::map<std::string, std::vector<float>> out;
  for (size_t i = 1; i < names.size(); ++i) {  // names[0] is the text context
    const std::string& name = names[i];
    const std::vector<int64_t> shape = request_input_shape(name, req.batch, lh, lw);
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    std::vector<float> v;
    auto given = req.inputs.find(name);
    if (name == "control_guess") {
      v.assign(count, req.control_guess_mode ? 1.0f : 0.0f);
    } else if (given != req.inputs.end()) {
      v = given->second;
    } else if (name == "time_ids") {  // diffusers' default: original size = target size = the image, no crop
      const int f = vae_factor();
      const float h = static_cast<float>(lh * f), w = static_cast<float>(lw * f);
      for (size_t row = 0; row < count / 6; ++row) v.insert(v.end(), {h, w, 0.0f, 0.0f, h, w});
    } else {
      std::string dims;
      for (const Dim& d : std::find_if(loop_->bindings().begin(), loop_->bindings().end(),
                                       [&](const Binding& x) { return x.spec.name == name; })->spec.shape)
        dims += (dims.empty() ? "" : ", ") + (d.symbol.empty() ? std::to_string(d.size) : d.symbol);
      bad("this bundle's step graphs need the input " + name + " (" + dims + "); pass it in request.inputs");
    }
    if (v.size() != count) {
      std::string want;
      for (int64_t d : shape) want += (want.empty() ? "" : " x ") + std::to_string(d);
      bad("the input " + name + " has " + std::to_string(v.size()) + " floats, this request needs " + want + " = " +
          std::to_string(count) + (name == "control_image" ? " (batch x channels x height x width, the image size)" : ""));
    }
    for (float x : v)
      if (!std::isfinite(x)) bad("the input " + name + " holds NaN or Inf");
    if (name == "control_image")
      for (float x : v)
        if (x < 0.0f || x > 1.0f) bad("the input control_image holds values outside [0, 1]; scale the image to [0, 1] as diffusers does");
    out[name] = std::move(v);
  }
  return out;
}

std::vector<float> control_scale_table(int calls, float scale, double start, double end) {
  std::vector<float> out;
  for (int i = 0; i < calls; ++i) {
    const double n = calls;
    const double keep = 1.0 - static_cast<double>(i / n < start || (i + 1) / n > end);
    out.push_back(static_cast<float>(static_cast<double>(scale) * keep));
  }
  return out;
}

// pipeline/sd.py's plan: the sampler's table from the bundle's scheduler config, the stitch by
// U-Net call, per-call noise (ddim eta > 0) drawn after the initial latent.
TrajectoryPlan Runtime::sd_plan(const SampleRequest& req, size_t latent, Pcg64& rng, float* init_sigma) const {
  const std::string sampler = req.sampler.empty() ? sd_default_sampler(manifest_.scheduler) : req.sampler;
  const SdTable table = sd_table(sampler, manifest_.scheduler, req.steps, req.eta);
  TrajectoryPlan p;
  p.sampler = sampler;
  p.t_float = table.timesteps;
  for (float t : table.timesteps) p.timesteps.push_back(static_cast<int64_t>(std::lround(t)));
  p.coef = table.coef;
  p.k = kSdNumCoefs;
  const int n = table.calls(), models = static_cast<int>(manifest_.models.size());
  if (!req.fractions.empty()) check_fractions(req.fractions, models);
  p.step_model = req.fractions.empty() ? stitch_by_call_index(n, models, req.ratio) : stitch_by_call_fractions(n, req.fractions);
  if (sd_needs_noise(sampler, req.eta)) {
    p.noise.resize(static_cast<size_t>(n) * latent);
    standard_normal_f32(rng, p.noise.data(), p.noise.size());
  }
  for (const Binding& b : loop_->bindings())
    if (b.role == Role::kStep && b.spec.name == "control_scale")
      p.tables["control_scale"] = control_scale_table(n, req.controlnet_scale, req.control_guidance_start, req.control_guidance_end);
  *init_sigma = table.init_noise_sigma;
  return p;
}

std::string Runtime::part_precision(const std::string& label) const {
  auto it = part_precisions_.find(label);
  return it == part_precisions_.end() ? "" : it->second;
}

namespace {
// The first n code points of valid UTF-8 (the tokenizer has checked it).
std::string utf8_prefix(const std::string& s, size_t n) {
  size_t i = 0;
  for (size_t k = 0; i < s.size() && k < n; ++k)
    for (++i; i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80;) ++i;
  return s.substr(0, i);
}
size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}
// pipeline/values.py's shown() of a string: repr(text[:61]), cut to 60 characters and "..."
std::string shown(const std::string& text) {
  constexpr size_t kShown = 60;  // values.SHOWN_CHARS
  const std::string r = py_repr(nlohmann::ordered_json(utf8_prefix(text, kShown + 1)));
  return utf8_length(r) <= kShown ? r : utf8_prefix(r, kShown) + "...";
}
}  // namespace

// pipeline/sd.py's notes on prompts cut to the tokenizer's length: one per distinct text, in the order encoded.
void Runtime::note_truncated(const std::vector<std::pair<std::string, bool>>& texts, int64_t max_length) {
  for (const auto& [text, cut] : texts) {
    if (!cut) continue;
    ++truncated_prompts_;
    const std::string note = "prompt " + shown(text) + " is longer than " +
                             std::to_string(max_length) + " tokens and was truncated (as diffusers does)";
    if (std::find(text_notes_.begin(), text_notes_.end(), note) == text_notes_.end()) text_notes_.push_back(note);
  }
}

LoopResult Runtime::sample(const SampleRequest& request) {
  truncated_prompts_ = 0;
  text_notes_.clear();
  last_notes_.clear();
  LoopResult r = sample_encoded(request);
  r.notes.insert(r.notes.begin(), text_notes_.begin(), text_notes_.end());
  for (const std::string& n : r.notes) last_notes_ += (last_notes_.empty() ? "" : "\n") + n;
  return r;
}

LoopResult Runtime::sample_encoded(const SampleRequest& request) {
  const SampleRequest texts = manifest_.text_to_image() && !request.prompts.empty() ? tokenize(request) : request;
  if (!manifest_.text_to_image() && (!request.prompts.empty() || request.has_negative))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "this bundle is class-conditional (DiT): it takes class labels, not prompts");
  const SampleRequest req = manifest_.text_to_image() && !texts.prompt_tokens.empty() ? encode_tokens(texts) : texts;
  check(req);
  if (manifest_.text_to_image()) {
    const auto [lh, lw] = latent_hw(req);  // the symbolic H, W of the step graph for this request
    const size_t latent = static_cast<size_t>(req.batch) * manifest_.channels() * lh * lw;
    Pcg64 rng(req.seed);
    RequestInputs in;
    in.batch = req.batch;
    in.latent_shape = {req.batch, manifest_.channels(), lh, lw};
    in.x_init = req.init_noise;
    if (in.x_init.empty()) {
      in.x_init.resize(latent);
      standard_normal_f32(rng, in.x_init.data(), latent);
    }
    float sigma = 1.0f;
    TrajectoryPlan plan = sd_plan(req, latent, rng, &sigma);
    plan_cache(req, plan);
    for (float& v : in.x_init) v *= sigma;  // x_unit * init_noise_sigma, in float32
    in.context = req.text_context;
    in.tensors = named_inputs(req, lh, lw);
    // guidance.graph_guidance: under "embedding" g itself (the graphs embed g - 1, as diffusers does for any g); under
    // cfg max(g, 1) (diffusers: no guidance at g <= 1)
    const bool embedding = manifest_.conditioning.guidance == "embedding";
    in.guidance = embedding || req.cfg_scale > 1.0f ? req.cfg_scale : 1.0f;
    return loop_->run(plan, in);
  }
  const size_t latent = static_cast<size_t>(req.batch) * manifest_.channels() * manifest_.height() * manifest_.width();
  Pcg64 rng(req.seed);  // numpy default_rng(seed): x_init first, then the plan's noise
  RequestInputs in;
  in.batch = req.batch;
  in.class_labels = req.class_labels;
  in.guidance = req.cfg_scale;
  in.x_init = req.init_noise;
  if (in.x_init.empty()) {
    in.x_init.resize(latent);
    standard_normal_f32(rng, in.x_init.data(), latent);
  }
  PlanSpec spec;
  spec.sampler = req.sampler.empty() ? "ddim" : req.sampler;
  spec.steps = req.steps;
  spec.num_models = static_cast<int>(manifest_.models.size());
  spec.ratio = req.ratio;
  spec.fractions = req.fractions;
  spec.eta = req.eta;
  spec.num_timesteps = manifest_.num_timesteps;
  spec.latent_count = latent;
  TrajectoryPlan plan = plan_trajectory(spec, rng);
  plan_cache(req, plan);
  return loop_->run(plan, in);
}

}  // namespace tstitch
