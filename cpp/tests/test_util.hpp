#pragma once

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace tstitch::testing {

inline std::string test_dir() { return TSTITCH_TEST_DIR; }

inline nlohmann::json golden(const std::string& name) {
  std::ifstream in(test_dir() + "/golden/" + name + ".json");
  std::stringstream s;
  s << in.rdbuf();
  return nlohmann::json::parse(s.str());
}

inline std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> out(v.size());
  if (!v.empty()) std::memcpy(out.data(), v.data(), v.size() * 4);
  return out;
}

}  // namespace tstitch::testing

#include <filesystem>
#include <functional>
#include <unistd.h>

#include "errors.hpp"

namespace tstitch::testing {

// A fresh copy of the toy bundle in a temporary directory, removed at scope exit.
class TempBundle {
 public:
  TempBundle() {
    char tmpl[] = "/tmp/tstitch-test-XXXXXX";
    root_ = mkdtemp(tmpl);
    dir_ = root_ + "/bundle";
    std::filesystem::copy(test_dir() + "/data/toy_pair", dir_, std::filesystem::copy_options::recursive);
  }
  ~TempBundle() {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }
  const std::string& dir() const { return dir_; }
  const std::string& root() const { return root_; }
  nlohmann::json manifest() const {
    std::ifstream in(dir_ + "/manifest.json");
    std::stringstream s;
    s << in.rdbuf();
    return nlohmann::json::parse(s.str());
  }
  void write_manifest(const nlohmann::json& j) const { std::ofstream(dir_ + "/manifest.json") << j.dump(2); }
  void edit(const std::function<void(nlohmann::json&)>& fn) const {
    nlohmann::json j = manifest();
    fn(j);
    write_manifest(j);
  }

 private:
  std::string root_, dir_;
};

inline std::string error_of(const std::function<void()>& fn, tstitch_status* status = nullptr) {
  try {
    fn();
  } catch (const Error& e) {
    if (status) *status = e.status();
    return e.what();
  }
  return "";
}

}  // namespace tstitch::testing
