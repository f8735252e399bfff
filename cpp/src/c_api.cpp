// The C API: status codes, a thread-local last error, a registry of open handles (a closed or
// unknown handle is refused without being dereferenced), and no exception crossing the boundary.
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <set>

#include "c_api_internal.hpp"
#include "errors.hpp"
#include "tstitch/tstitch.h"

struct tstitch_runtime {
  std::unique_ptr<tstitch::Runtime> runtime;
};

namespace tstitch {
namespace {

thread_local std::string g_last_error;
std::mutex g_handles_mutex;
std::set<tstitch_runtime*>& handles() {
  static std::set<tstitch_runtime*> h;
  return h;
}

tstitch_status set_error(tstitch_status s, const std::string& message) {
  g_last_error = message;
  return s;
}

// Runs `fn`, turning every exception into a status and a one-line message.
template <typename F>
tstitch_status guarded(F&& fn) {
  try {
    g_last_error.clear();
    return fn();
  } catch (const Error& e) {
    return set_error(e.status(), e.what());
  } catch (const std::bad_alloc&) {
    return set_error(TSTITCH_ERR_OUT_OF_MEMORY, "out of host memory");
  } catch (const std::exception& e) {
    return set_error(TSTITCH_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(TSTITCH_ERR_INTERNAL, "internal error (unknown exception)");
  }
}

template <typename T>
void check_struct(const T* s, const char* what) {
  if (s == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
  if (s->struct_size != sizeof(T))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(s->struct_size) +
                                           ", this library expects " + std::to_string(sizeof(T)) +
                                           " (API version " + std::to_string(TSTITCH_API_VERSION) +
                                           "); initialise it with its _init function and rebuild against this header");
}

// The request as this library's struct: an older caller's smaller struct (version 3: up to height/width; version 4: up
// to control_guess_mode) is copied and the newer fields take their _init defaults, so old binaries keep working.
constexpr size_t kRequestV3Size = offsetof(tstitch_request, inputs);
constexpr size_t kRequestV4Size = offsetof(tstitch_request, prompts);
static_assert(kRequestV3Size == (offsetof(tstitch_request, width) + sizeof(int) + alignof(tstitch_request) - 1) /
                                    alignof(tstitch_request) * alignof(tstitch_request),
              "the API 4 fields start where sizeof(a version-3 request) ended");
static_assert(kRequestV4Size == (offsetof(tstitch_request, control_guess_mode) + sizeof(int) + alignof(tstitch_request) - 1) /
                                    alignof(tstitch_request) * alignof(tstitch_request),
              "the API 5 fields start where sizeof(a version-4 request) ended");

// Version 5 ended at num_negative_prompts (an int after a pointer: 4 bytes of padding end its struct); the API 6
// fields begin inside that padding, so a version-5 request is copied up to its last field only.
constexpr size_t kRequestV5Fields = offsetof(tstitch_request, cache_interval);
constexpr size_t kRequestV5Size = (kRequestV5Fields + alignof(tstitch_request) - 1) / alignof(tstitch_request) * alignof(tstitch_request);
static_assert(kRequestV5Fields == offsetof(tstitch_request, num_negative_prompts) + sizeof(int),
              "the API 6 fields follow num_negative_prompts");
static_assert(kRequestV5Size < sizeof(tstitch_request), "a version-5 request is smaller than this one");

bool request_size_known(size_t n) {
  return n == sizeof(tstitch_request) || n == kRequestV5Size || n == kRequestV4Size || n == kRequestV3Size;
}

tstitch_request normalized(const tstitch_request* r) {
  if (r == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request is NULL");
  if (!request_size_known(r->struct_size))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.struct_size is " + std::to_string(r->struct_size) + ", this library expects " +
                                           std::to_string(sizeof(tstitch_request)) + " (API version " +
                                           std::to_string(TSTITCH_API_VERSION) + "), " + std::to_string(kRequestV5Size) +
                                           " (version 5), " + std::to_string(kRequestV4Size) +
                                           " (version 4) or " + std::to_string(kRequestV3Size) +
                                           " (version 3); initialise it with tstitch_request_init and rebuild against this header");
  tstitch_request q;
  tstitch_request_init(&q);
  std::memcpy(static_cast<void*>(&q), r, r->struct_size == kRequestV5Size ? kRequestV5Fields : r->struct_size);
  q.struct_size = sizeof(tstitch_request);
  return q;
}

// Open params: a version-4 caller's smaller struct (up to verify_checksums) reads precision as NULL (auto).
constexpr size_t kOpenParamsV4Size = offsetof(tstitch_open_params, precision);
static_assert(kOpenParamsV4Size == (offsetof(tstitch_open_params, verify_checksums) + sizeof(int) + alignof(tstitch_open_params) - 1) /
                                       alignof(tstitch_open_params) * alignof(tstitch_open_params),
              "the API 5 fields start where sizeof(a version-4 open params) ended");

tstitch_open_params normalized(const tstitch_open_params* p) {
  if (p->struct_size != sizeof(tstitch_open_params) && p->struct_size != kOpenParamsV4Size)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "params.struct_size is " + std::to_string(p->struct_size) + ", this library expects " +
                                           std::to_string(sizeof(tstitch_open_params)) + " (API version " +
                                           std::to_string(TSTITCH_API_VERSION) + ") or " + std::to_string(kOpenParamsV4Size) +
                                           " (version 4); initialise it with tstitch_open_params_init and rebuild against this header");
  tstitch_open_params q;
  tstitch_open_params_init(&q);
  std::memcpy(static_cast<void*>(&q), p, p->struct_size);
  q.struct_size = sizeof(tstitch_open_params);
  return q;
}

Runtime& checked(tstitch_runtime* h) {
  Runtime* rt = runtime_of(h);
  if (rt == nullptr) fail(TSTITCH_ERR_BAD_HANDLE, "the runtime handle is NULL, unknown or already closed; open a bundle first");
  return *rt;
}

SampleRequest to_request(const Runtime& rt, const tstitch_request* given) {
  const tstitch_request req = normalized(given);
  const tstitch_request* r = &req;
  SampleRequest q;
  if (r->batch < 1) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.batch must be >= 1, got " + std::to_string(r->batch));
  q.batch = r->batch;
  if (rt.manifest().pipeline == "dit-class-conditional") {
    if (r->class_labels == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.class_labels is NULL; a DiT bundle needs one label per image");
    q.class_labels.assign(r->class_labels, r->class_labels + r->batch);
  }
  if (!rt.manifest().text_to_image() && (r->prompt_tokens != nullptr || r->added_conditions != nullptr || r->text_context != nullptr ||
                                          r->prompts != nullptr || r->negative_prompts != nullptr))
    fail(TSTITCH_ERR_INVALID_ARGUMENT,
         "this bundle is class-conditional (DiT): leave prompts, prompt_tokens, text_context and added_conditions NULL");
  if (!rt.manifest().text_to_image() && (r->inputs != nullptr || r->num_inputs != 0))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "this bundle is class-conditional (DiT): it takes no named inputs; leave inputs NULL");
  if (r->added_conditions != nullptr || r->added_condition_count != 0)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.added_conditions is not read: API 4 takes SDXL's text_embeds and time_ids by "
                                       "name in request.inputs; leave it NULL");
  const bool cfg = rt.manifest().conditioning.guidance == "cfg";
  if (rt.manifest().text_to_image()) {
    if (r->class_labels != nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "this bundle is text-to-image (SD): leave class_labels NULL");
    if (r->prompts != nullptr || r->num_prompts != 0 || r->negative_prompts != nullptr || r->num_negative_prompts != 0) {
      if (r->prompt_tokens != nullptr || r->text_context != nullptr)
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "give prompts, prompt_tokens or text_context, one of them");
      if (r->prompts == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.prompts is NULL; give one UTF-8 prompt per image");
      auto strings = [](const char* const* v, int n, const char* what) {
        if (n < 0 || n > (1 << 20)) fail(TSTITCH_ERR_INVALID_ARGUMENT, std::string("request.num_") + what + " is " + std::to_string(n));
        std::vector<std::string> out;
        for (int i = 0; i < n; ++i) {
          if (v[i] == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, std::string("request.") + what + "[" + std::to_string(i) + "] is NULL");
          out.emplace_back(v[i]);
        }
        return out;
      };
      q.prompts = strings(r->prompts, r->num_prompts, "prompts");
      q.has_negative = r->negative_prompts != nullptr;
      if (q.has_negative) q.negative_prompts = strings(r->negative_prompts, r->num_negative_prompts, "negative_prompts");
      else if (r->num_negative_prompts != 0)
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.negative_prompts is NULL but num_negative_prompts is " +
                                               std::to_string(r->num_negative_prompts));
    } else if (r->prompt_tokens != nullptr) {  // the bundle's text encoder engine makes the context
      if (r->text_context != nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "give prompt_tokens or text_context, not both");
      if (cfg && r->negative_tokens == nullptr)
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.negative_tokens is NULL; pass the tokenized negative (or empty) prompts, "
                                           "batch x token_count ids like prompt_tokens");
      if (!cfg && r->negative_tokens != nullptr)
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "this bundle uses LCM's guidance embedding (no classifier-free guidance): it takes no "
                                           "negative prompt; leave negative_tokens NULL");
      if (r->token_count < 1) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.token_count must be >= 1 with prompt_tokens");
      const size_t n = static_cast<size_t>(r->batch) * static_cast<size_t>(r->token_count);
      q.prompt_tokens.assign(r->prompt_tokens, r->prompt_tokens + n);
      if (cfg) q.negative_tokens.assign(r->negative_tokens, r->negative_tokens + n);
      q.token_count = r->token_count;
    } else if (r->text_context == nullptr) {
      fail(TSTITCH_ERR_INVALID_ARGUMENT, std::string("request.text_context and prompt_tokens are NULL; an SD bundle needs token "
                                                     "ids or the ") + (cfg ? "(2 x batch)" : "batch") + " x tokens x width text context");
    }
    if (r->num_inputs < 0 || (r->num_inputs > 0 && r->inputs == nullptr))
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.inputs is NULL or num_inputs (" + std::to_string(r->num_inputs) + ") is negative");
    for (int i = 0; i < r->num_inputs; ++i) {
      const tstitch_input& in = r->inputs[i];
      if (in.name == nullptr || in.data == nullptr)
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.inputs[" + std::to_string(i) + "] has a NULL name or data");
      const std::string name(in.name);
      if (q.inputs.count(name)) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.inputs names " + name + " twice");
      if (in.count > (size_t{1} << 34)) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.inputs[" + std::to_string(i) + "].count is implausible");
      q.inputs[name].assign(in.data, in.data + in.count);
    }
    q.controlnet_scale = r->controlnet_scale;
    q.control_guidance_start = r->control_guidance_start, q.control_guidance_end = r->control_guidance_end;
    if (r->control_guess_mode != 0 && r->control_guess_mode != 1)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.control_guess_mode must be 0 or 1, got " + std::to_string(r->control_guess_mode));
    q.control_guess_mode = r->control_guess_mode == 1;
  } else if (r->controlnet_scale != 1.0f || r->control_guidance_start != 0.0 || r->control_guidance_end != 1.0 ||
             r->control_guess_mode != 0) {
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "controlnet_scale, control_guidance_start/end and control_guess_mode are for bundles with a "
                                       "ControlNet; this one has none (leave them at 1, 0, 1, 0)");
  }
  if (rt.manifest().text_to_image() && r->text_context != nullptr) {
    if (r->text_tokens < 1 || r->text_width < 1)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.text_tokens and text_width must be >= 1 with text_context");
    q.text_tokens = r->text_tokens, q.text_width = r->text_width;
    q.text_context.assign(r->text_context, r->text_context + static_cast<size_t>(rt.context_rows(r->batch)) *
                                                             static_cast<size_t>(r->text_tokens) * static_cast<size_t>(r->text_width));
  }
  q.height = r->height, q.width = r->width;
  const auto [lh, lw] = rt.latent_hw(q);  // refused here, before any caller buffer is read by its size
  q.steps = r->steps;
  q.ratio = r->ratio;
  if (r->fractions != nullptr) {
    if (r->num_fractions < 1) fail(TSTITCH_ERR_INVALID_ARGUMENT, "request.num_fractions must be >= 1 with fractions");
    q.fractions.assign(r->fractions, r->fractions + r->num_fractions);
  }
  q.sampler = r->sampler ? r->sampler : "";
  q.eta = r->eta;
  q.cfg_scale = r->cfg_scale;
  q.seed = r->seed;
  q.cache_interval = r->cache_interval;  // checked by the runtime (pipeline/caching.py's rules)
  q.cache_branch = r->cache_branch;
  if (r->init_noise != nullptr) {
    const Manifest& m = rt.manifest();
    q.init_noise.assign(r->init_noise, r->init_noise + static_cast<size_t>(r->batch) * m.channels() * lh * lw);
  }
  return q;
}

// Sample info: a version-6 (or older) caller's smaller struct (up to host_overhead_ms_per_step) gets the API 7 fields
// unwritten.
constexpr size_t kSampleInfoV6Size = offsetof(tstitch_sample_info, truncated_prompts);
static_assert(kSampleInfoV6Size == offsetof(tstitch_sample_info, host_overhead_ms_per_step) + sizeof(double),
              "a version-6 tstitch_sample_info ends at host_overhead_ms_per_step");

void check_info(const tstitch_sample_info* info) {
  if (info == nullptr || info->struct_size == kSampleInfoV6Size) return;
  check_struct(info, "info");
}

void fill_info(tstitch_sample_info* info, const LoopResult& r, const Runtime& rt) {
  if (info == nullptr) return;
  info->used_cuda_graph = r.graph ? 1 : 0;
  info->steps = static_cast<int>(r.step_ms.size());
  info->total_ms = 0.0;
  for (double ms : r.step_ms) info->total_ms += ms;
  info->host_overhead_ms_per_step = r.host_overhead_ms_per_step();
  if (info->struct_size < sizeof(tstitch_sample_info)) return;
  info->truncated_prompts = rt.truncated_prompts();
  info->notes = rt.last_notes().c_str();
}

}  // namespace

Runtime* runtime_of(tstitch_runtime* h) {
  std::lock_guard<std::mutex> lock(g_handles_mutex);
  return h != nullptr && handles().count(h) ? h->runtime.get() : nullptr;
}

tstitch_status open_with_factory(const char* bundle_dir, const tstitch_open_params* params,
                                 const BackendFactory& factory, tstitch_runtime** out, const char* default_engine) {
  return guarded([&] {
    if (out == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "out (where the handle goes) is NULL");
    *out = nullptr;
    if (bundle_dir == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "bundle_dir is NULL");
    OpenOptions opt;
    opt.engine = default_engine;
    if (params != nullptr) {
      const tstitch_open_params p = normalized(params);
      if (p.engine != nullptr) opt.engine = p.engine;
      if (p.engine != nullptr && opt.engine.empty())
        fail(TSTITCH_ERR_INVALID_ARGUMENT, "params.engine is empty; name openvino or trt, or leave it NULL (auto)");
      opt.device_index = p.device_index;
      opt.cuda_graph = p.cuda_graph != 0;
      opt.verify_checksums = p.verify_checksums != 0;
      if (p.precision != nullptr) opt.precision = p.precision;
    }
    auto h = std::make_unique<tstitch_runtime>();
    h->runtime = std::make_unique<Runtime>(bundle_dir, opt, factory);
    std::lock_guard<std::mutex> lock(g_handles_mutex);
    handles().insert(h.get());
    *out = h.release();
    return TSTITCH_OK;
  });
}

}  // namespace tstitch

using namespace tstitch;

extern "C" {

int tstitch_api_version(void) { return TSTITCH_API_VERSION; }
const char* tstitch_last_error(void) { return g_last_error.c_str(); }

const char* tstitch_status_name(tstitch_status s) {
  switch (s) {
    case TSTITCH_OK: return "ok";
    case TSTITCH_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TSTITCH_ERR_BAD_HANDLE: return "bad handle";
    case TSTITCH_ERR_BUNDLE: return "bundle error";
    case TSTITCH_ERR_INCOMPATIBLE: return "incompatible engine";
    case TSTITCH_ERR_UNAVAILABLE: return "unavailable in this build";
    case TSTITCH_ERR_NO_DEVICE: return "no device";
    case TSTITCH_ERR_OUT_OF_MEMORY: return "out of memory";
    case TSTITCH_ERR_RUNTIME: return "runtime error";
    case TSTITCH_ERR_NON_FINITE: return "non-finite result";
    case TSTITCH_ERR_BUFFER_TOO_SMALL: return "buffer too small";
    case TSTITCH_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

void tstitch_open_params_init(tstitch_open_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof(*p));
  p->struct_size = sizeof(*p);
  p->cuda_graph = 1;
  p->verify_checksums = 1;
}

void tstitch_request_init(tstitch_request* r) {
  if (r == nullptr) return;
  std::memset(r, 0, sizeof(*r));
  r->struct_size = sizeof(*r);
  r->batch = 1;
  r->steps = 50;
  r->ratio = 0.5;
  r->cfg_scale = 1.5f;
  r->controlnet_scale = 1.0f;
  r->control_guidance_end = 1.0;
  r->cache_interval = 1;
  r->cache_branch = -1;
}

void tstitch_sample_info_init(tstitch_sample_info* i) {
  if (i == nullptr) return;
  std::memset(i, 0, sizeof(*i));
  i->struct_size = sizeof(*i);
  i->host_overhead_ms_per_step = -1.0;
  i->notes = "";
}

tstitch_status tstitch_open(const char* bundle_dir, const tstitch_open_params* params, tstitch_runtime** out) {
  return open_with_factory(bundle_dir, params, default_backend_factory(), out, "");  // "": auto
}

tstitch_status tstitch_engine(tstitch_runtime* h, const char** engine, const char** precision) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (engine == nullptr || precision == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "engine or precision is NULL");
    *engine = rt.engine().c_str(), *precision = rt.precision_reason().c_str();
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_close(tstitch_runtime* h) {
  return guarded([&] {
    if (h == nullptr) return TSTITCH_OK;
    {
      std::lock_guard<std::mutex> lock(g_handles_mutex);
      if (!handles().erase(h)) fail(TSTITCH_ERR_BAD_HANDLE, "the runtime handle is unknown or already closed");
    }
    delete h;
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_latent_shape(tstitch_runtime* h, int* c, int* hh, int* w) {
  return guarded([&] {
    const Manifest& m = checked(h).manifest();
    if (c == nullptr || hh == nullptr || w == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "an output pointer is NULL");
    *c = m.channels(), *hh = m.height(), *w = m.width();
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_input_count(tstitch_runtime* h, int* count) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (count == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "count is NULL");
    *count = static_cast<int>(rt.request_input_names().size());
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_input_name(tstitch_runtime* h, int index, const char** name) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (name == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "name is NULL");
    const std::vector<std::string>& names = rt.request_input_names();
    if (index < 0 || static_cast<size_t>(index) >= names.size())
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "input index " + std::to_string(index) + " is outside [0, " + std::to_string(names.size()) + ")");
    *name = names[static_cast<size_t>(index)].c_str();  // valid while the handle is open
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_input_shape(tstitch_runtime* h, const char* name, int batch, int height, int width, int64_t dims[8],
                                   int* rank) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (name == nullptr || dims == nullptr || rank == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "name, dims or rank is NULL");
    if (batch < 1) fail(TSTITCH_ERR_INVALID_ARGUMENT, "batch must be >= 1, got " + std::to_string(batch));
    SampleRequest sized;
    sized.height = height, sized.width = width;
    const auto [lh, lw] = rt.latent_hw(sized);
    const std::vector<int64_t> shape = rt.request_input_shape(name, batch, lh, lw);
    if (shape.size() > 8) fail(TSTITCH_ERR_BUFFER_TOO_SMALL, std::string(name) + " has more than 8 dims");
    std::copy(shape.begin(), shape.end(), dims);
    *rank = static_cast<int>(shape.size());
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_image_shape(tstitch_runtime* h, int* height, int* width, int* channels) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (height == nullptr || width == nullptr || channels == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "an output pointer is NULL");
    rt.image_shape(height, width, channels);
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_model_count(tstitch_runtime* h, int* count) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (count == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "count is NULL");
    *count = static_cast<int>(rt.manifest().models.size());
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_batch_range(tstitch_runtime* h, int* lo, int* hi) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (lo == nullptr || hi == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "an output pointer is NULL");
    *lo = static_cast<int>(rt.batch_range().first), *hi = static_cast<int>(std::min<int64_t>(rt.batch_range().second, 1 << 30));
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_sample(tstitch_runtime* h, const tstitch_request* request, float* latents, size_t capacity,
                              uint8_t* rgb, size_t rgb_capacity, tstitch_sample_info* info) {
  return guarded([&] {
    Runtime& rt = checked(h);
    check_info(info);
    SampleRequest q = to_request(rt, request);
    if (latents == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "latents is NULL; pass a buffer of batch*C*H*W floats");
    const Manifest& m = rt.manifest();
    const auto [lh, lw] = rt.latent_hw(q);
    const size_t need = static_cast<size_t>(q.batch) * m.channels() * lh * lw;
    if (capacity < need)
      fail(TSTITCH_ERR_BUFFER_TOO_SMALL, "latents holds " + std::to_string(capacity) + " floats, the result needs " +
                                             std::to_string(need));
    size_t rgb_need = 0;
    if (rgb != nullptr) {  // checked before sampling: nothing is half-written
      int ih = 0, iw = 0, ic = 0;
      rt.image_shape(&ih, &iw, &ic, lh, lw);
      rgb_need = static_cast<size_t>(q.batch) * ih * iw * ic;
      if (rgb_capacity < rgb_need)
        fail(TSTITCH_ERR_BUFFER_TOO_SMALL, "rgb holds " + std::to_string(rgb_capacity) + " bytes, the images need " +
                                               std::to_string(rgb_need) + " (batch x H x W x channels)");
    }
    LoopResult r = rt.sample(q);
    if (rgb != nullptr) rt.decode_rgb(r.x, q.batch, lh, lw, rgb);
    std::memcpy(latents, r.x.data(), need * sizeof(float));
    fill_info(info, r, rt);
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_sample_alloc(tstitch_runtime* h, const tstitch_request* request, float** latents, size_t* count,
                                    tstitch_sample_info* info) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (latents == nullptr || count == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "latents or count is NULL");
    *latents = nullptr, *count = 0;
    const int batch = request != nullptr ? request->batch : 0;
    const Manifest& m = rt.manifest();
    SampleRequest sized;  // the request's latent size; a malformed request is refused by tstitch_sample
    if (request != nullptr && request_size_known(request->struct_size))
      sized.height = request->height, sized.width = request->width;
    const auto [lh, lw] = rt.latent_hw(sized);
    const size_t need = static_cast<size_t>(std::max(batch, 0)) * m.channels() * lh * lw;
    float* buf = static_cast<float*>(std::malloc(std::max<size_t>(need, 1) * sizeof(float)));
    if (buf == nullptr) fail(TSTITCH_ERR_OUT_OF_MEMORY, "out of host memory for the latents");
    const tstitch_status s = tstitch_sample(h, request, buf, need, nullptr, 0, info);
    if (s != TSTITCH_OK) {
      std::free(buf);
      return s;  // tstitch_sample set the message
    }
    *latents = buf, *count = need;
    return TSTITCH_OK;
  });
}

tstitch_status tstitch_cache_plan(tstitch_runtime* h, const tstitch_request* request, uint8_t* cached, size_t capacity,
                                  int* calls) {
  return guarded([&] {
    Runtime& rt = checked(h);
    if (calls == nullptr) fail(TSTITCH_ERR_INVALID_ARGUMENT, "calls is NULL");
    *calls = 0;
    const std::vector<uint8_t> plan = rt.cache_plan(to_request(rt, request));
    *calls = static_cast<int>(plan.size());
    if (cached == nullptr) return TSTITCH_OK;  // the count only
    if (capacity < plan.size())
      fail(TSTITCH_ERR_BUFFER_TOO_SMALL, "cached holds " + std::to_string(capacity) + " bytes, the trajectory has " +
                                             std::to_string(plan.size()) + " calls");
    std::copy(plan.begin(), plan.end(), cached);
    return TSTITCH_OK;
  });
}

void tstitch_free(void* buffer) { std::free(buffer); }

}  // extern "C"
