#include "manifest.hpp"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "errors.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace tstitch {
namespace {

const std::set<std::string> kPipelines = {"dit-class-conditional"};
const std::set<std::string> kSchedules = {"linear"};

// A manifest that parses as JSON but breaks a rule: one line naming the field.
[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  fail(TSTITCH_ERR_BUNDLE, path + " is corrupt or not a tstitch bundle manifest (" + why + "); rebuild the bundle");
}

struct Reader {
  std::string path;  // manifest.json, for messages

  const json& at(const json& j, const std::string& key, const std::string& field) const {
    if (!j.is_object() || !j.contains(key)) corrupt(path, field + " is missing");
    return j.at(key);
  }
  std::string str(const json& j, const std::string& key, const std::string& field) const {
    const json& v = at(j, key, field);
    if (!v.is_string()) corrupt(path, field + " must be a string");
    return v.get<std::string>();
  }
  int64_t integer(const json& j, const std::string& key, const std::string& field) const {
    const json& v = at(j, key, field);
    if (!v.is_number_integer()) corrupt(path, field + " must be an integer");
    return v.get<int64_t>();
  }
  double number(const json& j, const std::string& key, const std::string& field) const {
    const json& v = at(j, key, field);
    if (!v.is_number()) corrupt(path, field + " must be a number");
    return v.get<double>();
  }

  FileRef file_ref(const json& j, const std::string& field) const {
    return {str(j, "file", field + ".file"), str(j, "sha256", field + ".sha256"), field + ".file"};
  }

  EngineEntry engine(const json& j, const std::string& field) const {
    EngineEntry e;
    e.artifact = file_ref(j, field);
    if (j.contains("precision")) e.precision = str(j, "precision", field + ".precision");
    if (j.contains("batch_range")) {
      const json& br = j.at("batch_range");
      if (!br.is_array() || br.size() != 2 || !br[0].is_number_integer() || !br[1].is_number_integer() ||
          br[0].get<int64_t>() < 1 || br[0].get<int64_t>() > br[1].get<int64_t>())
        corrupt(path, field + ".batch_range must be [min, max] with 1 <= min <= max");
      e.batch_min = br[0].get<int64_t>(), e.batch_max = br[1].get<int64_t>();
    }
    if (j.contains("builder")) {
      if (!j.at("builder").is_object()) corrupt(path, field + ".builder must be an object");
      e.builder = j.at("builder");
    }
    if (j.contains("extra") && j.at("extra").is_object() && j.at("extra").contains("external_data")) {
      const json& ext = j.at("extra").at("external_data");
      if (!ext.is_array()) corrupt(path, field + ".extra.external_data must be a list");
      for (size_t i = 0; i < ext.size(); ++i)
        e.external_data.push_back(file_ref(ext[i], field + ".extra.external_data[" + std::to_string(i) + "]"));
    }
    return e;
  }

  std::map<std::string, EngineEntry> engines(const json& j, const std::string& field) const {
    std::map<std::string, EngineEntry> out;
    if (!j.contains("engines")) return out;
    const json& e = j.at("engines");
    if (!e.is_object()) corrupt(path, field + ".engines must be an object");
    for (auto it = e.begin(); it != e.end(); ++it) out[it.key()] = engine(it.value(), field + ".engines." + it.key());
    return out;
  }

  ModelEntry model(const json& j, const std::string& field) const {
    ModelEntry m;
    m.name = str(j, "name", field + ".name");
    m.family = str(j, "family", field + ".family");
    m.arch = at(j, "arch", field + ".arch");
    if (!m.arch.is_object()) corrupt(path, field + ".arch must be an object");
    m.channels = static_cast<int>(integer(m.arch, "in_channels", field + ".arch.in_channels"));
    m.height = m.width = static_cast<int>(integer(m.arch, "input_size", field + ".arch.input_size"));
    if (m.channels < 1 || m.height < 1) corrupt(path, field + ".arch: the latent shape must be positive");
    m.engines = engines(j, field);
    return m;
  }

  std::vector<TensorSpec> io(const json& j) const {
    std::vector<TensorSpec> out;
    for (const char* side : {"inputs", "outputs"}) {
      if (!j.contains(side)) continue;
      const json& group = j.at(side);
      if (!group.is_object()) corrupt(path, std::string("io.") + side + " must be an object");
      for (auto it = group.begin(); it != group.end(); ++it) {
        const std::string field = std::string("io.") + side + "." + it.key();
        TensorSpec t;
        t.name = it.key();
        t.input = std::string(side) == "inputs";
        t.dtype = str(it.value(), "dtype", field + ".dtype");
        if (t.dtype != "float32" && t.dtype != "int64" && t.dtype != "int32")
          corrupt(path, field + ".dtype '" + t.dtype + "' is not float32, int64 or int32");
        const json& shape = at(it.value(), "shape", field + ".shape");
        if (!shape.is_array()) corrupt(path, field + ".shape must be a list");
        for (const json& d : shape) {
          if (d.is_number_integer() && d.get<int64_t>() >= 0) t.dims.push_back(d.get<int64_t>());
          else if (d == "B") t.dims.push_back(TensorSpec::kBatch);
          else if (d == "2B") t.dims.push_back(TensorSpec::kDoubleBatch);
          else corrupt(path, field + ".shape has " + d.dump() + "; dims are integers, \"B\" or \"2B\"");
        }
        t.extra = it.value();
        out.push_back(std::move(t));
      }
    }
    return out;
  }
};

std::string shape_text(const ModelEntry& m) {
  return "(" + std::to_string(m.channels) + ", " + std::to_string(m.height) + ", " + std::to_string(m.width) + ")";
}

}  // namespace

Manifest parse_manifest(const json& raw, const std::string& path) {
  Reader r{path};
  if (!raw.is_object()) corrupt(path, "the top level must be an object");
  const json format = raw.value("format", json());
  if (format != kBundleFormat)
    corrupt(path, "format is " + format.dump() + ", not \"" + std::string(kBundleFormat) + "\"");
  const int64_t version = r.integer(raw, "format_version", "format_version");
  if (version != kBundleFormatVersion)
    corrupt(path, "format_version " + std::to_string(version) + " is not one this runtime reads (it reads " +
                      std::to_string(kBundleFormatVersion) + ")");
  Manifest m;
  m.pipeline = r.str(raw, "pipeline", "pipeline");
  if (!kPipelines.count(m.pipeline))
    corrupt(path, "pipeline '" + m.pipeline + "' is unknown to this runtime (it runs dit-class-conditional)");
  const json& sched = r.at(raw, "schedule", "schedule");
  m.schedule_kind = r.str(sched, "kind", "schedule.kind");
  if (!kSchedules.count(m.schedule_kind))
    corrupt(path, "schedule.kind '" + m.schedule_kind + "' is unknown to this runtime (it knows linear)");
  m.num_timesteps = static_cast<int>(r.integer(sched, "num_timesteps", "schedule.num_timesteps"));
  if (m.num_timesteps < 1 || m.num_timesteps > 100000) corrupt(path, "schedule.num_timesteps must be in [1, 100000]");
  m.num_classes = static_cast<int>(r.integer(raw, "num_classes", "num_classes"));
  m.image_size = static_cast<int>(r.integer(raw, "image_size", "image_size"));
  m.latent_scale_factor = r.number(raw, "latent_scale_factor", "latent_scale_factor");
  m.guidance_channels = static_cast<int>(r.integer(raw, "guidance_channels", "guidance_channels"));
  const json& models = r.at(raw, "models", "models");
  if (!models.is_array()) corrupt(path, "models must be a list");
  for (size_t i = 0; i < models.size(); ++i) m.models.push_back(r.model(models[i], "models[" + std::to_string(i) + "]"));
  m.has_vae = raw.contains("vae") && !raw.at("vae").is_null();
  if (raw.contains("io") && raw.at("io").is_object()) m.io = r.io(raw.at("io"));

  // Manifest.validate(): the same rules and messages as Python.
  if (m.models.empty()) fail(TSTITCH_ERR_BUNDLE, "the bundle names no models");
  for (const ModelEntry& model : m.models) {
    if (model.channels != m.channels() || model.height != m.height() || model.width != m.width()) {
      std::string listed;
      for (const ModelEntry& x : m.models) listed += (listed.empty() ? "" : ", ") + x.name + ": " + shape_text(x);
      fail(TSTITCH_ERR_BUNDLE, "the models' latent shapes differ (" + listed +
                                   "); stitched models must share one latent space");
    }
  }
  std::set<int64_t> classes;
  for (const ModelEntry& model : m.models)
    classes.insert(model.arch.contains("num_classes") && model.arch["num_classes"].is_number_integer()
                       ? model.arch["num_classes"].get<int64_t>()
                       : m.num_classes);
  if (classes.size() > 1) {
    std::string listed;
    for (int64_t c : classes) listed += (listed.empty() ? "" : ", ") + std::to_string(c);
    fail(TSTITCH_ERR_BUNDLE, "the models' class counts differ ([" + listed + "]); they must share one label space");
  }
  return m;
}

Manifest read_manifest(const std::string& bundle_dir) {
  std::error_code ec;
  if (!fs::is_directory(bundle_dir, ec))
    fail(TSTITCH_ERR_BUNDLE, "bundle " + bundle_dir + " does not exist; build one with `tstitch-trt build`");
  const std::string path = (fs::path(bundle_dir) / "manifest.json").string();
  if (!fs::is_regular_file(path, ec))
    fail(TSTITCH_ERR_BUNDLE, bundle_dir + " is not a bundle (no manifest.json); rebuild it with `tstitch-trt build`");
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) fail(TSTITCH_ERR_BUNDLE, "cannot read " + path + "; check its permissions");
  json raw = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (raw.is_discarded()) corrupt(path, "not valid JSON");
  return parse_manifest(raw, path);
}

std::string sealed_path(const std::string& bundle_dir, const std::string& rel, const std::string& field) {
  const fs::path p(rel);
  const std::string rule = "; bundle paths are relative and stay inside the bundle: rebuild the bundle";
  if (rel.empty()) fail(TSTITCH_ERR_BUNDLE, "manifest.json: " + field + " is empty" + rule);
  if (p.is_absolute() || p.has_root_name() || p.has_root_directory())
    fail(TSTITCH_ERR_BUNDLE, "manifest.json: " + field + " is an absolute path (" + rel + ")" + rule);
  for (const fs::path& part : p)
    if (part == "..") fail(TSTITCH_ERR_BUNDLE, "manifest.json: " + field + " (" + rel + ") leaves the bundle with .." + rule);
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(fs::path(bundle_dir), ec);
  const fs::path full = fs::weakly_canonical(fs::path(bundle_dir) / p, ec);
  const std::string root_s = root.string() + "/", full_s = full.string();
  if (ec || full_s.compare(0, root_s.size(), root_s) != 0)
    fail(TSTITCH_ERR_BUNDLE, "manifest.json: " + field + " (" + rel + ") resolves outside the bundle (a symlink?)" + rule);
  return (fs::path(bundle_dir) / p).string();
}

std::string artifact_path(const std::string& bundle_dir, const EngineEntry& entry, bool verify) {
  std::vector<FileRef> files = {entry.artifact};
  files.insert(files.end(), entry.external_data.begin(), entry.external_data.end());
  for (const FileRef& f : files) {
    const std::string path = sealed_path(bundle_dir, f.file, f.field);
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) fail(TSTITCH_ERR_BUNDLE, "bundle file " + path + " is missing; rebuild the bundle");
    if (verify && sha256_file(path) != f.sha256)
      fail(TSTITCH_ERR_BUNDLE, "checksum mismatch for " + path + ": the file changed since the build; rebuild the bundle");
  }
  return sealed_path(bundle_dir, entry.artifact.file, entry.artifact.field);
}

}  // namespace tstitch
