// The bundle manifest (manifest.json), read with the same rules as python/tstitch_trt/bundle/:
// format and version, known pipeline and schedule kinds, models sharing one latent and label space,
// sealed paths (relative, no "..", no symlink leaving the bundle) and sha256 checksums.
// One module, so it can follow the JSON Schema the Python side is moving to.
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

struct ModelEntry {
  std::string name;
  std::string family;
  nlohmann::json arch;
  std::map<std::string, EngineEntry> engines;  // kind -> artifact
  int channels = 0, height = 0, width = 0;     // latent (C, H, W)
};

// One tensor of the step graph's I/O, as the manifest's `io` records it. dims: >= 0 fixed,
// kBatch = "B", kDoubleBatch = "2B" (CFG-doubled conditioning).
struct TensorSpec {
  static constexpr int64_t kBatch = -1, kDoubleBatch = -2;
  std::string name;
  bool input = true;
  std::string dtype;  // "float32", "int64", "int32"
  std::vector<int64_t> dims;
  nlohmann::json extra;  // anything else the manifest says about it (e.g. a role)
};

struct Manifest {
  std::string pipeline;
  std::vector<ModelEntry> models;  // stitch order, smallest first
  int num_classes = 0;
  int image_size = 0;
  double latent_scale_factor = 1.0;
  int guidance_channels = 0;
  std::string schedule_kind = "linear";
  int num_timesteps = 1000;
  bool has_vae = false;
  std::vector<TensorSpec> io;  // inputs then outputs; empty for bundles written before `io` existed
  int channels() const { return models.front().channels; }
  int height() const { return models.front().height; }
  int width() const { return models.front().width; }
};

// Reads and validates <bundle_dir>/manifest.json; Error(TSTITCH_ERR_BUNDLE) with one line otherwise.
Manifest read_manifest(const std::string& bundle_dir);
Manifest parse_manifest(const nlohmann::json& raw, const std::string& bundle_dir);

// The absolute path of a file the manifest names, refused unless it stays inside the bundle.
std::string sealed_path(const std::string& bundle_dir, const std::string& rel, const std::string& field);

// The artifact's path, checked to exist and (verify) to match its sha256 (and its external data).
std::string artifact_path(const std::string& bundle_dir, const EngineEntry& entry, bool verify = true);

std::string sha256_file(const std::string& path);
std::string sha256_bytes(const void* data, size_t n);

}  // namespace tstitch
