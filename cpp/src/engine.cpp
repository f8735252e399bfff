#include "engine.hpp"

#include <fstream>
#include <iterator>

#include "errors.hpp"

namespace tstitch {

std::unique_ptr<StepEngine> Backend::load_file(const std::string& path, const std::string& what, const std::string& precision) {
  (void)precision;  // configure() gave "" (the engine's own): nothing to choose
  std::ifstream in(path, std::ios::binary);
  std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) fail(TSTITCH_ERR_BUNDLE, "cannot read " + path);
  return load(plan, what);
}

std::vector<std::string> Backend::configure(const Manifest& m, const std::string& requested, std::string* why) {
  if (!requested.empty() && requested != "auto")
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "precision " + requested + " is for the openvino engine (CPU); " + kind() +
                                           " runs its engines' own precision: leave precision NULL");
  *why = "the engines' own precision";
  return std::vector<std::string>(m.models.size());
}

std::vector<std::string> Backend::configure_parts(const std::vector<std::pair<std::string, nlohmann::json>>& parts,
                                                  const std::string& requested, std::string* why) {
  (void)requested;  // configure() refused anything but auto
  why->clear();
  return std::vector<std::string>(parts.size());
}

void Backend::check_compat(const nlohmann::json& builder, const std::string& what) {
  check_engine_compat(builder, identity(), device().compute_capability(), what);
}

}  // namespace tstitch
