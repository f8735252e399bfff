#include "roles.hpp"

#include <map>
#include <set>

#include "errors.hpp"

namespace tstitch {
namespace {

struct DefaultRole {
  Role role;
  const char* pair_or_source;
};

const std::map<std::string, DefaultRole>& dit_roles() {
  static const std::map<std::string, DefaultRole> roles = {
      {"x", {Role::kStateIn, "x_next"}},       {"x_next", {Role::kStateOut, "x"}},
      {"prev_x0", {Role::kStateIn, "x0"}},     {"x0", {Role::kStateOut, "prev_x0"}},
      {"t", {Role::kStep, "timestep"}},        {"coef", {Role::kStep, "coef"}},
      {"noise", {Role::kStep, "noise"}},       {"y", {Role::kRequest, "class_labels"}},
      {"guidance", {Role::kRequest, "guidance"}},
  };
  return roles;
}

[[noreturn]] void bad(const std::string& what) {
  fail(TSTITCH_ERR_BUNDLE, "manifest.json: io." + what + "; rebuild the bundle with this version");
}

std::vector<TensorSpec> dit_io(const Manifest& m, int k) {
  const std::vector<int64_t> lat = {TensorSpec::kBatch, m.channels(), m.height(), m.width()};
  auto t = [](const char* n, bool in, const char* dt, std::vector<int64_t> d) {
    TensorSpec s;
    s.name = n, s.input = in, s.dtype = dt, s.dims = std::move(d), s.extra = nlohmann::json::object();
    return s;
  };
  return {t("x", true, "float32", lat),           t("t", true, "int64", {TensorSpec::kBatch}),
          t("y", true, "int64", {TensorSpec::kBatch}), t("guidance", true, "float32", {}),
          t("coef", true, "float32", {k}),        t("prev_x0", true, "float32", lat),
          t("noise", true, "float32", lat),       t("x_next", false, "float32", lat),
          t("x0", false, "float32", lat)};
}

}  // namespace

std::vector<Binding> resolve_roles(const Manifest& m, int num_coefs) {
  const std::vector<TensorSpec> io = m.io.empty() ? dit_io(m, num_coefs) : m.io;
  std::vector<Binding> out;
  std::map<std::string, const TensorSpec*> by_name;
  for (const TensorSpec& t : io) by_name[t.name] = &t;
  for (const TensorSpec& t : io) {
    Binding b;
    b.spec = t;
    const std::string side = (t.input ? "inputs." : "outputs.") + t.name;
    const std::string role = t.extra.is_object() && t.extra.contains("role") && t.extra["role"].is_string()
                                 ? t.extra["role"].get<std::string>() : "";
    if (role.empty()) {
      auto it = dit_roles().find(t.name);
      if (it == dit_roles().end()) bad(side + " has no role and is not a DiT step-graph tensor");
      b.role = it->second.role;
      (b.role == Role::kStateIn || b.role == Role::kStateOut ? b.pair : b.source) = it->second.pair_or_source;
    } else if (role == "state") {
      b.role = t.input ? Role::kStateIn : Role::kStateOut;
      if (!t.extra.contains("pair") || !t.extra["pair"].is_string()) bad(side + ".pair is missing (a state tensor's other half)");
      b.pair = t.extra["pair"].get<std::string>();
    } else if (role == "step" || role == "request") {
      b.role = role == "step" ? Role::kStep : Role::kRequest;
      const char* key = role == "step" ? "table" : "source";
      if (!t.extra.contains(key) || !t.extra[key].is_string()) bad(side + "." + key + " is missing");
      b.source = t.extra[key].get<std::string>();
      if (!t.input) bad(side + " is an output with role " + role + "; only state tensors are outputs");
    } else {
      bad(side + ".role '" + role + "' is unknown (state, step or request)");
    }
    if (b.role == Role::kStateIn || b.role == Role::kStateOut) {
      auto it = by_name.find(b.pair);
      if (it == by_name.end() || it->second->input == t.input)
        bad(side + " pairs with '" + b.pair + "', which is not a state tensor of the other direction");
      if (it->second->dims != t.dims || it->second->dtype != t.dtype) bad(side + " and its pair " + b.pair + " differ in shape or dtype");
    }
    b.latent = b.role == Role::kStateIn &&
               (t.extra.is_object() && t.extra.contains("latent") ? t.extra["latent"] == true : t.name == "x");
    out.push_back(std::move(b));
  }
  int latents = 0;
  for (const Binding& b : out) latents += b.latent;
  if (latents != 1) bad("names " + std::to_string(latents) + " latent state inputs; exactly one (x) carries the latent");
  return out;
}

std::vector<int64_t> resolve_dims(const TensorSpec& t, int64_t batch) {
  std::vector<int64_t> d;
  for (int64_t v : t.dims) d.push_back(v == TensorSpec::kBatch ? batch : v == TensorSpec::kDoubleBatch ? 2 * batch : v);
  return d;
}

size_t dtype_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "int64") return 8;
  fail(TSTITCH_ERR_BUNDLE, "dtype " + dtype + " is not float32, int64 or int32");
}

}  // namespace tstitch
