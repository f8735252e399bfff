#include "roles.hpp"

#include <algorithm>
#include <cctype>
#include <set>

#include "errors.hpp"

namespace tstitch {
namespace {

[[noreturn]] void bad(const std::string& what) {
  fail(TSTITCH_ERR_BUNDLE, "the bundle manifest's io " + what + "; rebuild the bundle");
}

std::string dims_text(const std::vector<Dim>& shape) {
  std::string s;
  for (const Dim& d : shape) s += (s.empty() ? "" : ", ") + (d.symbol.empty() ? std::to_string(d.size) : "'" + d.symbol + "'");
  return "[" + s + "]";
}

std::vector<TensorSpec> dit_io(const Manifest& m, int k) {
  const std::vector<Dim> lat = {{0, "B"}, {m.channels(), ""}, {m.height(), ""}, {m.width(), ""}};
  auto t = [](const char* n, bool in, const char* dt, std::vector<Dim> d) { return TensorSpec{n, in, dt, std::move(d)}; };
  return {t("x", true, "float32", lat),           t("t", true, "int64", {{0, "B"}}),
          t("y", true, "int64", {{0, "B"}}),      t("guidance", true, "float32", {}),
          t("coef", true, "float32", {{k, ""}}),  t("prev_x0", true, "float32", lat),
          t("noise", true, "float32", lat),       t("x_next", false, "float32", lat),
          t("x0", false, "float32", lat)};
}

}  // namespace

std::vector<Binding> resolve_roles(const Manifest& m, int num_coefs) {
  const std::vector<TensorSpec> io = m.io.empty() && !m.roles_recorded ? dit_io(m, num_coefs) : m.io;
  const IoRoles& r = m.roles;
  auto spec_of = [&](const std::string& name, bool input) -> const TensorSpec* {
    auto it = std::find_if(io.begin(), io.end(), [&](const TensorSpec& t) { return t.name == name && t.input == input; });
    return it == io.end() ? nullptr : &*it;
  };
  std::vector<std::string> missing;
  auto need = [&](const std::string& name, bool input) {
    if (!spec_of(name, input)) missing.push_back(name);
  };
  for (const auto& [in, out] : r.state) need(in, true), need(out, false);
  for (const std::string& n : r.step) need(n, true);
  for (const std::string& n : r.request) need(n, true);
  if (!missing.empty()) {  // io_roles.StepIO.from_io's refusal
    std::string listed;
    for (const std::string& n : missing) listed += (listed.empty() ? "" : ", ") + n;
    fail(TSTITCH_ERR_BUNDLE, "the bundle manifest's io has no shape for " + listed + "; rebuild the bundle");
  }
  if (r.state.empty()) bad("names no state pair (the first carries the latent)");
  std::vector<Binding> out;
  for (const auto& [in, o] : r.state) {
    const TensorSpec &a = *spec_of(in, true), &b = *spec_of(o, false);
    if (!(a.shape == b.shape) || a.dtype != b.dtype)
      bad("pairs " + in + " " + dims_text(a.shape) + " " + a.dtype + " with " + o + " " + dims_text(b.shape) + " " + b.dtype +
          "; a state pair has one shape and dtype");
    out.push_back({a, Role::kStateIn, o, "", out.empty()});
  }
  for (const std::string& n : r.step) {
    // t, coef, noise come from the plan's own fields; others (control_scale) from plan.tables by name
    static const std::map<std::string, std::string> sources = {{"t", "timestep"}, {"coef", "coef"}, {"noise", "noise"}};
    auto known = sources.find(n);
    out.push_back({*spec_of(n, true), Role::kStep, "", known != sources.end() ? known->second : n, false});
  }
  bool cond = false;
  for (const std::string& n : r.request) {
    std::string source = n == "guidance" ? "guidance" : cond ? n : "cond";
    cond = cond || source == "cond";
    out.push_back({*spec_of(n, true), Role::kRequest, "", source, false});
  }
  for (const auto& [in, o] : r.state) out.push_back({*spec_of(o, false), Role::kStateOut, in, "", false});
  return out;
}

DimValues latent_dims(const TensorSpec& latent, const std::vector<int64_t>& shape) {
  auto refuse = [&] {
    std::string have;
    for (int64_t n : shape) have += (have.empty() ? "" : ", ") + std::to_string(n);
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the latent has shape (" + have + "), the step graphs take " + dims_text(latent.shape));
  };
  if (latent.shape.size() != shape.size()) refuse();
  DimValues dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (!latent.shape[i].symbol.empty()) dims[latent.shape[i].symbol] = shape[i];
    else if (latent.shape[i].size != shape[i]) refuse();
  }
  if (!dims.count("B")) fail(TSTITCH_ERR_BUNDLE, "the latent " + latent.name + " has no batch dimension \"B\"; rebuild the bundle");
  dims["2B"] = 2 * dims["B"];
  return dims;
}

std::vector<int64_t> resolve_dims(const TensorSpec& t, const DimValues& dims) {
  std::vector<int64_t> d;
  for (const Dim& x : t.shape) {
    if (x.symbol.empty()) {
      d.push_back(x.size);
      continue;
    }
    d.push_back(resolve_dim(x.symbol, dims, t.name));
  }
  return d;
}

int64_t resolve_dim(const std::string& symbol, const DimValues& dims, const std::string& tensor) {
  auto it = dims.find(symbol);
  if (it != dims.end()) return it->second;
  // "<Name>/<k>": a latent dim over k (a kept feature one level down); the latent's must divide
  if (const size_t slash = symbol.find('/'); slash != std::string::npos) {
    const std::string name = symbol.substr(0, slash), den = symbol.substr(slash + 1);
    auto base = dims.find(name);
    const bool digits = !den.empty() && den.size() <= 6 && den[0] != '0' &&
                        std::all_of(den.begin(), den.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (base == dims.end() || !digits)
      fail(TSTITCH_ERR_BUNDLE, "the step input " + tensor + " has the dimension '" + symbol +
                                   "', which the latent's shape does not define; rebuild the bundle");
    const int64_t f = std::stoll(den);
    if (base->second % f)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "the latent's " + name + " = " + std::to_string(base->second) + " is not a multiple of " +
                                             std::to_string(f) + ", which the step graphs need; choose another size");
    return base->second / f;
  }
  // "<k><Name>": k times a latent dim (io_roles.resolve_dim's [1-9][0-9]*[A-Za-z_][A-Za-z0-9_]*)
  size_t digits = 0;
  while (digits < symbol.size() && symbol[digits] >= '0' && symbol[digits] <= '9') ++digits;
  const std::string name = symbol.substr(digits);
  const bool word = !name.empty() && (std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_') &&
                    std::all_of(name.begin(), name.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
  auto base = dims.find(name);
  if (digits == 0 || digits > 6 || symbol[0] == '0' || !word || base == dims.end())
    fail(TSTITCH_ERR_BUNDLE, "the step input " + tensor + " has the dimension '" + symbol +
                                 "', which the latent's shape does not define; rebuild the bundle");
  return std::stoll(symbol.substr(0, digits)) * base->second;
}

size_t dtype_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "int64") return 8;
  fail(TSTITCH_ERR_UNAVAILABLE, "the step graphs use " + dtype + " tensors, which this runtime does not feed yet; rebuild with fp32 I/O");
}

}  // namespace tstitch
