// The stitched loop on an SD-shaped toy bundle (data/toy_sd: the U-Net step graph's I/O bound by
// io.roles, four state pairs incl. eps_hist and saved, a float (2B, tokens, width) text context),
// on the fake engine: trajectories equal to the Python reference (golden/sd_loop.json: the
// pipeline/sd.py plan and export/unet_step.py's update), plain and as one graph; the C API request.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "c_api_internal.hpp"
#include "errors.hpp"
#include "fake_backend.hpp"
#include "runtime.hpp"
#include "test_util.hpp"

using namespace tstitch;
using namespace tstitch::testing;

namespace {

std::string toy_sd() { return test_dir() + "/data/toy_sd"; }

std::vector<float> floats(const nlohmann::json& bits) {
  std::vector<float> out;
  for (const auto& b : bits) {
    const uint32_t u = b.get<uint32_t>();
    float f;
    std::memcpy(&f, &u, 4);
    out.push_back(f);
  }
  return out;
}

SampleRequest sd_request(const nlohmann::json& c) {
  SampleRequest r;
  r.batch = c["batch"];
  r.sampler = c["sampler"].is_null() ? "" : c["sampler"].get<std::string>();
  r.eta = c["eta"];
  r.steps = c["steps"];
  r.ratio = c["ratio"];
  r.cfg_scale = c["cfg"];
  r.seed = c["seed"];
  r.text_context = floats(c["context_bits"]);
  r.text_tokens = 3, r.text_width = 8;
  r.height = 8 * c["latent_hw"][0].get<int>(), r.width = 8 * c["latent_hw"][1].get<int>();  // VAE factor 8
  return r;
}

}  // namespace

TEST(SdLoop, TrajectoriesEqualThePythonReference) {
  const nlohmann::json gold = golden("sd_loop");
  int compared = 0;
  for (bool graph : {false, true}) {
    for (const auto& c : gold["runs"]) {
      FakeStats stats;
      OpenOptions o;
      o.cuda_graph = graph;
      Runtime rt(toy_sd(), o, fake_factory({}, stats));
      const LoopResult res = rt.sample(sd_request(c));
      const std::vector<float> want = c["x"].get<std::vector<float>>();
      ASSERT_EQ(res.x.size(), want.size());
      float scale = 1.0f, diff = 0.0f;
      for (size_t i = 0; i < want.size(); ++i) {
        scale = std::max(scale, std::fabs(want[i]));
        diff = std::max(diff, std::fabs(res.x[i] - want[i]));
      }
      // same RNG, tables and update; only tanh may differ in the last bit between libm and torch
      EXPECT_LE(diff, 1e-5f * scale) << c["sampler"] << " seed " << c["seed"];
      EXPECT_EQ(res.graph, graph);
      EXPECT_EQ(res.step_ms.size(), c["step_model"].size());  // PNDM: steps + 1 U-Net calls
      ++compared;
    }
  }
  EXPECT_EQ(compared, 12);
}

TEST(SdLoop, EveryStatePairIsBoundByRole) {
  FakeStats stats;
  Runtime rt(toy_sd(), {}, fake_factory({}, stats));
  std::vector<std::string> pairs;
  for (const Binding& b : rt.loop().bindings())
    if (b.role == Role::kStateIn) pairs.push_back(b.spec.name + "->" + b.pair);
  EXPECT_EQ(pairs, (std::vector<std::string>{"x->x_next", "prev_x0->x0", "eps_hist->eps_hist_next", "saved->saved_next"}));
  // the context's half swapped (cond first) changes the trajectory: the engine reads uncond rows first
  const nlohmann::json c = golden("sd_loop")["runs"][0];
  SampleRequest r = sd_request(c);
  const std::vector<float> base = rt.sample(r).x;
  const size_t half = r.text_context.size() / 2;
  std::rotate(r.text_context.begin(), r.text_context.begin() + static_cast<long>(half), r.text_context.end());
  EXPECT_NE(rt.sample(r).x, base);
}

TEST(SdLoop, BadRequestsAreOneLineStatuses) {
  FakeStats stats;
  Runtime rt(toy_sd(), {}, fake_factory({}, stats));
  const nlohmann::json c = golden("sd_loop")["runs"][0];
  tstitch_status s = TSTITCH_OK;
  SampleRequest r = sd_request(c);
  r.text_context.clear();
  EXPECT_EQ(error_of([&] { rt.sample(r); }, &s),
            "an SD request needs token ids or the text context (request.text_context: 2 x batch x 3 x 8 floats, negative "
            "prompts first)");
  EXPECT_EQ(s, TSTITCH_ERR_INVALID_ARGUMENT);
  r = sd_request(c);
  r.text_width = 16;
  EXPECT_EQ(error_of([&] { rt.sample(r); }), "the text context is 3 tokens x 16 wide, the U-Nets take 3 x 8");
  r = sd_request(c);
  r.class_labels = {1, 2};
  EXPECT_EQ(error_of([&] { rt.sample(r); }), "this bundle is text-to-image (SD): give a text context, not class labels");
  r = sd_request(c);
  r.batch = 5;
  EXPECT_NE(error_of([&] { rt.sample(r); }).find("batch 5 is outside the engines' range [1, 4]"), std::string::npos);
  r = sd_request(c);
  r.sampler = "ddpm";
  EXPECT_EQ(error_of([&] { rt.sample(r); }),
            "unknown sampler 'ddpm' for an SD bundle; choose one of pndm, ddim, euler, dpm-solver++, lcm");
  r = sd_request(c);
  r.text_context[3] = NAN;
  EXPECT_EQ(error_of([&] { rt.sample(r); }), "the text context holds NaN or Inf; check the text encoder's output");
}

TEST(SdLoop, CApiRequestWithTextContext) {
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(open_with_factory(toy_sd().c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  const nlohmann::json c = golden("sd_loop")["runs"][0];
  const std::vector<float> ctx = floats(c["context_bits"]);
  tstitch_request req;
  tstitch_request_init(&req);
  req.batch = c["batch"];
  req.steps = c["steps"];
  req.ratio = c["ratio"];
  req.cfg_scale = c["cfg"];
  req.seed = c["seed"];
  req.sampler = "pndm";
  req.text_context = ctx.data();
  req.text_tokens = 3, req.text_width = 8;
  std::vector<float> out(static_cast<size_t>(req.batch) * 2 * 4 * 4);
  ASSERT_EQ(tstitch_sample(h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  const std::vector<float> want = c["x"].get<std::vector<float>>();
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-5f * std::max(1.0f, std::fabs(want[i])));
  req.text_context = nullptr;
  EXPECT_EQ(tstitch_sample(h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.text_context and prompt_tokens are NULL; an SD bundle needs token ids or the "
                                     "(2 x batch) x tokens x width text context");
  const int64_t ids[6] = {49406, 1, 49407, 49406, 2, 49407};
  req.prompt_tokens = ids;
  req.token_count = 3;
  EXPECT_EQ(tstitch_sample(h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tstitch_last_error()).find("request.negative_tokens is NULL"), std::string::npos);
  req.negative_tokens = ids;
  req.text_context = ctx.data();
  EXPECT_EQ(tstitch_sample(h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "give prompt_tokens or text_context, not both");
  req.negative_tokens = nullptr;
  req.prompt_tokens = nullptr;
  req.text_context = ctx.data();
  const int64_t labels[2] = {1, 2};
  req.class_labels = labels;
  EXPECT_EQ(tstitch_sample(h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  tstitch_close(h);
}

TEST(SdLoop, TokenIdsRunThroughTheTextEncoderEngine) {
  // token ids -> the bundle's text encoder plan (a toy here) -> the context, negative prompts first:
  // the same trajectory as the context computed on the host from the same ids
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(open_with_factory(toy_sd().c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  const int batch = 2, tokens = 3, width = 8;
  // the toy U-Net reads the first and last embedding of each row: the halves differ there
  const std::vector<int64_t> prompt = {320, 49406, 1929, 77, 49407, 5}, negative = {49406, 49407, 49407, 49406, 49407, 49407};
  std::vector<float> ctx;
  for (const auto* rows : {&negative, &prompt})
    for (int64_t id : *rows)
      for (int d = 0; d < width; ++d) ctx.push_back(toy_text_embedding(id, d));
  tstitch_request req;
  tstitch_request_init(&req);
  req.batch = batch, req.steps = 4, req.ratio = 0.5, req.cfg_scale = 7.5f, req.seed = 5, req.sampler = "pndm";
  req.prompt_tokens = prompt.data(), req.negative_tokens = negative.data(), req.token_count = tokens;
  std::vector<float> from_ids(batch * 2 * 4 * 4), from_ctx(from_ids.size());
  ASSERT_EQ(tstitch_sample(h, &req, from_ids.data(), from_ids.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  req.prompt_tokens = req.negative_tokens = nullptr;
  req.text_context = ctx.data(), req.text_tokens = tokens, req.text_width = width;
  ASSERT_EQ(tstitch_sample(h, &req, from_ctx.data(), from_ctx.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(from_ids, from_ctx);
  // the halves matter: prompts as negatives gives another trajectory
  req.text_context = nullptr;
  req.prompt_tokens = negative.data(), req.negative_tokens = prompt.data();
  std::vector<float> swapped(from_ids.size());
  ASSERT_EQ(tstitch_sample(h, &req, swapped.data(), swapped.size(), nullptr, 0, nullptr), TSTITCH_OK);
  EXPECT_NE(swapped, from_ids);
  req.token_count = 2;  // the U-Nets take 3 tokens: the text encoder refuses first
  EXPECT_EQ(tstitch_sample(h, &req, swapped.data(), swapped.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "the text encoder takes 3 tokens per prompt, the request has 2 (pad or cut to it, as the bundle's tokenizer does)");
  const std::vector<int64_t> bad = {-1, 2, 3, 4, 5, 6};
  req.token_count = 3, req.prompt_tokens = bad.data();
  EXPECT_EQ(tstitch_sample(h, &req, swapped.data(), swapped.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "token id -1 is negative; pass the tokenizer's ids");
  tstitch_close(h);
}

// Decoded RGB (pipeline/sd.py's decode): the bundle's VAE engine on latents / latent_scale_factor,
// then to_uint8 (HWC), equal to the golden Python computes with the same toy VAE (cpp_goldens.toy_vae).
TEST(SdVae, DecodesLikeThePythonPipeline) {
  FakeStats stats;
  Runtime rt(toy_sd(), {}, fake_factory({}, stats));
  int h = 0, w = 0, ch = 0;
  rt.image_shape(&h, &w, &ch);
  EXPECT_EQ(h, 32);
  EXPECT_EQ(w, 32);
  EXPECT_EQ(ch, 3);
  size_t mid = 0, runs = 0;
  const nlohmann::json gold = golden("sd_loop");
  for (const auto& c : gold["runs"]) {
    ++runs;
    const int batch = c["batch"], lh = c["latent_hw"][0], lw = c["latent_hw"][1];
    const std::vector<int> want = c["rgb"].get<std::vector<int>>();
    ASSERT_EQ(want.size(), static_cast<size_t>(batch) * lh * lw * 64 * ch);
    // Python's own final latents: the decode alone, bit for bit
    std::vector<uint8_t> rgb(want.size(), 7);
    rt.decode_rgb(c["x"].get<std::vector<float>>(), batch, lh, lw, rgb.data());
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(rgb[i], want[i]) << "byte " << i << " seed " << c["seed"];
    for (int v : want) mid += v > 0 && v < 255;
  }
  EXPECT_EQ(runs, 6u);
  EXPECT_GT(mid, 1000u);  // the golden is not all clipped: the arithmetic is compared, not just the clip
}

TEST(SdVae, CApiWritesRgbOrLatentsOnly) {
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(open_with_factory(toy_sd().c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  int ih = 0, iw = 0, ic = 0;
  ASSERT_EQ(tstitch_image_shape(h, &ih, &iw, &ic), TSTITCH_OK);
  EXPECT_EQ(ih * iw * ic, 32 * 32 * 3);
  EXPECT_EQ(tstitch_image_shape(h, nullptr, &iw, &ic), TSTITCH_ERR_INVALID_ARGUMENT);
  const nlohmann::json c = golden("sd_loop")["runs"][3];  // ddim eta 0.5, batch 2: per-step noise too
  const std::vector<float> ctx = floats(c["context_bits"]);
  tstitch_request req;
  tstitch_request_init(&req);
  req.batch = c["batch"];
  req.steps = c["steps"];
  req.ratio = c["ratio"];
  req.cfg_scale = c["cfg"];
  req.seed = c["seed"];
  req.eta = c["eta"];
  req.sampler = "ddim";
  req.text_context = ctx.data();
  req.text_tokens = 3, req.text_width = 8;
  const size_t n_lat = static_cast<size_t>(req.batch) * 2 * 4 * 4, n_rgb = static_cast<size_t>(req.batch) * ih * iw * ic;
  std::vector<float> lat(n_lat), lat_only(n_lat, -7.0f);
  std::vector<uint8_t> rgb(n_rgb, 7);
  ASSERT_EQ(tstitch_sample(h, &req, lat.data(), lat.size(), rgb.data(), rgb.size(), nullptr), TSTITCH_OK) << tstitch_last_error();
  // the trajectory matches Python to float32 rounding, so a byte may differ by one at a rounding edge
  const std::vector<int> want = c["rgb"].get<std::vector<int>>();
  size_t differ = 0;
  for (size_t i = 0; i < n_rgb; ++i) {
    EXPECT_LE(std::abs(rgb[i] - want[i]), 1) << "byte " << i;
    differ += rgb[i] != want[i];
  }
  EXPECT_LE(differ, n_rgb / 100);
  // and exactly the decode of the latents this call returned
  std::vector<uint8_t> again(n_rgb);
  FakeStats other;
  Runtime(toy_sd(), {}, fake_factory({}, other)).decode_rgb(lat, req.batch, 4, 4, again.data());
  EXPECT_EQ(again, rgb);
  // NULL rgb: latents only, the same latents
  ASSERT_EQ(tstitch_sample(h, &req, lat_only.data(), lat_only.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(lat_only, lat);
  // too small: refused before any work, nothing written
  std::vector<uint8_t> small(n_rgb - 1, 9);
  std::vector<float> untouched(n_lat, -7.0f);
  EXPECT_EQ(tstitch_sample(h, &req, untouched.data(), untouched.size(), small.data(), small.size(), nullptr),
            TSTITCH_ERR_BUFFER_TOO_SMALL);
  EXPECT_NE(std::string(tstitch_last_error()).find("the images need " + std::to_string(n_rgb)), std::string::npos)
      << tstitch_last_error();
  EXPECT_EQ(untouched, std::vector<float>(n_lat, -7.0f));
  EXPECT_EQ(small, std::vector<uint8_t>(n_rgb - 1, 9));
  EXPECT_EQ(tstitch_close(h), TSTITCH_OK);
}

// request.height/width: pipeline/sd.py's validate (VAE factor, U-Net downsampling, io.dim_ranges H/W [2, 8]
// latent pixels -> [16, 64] image pixels), with its messages, before any work; DiT bundles refuse them.
TEST(SdSize, HeightAndWidthAreCheckedAsPythonChecksThem) {
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  ASSERT_EQ(open_with_factory(toy_sd().c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  const std::vector<float> ctx(2 * 3 * 8, 0.25f);
  tstitch_request req;
  tstitch_request_init(&req);
  req.steps = 3;
  req.sampler = "euler";
  req.text_context = ctx.data();
  req.text_tokens = 3, req.text_width = 8;
  std::vector<float> lat(8 * 8 * 2, -7.0f);
  const std::pair<std::pair<int, int>, const char*> bad[] = {
      {{20, 32}, "height 20 is not a positive multiple of the VAE factor 8"},
      {{32, -8}, "width -8 is not a positive multiple of the VAE factor 8"},
      {{72, 32}, "height 72 is outside the sizes this bundle was built for [16, 64]"},
      {{32, 8}, "width 8 is outside the sizes this bundle was built for [16, 64]"},
  };
  for (const auto& [hw, message] : bad) {
    req.height = hw.first, req.width = hw.second;
    EXPECT_EQ(tstitch_sample(h, &req, lat.data(), lat.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
    EXPECT_STREQ(tstitch_last_error(), message);
  }
  EXPECT_EQ(lat, std::vector<float>(lat.size(), -7.0f));
  // 64 x 16 pixels: an (8, 2) latent; the buffers are sized by it, the image too
  req.height = 64, req.width = 16;
  EXPECT_EQ(tstitch_sample(h, &req, lat.data(), 8 * 2 * 2 - 1, nullptr, 0, nullptr), TSTITCH_ERR_BUFFER_TOO_SMALL);
  std::vector<uint8_t> rgb(64 * 16 * 3);
  ASSERT_EQ(tstitch_sample(h, &req, lat.data(), 8 * 2 * 2, rgb.data(), rgb.size(), nullptr), TSTITCH_OK) << tstitch_last_error();
  float* alloc = nullptr;
  size_t n = 0;
  ASSERT_EQ(tstitch_sample_alloc(h, &req, &alloc, &n, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(n, 8u * 2 * 2);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(alloc[i], lat[i]);
  tstitch_free(alloc);
  // back to the default size on the same handle (the loop re-binds its buffers)
  req.height = 0, req.width = 0;
  ASSERT_EQ(tstitch_sample(h, &req, lat.data(), 4 * 4 * 2, nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(tstitch_close(h), TSTITCH_OK);

  FakeStats dit_stats;
  ASSERT_EQ(open_with_factory((test_dir() + "/data/toy_pair").c_str(), nullptr, fake_factory({}, dit_stats), &h), TSTITCH_OK);
  const int64_t labels[1] = {3};
  tstitch_request d;
  tstitch_request_init(&d);
  d.class_labels = labels;
  d.steps = 2;
  d.height = 32;
  EXPECT_EQ(tstitch_sample(h, &d, lat.data(), lat.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.height and width are for SD bundles; leave them 0 (this bundle samples at 4x4)");
  EXPECT_EQ(tstitch_close(h), TSTITCH_OK);
}

TEST(SdSize, UNetDownsamplingIsPythonsRule) {
  namespace fs = std::filesystem;
  const std::string dir = ::testing::TempDir() + "/tstitch_sd_down";
  fs::remove_all(dir);
  fs::copy(toy_sd(), dir, fs::copy_options::recursive);
  nlohmann::json m = nlohmann::json::parse(std::ifstream(dir + "/manifest.json"));
  for (auto& model : m["models"]) model["arch"]["block_out_channels"] = {8, 8, 8};  // 2^(3-1) = 4x down
  std::ofstream(dir + "/manifest.json") << m.dump(2);
  FakeStats stats;
  Runtime rt(dir, {}, fake_factory({}, stats));
  SampleRequest r;
  r.height = 48, r.width = 32;
  try {
    rt.latent_hw(r);
    FAIL() << "48x32 passed a 32-pixel rule";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "height/width 48x32 must be multiples of 32 (VAE factor 8 x the U-Nets' 4x downsampling)");
  }
  r.height = 64;
  EXPECT_EQ(rt.latent_hw(r), (std::pair<int64_t, int64_t>{8, 4}));
}

TEST(SdLoop, DeepCacheEntryWithoutCachedGraphsIsRefusedWithOneLine) {
  // `cache` without io.roles.cache and every model's cached graphs: Manifest._validate_cache's rule and message, at
  // open, before any device work
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("tstitch-cache-bundle-" + std::to_string(std::random_device{}()));
  fs::remove_all(dir);
  fs::copy(toy_sd(), dir, fs::copy_options::recursive);
  nlohmann::ordered_json m;
  {
    std::ifstream in(dir / "manifest.json");
    in >> m;
  }
  m["cache"] = {{"scheme", "deepcache"}, {"branch", 3}};
  {
    std::ofstream out(dir / "manifest.json");
    out << m.dump();
  }
  FakeStats stats;
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([&] { Runtime rt(dir.string(), {}, fake_factory({}, stats)); }, &s),
            "cache, io.roles.cache and every model's cached entry come together (DeepCache's full and cached step "
            "graphs); rebuild the bundle");
  EXPECT_EQ(s, TSTITCH_ERR_BUNDLE);
  EXPECT_EQ(stats.contexts, 0u);
  fs::remove_all(dir);
}
