// The bundle manifest (manifest.json), read with the same rules as python/tstitch_trt/bundle/:
// the JSON Schema (python/tstitch_trt/bundle/manifest.schema.json, embedded; see schema.hpp), the
// consistency rules of Manifest.validate (DiT and SD), sealed paths (relative, no "..", no symlink
// leaving the bundle) and sha256 checksums.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tstitch {

constexpr const char* kBundleFormat = "tstitch-bundle";
constexpr int kBundleFormatVersion = 1;

struct FileRef {
  std::string file;    // relative to the bundle
  std::string sha256;  // hex
  std::string field;   // where the manifest names it, e.g. models[1].engines.trt.file
};

struct EngineEntry {
  FileRef artifact;
  std::vector<FileRef> external_data;  // ONNX > 2 GB: weights beside the graph
  std::string precision = "fp32";
  int64_t batch_min = 1, batch_max = 16;
  nlohmann::json builder = nlohmann::json::object();
};

// One dimension of a step-graph tensor: a size, or a symbol ("B", "2B", "H", "W", ...) whose value
// comes from the initial latent's shape at run time (runtime/io_roles.py).
struct Dim {
  int64_t size = 0;
  std::string symbol;  // empty: fixed size
  bool operator==(const Dim& o) const { return size == o.size && symbol == o.symbol; }
};

// One tensor of the step graph's I/O, as the manifest's io.inputs / io.outputs record it.
struct TensorSpec {
  std::string name;
  bool input = true;
  std::string dtype;  // "float32", "float16", "int64", "int32"
  std::vector<Dim> shape;
};

struct ModelEntry {
  std::string name;
  std::string family;
  nlohmann::json arch;
  std::map<std::string, EngineEntry> engines;  // kind -> artifact
  int channels = 0, height = 0, width = 0;     // latent (C, H, W)
  nlohmann::json bf16;  // `tstitch-trt check --precision bf16 --record`'s verdict (null: none); see precision.hpp
  // Feature caching (manifest models[i].cached: DeepCache, FORA): the cached step graph per kind and the kept
  // feature's spec (its own shape per model; the full graphs output it, the cached ones read it)
  bool has_cached = false;
  std::map<std::string, EngineEntry> cached_engines;
  TensorSpec cached_feature;  // shape and dtype (no name: io.roles.cache names it, per graph)
};

// io.roles: the step graph's tensors by role (state pairs, per-step rows, per-request constants).
struct IoRoles {
  std::vector<std::pair<std::string, std::string>> state;  // (input, output); the first pair is the latent
  std::vector<std::string> step;                           // "t", "coef", "noise"
  std::vector<std::string> request;                        // conditioning first-non-guidance, "guidance"
  std::pair<std::string, std::string> cache;               // feature caching: (cached graphs' input, full graphs'
                                                           // output) of the kept feature; empty: none
};

// conditioning (text-to-image): how the step graphs are conditioned beyond the text context.
struct Conditioning {
  std::string guidance = "cfg";        // "cfg": batch doubling inside the graph (context (2B, L, D), uncond
                                       // first); "embedding": LCM's guidance embedding, no doubling (B, L, D)
  bool force_zeros_for_empty_prompt = true;   // SDXL: no negative prompt -> zero uncond embeddings (diffusers)
  int64_t text_embeds_dim = 0;         // SDXL: width of the pooled text_embeds input; 0: none
  int64_t time_ids = 0;                // SDXL: 6; 0: none
  bool controlnet = false;             // a ControlNet inside every step graph
  std::string controlnet_family;       // "sd" | "sdxl"
  int64_t controlnet_channels = 0;     // its conditioning image's channels
  std::map<std::string, EngineEntry> controlnet_engines;  // kind -> artifact (kept apart from the step graphs)
};

// SD: the tokenizer file (tokenizer.json) and how prompts are padded (pipeline/text.py).
struct TokenizerEntry {
  bool present = false;
  EngineEntry file;  // artifact: the tokenizer.json (sha256 checked like every file)
  int64_t max_length = 77, pad_id = 0;
  std::string kind;
};

struct Manifest {
  std::string pipeline;            // "dit-class-conditional" | "sd" | "sdxl"
  std::vector<ModelEntry> models;  // stitch order, smallest first
  int num_classes = 0;
  int image_size = 0;
  double latent_scale_factor = 1.0;
  int guidance_channels = 0;
  std::string schedule_kind = "linear";
  int num_timesteps = 1000;
  bool has_vae = false;
  std::map<std::string, EngineEntry> vae_engines;  // kind -> the VAE decoder's plan (latent -> image)
  std::map<std::string, std::vector<int64_t>> dim_ranges;  // io.dim_ranges: symbol -> (min, opt, max)
  std::vector<TensorSpec> io;  // inputs then outputs; empty for bundles written before `io` existed
  IoRoles roles;               // io.roles, or the DiT roles where the manifest has none
  bool roles_recorded = false; // io.roles was in the manifest
  int cache_branch = -1;       // manifest `cache` (DeepCache's full + cached step graphs): its branch; -1: none
  std::string cache_scheme;    // manifest `cache`: "deepcache" (U-Nets) or "fora" (DiTs); empty: none
  nlohmann::json scheduler;    // SD: the diffusers scheduler config (null otherwise)
  bool has_text_encoder = false;
  std::map<std::string, EngineEntry> text_encoder_engines;  // SD: kind -> the text encoder's plan
  std::vector<TensorSpec> text_encoder_io;                  // SD: input_ids (N, L) -> embeddings (N, L, D)
  bool has_text_encoder_2 = false;                          // SDXL: the second (OpenCLIP bigG) text encoder
  std::map<std::string, EngineEntry> text_encoder_2_engines;
  std::vector<TensorSpec> text_encoder_2_io;                // SDXL: input_ids -> text_embeddings (N, L, D2), text_embeds (N, P)
  Conditioning conditioning;                                // defaults (cfg, no extras) where the manifest has none
  TokenizerEntry tokenizer, tokenizer_2;                    // SD: the large pipeline's tokenizer(s)
  // The text encoder(s) and VAE decoder present, as pipeline/precision.py's aux_parts labels and orders them
  // ("text encoder", "text encoder 2", "VAE decoder"), each with its own recorded bf16 verdict (null: none).
  std::vector<std::pair<std::string, nlohmann::json>> aux_bf16;
  bool text_to_image() const { return pipeline == "sd" || pipeline == "sdxl"; }
  int channels() const { return models.front().channels; }
  int height() const { return models.front().height; }
  int width() const { return models.front().width; }
};

// Reads and validates <bundle_dir>/manifest.json; Error(TSTITCH_ERR_BUNDLE) with one line otherwise.
Manifest read_manifest(const std::string& bundle_dir);
// `where` names the manifest in messages (its path). The schema (schema.hpp) first, then the
// consistency rules of Manifest.validate (bundle/manifest.py), with Python's messages.
Manifest parse_manifest(const nlohmann::ordered_json& raw, const std::string& where);
Manifest parse_manifest(const nlohmann::json& raw, const std::string& where);

// The absolute path of a file the manifest names, refused unless it stays inside the bundle.
std::string sealed_path(const std::string& bundle_dir, const std::string& rel, const std::string& field);

// The artifact's path, checked to exist and (verify) to match its sha256 (and its external data).
std::string artifact_path(const std::string& bundle_dir, const EngineEntry& entry, bool verify = true);

std::string sha256_file(const std::string& path);
std::string sha256_bytes(const void* data, size_t n);

}  // namespace tstitch
