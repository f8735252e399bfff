// The manifest conformance corpus (golden/manifest_cases.json, written by tests/cpp_goldens.py):
// hostile edits (RFC 6902 patches) of a valid DiT and SD manifest, each with the refusal Python's
// reader gives. The C++ reader must refuse each one with the same message, so it names the same
// field path; tests/test_cpp_goldens.py fails if the corpus drifts from Python.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "errors.hpp"
#include "manifest.hpp"
#include "test_util.hpp"

using namespace tstitch;
using ojson = nlohmann::ordered_json;

namespace {
ojson corpus() {
  std::ifstream in(tstitch::testing::test_dir() + "/golden/manifest_cases.json");
  std::stringstream text;
  text << in.rdbuf();
  return ojson::parse(text.str());
}
}  // namespace

TEST(ManifestCases, TheBasesAreAccepted) {
  const ojson c = corpus();
  for (const auto& [name, base] : c["bases"].items()) {
    const Manifest m = parse_manifest(base, c["where"].get<std::string>());
    EXPECT_EQ(m.models.size(), 2u) << name;
  }
}

TEST(ManifestCases, EachIsRefusedAsPythonRefusesIt) {
  const ojson c = corpus();
  ASSERT_GE(c["cases"].size(), 60u);
  size_t sd = 0;
  for (const ojson& k : c["cases"]) {
    const std::string name = k["name"].get<std::string>();
    const ojson doc = c["bases"][k["base"].get<std::string>()].patch(k["patch"]);
    tstitch_status status = TSTITCH_OK;
    const std::string got = tstitch::testing::error_of([&] { parse_manifest(doc, c["where"].get<std::string>()); }, &status);
    EXPECT_EQ(status, TSTITCH_ERR_BUNDLE) << name;
    const std::string field = k["field"].get<std::string>();
    if (!field.empty()) {
      EXPECT_NE(got.find(field), std::string::npos) << name << ": does not name " << field << ": " << got;
    }
    EXPECT_EQ(got, k["message"].get<std::string>()) << name;
    sd += k["base"] == "sd";
  }
  EXPECT_GE(sd, 15u);
}
