// The manifest rules and their one-line messages; sealed paths; sha256 and checksum refusals.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "disk_reserve.hpp"
#include "graph_refs.hpp"
#include "manifest.hpp"
#include "precision.hpp"
#include "test_util.hpp"
#include "verified.hpp"

using namespace tstitch;
using tstitch::testing::error_of;
using tstitch::testing::TempBundle;
namespace fs = std::filesystem;

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_bytes("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_bytes("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Manifest, ReadsTheToyBundle) {
  const Manifest m = read_manifest(tstitch::testing::test_dir() + "/data/toy_pair");
  ASSERT_EQ(m.models.size(), 2u);
  EXPECT_EQ(m.models[0].name, "Toy-S");
  EXPECT_EQ(m.channels(), 2);
  EXPECT_EQ(m.height(), 4);
  EXPECT_EQ(m.num_classes, 10);
  EXPECT_EQ(m.io.size(), 9u);
  EXPECT_FALSE(m.roles_recorded);  // written before io.roles: the DiT roles
  EXPECT_EQ(m.roles.state.front(), (std::pair<std::string, std::string>{"x", "x_next"}));
  EXPECT_EQ(m.models[1].engines.at("trt").batch_max, 16);
  const std::string p = artifact_path(tstitch::testing::test_dir() + "/data/toy_pair", m.models[0].engines.at("trt"));
  EXPECT_EQ(sha256_file(p), m.models[0].engines.at("trt").artifact.sha256);
}

TEST(Manifest, MissingBundleAndManifest) {
  TempBundle b;
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { read_manifest(b.root() + "/nope"); }, &s),
            "bundle " + b.root() + "/nope does not exist; build one with `tstitch-trt build`");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  fs::remove(b.dir() + "/manifest.json");
  EXPECT_EQ(error_of([&] { read_manifest(b.dir()); }),
            b.dir() + " is not a bundle (no manifest.json); rebuild it with `tstitch-trt build`");
  std::ofstream(b.dir() + "/manifest.json") << "{not json";
  EXPECT_EQ(error_of([&] { read_manifest(b.dir()); }),
            b.dir() + "/manifest.json is not valid JSON; rebuild the bundle");
}

struct FieldCase {
  const char* what;
  std::function<void(nlohmann::json&)> edit;
  std::string message;  // after "<manifest path>"
};

// A few rules spelled out here; tests/cpp_goldens.py's conformance corpus (test_manifest_cases.cpp)
// holds the rest, with the messages Python gives.
TEST(Manifest, EachRuleIsOneLineNamingTheField) {
  const std::string rebuild = "; rebuild the bundle with `tstitch-trt build`";
  const std::vector<FieldCase> cases = {
      {"format", [](auto& j) { j["format"] = "other"; },
       " is not a tstitch bundle manifest (format is 'other', expected 'tstitch-bundle'); rebuild the bundle"},
      {"version", [](auto& j) { j["format_version"] = 2; },
       " has bundle format version 2, newer than this tstitch-trt reads (1); upgrade tstitch-trt or rebuild the bundle "
       "with this version"},
      {"pipeline", [](auto& j) { j["pipeline"] = "video"; },
       ": pipeline is 'video'; this tstitch-trt knows only 'dit-class-conditional', 'sd', 'sdxl'" + rebuild},
      {"missing", [](auto& j) { j["models"][1].erase("name"); }, ": models[1] lacks the required field 'name'" + rebuild},
      {"type", [](auto& j) { j["num_classes"] = "ten"; }, ": num_classes must be of type integer, got string 'ten'" + rebuild},
      {"unknown field", [](auto& j) { j["models"][0]["engines"]["trt"]["speed"] = 1; },
       ": models[0].engines.trt.speed is a field this tstitch-trt does not understand (it would be ignored, so it is "
       "refused)" + rebuild},
      {"batch", [](auto& j) { j["models"][0]["engines"]["trt"]["batch_range"] = {4, 2}; },
       "Toy-S trt: batch_range [4, 2] is empty (min > max)"},
      {"relpath", [](auto& j) { j["models"][0]["engines"]["trt"]["file"] = "../x.plan"; },
       ": models[0].engines.trt.file is '../x.plan', not a relative path inside the bundle (no '..', no absolute path)" +
           rebuild},
  };
  for (const FieldCase& c : cases) {
    TempBundle b;
    b.edit(c.edit);
    const std::string path = b.dir() + "/manifest.json";
    const std::string got = error_of([&] { read_manifest(b.dir()); });
    EXPECT_TRUE(got == path + c.message || got == c.message) << c.what << ": " << got;
  }
}

TEST(Manifest, ModelsMustShareLatentAndLabels) {
  TempBundle b;
  b.edit([](auto& j) { j["models"][1]["arch"]["input_size"] = 8; });
  EXPECT_EQ(error_of([&] { read_manifest(b.dir()); }),
            "the models' latent shapes differ (Toy-S: (2, 4, 4), Toy-L: (2, 8, 8)); stitched models must share one "
            "latent space");
  TempBundle c;
  c.edit([](auto& j) { j["models"][1]["arch"]["num_classes"] = 1000; });
  EXPECT_EQ(error_of([&] { read_manifest(c.dir()); }),
            "the models' class counts ([10, 1000]) differ from num_classes 10; they must share one label space");
}

TEST(Manifest, PathsAreSealedInsideTheBundle) {
  TempBundle b;
  Manifest m = read_manifest(b.dir());
  EngineEntry e = m.models[0].engines.at("trt");
  const std::string rule = "; bundle paths are relative and stay inside the bundle: rebuild the bundle";
  e.artifact.file = "/etc/passwd";
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }),
            "manifest.json: models[0].engines.trt.file is an absolute path (/etc/passwd)" + rule);
  e.artifact.file = "trt/../../outside.plan";
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }),
            "manifest.json: models[0].engines.trt.file (trt/../../outside.plan) leaves the bundle with .." + rule);
  std::ofstream(b.root() + "/outside.plan") << "TOY2,4,4,11,0.5,";
  fs::create_symlink(b.root() + "/outside.plan", b.dir() + "/trt/link.plan");
  e.artifact.file = "trt/link.plan";
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }),
            "manifest.json: models[0].engines.trt.file (trt/link.plan) resolves outside the bundle (a symlink?)" + rule);
  fs::create_symlink(b.root(), b.dir() + "/up");  // a directory symlink leaving the bundle
  e.artifact.file = "up/outside.plan";
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("resolves outside the bundle"), std::string::npos);
  fs::create_symlink("0-toy.plan", b.dir() + "/trt/inside.plan");  // a symlink inside is fine
  e.artifact.file = "trt/inside.plan";
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }), "");
}

TEST(Manifest, ChecksumMismatchAndMissingFile) {
  TempBundle b;
  const Manifest m = read_manifest(b.dir());
  const EngineEntry& e = m.models[1].engines.at("trt");
  const std::string path = b.dir() + "/" + e.artifact.file;
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('!');  // one byte changed
  }
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }, &s),
            "checksum mismatch for " + path + ": the file changed since the build; rebuild the bundle");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e, /*verify=*/false); }), "");
  fs::remove(path);
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }), "bundle file " + path + " is missing; rebuild the bundle");
}

// Verified checksums are remembered per file version (tests/test_cpp_verified.py: in Python's format).
TEST(Manifest, VerifiedChecksumsAreRememberedPerFileVersion) {
  TempBundle b;
  const std::string memo_dir = b.root() + "/memo";
  ::setenv("TSTITCH_VERIFY_CACHE", memo_dir.c_str(), 1);
  const Manifest m = read_manifest(b.dir());
  const EngineEntry& e = m.models[1].engines.at("trt");
  const std::string path = b.dir() + "/" + e.artifact.file;
  const std::string memo = verified_memo_file(path);
  ASSERT_EQ(memo.rfind(memo_dir + "/", 0), 0u) << memo;
  EXPECT_FALSE(fs::exists(memo));
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }), "");
  std::string digest;
  std::ifstream(memo) >> digest;
  EXPECT_EQ(digest, e.artifact.sha256);  // remembered after a hash that matched
  // read, not hashed again: a memo saying another digest is believed (it is the user's own cache)
  std::ofstream(memo, std::ios::trunc) << std::string(64, '0');
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("checksum mismatch for"), std::string::npos);
  std::ofstream(memo, std::ios::trunc) << "not a digest";  // a damaged memo: hashed again
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }), "");
  // file times tick at the kernel's clock granularity (a jiffy): a write must land on a later tick to be seen
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('!');  // a write: another version of the file (its ctime moved), so hashed and refused
  }
  EXPECT_NE(verified_memo_file(path), memo);
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("checksum mismatch for"), std::string::npos);
  ::setenv("TSTITCH_VERIFY_CACHE", "off", 1);
  EXPECT_EQ(verified_memo_file(path), "");
  ::unsetenv("TSTITCH_VERIFY_CACHE");
}

// The model cache's disk reserve: Python's rule and words (tests/test_openvino_cache.py holds Python's side).
TEST(DiskReserve, ABlobThatWouldEatTheReserveIsNotWritten) {
  const uint64_t GiB = 1ull << 30, total = 100 * GiB, reserve = 5 * GiB;  // 5% of 100 GiB > 2 GiB
  EXPECT_EQ(blob_refusal("/c", kSmallBlobBytes, 0, total), "");  // small blobs always
  EXPECT_EQ(blob_refusal("/c", 3 * GiB, reserve + 3 * GiB, total), "");
  EXPECT_EQ(blob_refusal("/c", 3 * GiB, reserve + 3 * GiB - 1, total),
            "OpenVINO model cache: not written for this graph (3.0 GiB blob, 8.0 GiB free in /c, 5.0 GiB kept free); "
            "the next run compiles it again");
  EXPECT_NE(blob_refusal("/c", 10 * GiB, 4 * GiB, total), "");  // bigger than what is free
  EXPECT_NE(blob_refusal("/c", 1 * GiB, 2 * GiB + GiB / 2, 10 * GiB), "");  // small disks keep 2 GiB
}

TEST(Manifest, ReadsThePythonDemoPair) {
  // The committed demo bundle (ort + torch artifacts) parses with the same reader.
  const std::string demo = tstitch::testing::test_dir() + "/../../python/tstitch_trt/demo/pair";
  const Manifest m = read_manifest(demo);
  EXPECT_EQ(m.models.size(), 2u);
  EXPECT_EQ(m.channels(), 1);
  EXPECT_EQ(m.height(), 32);
  EXPECT_TRUE(m.models[0].engines.count("ort"));
  EXPECT_EQ(artifact_path(demo, m.models[0].engines.at("ort")).empty(), false);
}

TEST(Manifest, HostileSizesAreRefusedNeverACrash) {
  // a path at the schema's 1024-character limit, non-ASCII, is a path (as in Python); one over it,
  // or a megabyte long, is refused without running the regex on it; deep nesting is cut in messages
  const std::string base = tstitch::testing::test_dir() + "/data/toy_pair/manifest.json";
  std::ifstream in(base);
  const nlohmann::ordered_json good = nlohmann::ordered_json::parse(in);
  auto with_file = [&](const std::string& file) {
    nlohmann::ordered_json j = good;
    j["models"][0]["engines"]["trt"]["file"] = file;
    return error_of([&] { parse_manifest(j, "m"); });
  };
  EXPECT_EQ(with_file("trt/mod\u00e8le-\u4e2d.plan"), "");
  EXPECT_EQ(with_file("trt/" + std::string(1020, 'a')), "");
  const std::string too_long = "m: models[0].engines.trt.file has the wrong size (maxLength 1024); rebuild the bundle with `tstitch-trt build`";
  EXPECT_EQ(with_file("trt/" + std::string(1021, 'a')), too_long);
  EXPECT_EQ(with_file(std::string(1 << 20, 'a')), too_long);
  EXPECT_NE(with_file("trt/\x01.plan").find("not a relative path inside the bundle"), std::string::npos);
  nlohmann::ordered_json j = good;
  nlohmann::ordered_json deep = nlohmann::ordered_json::array();
  for (int i = 0; i < 100000; ++i) deep = nlohmann::ordered_json::array({std::move(deep)});
  j["models"] = std::move(deep);
  const std::string got = error_of([&] { parse_manifest(j, "m"); });
  EXPECT_EQ(got.rfind("m: models has the wrong size (minItems 2)", 0), 0u) << got.substr(0, 200);
  j = good;
  j["models"][0]["name"] = nlohmann::ordered_json::array({nlohmann::ordered_json::array({std::string(1 << 20, 'x')})});
  EXPECT_EQ(error_of([&] { parse_manifest(j, "m"); }),
            "m: models[0].name must be of type string, got array [['" + std::string(54, 'x') +  // repr cut at 60, as _short
                "...; rebuild the bundle with `tstitch-trt build`");
}

namespace {
// protobuf bytes of a length-delimited field
std::string field(int number, const std::string& payload) {
  std::string out(1, char(number << 3 | 2));
  size_t n = payload.size();
  do {
    unsigned char b = n & 0x7F;
    n >>= 7;
    out.push_back(char(n ? b | 0x80 : b));
  } while (n);
  return out + payload;
}

// A ModelProto whose graph's one initializer is external data at `location` (what a re-sealed graph can say).
std::string graph_naming(const std::string& location) {
  const std::string entry = field(1, "location") + field(2, location);
  const std::string tensor = field(8, "w") + field(13, entry);
  return field(7, field(5, tensor));
}
}  // namespace

TEST(Manifest, GraphExternalDataIsSealedToo) {
  TempBundle b;
  Manifest m = read_manifest(b.dir());
  EngineEntry e = m.models[0].engines.at("trt");
  auto seal_graph = [&](const std::string& location) {
    std::ofstream(b.dir() + "/trt/g.onnx", std::ios::binary) << graph_naming(location);
    e.artifact.file = "trt/g.onnx";
    e.artifact.sha256 = sha256_file(b.dir() + "/trt/g.onnx");
  };
  std::ofstream(b.root() + "/secret.data") << "weights";
  EXPECT_EQ(external_data_locations((seal_graph("../../secret.data"), b.dir() + "/trt/g.onnx")),
            std::vector<std::string>{"../../secret.data"});
  const std::string outside = "which leads outside the bundle";
  tstitch_status s = TSTITCH_OK;
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }, &s).find("bundle file trt/g.onnx names external data '../../secret.data', " + outside), std::string::npos);
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  seal_graph(b.root() + "/secret.data");
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("names external data '" + b.root() + "/secret.data', " + outside), std::string::npos);
  fs::create_symlink(b.root() + "/secret.data", b.dir() + "/trt/w.data");
  seal_graph("w.data");
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("names external data 'w.data', " + outside), std::string::npos);
  fs::remove(b.dir() + "/trt/w.data");
  std::ofstream(b.dir() + "/trt/w.data") << "weights";
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }),
            "bundle file trt/g.onnx names external data 'w.data', which the manifest does not checksum; rebuild the bundle");
  e.external_data.push_back({"trt/w.data", sha256_file(b.dir() + "/trt/w.data"), "models[0].engines.trt.extra.external_data[0]"});
  EXPECT_EQ(error_of([&] { artifact_path(b.dir(), e); }), "");  // inside and checksummed: the >2 GB layout
  std::ofstream(b.dir() + "/trt/g.onnx", std::ios::binary) << std::string("\x0a\xff\xff\xff\x0f", 5);  // truncated
  e.artifact.sha256 = sha256_file(b.dir() + "/trt/g.onnx");
  EXPECT_NE(error_of([&] { artifact_path(b.dir(), e); }).find("bundle file trt/g.onnx is not an ONNX graph that can be read"), std::string::npos);
}

TEST(Precision, AutoUsesBf16OnlyWhereTheVerdictCoversThisIsa) {
  // runtime/openvino_backend.py's choose_precisions, word for word (issue 19: a verdict is per CPU ISA)
  Manifest m = read_manifest(tstitch::testing::test_dir() + "/../../python/tstitch_trt/demo/pair");
  const nlohmann::json safe_avx = {{"safe", true}, {"isa", {"avx512_bf16"}}};
  m.models[0].bf16 = safe_avx;
  m.models[1].bf16 = safe_avx;
  std::string why;
  EXPECT_EQ(resolve_cpu_precisions(m, "", true, "avx512_bf16", &why), (std::vector<std::string>{"bf16", "bf16"}));
  EXPECT_EQ(why, "bf16: the bundle records bf16 as safe on avx512_bf16 for every part");
  EXPECT_EQ(resolve_cpu_precisions(m, "auto", true, "amx_bf16", &why), (std::vector<std::string>{"fp32", "fp32"}));
  EXPECT_EQ(why, "fp32: bf16 verdict measured on avx512_bf16, this CPU is amx_bf16");
  m.models[1].bf16 = {{"safe", true}};  // recorded before verdicts named their ISA
  EXPECT_EQ(resolve_cpu_precisions(m, "auto", true, "avx512_bf16", &why), (std::vector<std::string>{"bf16", "fp32"}));
  EXPECT_EQ(why.rfind("bf16 on " + m.models[0].name + ", fp32 elsewhere: the bundle's bf16 verdict does not name", 0),
            0u) << why;
  m.models[1].bf16 = {{"safe", false}, {"isa", {"avx512_bf16"}}};
  EXPECT_EQ(bf16_verdict_gap(m.models[1].bf16, "avx512_bf16"),
            "the bundle does not record bf16 as safe (tstitch-trt check --precision bf16 --record)");
  EXPECT_EQ(bf16_verdict_gap(safe_avx, ""), "this CPU's bf16 ISA cannot be told (no /proc/cpuinfo flags)");
  EXPECT_EQ(resolve_cpu_precisions(m, "auto", false, "", &why), (std::vector<std::string>{"fp32", "fp32"}));
  EXPECT_EQ(why, "fp32: this CPU has no native bf16");
  EXPECT_EQ(resolve_cpu_precisions(m, "bf16", true, "amx_bf16", &why), (std::vector<std::string>{"bf16", "bf16"}));
}

TEST(Precision, CpuIsaFromCpuinfoFlags) {
  const std::string dir = ::testing::TempDir();
  const auto isa_of = [&](const std::string& text) {
    const std::string path = dir + "/cpuinfo-test";
    std::ofstream(path) << text;
    return cpu_bf16_isa(path);
  };
  EXPECT_EQ(isa_of("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"), "amx_bf16");
  EXPECT_EQ(isa_of("flags\t\t: fpu avx512f avx512_bf16\n"), "avx512_bf16");
  EXPECT_EQ(isa_of("flags\t\t: fpu sse2 avx2\n"), "");
  EXPECT_EQ(isa_of("no flags here\n"), "");
  EXPECT_EQ(cpu_bf16_isa("/nonexistent/cpuinfo"), "");
}
