#include "manifest.hpp"

#include <filesystem>
#include <fstream>
#include <set>
#include <cmath>
#include <iterator>
#include <sstream>

#include "errors.hpp"
#include "graph_refs.hpp"
#include "pyrepr.hpp"
#include "schema.hpp"
#include "verified.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace tstitch {
namespace {

using ojson = nlohmann::ordered_json;

[[noreturn]] void refuse(const std::string& why) { fail(TSTITCH_ERR_BUNDLE, why); }

// Fields are read after the schema accepted the manifest: types and ranges hold here.
FileRef file_ref(const ojson& j, const std::string& field) {
  return {j.at("file").get<std::string>(), j.at("sha256").get<std::string>(), field + ".file"};
}

EngineEntry engine(const ojson& j, const std::string& field) {
  EngineEntry e;
  e.artifact = file_ref(j, field);
  e.precision = j.value("precision", "fp32");
  if (j.contains("batch_range")) e.batch_min = j["batch_range"][0].get<int64_t>(), e.batch_max = j["batch_range"][1].get<int64_t>();
  if (j.contains("builder")) e.builder = json::parse(j["builder"].dump());
  const ojson extra = j.value("extra", ojson::object());
  for (const char* key : {"external_data", "files"})
    if (extra.contains(key))
      for (size_t i = 0; i < extra[key].size(); ++i)
        e.external_data.push_back(file_ref(extra[key][i], field + ".extra." + key + "[" + std::to_string(i) + "]"));
  return e;
}

std::map<std::string, EngineEntry> engines(const ojson& j, const std::string& field) {
  std::map<std::string, EngineEntry> out;
  for (auto it = j.begin(); it != j.end(); ++it) out[it.key()] = engine(it.value(), field + "." + it.key());
  return out;
}

ModelEntry model(const ojson& j, const std::string& field) {
  ModelEntry m;
  m.name = j.at("name").get<std::string>();
  m.family = j.at("family").get<std::string>();
  m.arch = json::parse(j.at("arch").dump());
  // U-Nets take any H, W: sample_size is their default (ModelEntry.latent_shape)
  const char* size = m.arch.contains("input_size") ? "input_size" : "sample_size";
  if (!m.arch.contains("in_channels") || !m.arch["in_channels"].is_number_integer() || !m.arch.contains(size) ||
      !m.arch[size].is_number_integer())
    refuse(m.name + ": arch has no integer in_channels and " + size + "; rebuild the bundle");
  m.channels = m.arch["in_channels"].get<int>();
  m.height = m.width = m.arch[size].get<int>();
  m.engines = engines(j.at("engines"), field + ".engines");
  if (j.contains("bf16")) m.bf16 = json::parse(j.at("bf16").dump());
  if (j.contains("cached") && j["cached"].is_object()) {  // the schema holds its fields' types
    const ojson& c = j["cached"];
    m.has_cached = true;
    m.cached_engines = engines(c.at("engines"), field + ".cached.engines");
    m.cached_feature.dtype = c["feature"].at("dtype").get<std::string>();
    for (const ojson& d : c["feature"].at("shape"))
      m.cached_feature.shape.push_back(d.is_string() ? Dim{0, d.get<std::string>()} : Dim{d.get<int64_t>(), ""});
  }
  return m;
}

std::vector<TensorSpec> io_specs(const ojson& io) {
  std::vector<TensorSpec> out;
  for (const char* side : {"inputs", "outputs"}) {
    if (!io.contains(side)) continue;
    for (auto it = io[side].begin(); it != io[side].end(); ++it) {
      TensorSpec t;
      t.name = it.key();
      t.input = std::string(side) == "inputs";
      t.dtype = it.value().at("dtype").get<std::string>();
      for (const ojson& d : it.value().at("shape"))
        t.shape.push_back(d.is_string() ? Dim{0, d.get<std::string>()} : Dim{d.get<int64_t>(), ""});
      out.push_back(std::move(t));
    }
  }
  return out;
}

IoRoles io_roles(const ojson& roles) {
  IoRoles r;
  for (const ojson& pair : roles.at("state")) r.state.emplace_back(pair[0].get<std::string>(), pair[1].get<std::string>());
  for (const ojson& n : roles.at("step")) r.step.push_back(n.get<std::string>());
  for (const ojson& n : roles.at("request")) r.request.push_back(n.get<std::string>());
  if (roles.contains("cache") && !roles["cache"].empty())  // one (input, output) pair (the schema says so)
    r.cache = {roles["cache"][0][0].get<std::string>(), roles["cache"][0][1].get<std::string>()};
  return r;
}

std::string shape_text(const ModelEntry& m) {
  return "(" + std::to_string(m.channels) + ", " + std::to_string(m.height) + ", " + std::to_string(m.width) + ")";
}

template <class T>
std::string py_list(const std::set<T>& values) {
  ojson list = ojson::array();
  for (const T& v : values) list.push_back(v);
  return py_repr(list);
}

void validate_cache(const Manifest& m, const ojson& raw);

// Manifest._validate_dit
void validate_dit(const Manifest& m, const ojson& raw) {
  std::set<int64_t> classes;
  for (const ModelEntry& model : m.models)
    classes.insert(model.arch.contains("num_classes") ? model.arch["num_classes"].get<int64_t>() : m.num_classes);
  if (classes != std::set<int64_t>{m.num_classes})
    refuse("the models' class counts (" + py_list(classes) + ") differ from num_classes " + std::to_string(m.num_classes) +
           "; they must share one label space");
  for (const ModelEntry& model : m.models) {
    const json& a = model.arch;
    for (auto [num, den] : {std::pair{"input_size", "patch_size"}, std::pair{"hidden_size", "num_heads"}})
      if (a.contains(num) && a.contains(den) && a[den].get<int64_t>() != 0 && a[num].get<int64_t>() % a[den].get<int64_t>())
        refuse(model.name + ": " + num + " " + a[num].dump() + " is not a multiple of " + den + " " + a[den].dump());
  }
  const int c = m.channels(), h = m.height(), w = m.width();
  if (m.guidance_channels > c)
    refuse("guidance_channels " + std::to_string(m.guidance_channels) + " exceeds the latent's " + std::to_string(c) + " channels");
  const bool pixel_space = !m.has_vae && m.latent_scale_factor == 1.0;
  if (h != w || (pixel_space && m.image_size != h) || (!pixel_space && m.image_size % h))
    refuse("image_size " + std::to_string(m.image_size) + " does not fit the models' latent " + std::to_string(h) + "x" +
           std::to_string(w));
  if (raw.contains("io") && !raw["io"].empty()) {
    const ojson& io = raw["io"];
    for (const char* name : {"x", "x_next"}) {
      const ojson* spec = nullptr;
      for (const char* side : {"inputs", "outputs"})
        if (!spec && io.contains(side) && io[side].contains(name)) spec = &io[side][name];
      if (spec == nullptr) continue;
      const ojson& shape = spec->at("shape");
      const ojson tail = shape.empty() ? ojson::array() : ojson(std::vector<ojson>(shape.begin() + 1, shape.end()));
      if (tail != ojson::array({c, h, w}))
        refuse(std::string("io: ") + name + " has shape " + py_repr(shape) + ", but the models' latent is " + std::to_string(c) +
               "x" + std::to_string(h) + "x" + std::to_string(w));
    }
  }
  // Python's truthiness test over these fields (tokenizer_2 is not among them there either)
  for (const char* part : {"text_encoder", "tokenizer", "scheduler", "text_encoder_2", "conditioning"})
    if (raw.contains(part) && !raw[part].is_null() && !raw[part].empty())
      refuse("a class-conditional (DiT) bundle has a text encoder, tokenizer or scheduler entry; rebuild the bundle");
  if (!m.cache_scheme.empty() && m.cache_scheme != "fora")
    refuse("a class-conditional (DiT) bundle caches with FORA, not " + m.cache_scheme + "; rebuild the bundle");
  validate_cache(m, raw);
}

// Manifest._validate_cache: `cache`, io.roles.cache and every model's `cached` come together; each model has a
// cached graph for every kind it has a (full) graph for, torch aside
void validate_cache(const Manifest& m, const ojson& raw) {
  const ojson io = raw.value("io", ojson::object());
  const bool roles = io.is_object() && io.contains("roles") && io["roles"].is_object() && io["roles"].contains("cache");
  const bool cache = raw.contains("cache") && !raw["cache"].is_null();
  bool any = cache || roles, all = cache && roles;
  for (const ModelEntry& model : m.models) any = any || model.has_cached, all = all && model.has_cached;
  if (any && !all)
    refuse("cache, io.roles.cache and every model's cached entry come together (DeepCache's full and cached step graphs); "
           "rebuild the bundle");
  for (const ModelEntry& model : m.models) {
    std::string missing;
    for (const auto& [kind, e] : model.engines)
      if (kind != "torch" && !model.cached_engines.count(kind)) missing += (missing.empty() ? "" : ", ") + kind;
    if (model.has_cached && !missing.empty())
      refuse(model.name + ": no cached step graph for " + missing + "; rebuild the bundle");
  }
}

// Python's str() of a JSON scalar as an f-string shows it: a number, a string as is, null as None
std::string py_int_or_none(const ojson& v) {
  if (v.is_string()) return v.get<std::string>();
  return v.is_null() ? "None" : v.dump();
}

// Manifest._validate_sdxl: the pooled width agrees between the conditioning, the step graphs and text_encoder_2
void validate_sdxl(const ojson& raw, const ojson& io) {
  const ojson none;
  const ojson cond = raw.value("conditioning", ojson::object());
  const ojson want = cond.is_object() && cond.contains("text_embeds_dim") ? cond["text_embeds_dim"] : none;
  auto last_dim = [&](const ojson& specs, const char* name) -> ojson {
    if (!specs.is_object() || !specs.contains(name) || !specs[name].contains("shape")) return none;
    const ojson& shape = specs[name]["shape"];
    return shape.empty() ? none : shape.back();
  };
  const ojson graph = last_dim(io.value("inputs", ojson::object()), "text_embeds");
  const ojson te2 = raw.value("text_encoder_2", ojson());
  const ojson pooled = te2.is_object() && te2.contains("io") ? last_dim(te2["io"].value("outputs", ojson::object()), "text_embeds")
                                                             : none;
  const bool truthy = want.is_number_integer() && want.get<int64_t>() != 0;
  if (!truthy || graph != want || pooled != want)
    refuse("the sdxl bundle's pooled text_embeds widths disagree (conditioning " + py_int_or_none(want) + ", step graphs " +
           py_int_or_none(graph) + ", text_encoder_2 " + py_int_or_none(pooled) + "); rebuild the bundle");
}

// Manifest._validate_sd
void validate_sd(const Manifest& m, const ojson& raw) {
  std::set<int64_t> widths, text_width;
  std::string listed;
  for (const ModelEntry& model : m.models) {
    widths.insert(model.arch.at("cross_attention_dim").get<int64_t>());
    listed += (listed.empty() ? "" : ", ") + model.name + ": " + model.arch.at("cross_attention_dim").dump();
  }
  // Manifest._text_width: the context width the text encoder(s) produce (SDXL: both, concatenated)
  int64_t total = 0;
  for (const char* part : {"text_encoder", "text_encoder_2"}) {
    const ojson te = raw.value(part, ojson());
    if (!te.is_object() || !te.contains("io") || !te["io"].contains("outputs")) continue;
    const ojson& outs = te["io"]["outputs"];
    if (!outs.contains("text_embeddings") || !outs["text_embeddings"].contains("shape")) continue;
    const ojson& shape = outs["text_embeddings"]["shape"];
    if (!shape.empty() && shape.back().is_number_integer()) total += shape.back().get<int64_t>();
  }
  if (total) text_width.insert(total);
  if (widths.size() > 1 || (!text_width.empty() && text_width != widths))
    refuse("the U-Nets' cross-attention widths (" + listed + ") and the text encoder's (" + py_list(text_width) +
           ") must all be equal; rebuild the bundle");
  const ojson io = raw.value("io", ojson::object());
  if (!io.contains("roles") || io["roles"].empty())
    refuse("io.roles is missing: a text-to-image bundle must record its step graph's roles");
  if (m.pipeline == "sdxl") validate_sdxl(raw, io);
  std::set<std::string> names, named, diff;
  for (const TensorSpec& t : m.io) names.insert(t.name);
  for (const auto& [in, out] : m.roles.state) named.insert(in), named.insert(out);
  named.insert(m.roles.step.begin(), m.roles.step.end());
  named.insert(m.roles.request.begin(), m.roles.request.end());
  if (!m.cache_scheme.empty() && m.cache_scheme != "deepcache")
    refuse("a text-to-image bundle caches with DeepCache, not " + m.cache_scheme + "; rebuild the bundle");
  validate_cache(m, raw);
  std::set_symmetric_difference(named.begin(), named.end(), names.begin(), names.end(), std::inserter(diff, diff.end()));
  if (!diff.empty()) {
    std::set<std::string> first3;
    for (const std::string& n : diff)
      if (first3.size() < 3) first3.insert(n);
    refuse("io.roles names " + py_list(first3) + " that are not (or not all) the step graph's inputs and outputs; rebuild the bundle");
  }
  const ojson cond = raw.value("conditioning", ojson());
  const bool has_controlnet = cond.is_object() && cond.contains("controlnet") && !cond["controlnet"].is_null();
  const bool has_control_image = io.contains("inputs") && io["inputs"].is_object() && io["inputs"].contains("control_image");
  if (has_controlnet != has_control_image)
    refuse("conditioning.controlnet and the step graphs' control_image input come together (a ControlNet runs inside the step "
           "graphs); rebuild the bundle");
}

}  // namespace

Manifest parse_manifest(const json& raw, const std::string& where) { return parse_manifest(ojson::parse(raw.dump()), where); }

Manifest parse_manifest(const ojson& raw, const std::string& where) {
  validate_manifest_schema(raw, where);
  Manifest m;
  m.pipeline = raw["pipeline"].get<std::string>();
  m.schedule_kind = raw["schedule"]["kind"].get<std::string>();
  m.num_timesteps = raw["schedule"]["num_timesteps"].get<int>();
  m.num_classes = raw["num_classes"].get<int>();
  m.image_size = raw["image_size"].get<int>();
  m.latent_scale_factor = raw["latent_scale_factor"].get<double>();
  m.guidance_channels = raw["guidance_channels"].get<int>();
  for (size_t i = 0; i < raw["models"].size(); ++i) m.models.push_back(model(raw["models"][i], "models[" + std::to_string(i) + "]"));
  m.has_vae = raw.contains("vae") && !raw["vae"].is_null();
  if (raw.contains("cache") && raw["cache"].is_object()) {  // DeepCache has a branch, FORA none (the schema says which)
    m.cache_scheme = raw["cache"]["scheme"].get<std::string>();
    if (raw["cache"].contains("branch")) m.cache_branch = raw["cache"]["branch"].get<int>();
  }
  m.has_text_encoder = raw.contains("text_encoder") && !raw["text_encoder"].is_null();
  if (raw.contains("scheduler") && !raw["scheduler"].is_null()) m.scheduler = json::parse(raw["scheduler"].dump());
  if (m.has_vae) m.vae_engines = engines(raw["vae"]["engines"], "vae.engines");
  if (m.has_text_encoder) {
    m.text_encoder_engines = engines(raw["text_encoder"]["engines"], "text_encoder.engines");
    m.text_encoder_io = io_specs(raw["text_encoder"]["io"]);
  }
  m.has_text_encoder_2 = raw.contains("text_encoder_2") && !raw["text_encoder_2"].is_null();
  if (m.has_text_encoder_2) {
    m.text_encoder_2_engines = engines(raw["text_encoder_2"]["engines"], "text_encoder_2.engines");
    m.text_encoder_2_io = io_specs(raw["text_encoder_2"]["io"]);
  }
  for (auto [key, label] : {std::pair{"text_encoder", "text encoder"}, std::pair{"text_encoder_2", "text encoder 2"},
                            std::pair{"vae", "VAE decoder"}})
    if (raw.contains(key) && raw[key].is_object() && !raw[key].empty())  // Python's getattr(manifest, key) is truthy
      m.aux_bf16.emplace_back(label, raw[key].contains("bf16") ? json::parse(raw[key]["bf16"].dump()) : json());
  for (auto [key, out] : {std::pair{"tokenizer", &m.tokenizer}, std::pair{"tokenizer_2", &m.tokenizer_2}}) {
    if (!raw.contains(key) || !raw[key].is_object()) continue;  // the schema holds the fields' types
    const ojson& t = raw[key];
    out->present = true;
    out->file.artifact = {t["file"]["file"].get<std::string>(), t["file"]["sha256"].get<std::string>(), std::string(key) + ".file.file"};
    out->max_length = t["max_length"].get<int64_t>();
    out->pad_id = t["pad_id"].get<int64_t>();
    out->kind = t["kind"].get<std::string>();
  }
  if (raw.contains("conditioning") && raw["conditioning"].is_object()) {  // the schema holds its fields' types
    const ojson& c = raw["conditioning"];
    m.conditioning.guidance = c["guidance"].get<std::string>();
    m.conditioning.force_zeros_for_empty_prompt = c.value("force_zeros_for_empty_prompt", true);  // Python's default
    m.conditioning.text_embeds_dim = c.value("text_embeds_dim", int64_t{0});
    m.conditioning.time_ids = c.value("time_ids", int64_t{0});
    if (c.contains("controlnet") && c["controlnet"].is_object()) {
      const ojson& net = c["controlnet"];
      m.conditioning.controlnet = true;
      m.conditioning.controlnet_family = net["family"].get<std::string>();
      m.conditioning.controlnet_channels = net["conditioning_channels"].get<int64_t>();
      m.conditioning.controlnet_engines = engines(net["engines"], "conditioning.controlnet.engines");
    }
  }
  const ojson io = raw.value("io", ojson::object());
  m.io = io_specs(io);
  if (io.contains("dim_ranges"))  // the schema holds them to three integers each
    for (auto it = io["dim_ranges"].begin(); it != io["dim_ranges"].end(); ++it)
      m.dim_ranges[it.key()] = it.value().get<std::vector<int64_t>>();
  m.roles_recorded = io.contains("roles");
  m.roles = m.roles_recorded ? io_roles(io["roles"])
                             : IoRoles{{{"x", "x_next"}, {"prev_x0", "x0"}}, {"t", "coef", "noise"}, {"y", "guidance"}, {}};

  // Manifest.validate(): the same rules, in the same order, with the same messages as Python.
  if (m.models.empty()) refuse("the bundle names no models");
  for (const ModelEntry& model : m.models) {
    if (model.channels != m.channels() || model.height != m.height() || model.width != m.width()) {
      std::string listed;
      for (const ModelEntry& x : m.models) listed += (listed.empty() ? "" : ", ") + x.name + ": " + shape_text(x);
      refuse("the models' latent shapes differ (" + listed + "); stitched models must share one latent space");
    }
  }
  std::vector<std::pair<std::string, const ojson*>> parts;
  for (const ojson& model : raw["models"]) parts.emplace_back(model["name"].get<std::string>(), &model["engines"]);
  // Manifest.artifacts()' order: models, VAE, text encoder, text encoder 2, ControlNet (tokenizers have no range)
  for (auto [part, label] : {std::pair{"vae", "VAE"}, std::pair{"text_encoder", "text encoder"},
                             std::pair{"text_encoder_2", "text encoder 2"}})
    if (raw.contains(part) && raw[part].is_object() && raw[part].contains("engines")) parts.emplace_back(label, &raw[part]["engines"]);
  if (raw.contains("conditioning") && raw["conditioning"].is_object() && raw["conditioning"].contains("controlnet") &&
      raw["conditioning"]["controlnet"].is_object())
    parts.emplace_back("ControlNet", &raw["conditioning"]["controlnet"]["engines"]);
  for (const auto& [label, engines] : parts)
    for (auto it = engines->begin(); it != engines->end(); ++it) {
      const ojson range = it.value().value("batch_range", ojson::array({1, 16}));
      if (range[0].get<int64_t>() > range[1].get<int64_t>())
        refuse(label + " " + it.key() + ": batch_range [" + range[0].dump() + ", " + range[1].dump() + "] is empty (min > max)");
    }
  if (!std::isfinite(m.latent_scale_factor)) refuse("latent_scale_factor is not a finite number");
  if (m.text_to_image()) validate_sd(m, raw);
  else validate_dit(m, raw);
  return m;
}

Manifest read_manifest(const std::string& bundle_dir) {
  std::error_code ec;
  if (!fs::is_directory(bundle_dir, ec))
    fail(TSTITCH_ERR_BUNDLE, "bundle " + bundle_dir + " does not exist; build one with `tstitch-trt build`");
  const std::string path = (fs::path(bundle_dir) / "manifest.json").string();
  if (!fs::is_regular_file(path, ec))
    fail(TSTITCH_ERR_BUNDLE, bundle_dir + " is not a bundle (no manifest.json); rebuild it with `tstitch-trt build`");
  const auto size = fs::file_size(path, ec);
  if (!ec && size > (16u << 20))  // bundle/manifest.py's MAX_MANIFEST_BYTES
    fail(TSTITCH_ERR_BUNDLE, path + " is " + std::to_string(size) + " bytes, far larger than a manifest; rebuild the bundle");
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) fail(TSTITCH_ERR_BUNDLE, "cannot read " + path + "; check its permissions");
  ojson raw = ojson::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (raw.is_discarded()) fail(TSTITCH_ERR_BUNDLE, path + " is not valid JSON; rebuild the bundle");
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
    if (verify && !file_has_sha256(path, f.sha256))  // remembered per file version, shared with Python
      fail(TSTITCH_ERR_BUNDLE, "checksum mismatch for " + path + ": the file changed since the build; rebuild the bundle");
  }
  const std::string& rel = entry.artifact.file;
  if (rel.size() > 5 && rel.compare(rel.size() - 5, 5, ".onnx") == 0) {  // what the graph itself names
    std::vector<std::string> sealed;
    for (const FileRef& f : files) sealed.push_back(f.file);
    check_graph_references(bundle_dir, rel, sealed);
  }
  return sealed_path(bundle_dir, entry.artifact.file, entry.artifact.field);
}

}  // namespace tstitch
