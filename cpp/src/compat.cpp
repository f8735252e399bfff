#include "compat.hpp"

#include <algorithm>
#include <cctype>
#include <vector>

#include "errors.hpp"

namespace tstitch {

std::string cc_string(int major, int minor) { return std::to_string(major) + "." + std::to_string(minor); }

std::string cc_string(const std::string& cc) {
  std::string s;
  for (char c : cc) s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  s.erase(std::remove(s.begin(), s.end(), ' '), s.end());
  if (s.rfind("sm_", 0) == 0) s = s.substr(3);
  else if (s.rfind("sm", 0) == 0) s = s.substr(2);
  try {
    const size_t dot = s.find('.');
    if (dot != std::string::npos) return cc_string(std::stoi(s.substr(0, dot)), std::stoi(s.substr(dot + 1)));
    if (s.size() < 2) throw std::invalid_argument(s);
    return cc_string(std::stoi(s.substr(0, s.size() - 1)), std::stoi(s.substr(s.size() - 1)));
  } catch (const std::exception&) {
    fail(TSTITCH_ERR_BUNDLE, "manifest.json: compute capability '" + cc + "' is not like 8.9 or sm_89; rebuild the bundle");
  }
}

namespace {
std::string json_text(const nlohmann::json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }
std::string major_of(const std::string& v) { return v.substr(0, v.find('.')); }
}  // namespace

void check_engine_compat(const nlohmann::json& builder, const RuntimeIdentity& here, std::pair<int, int> device_cc,
                         const std::string& what) {
  const std::string rebuild = "rebuild the bundle on this machine (`tstitch-trt build --backend " + here.kind + "`)";
  const std::string module = builder.contains("module") ? json_text(builder["module"]) : "";
  if (!module.empty() && module != here.module)
    fail(TSTITCH_ERR_INCOMPATIBLE, what + " was built with " + module + ", but this backend runs " + here.module +
                                       "; use the matching --backend or " + rebuild);
  const std::string version = builder.contains("version") ? json_text(builder["version"]) : "";
  if (!version.empty() && version != here.version) {
    const bool same_major = major_of(version) == major_of(here.version);
    const bool relaxed = builder.contains("version_compatible") && builder["version_compatible"] == true;
    if (!(relaxed && same_major)) {
      const std::string mod = module.empty() ? here.module : module;
      fail(TSTITCH_ERR_INCOMPATIBLE, what + " was built with " + mod + " " + version + ", but " + here.version +
                                         " is installed; engines only load in the TensorRT version that built "
                                         "them: install " + mod + "==" + version + " or " + rebuild);
    }
  }
  const std::string here_cc = cc_string(device_cc.first, device_cc.second);
  std::string level = builder.contains("hardware_compatibility") && builder["hardware_compatibility"].is_string()
                          ? builder["hardware_compatibility"].get<std::string>()
                          : "none";
  std::transform(level.begin(), level.end(), level.begin(), [](unsigned char c) { return std::tolower(c); });
  if (level == "ampere_plus") {
    if (device_cc < std::make_pair(8, 0))
      fail(TSTITCH_ERR_INCOMPATIBLE, what + " was built for Ampere and newer GPUs (compute capability >= 8.0), "
                                            "this GPU is " + here_cc + "; " + rebuild);
    return;
  }
  std::vector<std::string> targets;
  if (builder.contains("compute_capabilities") && builder["compute_capabilities"].is_array())
    for (const auto& c : builder["compute_capabilities"]) targets.push_back(cc_string(json_text(c)));
  if (!targets.empty() && std::find(targets.begin(), targets.end(), here_cc) == targets.end()) {
    std::string listed;
    for (const auto& t : targets) listed += (listed.empty() ? "" : ", ") + t;
    fail(TSTITCH_ERR_INCOMPATIBLE, what + " was built for GPU compute capability " + listed + ", but this GPU is " +
                                       here_cc + "; engines are specific to the GPU architecture: " + rebuild);
  }
}

}  // namespace tstitch
