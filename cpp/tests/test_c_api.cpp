// The C API contract: version, handles (NULL, unknown, closed), struct sizes, NULL pointers,
// out-of-range requests, a tampered bundle, this build without TensorRT; status + one-line error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <thread>

#include "c_api_internal.hpp"
#ifdef TSTITCH_TEST_HAVE_TENSORRT
#include "cuda_device.hpp"
#endif
#include "fake_backend.hpp"
#include "test_util.hpp"
#include "tstitch/tstitch.h"
#include "tstitch/tstitch.hpp"

using namespace tstitch::testing;

namespace {

std::string toy() { return test_dir() + "/data/toy_pair"; }
bool one_line(const char* s) { return s != nullptr && *s != '\0' && std::string(s).find('\n') == std::string::npos; }

struct FakeHandle {
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  explicit FakeHandle(const std::string& dir = toy()) {
    tstitch_open_params p;
    tstitch_open_params_init(&p);
    EXPECT_EQ(tstitch::open_with_factory(dir.c_str(), &p, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  }
  ~FakeHandle() { tstitch_close(h); }
};

tstitch_request request(const int64_t* labels, int batch = 2) {
  tstitch_request r;
  tstitch_request_init(&r);
  r.batch = batch;
  r.class_labels = labels;
  r.steps = 8;
  r.ratio = 0.4;
  r.sampler = "ddpm";
  return r;
}

}  // namespace

TEST(CApi, VersionAndStatusNames) {
  EXPECT_EQ(tstitch_api_version(), TSTITCH_API_VERSION);
  EXPECT_STREQ(tstitch_status_name(TSTITCH_ERR_BAD_HANDLE), "bad handle");
  EXPECT_STREQ(tstitch_status_name(static_cast<tstitch_status>(999)), "unknown status");
}

TEST(CApi, BadHandlesAreRefusedNotDereferenced) {
  int c = 0, h = 0, w = 0;
  EXPECT_EQ(tstitch_latent_shape(nullptr, &c, &h, &w), TSTITCH_ERR_BAD_HANDLE);
  EXPECT_TRUE(one_line(tstitch_last_error()));
  auto* bogus = reinterpret_cast<tstitch_runtime*>(0x1234);  // never dereferenced: checked against open handles
  EXPECT_EQ(tstitch_latent_shape(bogus, &c, &h, &w), TSTITCH_ERR_BAD_HANDLE);
  EXPECT_EQ(tstitch_close(bogus), TSTITCH_ERR_BAD_HANDLE);
  EXPECT_EQ(tstitch_close(nullptr), TSTITCH_OK);

  FakeHandle f;
  ASSERT_EQ(tstitch_latent_shape(f.h, &c, &h, &w), TSTITCH_OK);
  EXPECT_EQ(c * 100 + h * 10 + w, 244);
  ASSERT_EQ(tstitch_close(f.h), TSTITCH_OK);
  EXPECT_EQ(tstitch_latent_shape(f.h, &c, &h, &w), TSTITCH_ERR_BAD_HANDLE);  // closed
  EXPECT_STREQ(tstitch_last_error(), "the runtime handle is NULL, unknown or already closed; open a bundle first");
  const int64_t labels[2] = {1, 2};
  tstitch_request r = request(labels);
  float out[64];
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, nullptr), TSTITCH_ERR_BAD_HANDLE);
  int calls = -1;
  EXPECT_EQ(tstitch_cache_plan(f.h, &r, nullptr, 0, &calls), TSTITCH_ERR_BAD_HANDLE);
  EXPECT_EQ(tstitch_cache_plan(nullptr, &r, nullptr, 0, &calls), TSTITCH_ERR_BAD_HANDLE);
  EXPECT_EQ(tstitch_close(f.h), TSTITCH_ERR_BAD_HANDLE);  // twice
  f.h = nullptr;
}

TEST(CApi, StructSizesAndNullPointers) {
  tstitch_open_params p;
  tstitch_open_params_init(&p);
  p.struct_size = sizeof(p) + 8;  // a caller built against another header
  tstitch_runtime* h = reinterpret_cast<tstitch_runtime*>(0x1);
  EXPECT_EQ(tstitch_open(toy().c_str(), &p, &h), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(h, nullptr);  // out is cleared on failure
  EXPECT_NE(std::string(tstitch_last_error()).find("params.struct_size is"), std::string::npos);
  EXPECT_EQ(tstitch_open(nullptr, nullptr, &h), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "bundle_dir is NULL");
  EXPECT_EQ(tstitch_open(toy().c_str(), nullptr, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);

  FakeHandle f;
  const int64_t labels[2] = {1, 2};
  float out[64];
  tstitch_request r = request(labels);
  EXPECT_EQ(tstitch_sample(f.h, nullptr, out, 64, nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request is NULL");
  EXPECT_EQ(tstitch_sample(f.h, &r, nullptr, 64, nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  r.struct_size = 3;
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  r = request(nullptr);
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tstitch_last_error()).find("class_labels is NULL"), std::string::npos);
  r = request(labels);
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 63, nullptr, 0, nullptr), TSTITCH_ERR_BUFFER_TOO_SMALL);
  EXPECT_STREQ(tstitch_last_error(), "latents holds 63 floats, the result needs 64");
  tstitch_sample_info info;
  tstitch_sample_info_init(&info);
  info.struct_size = 1;
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, &info), TSTITCH_ERR_INVALID_ARGUMENT);
  uint8_t rgb[16];  // a pixel-space toy: the image is the (2, 4, 4) latent, 64 bytes for batch 2
  EXPECT_EQ(tstitch_sample(f.h, &r, out, 64, rgb, 16, nullptr), TSTITCH_ERR_BUFFER_TOO_SMALL);
  EXPECT_STREQ(tstitch_last_error(), "rgb holds 16 bytes, the images need 64 (batch x H x W x channels)");
}

TEST(CApi, RequestsOutsideTheBundleRanges) {
  FakeHandle f;
  int lo = 0, hi = 0;
  ASSERT_EQ(tstitch_batch_range(f.h, &lo, &hi), TSTITCH_OK);
  EXPECT_EQ(lo, 1);
  EXPECT_EQ(hi, 16);
  std::vector<int64_t> labels(17, 0);
  std::vector<float> out(17 * 32);
  tstitch_request r = request(labels.data(), 17);
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tstitch_last_error()).find("batch 17 is outside"), std::string::npos);
  r = request(labels.data(), 0);
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  r = request(labels.data(), 2);
  r.steps = 5000;
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "steps must be in [1, 1000], got 5000");
  r.steps = 8;
  r.ratio = 2.0;
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  r.ratio = 0.4;
  r.sampler = "heun";
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  r.sampler = nullptr;  // default ddim
  EXPECT_EQ(tstitch_sample(f.h, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_STREQ(tstitch_last_error(), "");
}

TEST(CApi, SampleEqualsThePythonTrajectory) {
  FakeHandle f;
  const auto c = golden("loop")["runs"][4];  // ddpm, batch 2, seed 0
  ASSERT_EQ(c["sampler"], "ddpm");
  const std::vector<int64_t> labels = c["labels"].get<std::vector<int64_t>>();
  tstitch_request r = request(labels.data(), c["batch"]);
  r.seed = c["seed"].get<uint64_t>();
  r.steps = c["steps"];
  r.ratio = c["ratio"];
  r.cfg_scale = c["cfg"];
  tstitch_sample_info info;
  tstitch_sample_info_init(&info);
  float* x = nullptr;
  size_t n = 0;
  ASSERT_EQ(tstitch_sample_alloc(f.h, &r, &x, &n, &info), TSTITCH_OK) << tstitch_last_error();
  const std::vector<float> want = c["x"].get<std::vector<float>>();
  ASSERT_EQ(n, want.size());
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(x[i], want[i], 1e-5f * std::max(1.0f, std::fabs(want[i])));
  tstitch_free(x);
  EXPECT_EQ(info.used_cuda_graph, 1);
  EXPECT_EQ(info.steps, c["steps"].get<int>());
}

// API 6 grew tstitch_sample_info (truncated_prompts, notes): a version-5 caller's smaller struct is accepted and
// nothing past its end is written; a version-6 one gets no truncation and no notes on a run without any.
TEST(CApi, SampleInfoOfAVersion5CallerKeepsWorking) {
  FakeHandle f;
  const int64_t labels[2] = {1, 7};
  tstitch_request r = request(labels);
  float out[64];
  struct V5Info {  // tstitch.h's tstitch_sample_info at TSTITCH_API_VERSION 5, then what follows it in the caller
    tstitch_sample_info v5;
    unsigned char after[32];
  } caller;
  std::memset(&caller, 0xAB, sizeof caller);
  caller.v5.struct_size = offsetof(tstitch_sample_info, truncated_prompts);
  ASSERT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, &caller.v5), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(caller.v5.steps, r.steps);
  const unsigned char* tail = reinterpret_cast<const unsigned char*>(&caller.v5) + caller.v5.struct_size;
  for (size_t i = 0; i < sizeof(tstitch_sample_info) - caller.v5.struct_size; ++i) EXPECT_EQ(tail[i], 0xAB) << i;
  tstitch_sample_info info;
  tstitch_sample_info_init(&info);
  info.truncated_prompts = 5;
  info.notes = nullptr;
  ASSERT_EQ(tstitch_sample(f.h, &r, out, 64, nullptr, 0, &info), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(info.truncated_prompts, 0);
  ASSERT_NE(info.notes, nullptr);
  EXPECT_STREQ(info.notes, "");
}

// pipeline/dit.py's _decode: a pixel-space bundle (no VAE, latent_scale_factor 1) gives to_uint8(latents);
// a latent-space bundle without a VAE has no image (one line, nothing written).
TEST(CApi, PixelSpaceRgbIsTheLatent) {
  FakeHandle f;
  int h = 0, w = 0, c = 0;
  ASSERT_EQ(tstitch_image_shape(f.h, &h, &w, &c), TSTITCH_OK);
  EXPECT_EQ(h, 4);
  EXPECT_EQ(w, 4);
  EXPECT_EQ(c, 2);
  const int64_t labels[2] = {1, 7};
  tstitch_request r = request(labels);
  std::vector<float> x(64);
  std::vector<uint8_t> rgb(64, 1);
  ASSERT_EQ(tstitch_sample(f.h, &r, x.data(), x.size(), rgb.data(), rgb.size(), nullptr), TSTITCH_OK) << tstitch_last_error();
  for (int b = 0; b < 2; ++b)
    for (int ch = 0; ch < 2; ++ch)
      for (int p = 0; p < 16; ++p) {
        const float v = std::clamp((x[(b * 2 + ch) * 16 + p] + 1.0f) * 127.5f + 0.5f, 0.0f, 255.0f);
        EXPECT_EQ(rgb[(b * 16 + p) * 2 + ch], static_cast<uint8_t>(v));  // HWC
      }
  // the toy trajectory ends far outside [-1, 1], so this checks the layout and the clip; the mid-range
  // arithmetic of the same to_uint8 is compared with Python's bytes in SdVae.DecodesLikeThePythonPipeline
  EXPECT_NE(std::count(rgb.begin(), rgb.end(), 0), 0);
  EXPECT_NE(std::count(rgb.begin(), rgb.end(), 255), 0);
}

TEST(CApi, LatentBundleWithoutVaeHasNoImage) {
  FakeStats stats;
  const std::string dir = testing::TempDir() + "/tstitch_latent_no_vae";
  write_toy_bundle(dir, 2, 4, 4);
  nlohmann::json m = nlohmann::json::parse(std::ifstream(dir + "/manifest.json"));
  m["latent_scale_factor"] = 0.18215;
  std::ofstream(dir + "/manifest.json") << m.dump(2);
  FakeHandle f(dir);
  int h = 0, w = 0, c = 0;
  EXPECT_EQ(tstitch_image_shape(f.h, &h, &w, &c), TSTITCH_ERR_UNAVAILABLE);
  EXPECT_STREQ(tstitch_last_error(),
               "the bundle has no VAE (build with --vae DIR): it makes latents, not images; pass rgb = NULL");
  const int64_t labels[2] = {1, 7};
  tstitch_request r = request(labels);
  std::vector<float> x(64, -3.0f);
  std::vector<uint8_t> rgb(1024, 1);
  EXPECT_EQ(tstitch_sample(f.h, &r, x.data(), x.size(), rgb.data(), rgb.size(), nullptr), TSTITCH_ERR_UNAVAILABLE);
  EXPECT_EQ(x, std::vector<float>(64, -3.0f));
  EXPECT_EQ(tstitch_sample(f.h, &r, x.data(), x.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
}

TEST(CApi, TamperedBundleIsRefusedWithOneLine) {
  TempBundle b;
  {
    std::ofstream f(b.dir() + "/trt/1-toy.plan", std::ios::app);
    f << "x";
  }
  tstitch_runtime* h = nullptr;
  EXPECT_EQ(tstitch_open(b.dir().c_str(), nullptr, &h), TSTITCH_ERR_BUNDLE);
  EXPECT_EQ(h, nullptr);
  EXPECT_TRUE(one_line(tstitch_last_error()));
  EXPECT_NE(std::string(tstitch_last_error()).find("checksum mismatch for"), std::string::npos);
  b.edit([](nlohmann::json& j) { j["models"][0]["engines"]["trt"]["file"] = "../../etc/passwd"; });
  EXPECT_EQ(tstitch_open(b.dir().c_str(), nullptr, &h), TSTITCH_ERR_BUNDLE);
  EXPECT_NE(std::string(tstitch_last_error()).find("models[0].engines.trt.file is '../../etc/passwd', not a relative path inside the bundle"), std::string::npos);
  EXPECT_EQ(tstitch_open((b.root() + "/missing").c_str(), nullptr, &h), TSTITCH_ERR_BUNDLE);
}

TEST(CApi, OpenWithThisBuildsEngine) {
  tstitch_runtime* h = nullptr;
  const tstitch_status s = tstitch_open(toy().c_str(), nullptr, &h);
#ifdef TSTITCH_TEST_HAVE_TENSORRT
  // TensorRT is linked: without a GPU the CUDA device refuses first; with one, the toy plans are not plans.
  if (tstitch::cuda_device_count() == 0) {
    EXPECT_EQ(s, TSTITCH_ERR_NO_DEVICE) << tstitch_last_error();
  } else {
    EXPECT_EQ(s, TSTITCH_ERR_INCOMPATIBLE) << tstitch_last_error();
  }
#else
  // The toy bundle's checksums pass; then this build says why it cannot run TensorRT engines.
  EXPECT_EQ(s, TSTITCH_ERR_UNAVAILABLE);
  EXPECT_NE(std::string(tstitch_last_error()).find("built without TensorRT"), std::string::npos);
#endif
  tstitch_close(h);
  tstitch_open_params p;
  tstitch_open_params_init(&p);
  p.engine = "onnx";
  EXPECT_EQ(tstitch_open(toy().c_str(), &p, &h), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "unknown engine 'onnx'; choose openvino or trt (NULL: auto)");
  p.engine = "";
  EXPECT_EQ(tstitch_open(toy().c_str(), &p, &h), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(one_line(tstitch_last_error()));
  // openvino runs the ONNX graphs of the `ort` entry: the toy bundle has TensorRT plans only
  p.engine = "openvino";
  EXPECT_EQ(tstitch_open(toy().c_str(), &p, &h), TSTITCH_ERR_BUNDLE);
  EXPECT_STREQ(tstitch_last_error(), "the bundle has no ort engine for Toy-S; rebuild it with --backend ort");
  EXPECT_EQ(h, nullptr);
}

// An API-4 caller's open params (no precision field) keep working; precision reads as NULL (auto).
TEST(CApi, Version4OpenParamsKeepWorking) {
  struct OpenParamsV4 {
    size_t struct_size;
    const char* engine;
    int device_index, cuda_graph, verify_checksums;
  };
  OpenParamsV4 v4{sizeof(OpenParamsV4), nullptr, 0, 1, 1};
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(tstitch::open_with_factory(toy().c_str(), reinterpret_cast<const tstitch_open_params*>(&v4), fake_factory({}, stats), &h),
            TSTITCH_OK) << tstitch_last_error();
  const char* engine = nullptr;
  const char* precision = nullptr;
  ASSERT_EQ(tstitch_engine(h, &engine, &precision), TSTITCH_OK);
  EXPECT_STREQ(engine, "trt");
  EXPECT_STREQ(precision, "the engines' own precision");
  tstitch_close(h);
  // precision is for the CPU engine: the TensorRT kind refuses it in one line
  tstitch_open_params p;
  tstitch_open_params_init(&p);
  p.precision = "bf16";
  EXPECT_EQ(tstitch::open_with_factory(toy().c_str(), &p, fake_factory({}, stats), &h), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "precision bf16 is for the openvino engine (CPU); trt runs its engines' own precision: leave "
                                     "precision NULL");
  EXPECT_EQ(h, nullptr);
  EXPECT_EQ(stats.live_bytes, 0u);
}

TEST(CApi, CppWrapperThrowsWithStatusAndMessage) {
  try {
    tstitch::cpp::Runtime rt(test_dir() + "/no/such/bundle");
    FAIL() << "opened a missing bundle";
  } catch (const tstitch::cpp::Error& e) {
    EXPECT_EQ(e.status(), TSTITCH_ERR_BUNDLE);
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos);
  }
}

TEST(CApi, LastErrorIsPerThread) {
  int c = 0, h = 0, w = 0;
  ASSERT_EQ(tstitch_latent_shape(nullptr, &c, &h, &w), TSTITCH_ERR_BAD_HANDLE);
  std::string other = "unset";
  std::thread([&] { other = tstitch_last_error(); }).join();
  EXPECT_EQ(other, "");  // another thread sees its own (empty) last error
  EXPECT_NE(std::string(tstitch_last_error()), "");
}
