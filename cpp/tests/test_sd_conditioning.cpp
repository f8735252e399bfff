// Issue 12's step graphs on the fake engine: SDXL-shaped (text_embeds, time_ids), ControlNet-shaped
// (control_image, control_guess, the per-step control_scale table) and LCM-shaped ("embedding"
// guidance: a (B, L, D) context, no negative prompt; the lcm sampler) toy bundles, written by
// tests/cpp_goldens.py from export/unet_export.py's unet_io_spec. Trajectories equal the Python
// reference (golden/sd_cond_loop.json: pipeline/sd.py's plan + sd_sampler_update, and diffusers'
// LCMScheduler itself for lcm), through the Runtime and through the C API (version 4 request with
// named inputs; version-3 callers keep working); every bad input is one line with a status.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>

#include "c_api_internal.hpp"
#include "errors.hpp"
#include "fake_backend.hpp"
#include "roles.hpp"
#include "runtime.hpp"
#include "sd_samplers.hpp"
#include "test_util.hpp"

using namespace tstitch;
using namespace tstitch::testing;

namespace {

std::string bundle(const std::string& name) { return test_dir() + "/data/" + name; }

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

const nlohmann::json& runs() {
  static const nlohmann::json j = golden("sd_cond_loop")["runs"];
  return j;
}

SampleRequest cond_request(const nlohmann::json& c) {
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
  r.height = 8 * c["latent_hw"][0].get<int>(), r.width = 8 * c["latent_hw"][1].get<int>();
  for (const auto& [name, bits] : c["inputs_bits"].items()) r.inputs[name] = floats(bits);
  if (!c["control"].is_null()) {
    r.controlnet_scale = c["control"][0];
    r.control_guidance_start = c["control"][1], r.control_guidance_end = c["control"][2];
    r.control_guess_mode = c["control"][3].get<int>() == 1;
  }
  return r;
}

float max_diff(const std::vector<float>& got, const nlohmann::json& want_j, float* scale) {
  const std::vector<float> want = want_j.get<std::vector<float>>();
  EXPECT_EQ(got.size(), want.size());
  float diff = 0.0f;
  *scale = 1.0f;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    *scale = std::max(*scale, std::fabs(want[i]));
    diff = std::max(diff, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY);
  }
  return diff;
}

// A C API (version 4) request for golden run `c`; its named inputs point into `keep`.
tstitch_request c_request(const nlohmann::json& c, std::vector<std::pair<std::string, std::vector<float>>>& keep,
                          std::vector<tstitch_input>& inputs, std::vector<float>& ctx) {
  const SampleRequest q = cond_request(c);
  tstitch_request req;
  tstitch_request_init(&req);
  req.batch = q.batch, req.steps = q.steps, req.ratio = q.ratio, req.cfg_scale = q.cfg_scale, req.seed = q.seed, req.eta = q.eta;
  static thread_local std::string sampler;
  sampler = q.sampler;
  req.sampler = sampler.empty() ? nullptr : sampler.c_str();
  ctx = q.text_context;
  req.text_context = ctx.data(), req.text_tokens = 3, req.text_width = 8;
  req.height = q.height, req.width = q.width;
  keep.assign(q.inputs.begin(), q.inputs.end());
  inputs.clear();
  for (const auto& [name, v] : keep) inputs.push_back({name.c_str(), v.data(), v.size()});
  req.inputs = inputs.empty() ? nullptr : inputs.data(), req.num_inputs = static_cast<int>(inputs.size());
  req.controlnet_scale = q.controlnet_scale;
  req.control_guidance_start = q.control_guidance_start, req.control_guidance_end = q.control_guidance_end;
  req.control_guess_mode = q.control_guess_mode ? 1 : 0;
  return req;
}

struct Open {
  FakeStats stats;
  tstitch_runtime* h = nullptr;
  explicit Open(const std::string& name) {
    EXPECT_EQ(open_with_factory(bundle(name).c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
  }
  ~Open() { tstitch_close(h); }
};

}  // namespace

TEST(SdConditioning, TrajectoriesEqualThePythonReference) {
  std::map<std::string, int> compared;
  std::map<std::string, float> worst;
  for (bool graph : {false, true}) {
    for (const auto& c : runs()) {
      FakeStats stats;
      OpenOptions o;
      o.cuda_graph = graph;
      Runtime rt(bundle(c["bundle"]), o, fake_factory({}, stats));
      const LoopResult res = rt.sample(cond_request(c));
      float scale = 1.0f;
      const float diff = max_diff(res.x, c["x"], &scale);
      // the same RNG, tables (lcm: against diffusers' own float32 update) and update; tanh may differ in the last bit
      EXPECT_LE(diff, 2e-5f * scale) << c["bundle"] << " " << c["sampler"] << " seed " << c["seed"];
      worst[c["bundle"]] = std::max(worst[c["bundle"]], diff / scale);
      EXPECT_EQ(res.graph, graph);
      EXPECT_EQ(res.step_ms.size(), c["step_model"].size());
      ++compared[c["bundle"]];
    }
  }
  EXPECT_EQ(compared, (std::map<std::string, int>{{"toy_control", 6}, {"toy_lcm", 6}, {"toy_sdxl", 6}}));
  for (const auto& [name, w] : worst) std::printf("%s vs the Python reference: worst max|diff| / max|x| = %.3g\n", name.c_str(), w);
}

TEST(SdConditioning, EveryInputMattersAndIsBoundByName) {
  // changing any one named input (or the ControlNet schedule) changes the trajectory: nothing is dropped
  const nlohmann::json& sdxl = runs()[0];
  const nlohmann::json& control = runs()[3];
  for (const nlohmann::json* c : {&sdxl, &control}) {
    FakeStats stats;
    Runtime rt(bundle((*c)["bundle"]), {}, fake_factory({}, stats));
    const SampleRequest base = cond_request(*c);
    const std::vector<float> x = rt.sample(base).x;
    for (const auto& [name, v] : base.inputs) {
      SampleRequest r = base;
      r.inputs[name].front() = name == "control_image" ? 0.5f * v.front() : v.front() + 1.0f;
      EXPECT_NE(rt.sample(r).x, x) << name;
    }
  }
  FakeStats stats;
  Runtime rt(bundle("toy_control"), {}, fake_factory({}, stats));
  const SampleRequest base = cond_request(control);
  const std::vector<float> x = rt.sample(base).x;
  SampleRequest r = base;
  r.control_guess_mode = !base.control_guess_mode;
  EXPECT_NE(rt.sample(r).x, x) << "guess mode";
  r = base;
  r.controlnet_scale = 0.0f;
  EXPECT_NE(rt.sample(r).x, x) << "scale";
  r = base;
  r.control_guidance_end = 0.5;
  EXPECT_NE(rt.sample(r).x, x) << "end";
  std::vector<std::string> request;
  for (const Binding& b : rt.loop().bindings())
    if (b.role == Role::kRequest || b.role == Role::kStep) request.push_back(b.spec.name + ":" + b.source);
  EXPECT_EQ(request, (std::vector<std::string>{"t:timestep", "coef:coef", "noise:noise", "control_scale:control_scale",
                                               "context:cond", "control_image:control_image",
                                               "control_guess:control_guess", "guidance:guidance"}));
}

TEST(SdConditioning, ControlScaleIsDiffusersKeepRule) {
  size_t checked = 0;
  for (const auto& c : runs()) {
    if (c["control"].is_null()) continue;
    const int n = static_cast<int>(c["step_model"].size());
    EXPECT_EQ(control_scale_table(n, c["control"][0], c["control"][1], c["control"][2]),
              c["control_scale"].get<std::vector<float>>());
    ++checked;
  }
  EXPECT_EQ(checked, 3u);
  // 10 calls in [0.2, 0.7]: calls 2..6 run the ControlNet (i / n >= 0.2 and (i + 1) / n <= 0.7)
  EXPECT_EQ(control_scale_table(10, 2.0f, 0.2, 0.7), (std::vector<float>{0, 0, 2, 2, 2, 2, 2, 0, 0, 0}));
}

TEST(SdConditioning, CApiVersion4RequestsWithNamedInputs) {
  size_t compared = 0;
  for (const auto& c : runs()) {
    Open o(c["bundle"]);
    std::vector<std::pair<std::string, std::vector<float>>> keep;
    std::vector<tstitch_input> inputs;
    std::vector<float> ctx;
    const tstitch_request req = c_request(c, keep, inputs, ctx);
    std::vector<float> out(c["x"].size(), -7.0f);
    ASSERT_EQ(tstitch_sample(o.h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_OK)
        << c["bundle"] << ": " << tstitch_last_error();
    float scale = 1.0f;
    EXPECT_LE(max_diff(out, c["x"], &scale), 2e-5f * scale) << c["bundle"] << " seed " << c["seed"];
    // the RGB path decodes the same latents at the request's size
    int ih = 0, iw = 0, ic = 0;
    ASSERT_EQ(tstitch_image_shape(o.h, &ih, &iw, &ic), TSTITCH_OK);
    std::vector<uint8_t> rgb(static_cast<size_t>(req.batch) * 64 * c["latent_hw"][0].get<int>() * c["latent_hw"][1].get<int>() * 3);
    std::vector<float> again(out.size());
    ASSERT_EQ(tstitch_sample(o.h, &req, again.data(), again.size(), rgb.data(), rgb.size(), nullptr), TSTITCH_OK) << tstitch_last_error();
    EXPECT_EQ(again, out);
    ++compared;
  }
  EXPECT_EQ(compared, 9u);
}

TEST(SdConditioning, InputsAreDiscoverableByName) {
  Open control("toy_control");
  int n = 0;
  ASSERT_EQ(tstitch_input_count(control.h, &n), TSTITCH_OK);
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    const char* name = nullptr;
    ASSERT_EQ(tstitch_input_name(control.h, i, &name), TSTITCH_OK);
    names.push_back(name);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"context", "control_image", "control_guess"}));
  const char* none = nullptr;
  EXPECT_EQ(tstitch_input_name(control.h, 3, &none), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "input index 3 is outside [0, 3)");
  int64_t dims[8] = {};
  int rank = 0;
  ASSERT_EQ(tstitch_input_shape(control.h, "control_image", 2, 64, 16, dims, &rank), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(std::vector<int64_t>(dims, dims + rank), (std::vector<int64_t>{2, 3, 64, 16}));  // (B, 3, 8H, 8W)
  ASSERT_EQ(tstitch_input_shape(control.h, "context", 2, 0, 0, dims, &rank), TSTITCH_OK);
  EXPECT_EQ(std::vector<int64_t>(dims, dims + rank), (std::vector<int64_t>{4, 3, 8}));  // cfg: 2B rows
  ASSERT_EQ(tstitch_input_shape(control.h, "control_guess", 1, 0, 0, dims, &rank), TSTITCH_OK);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(tstitch_input_shape(control.h, "text_embeds", 1, 0, 0, dims, &rank), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "this bundle's step graphs take no request input 'text_embeds' (they take context, control_image, control_guess)");
  EXPECT_EQ(tstitch_input_shape(control.h, "control_image", 1, 72, 32, dims, &rank), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "height 72 is outside the sizes this bundle was built for [16, 64]");
  Open sdxl("toy_sdxl");
  ASSERT_EQ(tstitch_input_shape(sdxl.h, "text_embeds", 3, 0, 0, dims, &rank), TSTITCH_OK);
  EXPECT_EQ(std::vector<int64_t>(dims, dims + rank), (std::vector<int64_t>{6, 5}));
  ASSERT_EQ(tstitch_input_shape(sdxl.h, "time_ids", 1, 0, 0, dims, &rank), TSTITCH_OK);
  EXPECT_EQ(std::vector<int64_t>(dims, dims + rank), (std::vector<int64_t>{2, 6}));
  Open lcm("toy_lcm");
  ASSERT_EQ(tstitch_input_shape(lcm.h, "context", 3, 0, 0, dims, &rank), TSTITCH_OK);
  EXPECT_EQ(std::vector<int64_t>(dims, dims + rank), (std::vector<int64_t>{3, 3, 8}));  // "embedding": B rows
}

TEST(SdConditioning, SdxlBadInputsAreOneLine) {
  Open o("toy_sdxl");
  const nlohmann::json& c = runs()[0];  // batch 2, cfg, time_ids given
  std::vector<std::pair<std::string, std::vector<float>>> keep;
  std::vector<tstitch_input> inputs;
  std::vector<float> ctx;
  std::vector<float> out(c["x"].size(), -7.0f);
  auto sample = [&](const tstitch_request& r) { return tstitch_sample(o.h, &r, out.data(), out.size(), nullptr, 0, nullptr); };
  tstitch_request req = c_request(c, keep, inputs, ctx);
  ASSERT_EQ(keep[0].first, "text_embeds");
  ASSERT_EQ(keep[1].first, "time_ids");
  req.num_inputs = 1;  // time_ids left out: diffusers' default, fine
  ASSERT_EQ(sample(req), TSTITCH_OK) << tstitch_last_error();
  std::fill(out.begin(), out.end(), -7.0f);
  req.inputs = inputs.data() + 1;  // text_embeds missing
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "this bundle's step graphs need the input text_embeds (2B, 5); pass it in request.inputs");
  req = c_request(c, keep, inputs, ctx);
  inputs[0].count -= 1;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "the input text_embeds has 19 floats, this request needs 4 x 5 = 20");
  req = c_request(c, keep, inputs, ctx);
  keep[1].second[4] = NAN;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "the input time_ids holds NaN or Inf");
  req = c_request(c, keep, inputs, ctx);
  inputs[1].name = "pooled";
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "this bundle's step graphs take no input 'pooled' (they take text_embeds, time_ids)");
  inputs[1].name = "context";
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "give the text context ('context') as request.text_context, not as a named input");
  inputs[1].name = "text_embeds";
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.inputs names text_embeds twice");
  inputs[1].name = nullptr;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.inputs[1] has a NULL name or data");
  req = c_request(c, keep, inputs, ctx);
  req.num_inputs = -1;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  req = c_request(c, keep, inputs, ctx);
  const float added[4] = {};
  req.added_conditions = added;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tstitch_last_error()).find("request.added_conditions is not read"), std::string::npos);
  req = c_request(c, keep, inputs, ctx);
  req.controlnet_scale = 0.5f;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "controlnet_scale, control_guidance_start/end and control_guess_mode are for bundles with a "
                                     "ControlNet; this one has none (leave them at 1, 0, 1, 0)");
  req = c_request(c, keep, inputs, ctx);
  const int64_t ids[6] = {49406, 1, 49407, 49406, 2, 49407};
  req.text_context = nullptr, req.prompt_tokens = ids, req.negative_tokens = ids, req.token_count = 3;
  EXPECT_EQ(sample(req), TSTITCH_ERR_UNAVAILABLE);
  EXPECT_NE(std::string(tstitch_last_error()).find("an SDXL bundle's prompts go through two tokenizers and text encoders"),
            std::string::npos);
  // prompts as text load both encoders on first use: this toy bundle's second one lacks the pooled output the io names
  const char* prompts[2] = {"a cat", "a dog"};
  req = c_request(c, keep, inputs, ctx);
  req.text_context = nullptr, req.prompts = prompts, req.num_prompts = 2, req.inputs = nullptr, req.num_inputs = 0;
  EXPECT_EQ(sample(req), TSTITCH_ERR_BUNDLE);
  EXPECT_STREQ(tstitch_last_error(), "the text encoder 2 engine has no float32 device tensor text_embeds as the manifest says; "
                                     "rebuild the bundle");
  req.inputs = inputs.data(), req.num_inputs = static_cast<int>(inputs.size());  // text_embeds among them
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "text_embeds comes from the prompts (text_encoder_2's pooled output) when prompts are given "
                                     "as text; leave it out of request.inputs, or pass text_context and text_embeds instead of prompts");
  EXPECT_EQ(out, std::vector<float>(out.size(), -7.0f)) << "a refused request writes nothing";
}

TEST(SdConditioning, ControlNetBadInputsAreOneLine) {
  Open o("toy_control");
  const nlohmann::json& c = runs()[3];  // batch 2, 32 x 32 px
  std::vector<std::pair<std::string, std::vector<float>>> keep;
  std::vector<tstitch_input> inputs;
  std::vector<float> ctx;
  std::vector<float> out(c["x"].size());
  auto sample = [&](const tstitch_request& r) { return tstitch_sample(o.h, &r, out.data(), out.size(), nullptr, 0, nullptr); };
  tstitch_request req = c_request(c, keep, inputs, ctx);
  req.num_inputs = 0, req.inputs = nullptr;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "this bundle's step graphs need the input control_image (B, 3, 8H, 8W); pass it in request.inputs");
  req = c_request(c, keep, inputs, ctx);
  req.height = 64;  // the image was made for 32 x 32
  EXPECT_EQ(tstitch_sample(o.h, &req, out.data(), 2 * out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "the input control_image has 6144 floats, this request needs 2 x 3 x 64 x 32 = 12288 "
                                     "(batch x channels x height x width, the image size)");
  req = c_request(c, keep, inputs, ctx);
  keep[0].second[7] = 1.5f;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "the input control_image holds values outside [0, 1]; scale the image to [0, 1] as diffusers does");
  req = c_request(c, keep, inputs, ctx);
  const float guess = 1.0f;
  const tstitch_input extra[2] = {inputs[0], {"control_guess", &guess, 1}};
  req.inputs = extra, req.num_inputs = 2;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "control_guess comes from request.control_guess_mode; do not pass it as an input");
  req = c_request(c, keep, inputs, ctx);
  req.control_guess_mode = 2;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.control_guess_mode must be 0 or 1, got 2");
  req = c_request(c, keep, inputs, ctx);
  req.control_guidance_start = 0.6, req.control_guidance_end = 0.6;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1, got 0.600000 and 0.600000");
  req = c_request(c, keep, inputs, ctx);
  req.controlnet_scale = INFINITY;
  EXPECT_EQ(sample(req), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "controlnet_scale must be a finite number");
}

TEST(SdConditioning, EmbeddingGuidanceTakesBatchRowsAndNoNegativePrompt) {
  Open o("toy_lcm");
  const nlohmann::json& c = runs()[6];  // batch 2, cfg 8.5 through the embedding
  std::vector<std::pair<std::string, std::vector<float>>> keep;
  std::vector<tstitch_input> inputs;
  std::vector<float> ctx;
  std::vector<float> out(c["x"].size()), from_ids(c["x"].size()), from_ctx(c["x"].size());
  tstitch_request req = c_request(c, keep, inputs, ctx);
  ASSERT_EQ(ctx.size(), 2u * 3 * 8);  // B rows, not 2B
  // token ids: the prompt rows only, through the text encoder engine; the same as the host context
  const std::vector<int64_t> prompt = {320, 49406, 1929, 77, 49407, 5};
  std::vector<float> host;
  for (int64_t id : prompt)
    for (int d = 0; d < 8; ++d) host.push_back(toy_text_embedding(id, d));
  req.text_context = nullptr, req.prompt_tokens = prompt.data(), req.token_count = 3;
  ASSERT_EQ(tstitch_sample(o.h, &req, from_ids.data(), from_ids.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  req.prompt_tokens = nullptr, req.text_context = host.data();
  ASSERT_EQ(tstitch_sample(o.h, &req, from_ctx.data(), from_ctx.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(from_ids, from_ctx);
  req.text_context = nullptr, req.prompt_tokens = prompt.data(), req.negative_tokens = prompt.data();
  EXPECT_EQ(tstitch_sample(o.h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "this bundle uses LCM's guidance embedding (no classifier-free guidance): it takes no "
                                     "negative prompt; leave negative_tokens NULL");
  // the Runtime refuses a 2B (cfg-shaped) context in one line
  FakeStats stats;
  Runtime rt(bundle("toy_lcm"), {}, fake_factory({}, stats));
  SampleRequest r = cond_request(c);
  r.text_context.insert(r.text_context.end(), r.text_context.begin(), r.text_context.end());
  EXPECT_EQ(error_of([&] { rt.sample(r); }),
            "the text context has 96 floats, the request needs 2 rows (batch: no negative prompts under LCM's guidance "
            "embedding) x 3 x 8");
  r = cond_request(c);
  r.text_context.clear();
  EXPECT_EQ(error_of([&] { rt.sample(r); }),
            "an SD request needs token ids or the text context (request.text_context: batch x 3 x 8 floats; this bundle's LCM "
            "guidance embedding takes no negative prompts)");
  r = cond_request(c);
  r.negative_tokens = {1, 2, 3};
  r.prompt_tokens = {1, 2, 3, 4, 5, 6};
  r.token_count = 3;
  r.text_context.clear();
  EXPECT_NE(error_of([&] { rt.sample(r); }).find("it takes no negative prompt"), std::string::npos);
  // the guidance reaches the graph: cfg 8.5 and 1 give different trajectories
  r = cond_request(c);
  const std::vector<float> guided = rt.sample(r).x;
  r.cfg_scale = 1.0f;
  EXPECT_NE(rt.sample(r).x, guided);
}

// A caller compiled against the version-3 header: its struct ends at height/width (struct_size = that
// size); the library reads nothing beyond it and gives the API 4 fields their defaults.
namespace {
struct RequestV3 {  // tstitch.h at TSTITCH_API_VERSION 3, verbatim
  size_t struct_size;
  int batch;
  const int64_t* class_labels;
  const int64_t* prompt_tokens;
  const int64_t* negative_tokens;
  int token_count;
  const float* added_conditions;
  int added_condition_count;
  int steps;
  double ratio;
  const double* fractions;
  int num_fractions;
  const char* sampler;
  double eta;
  float cfg_scale;
  uint64_t seed;
  const float* init_noise;
  const float* text_context;
  int text_tokens;
  int text_width;
  int height;
  int width;
};
}  // namespace

TEST(SdConditioning, Version3CallersKeepWorking) {
  static_assert(sizeof(RequestV3) == offsetof(tstitch_request, inputs), "v4 appends after the v3 layout");
  static_assert(offsetof(RequestV3, width) == offsetof(tstitch_request, width), "v3 fields keep their offsets");
  const nlohmann::json c = golden("sd_loop")["runs"][0];  // toy_sd (SD 1.x): what a v3 caller could run
  Open o("toy_sd");
  const std::vector<float> ctx = floats(c["context_bits"]);
  // a v3 struct in a buffer of garbage: nothing past struct_size may be read
  std::vector<unsigned char> mem(sizeof(tstitch_request) + 64, 0xEE);
  RequestV3 v3{};
  v3.struct_size = sizeof(RequestV3);
  v3.batch = c["batch"], v3.steps = c["steps"], v3.ratio = c["ratio"], v3.cfg_scale = c["cfg"], v3.seed = c["seed"];
  v3.sampler = "pndm";
  v3.text_context = ctx.data(), v3.text_tokens = 3, v3.text_width = 8;
  std::memcpy(mem.data(), &v3, sizeof(v3));
  std::vector<float> old_out(c["x"].size()), new_out(c["x"].size());
  const auto* as_request = reinterpret_cast<const tstitch_request*>(mem.data());
  ASSERT_EQ(tstitch_sample(o.h, as_request, old_out.data(), old_out.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  tstitch_request v4;
  tstitch_request_init(&v4);
  v4.batch = v3.batch, v4.steps = v3.steps, v4.ratio = v3.ratio, v4.cfg_scale = v3.cfg_scale, v4.seed = v3.seed;
  v4.sampler = "pndm", v4.text_context = ctx.data(), v4.text_tokens = 3, v4.text_width = 8;
  ASSERT_EQ(tstitch_sample(o.h, &v4, new_out.data(), new_out.size(), nullptr, 0, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(old_out, new_out);
  float scale = 1.0f;
  EXPECT_LE(max_diff(old_out, c["x"], &scale), 1e-5f * scale);
  float* alloc = nullptr;
  size_t n = 0;
  ASSERT_EQ(tstitch_sample_alloc(o.h, as_request, &alloc, &n, nullptr), TSTITCH_OK) << tstitch_last_error();
  EXPECT_EQ(std::vector<float>(alloc, alloc + n), old_out);
  tstitch_free(alloc);
  // any other size is refused with both sizes this library reads
  v4.struct_size = sizeof(RequestV3) + 8;
  EXPECT_EQ(tstitch_sample(o.h, &v4, new_out.data(), new_out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(tstitch_last_error()),
            "request.struct_size is " + std::to_string(sizeof(RequestV3) + 8) + ", this library expects " +
                std::to_string(sizeof(tstitch_request)) + " (API version " + std::to_string(TSTITCH_API_VERSION) + "), " +
                std::to_string(offsetof(tstitch_request, cache_interval) + alignof(tstitch_request) - sizeof(int)) +
                " (version 5), " +
                std::to_string(offsetof(tstitch_request, prompts)) + " (version 4) or " + std::to_string(sizeof(RequestV3)) +
                " (version 3); initialise it with tstitch_request_init and rebuild against this header");
  EXPECT_EQ(tstitch_api_version(), TSTITCH_API_VERSION);
}

TEST(SdConditioning, SymbolicMultiplesResolveAsIoRolesDoes) {
  const DimValues dims = {{"B", 2}, {"2B", 4}, {"H", 5}, {"W", 3}};
  EXPECT_EQ(resolve_dim("8H", dims, "control_image"), 40);
  EXPECT_EQ(resolve_dim("16W", dims, "x"), 48);
  EXPECT_EQ(resolve_dim("2B", dims, "context"), 4);
  EXPECT_EQ(resolve_dim("3B", dims, "context"), 6);
  for (const char* bad : {"08H", "8", "8Q", "H8", "8-H", ""})
    EXPECT_EQ(error_of([&] { resolve_dim(bad, dims, "control_image"); }),
              std::string("the step input control_image has the dimension '") + bad +
                  "', which the latent's shape does not define; rebuild the bundle")
        << bad;
}

TEST(SdConditioning, BundlesWithoutNamedInputsRefuseThem) {
  const float v[4] = {};
  const tstitch_input in[1] = {{"text_embeds", v, 4}};
  const nlohmann::json c = golden("sd_loop")["runs"][0];
  Open sd("toy_sd");
  const std::vector<float> ctx = floats(c["context_bits"]);
  tstitch_request req;
  tstitch_request_init(&req);
  req.batch = c["batch"], req.steps = 2, req.sampler = "ddim";
  req.text_context = ctx.data(), req.text_tokens = 3, req.text_width = 8;
  req.inputs = in, req.num_inputs = 1;
  std::vector<float> out(c["x"].size());
  EXPECT_EQ(tstitch_sample(sd.h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(),
               "this bundle's step graphs take no input 'text_embeds' besides the text context; leave request.inputs empty");
  req.inputs = nullptr, req.num_inputs = 0, req.control_guess_mode = 1;
  EXPECT_EQ(tstitch_sample(sd.h, &req, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "controlnet_scale, control_guidance_start/end and control_guess_mode are for bundles with a "
                                     "ControlNet; this one has none (leave them at 1, 0, 1, 0)");
  FakeStats stats;
  tstitch_runtime* dit = nullptr;
  ASSERT_EQ(open_with_factory((test_dir() + "/data/toy_pair").c_str(), nullptr, fake_factory({}, stats), &dit), TSTITCH_OK);
  const int64_t labels[1] = {3};
  tstitch_request d;
  tstitch_request_init(&d);
  d.class_labels = labels, d.steps = 2, d.inputs = in, d.num_inputs = 1;
  EXPECT_EQ(tstitch_sample(dit, &d, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "this bundle is class-conditional (DiT): it takes no named inputs; leave inputs NULL");
  d.inputs = nullptr, d.num_inputs = 0, d.controlnet_scale = 2.0f;
  EXPECT_EQ(tstitch_sample(dit, &d, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tstitch_last_error()).find("are for bundles with a ControlNet"), std::string::npos);
  EXPECT_EQ(tstitch_close(dit), TSTITCH_OK);
}

TEST(SdConditioning, ManifestReadsTheConditioning) {
  const Manifest sdxl = read_manifest(bundle("toy_sdxl"));
  EXPECT_TRUE(sdxl.text_to_image());
  EXPECT_EQ(sdxl.conditioning.guidance, "cfg");
  EXPECT_TRUE(sdxl.conditioning.force_zeros_for_empty_prompt);
  EXPECT_EQ(sdxl.conditioning.text_embeds_dim, 5);
  EXPECT_EQ(sdxl.conditioning.time_ids, 6);
  EXPECT_TRUE(sdxl.has_text_encoder_2);
  EXPECT_EQ(sdxl.text_encoder_2_engines.count("trt"), 1u);
  const Manifest control = read_manifest(bundle("toy_control"));
  EXPECT_TRUE(control.conditioning.controlnet);
  EXPECT_EQ(control.conditioning.controlnet_family, "sd");
  EXPECT_EQ(control.conditioning.controlnet_channels, 3);
  EXPECT_EQ(control.conditioning.controlnet_engines.count("torch"), 1u);
  EXPECT_EQ(read_manifest(bundle("toy_lcm")).conditioning.guidance, "embedding");
  EXPECT_EQ(read_manifest(bundle("toy_sd")).conditioning.guidance, "cfg");  // no conditioning: cfg
}

// Prompts as text through the C API: checked before any tokenizer or engine work (the toy bundles have no
// tokenizer; the real tokenizer is tested against `tokenizers` in tests/test_cpp_tokenizer.py).
TEST(SdConditioning, TextPromptsAreCheckedFirst) {
  FakeStats stats;
  auto open = [&](const std::string& bundle) {
    tstitch_runtime* h = nullptr;
    EXPECT_EQ(tstitch::open_with_factory(bundle.c_str(), nullptr, fake_factory({}, stats), &h), TSTITCH_OK) << tstitch_last_error();
    return h;
  };
  const char* prompts[] = {"a cat", "a dog"};
  const char* negatives[] = {"", "blurry"};
  tstitch_request r;
  tstitch_request_init(&r);
  r.batch = 2, r.steps = 2;
  r.prompts = prompts, r.num_prompts = 2;
  std::vector<float> out(1 << 16);
  // LCM's guidance embedding has no uncond batch: a negative prompt is refused, never dropped
  tstitch_runtime* lcm = open(test_dir() + "/data/toy_lcm");
  r.negative_prompts = negatives, r.num_negative_prompts = 2;
  EXPECT_EQ(tstitch_sample(lcm, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "a negative prompt needs classifier-free guidance, but this bundle guides through LCM's "
                                     "guidance embedding (no uncond batch): leave negative_prompts NULL, or rebuild with --guidance cfg");
  r.negative_prompts = nullptr, r.num_negative_prompts = 0;  // the toy's tokenizer.json is "{}": refused, one line
  EXPECT_EQ(tstitch_sample(lcm, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_BUNDLE);
  EXPECT_EQ(std::string(tstitch_last_error()).rfind("the bundle's tokenizer ", 0), 0u) << tstitch_last_error();
  EXPECT_NE(std::string(tstitch_last_error()).find("is not the CLIP BPE tokenizer this runtime implements"), std::string::npos);
  EXPECT_EQ(std::string(tstitch_last_error()).find('\n'), std::string::npos);
  tstitch_close(lcm);
  tstitch_runtime* sd = open(test_dir() + "/data/toy_sd");
  r.num_prompts = 1;
  EXPECT_EQ(tstitch_sample(sd, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "give one prompt per image: batch 2, 1 prompts");
  r.num_prompts = 2;
  const char* with_null[] = {"a cat", nullptr};
  r.prompts = with_null;
  EXPECT_EQ(tstitch_sample(sd, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "request.prompts[1] is NULL");
  const int64_t ids[4] = {1, 2, 3, 4};
  r.prompts = prompts, r.prompt_tokens = ids, r.token_count = 2;
  EXPECT_EQ(tstitch_sample(sd, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "give prompts, prompt_tokens or text_context, one of them");
  tstitch_close(sd);
  tstitch_runtime* dit = open(test_dir() + "/data/toy_pair");
  const int64_t labels[2] = {1, 2};
  r.prompt_tokens = nullptr, r.token_count = 0, r.class_labels = labels;
  EXPECT_EQ(tstitch_sample(dit, &r, out.data(), out.size(), nullptr, 0, nullptr), TSTITCH_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(tstitch_last_error(), "this bundle is class-conditional (DiT): leave prompts, prompt_tokens, text_context and "
                                     "added_conditions NULL");
  tstitch_close(dit);
  EXPECT_EQ(stats.live_bytes, 0u);
}
