#include "loop.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "errors.hpp"

namespace tstitch {
namespace {

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

size_t count(const std::vector<int64_t>& dims) {
  size_t n = 1;
  for (int64_t d : dims) n *= static_cast<size_t>(d);
  return n;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float f) { return std::isfinite(f); });
}

}  // namespace

double LoopResult::host_overhead_ms_per_step() const {
  if (engine_ms.empty() || engine_ms.size() != step_ms.size()) return -1.0;
  double sum = 0.0;
  for (size_t i = 0; i < step_ms.size(); ++i) sum += step_ms[i] - engine_ms[i];
  return sum / static_cast<double>(step_ms.size());
}

StitchedLoop::StitchedLoop(const Manifest& manifest, Device& device, std::vector<std::unique_ptr<StepEngine>> engines,
                           bool cuda_graph, std::vector<std::unique_ptr<StepEngine>> cached_engines)
    : manifest_(manifest), device_(device), engines_(std::move(engines)), cached_engines_(std::move(cached_engines)),
      use_graph_(cuda_graph) {
  try {
    bindings_ = resolve_roles(manifest_, 11);
    for (const Binding& b : bindings_)
      if (b.latent) latent_name_ = b.spec.name;
    caching_ = !manifest_.roles.cache.first.empty();
    check_engines();
    auto contexts = [](StepEngine& e) {
      std::vector<std::unique_ptr<StepContext>> pair;
      for (int parity = 0; parity < 2; ++parity) pair.push_back(e.create_context());
      return pair;
    };
    for (auto& e : engines_) {
      engine_scratch_.push_back(e->scratch_bytes());
      contexts_.push_back(contexts(*e));
    }
    size_t most = std::max<size_t>(1, *std::max_element(engine_scratch_.begin(), engine_scratch_.end()));
    for (auto& e : cached_engines_) {
      most = std::max(most, e->scratch_bytes());
      cached_contexts_.push_back(contexts(*e));
    }
    // One scratch for every context: engines never run at the same time.
    scratch_ = alloc(most, "TensorRT scratch (shared by all engines)");
    for (auto* group : {&contexts_, &cached_contexts_})
      for (auto& pair : *group)
        for (auto& ctx : pair) ctx->set_scratch(scratch_.ptr, scratch_.nbytes);
  } catch (...) {
    close();
    throw;
  }
}

StitchedLoop::~StitchedLoop() { close(); }

TensorSpec StitchedLoop::kept_spec(size_t model, bool cached_graph) const {
  TensorSpec t = manifest_.models[model].cached_feature;
  t.name = cached_graph ? manifest_.roles.cache.first : manifest_.roles.cache.second;
  t.input = cached_graph;
  return t;
}

void StitchedLoop::check_engines() {
  if (engines_.size() != manifest_.models.size()) fail(TSTITCH_ERR_INTERNAL, "one engine per model expected");
  if (!cached_engines_.empty() && (!caching_ || cached_engines_.size() != engines_.size()))
    fail(TSTITCH_ERR_INTERNAL, "one cached engine per model expected, on a bundle with io.roles.cache");
  for (size_t m = 0; m < engines_.size(); ++m) {
    const std::string& name = manifest_.models[m].name;
    if (caching_ && manifest_.models[m].cached_feature.shape.empty())
      fail(TSTITCH_ERR_BUNDLE, name + " has no cached.feature for io.roles.cache; rebuild the bundle");
    const TensorSpec out = caching_ ? kept_spec(m, false) : TensorSpec{};
    check_engine(*engines_[m], "the engine of " + name, caching_ ? &out : nullptr);
    if (m < cached_engines_.size()) {
      const TensorSpec in = kept_spec(m, true);
      check_engine(*cached_engines_[m], "the cached engine of " + name, &in);
    }
  }
}

void StitchedLoop::check_engine(StepEngine& engine, const std::string& name, const TensorSpec* extra) {
  // name: "the engine of <model>" / "the cached engine of <model>"; extra: the kept feature's I/O, if any
  std::vector<EngineTensor> ts = engine.tensors();
  std::vector<Binding> expected = bindings_;
  if (extra != nullptr) expected.push_back({*extra, extra->input ? Role::kRequest : Role::kStateOut, "", "", false});
  std::vector<std::string> unknown, missing;
  for (const EngineTensor& t : ts)
    if (std::none_of(expected.begin(), expected.end(), [&](const Binding& b) { return b.spec.name == t.name; }))
      unknown.push_back(t.name);
  for (const Binding& b : expected)
    if (std::none_of(ts.begin(), ts.end(), [&](const EngineTensor& t) { return t.name == b.spec.name; }))
      missing.push_back(b.spec.name);
  if (!unknown.empty() || !missing.empty()) {
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
      return "[" + s + "]";
    };
    fail(TSTITCH_ERR_BUNDLE, name + " does not match the manifest's step I/O (unknown " +
                                 join(unknown) + ", missing " + join(missing) + "); rebuild the bundle");
  }
  for (const EngineTensor& t : ts) {
    const Binding& b = *std::find_if(expected.begin(), expected.end(), [&](const Binding& x) { return x.spec.name == t.name; });
    if (t.input != b.spec.input)
      fail(TSTITCH_ERR_BUNDLE, name + ": tensor " + t.name + " has the wrong direction; rebuild");
    if (!t.on_device)
      fail(TSTITCH_ERR_BUNDLE, name + " keeps " + t.name + " on the host; rebuild the bundle");
    if (t.dtype != b.spec.dtype)
      fail(TSTITCH_ERR_BUNDLE, name + " has " + t.name + " as " + t.dtype + ", the manifest says " +
                                   b.spec.dtype + "; rebuild the bundle");
  }
}

StitchedLoop::Buffer StitchedLoop::alloc(size_t nbytes, const std::string& what) {
  try {
    Buffer b{device_.alloc(std::max<size_t>(nbytes, 1), what), nbytes};
    owned_.push_back(b);
    ++allocations_;
    return b;
  } catch (const Error&) {
    close();  // out of memory: nothing stays allocated, and the loop never launches on freed memory
    throw;
  }
}

void StitchedLoop::free_buffers() {
  for (auto* group : {&state_[0], &state_[1], &step_, &table_, &request_})
    for (auto& kv : *group) {
      device_.free(kv.second.ptr);
      owned_.erase(std::remove_if(owned_.begin(), owned_.end(), [&](const Buffer& b) { return b.ptr == kv.second.ptr; }),
                   owned_.end());
    }
  for (auto* group : {&state_[0], &state_[1], &step_, &table_, &request_}) group->clear();
  for (const Buffer& k : kept_) {
    device_.free(k.ptr);
    owned_.erase(std::remove_if(owned_.begin(), owned_.end(), [&](const Buffer& b) { return b.ptr == k.ptr; }), owned_.end());
  }
  kept_.clear();
  key_.clear();
  cached_bound_ = 0;
}

void StitchedLoop::allocate(const TrajectoryPlan& plan, const DimValues& dims) {
  std::vector<int64_t> key = {plan.steps(), plan.noise.empty() ? 0 : 1, plan.k};
  for (const auto& kv : dims) key.push_back(kv.second);
  if (key == key_) return;
  const int64_t batch = dims.at("B");
  for (size_t m = 0; m < engines_.size(); ++m) {
    auto [lo, hi] = engines_[m]->batch_range(latent_name_);
    if (batch < lo || batch > hi)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "batch " + std::to_string(batch) + " is outside the engine's range [" +
                                             std::to_string(lo) + ", " + std::to_string(hi) + "] (" +
                                             manifest_.models[m].name + "); rebuild with --batch-sizes " +
                                             std::to_string(std::min<int64_t>(lo, batch)) + "-" +
                                             std::to_string(std::max<int64_t>(hi, batch)));
  }
  for (const Binding& b : bindings_)
    if (b.role == Role::kStep && b.source == "coef" &&
        (b.spec.shape.size() != 1 || !b.spec.shape[0].symbol.empty() || b.spec.shape[0].size != plan.k))
      fail(TSTITCH_ERR_BUNDLE, "the engines take " + std::to_string(b.spec.shape.size() == 1 ? b.spec.shape[0].size : 0) +
                                   " sampler coefficients, the sampler tables have " + std::to_string(plan.k) +
                                   "; rebuild the bundle with this version");
  graphs_.clear();
  free_buffers();
  const std::string shape = " (batch " + std::to_string(batch) + ")";
  for (const Binding& b : bindings_) {
    const size_t bytes = count(resolve_dims(b.spec, dims)) * dtype_size(b.spec.dtype);
    if (b.role == Role::kStateIn) {
      for (int s = 0; s < 2; ++s) state_[s][b.spec.name] = alloc(bytes, b.spec.name + " slot " + std::to_string(s) + shape);
    } else if (b.role == Role::kStep) {
      step_[b.spec.name] = alloc(bytes, b.spec.name + shape);
      row_bytes_[b.spec.name] = bytes;
      if (b.source != "noise" || !plan.noise.empty())
        table_[b.spec.name] = alloc(bytes * plan.steps(), b.spec.name + " table" + shape);
      device_.zero(step_[b.spec.name].ptr, bytes);  // noise stays zero for samplers without noise
    } else if (b.role == Role::kRequest) {
      request_[b.spec.name] = alloc(bytes, b.spec.name + shape);
    }
  }
  if (caching_)  // one kept feature per model, in its own shape
    for (size_t m = 0; m < engines_.size(); ++m) {
      const TensorSpec f = kept_spec(m, false);
      kept_.push_back(alloc(count(resolve_dims(f, dims)) * dtype_size(f.dtype),
                            "the kept feature of " + manifest_.models[m].name + shape));
    }
  dims_ = dims;
  bind();
  key_ = key;
  ++generation_;
}

void* StitchedLoop::address(const Binding& b, int parity) {
  switch (b.role) {
    case Role::kStateIn: return state_[parity][b.spec.name].ptr;  // step i reads slot i % 2
    case Role::kStateOut: return state_[1 - parity][b.pair].ptr;  // and writes slot (i + 1) % 2
    case Role::kStep: return step_[b.spec.name].ptr;
    case Role::kRequest: return request_[b.spec.name].ptr;
  }
  return nullptr;
}

void StitchedLoop::bind_buffers(StepContext& ctx, int parity, const std::string& engine) {
  for (const Binding& b : bindings_) {
    void* ptr = address(b, parity);
    if (b.spec.input && !ctx.set_input_shape(b.spec.name, resolve_dims(b.spec, dims_)))
      fail(TSTITCH_ERR_INVALID_ARGUMENT, engine + " refused the shape of " + b.spec.name + " for batch " +
                                             std::to_string(dims_.at("B")));
    ctx.set_address(b.spec.name, ptr);
  }
}

bool StitchedLoop::grow_scratch(size_t need) {
  if (need <= scratch_.nbytes) return false;  // shapes needing more than the engine-wide size (not expected)
  device_.free(scratch_.ptr);
  owned_.erase(std::remove_if(owned_.begin(), owned_.end(), [&](const Buffer& b) { return b.ptr == scratch_.ptr; }),
               owned_.end());
  scratch_ = {};
  scratch_ = alloc(need, "TensorRT scratch (shared by all engines)");
  return true;
}

void StitchedLoop::set_scratch_everywhere() {
  for (auto* group : {&contexts_, &cached_contexts_})
    for (auto& pair : *group)
      for (auto& ctx : pair) ctx->set_scratch(scratch_.ptr, scratch_.nbytes);
}

void StitchedLoop::bind() {
  size_t need = scratch_.nbytes;
  for (size_t m = 0; m < contexts_.size(); ++m) {
    for (int parity = 0; parity < 2; ++parity) {
      StepContext& ctx = *contexts_[m][parity];
      bind_buffers(ctx, parity, "the engine of " + manifest_.models[m].name);
      if (caching_) ctx.set_address(manifest_.roles.cache.second, kept_[m].ptr);  // the full graph writes it
      need = std::max(need, ctx.scratch_needed());
    }
  }
  grow_scratch(need);
  set_scratch_everywhere();
}

// The cached engines' contexts: bound at the first trajectory of these buffers that has a cached call (a bundle
// run without caching never compiles them, as Python's OpenVINO backend), to the same buffers as the full ones,
// the model's kept feature as their input.
void StitchedLoop::bind_cached() {
  if (cached_bound_ == generation_) return;
  size_t need = scratch_.nbytes;
  for (size_t m = 0; m < cached_contexts_.size(); ++m) {
    const TensorSpec kept = kept_spec(m, true);
    const std::string engine = "the cached engine of " + manifest_.models[m].name;
    for (int parity = 0; parity < 2; ++parity) {
      StepContext& ctx = *cached_contexts_[m][parity];
      bind_buffers(ctx, parity, engine);
      if (!ctx.set_input_shape(kept.name, resolve_dims(kept, dims_)))
        fail(TSTITCH_ERR_INVALID_ARGUMENT, engine + " refused the shape of " + kept.name + " for batch " +
                                               std::to_string(dims_.at("B")));
      ctx.set_address(kept.name, kept_[m].ptr);
      need = std::max(need, ctx.scratch_needed());
    }
  }
  if (grow_scratch(need)) set_scratch_everywhere();
  cached_bound_ = generation_;
}

void StitchedLoop::require_open() const {
  if (closed_) fail(TSTITCH_ERR_RUNTIME, "the runtime was closed after an error (or close()); open the bundle again");
}

void StitchedLoop::prepare(const TrajectoryPlan& plan, const RequestInputs& in) {
  require_open();
  std::vector<int64_t> latent_shape = in.latent_shape;
  if (latent_shape.empty()) latent_shape = {in.batch, manifest_.channels(), manifest_.height(), manifest_.width()};
  const Binding& latent = *std::find_if(bindings_.begin(), bindings_.end(), [](const Binding& b) { return b.latent; });
  const DimValues dims = latent_dims(latent.spec, latent_shape);
  if (in.x_init.size() != count(resolve_dims(latent.spec, dims)))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the initial latent has " + std::to_string(in.x_init.size()) + " values, its shape needs " +
                                           std::to_string(count(resolve_dims(latent.spec, dims))));
  const bool any_cached = std::any_of(plan.cached.begin(), plan.cached.end(), [](uint8_t c) { return c != 0; });
  if (!plan.cached.empty() && plan.cached.size() != static_cast<size_t>(plan.steps()))
    fail(TSTITCH_ERR_INTERNAL, "the plan's cached row has " + std::to_string(plan.cached.size()) + " calls, not " +
                                   std::to_string(plan.steps()));
  if (any_cached && cached_engines_.empty())
    fail(TSTITCH_ERR_UNAVAILABLE, "this bundle has no cached step graphs; rebuild it with --cache-branch K (SD) or "
                                  "--cache-scheme fora (DiT), or run with cache interval 1");
  for (int i = 0; i < plan.steps(); ++i)  // a cached call reads what its model's last call kept: a full call first
    if (is_cached(plan, i) && (i == 0 || plan.step_model[i - 1] != plan.step_model[i]))
      fail(TSTITCH_ERR_INTERNAL, "the plan's call " + std::to_string(i) + " is cached but its model's previous call is "
                                 "not right before it");
  allocate(plan, dims);
  if (any_cached) bind_cached();
  for (const Buffer& k : kept_) device_.zero(k.ptr, k.nbytes);
  staging_.clear();
  auto upload = [&](const Buffer& dst, const void* src, size_t nbytes) {
    if (nbytes > dst.nbytes) fail(TSTITCH_ERR_INTERNAL, "upload larger than its buffer");
    staging_.emplace_back(static_cast<const char*>(src), static_cast<const char*>(src) + nbytes);
    device_.upload(dst.ptr, staging_.back().data(), nbytes);
  };
  auto as_ints = [&](const std::vector<int64_t>& v, const std::string& dtype) {
    std::vector<char> out(v.size() * dtype_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
      if (dtype == "int64") std::memcpy(out.data() + 8 * i, &v[i], 8);
      else { const int32_t x = static_cast<int32_t>(v[i]); std::memcpy(out.data() + 4 * i, &x, 4); }
    }
    return out;
  };
  x_init_ = in.x_init;
  latent_count_ = in.x_init.size();
  for (const Binding& b : bindings_) {
    const std::string& n = b.spec.name;
    if (b.role == Role::kStateIn) {
      if (b.latent) upload(state_[0][n], x_init_.data(), x_init_.size() * 4);
      else device_.zero(state_[0][n].ptr, state_[0][n].nbytes);  // step 0's history is zero
    } else if (b.role == Role::kRequest) {
      const size_t want = request_[n].nbytes / dtype_size(b.spec.dtype);
      if (b.source == "cond" && b.spec.dtype != "float32") {  // DiT: class labels
        if (in.class_labels.size() != want)
          fail(TSTITCH_ERR_INVALID_ARGUMENT, "the step graphs take " + std::to_string(want) + " class labels (" + n +
                                                 "), the request has " + std::to_string(in.class_labels.size()));
        std::vector<char> v = as_ints(in.class_labels, b.spec.dtype);
        upload(request_[n], v.data(), v.size());
      } else if (b.source == "cond") {  // SD: the text context, uncond rows first
        if (in.context.size() != want)
          fail(TSTITCH_ERR_INVALID_ARGUMENT, "the step graphs take a text context " + n + " of " + std::to_string(want) +
                                                 " floats (batch x tokens x width), the request has " +
                                                 std::to_string(in.context.size()));
        upload(request_[n], in.context.data(), want * 4);
      } else if (b.source == "guidance") {
        upload(request_[n], &in.guidance, 4);
      } else {  // by name: SDXL text_embeds / time_ids, a ControlNet's control_image / control_guess
        auto it = in.tensors.find(n);
        if (it == in.tensors.end())
          fail(TSTITCH_ERR_INVALID_ARGUMENT, "the step graphs need " + n + " for this request");
        if (b.spec.dtype != "float32")
          fail(TSTITCH_ERR_UNAVAILABLE, "the step input " + n + " is " + b.spec.dtype + "; this runtime feeds float32 request inputs");
        if (it->second.size() != want)
          fail(TSTITCH_ERR_INVALID_ARGUMENT, "the step graphs take " + n + " as " + std::to_string(want) + " floats, the request has " +
                                                 std::to_string(it->second.size()));
        upload(request_[n], it->second.data(), want * 4);
      }
    } else if (b.role == Role::kStep) {
      if (b.source == "timestep" && b.spec.dtype == "float32") {  // SD: t as float, one per image
        std::vector<float> rows;
        for (int i = 0; i < plan.steps(); ++i) {
          const float t = plan.t_float.empty() ? static_cast<float>(plan.timesteps[i]) : plan.t_float[i];
          rows.insert(rows.end(), static_cast<size_t>(dims_.at("B")), t);
        }
        upload(table_[n], rows.data(), rows.size() * 4);
      } else if (b.source == "timestep") {
        std::vector<int64_t> rows;
        for (int64_t t : plan.timesteps) rows.insert(rows.end(), static_cast<size_t>(dims_.at("B")), t);
        std::vector<char> v = as_ints(rows, b.spec.dtype);
        upload(table_[n], v.data(), v.size());
      } else if (b.source == "coef") {
        upload(table_[n], plan.coef.data(), plan.coef.size() * 4);
      } else if (b.source == "noise") {
        if (!plan.noise.empty()) upload(table_[n], plan.noise.data(), plan.noise.size() * 4);
      } else {  // a per-step table by name (a ControlNet's control_scale): one row per step
        auto it = plan.tables.find(n);
        if (it == plan.tables.end())
          fail(TSTITCH_ERR_INVALID_ARGUMENT, "the step graphs take the per-step input '" + n + "', which this request does not give");
        if (b.spec.dtype != "float32")
          fail(TSTITCH_ERR_UNAVAILABLE, "the step input " + n + " is " + b.spec.dtype + "; this runtime feeds float32 step tables");
        const size_t need = table_[n].nbytes / 4;
        if (it->second.size() != need)
          fail(TSTITCH_ERR_INTERNAL, "the " + n + " table has " + std::to_string(it->second.size()) + " values, " +
                                         std::to_string(plan.steps()) + " steps need " + std::to_string(need));
        upload(table_[n], it->second.data(), need * 4);
      }
    }
  }
  device_.synchronize();
  staging_.clear();
}

void StitchedLoop::restore_start() {
  // A warm-up ran real steps on the buffers: put back the trajectory's start state.
  for (const Binding& b : bindings_) {
    if (b.role != Role::kStateIn) continue;
    Buffer& slot = state_[0][b.spec.name];
    if (b.latent) device_.upload(slot.ptr, x_init_.data(), x_init_.size() * 4);
    else device_.zero(slot.ptr, slot.nbytes);
  }
  for (const Buffer& k : kept_) device_.zero(k.ptr, k.nbytes);
  device_.synchronize();
}

void StitchedLoop::enqueue(int step, int model, bool cached) {
  // The step's table rows into the step buffers, then the engine: all on the stream.
  for (const auto& kv : table_) {
    const size_t n = row_bytes_[kv.first];
    device_.copy(step_[kv.first].ptr, static_cast<char*>(kv.second.ptr) + static_cast<size_t>(step) * n, n);
  }
  (cached ? cached_contexts_ : contexts_)[static_cast<size_t>(model)][static_cast<size_t>(step % 2)]->enqueue();
}

std::vector<float> StitchedLoop::read_latent(int slot) {
  std::vector<float> x(latent_count_);
  device_.download(x.data(), state_[slot][latent_name_].ptr, x.size() * 4);
  return x;
}

LoopResult StitchedLoop::plain_run(const TrajectoryPlan& plan) {
  LoopResult r;
  for (int i = 0; i < plan.steps(); ++i) {
    const double t0 = now_ms();
    r.engine_ms.push_back(device_.time_ms([&] { enqueue(i, plan.step_model[i], is_cached(plan, i)); }));
    r.step_ms.push_back(now_ms() - t0);
  }
  r.x = read_latent(plan.steps() % 2);
  return r;
}

LoopResult StitchedLoop::replay(Graph& g, const TrajectoryPlan& plan) {
  const double t0 = now_ms();
  const double gpu_ms = device_.time_ms([&] { g.launch(); });
  const double wall = now_ms() - t0;
  LoopResult r;
  const size_t n = static_cast<size_t>(plan.steps());
  // One launch: per-step times are not observable, so they are the honest averages.
  r.step_ms.assign(n, wall / static_cast<double>(n));
  r.engine_ms.assign(n, gpu_ms / static_cast<double>(n));
  r.graph = true;
  r.x = read_latent(plan.steps() % 2);
  return r;
}

std::unique_ptr<Graph> StitchedLoop::capture(const TrajectoryPlan& plan) {
  for (int i = 0; i < plan.steps(); ++i) {
    const int m = plan.step_model[i];
    if (!(is_cached(plan, i) ? cached_contexts_ : contexts_)[m][i % 2]->capturable()) {
      use_graph_ = false;
      notes_.push_back("CUDA graph disabled, using plain launches: " + manifest_.models[m].name +
                       "'s context is not stream-capturable");
      return nullptr;
    }
  }
  try {
    auto g = device_.capture([&] {
      for (int i = 0; i < plan.steps(); ++i) enqueue(i, plan.step_model[i], is_cached(plan, i));
    });
    ++captures_;
    return g;
  } catch (const Error& e) {
    use_graph_ = false;
    notes_.push_back(std::string("CUDA graph disabled, using plain launches: capture failed: ") + e.what());
    return nullptr;
  }
}

LoopResult StitchedLoop::run_graph(const TrajectoryPlan& plan) {
  std::vector<int64_t> key = {static_cast<int64_t>(generation_), plan.steps(), key_[0]};
  key.insert(key.end(), plan.step_model.begin(), plan.step_model.end());
  for (int i = 0; i < plan.steps(); ++i) key.push_back(is_cached(plan, i) ? 1 : 0);  // full / cached per call
  auto it = graphs_.find(key);
  if (it != graphs_.end()) return replay(*it->second.graph, plan);
  LoopResult warm = plain_run(plan);  // TensorRT must have enqueued once before a capture
  std::unique_ptr<Graph> g = capture(plan);
  if (!g) return warm;
  restore_start();
  LoopResult res = replay(*g, plan);
  if (all_finite(warm.x)) {
    float diff = 0.0f, scale = 1.0f;
    for (size_t i = 0; i < warm.x.size(); ++i) {
      diff = std::max(diff, std::isfinite(res.x[i]) ? std::fabs(res.x[i] - warm.x[i]) : INFINITY);
      scale = std::max(scale, std::fabs(warm.x[i]));
    }
    if (diff > 1e-3f * scale) {
      use_graph_ = false;
      std::ostringstream os;
      os << "the CUDA graph's result differs from plain launches (max |diff| " << diff << "); using plain launches";
      notes_.push_back(os.str());
      return warm;
    }
  }
  graphs_[key] = CachedGraph{std::move(g)};
  return res;
}

LoopResult StitchedLoop::run(const TrajectoryPlan& plan, const RequestInputs& in) {
  prepare(plan, in);
  LoopResult r = use_graph_ ? run_graph(plan) : plain_run(plan);
  r.notes = std::move(notes_);  // each note once, with the run it affected
  notes_.clear();
  for (std::string& n : device_.take_notes()) r.notes.push_back(std::move(n));
  if (!all_finite(r.x)) locate_non_finite(plan, in);
  return r;
}

void StitchedLoop::locate_non_finite(const TrajectoryPlan& plan, const RequestInputs& in) {
  // Replay step by step (only after a failure) to find the first non-finite output.
  prepare(plan, in);
  int step = plan.steps() - 1;
  for (int i = 0; i < plan.steps(); ++i) {
    enqueue(i, plan.step_model[i], is_cached(plan, i));
    device_.synchronize();
    bool finite = true;
    for (const Binding& b : bindings_) {
      if (b.role != Role::kStateIn) continue;
      const Buffer& out = state_[(i + 1) % 2][b.spec.name];
      std::vector<float> v(out.nbytes / 4);
      device_.download(v.data(), out.ptr, out.nbytes);
      finite = finite && all_finite(v);
    }
    if (!finite) {
      step = i;
      break;
    }
  }
  fail(TSTITCH_ERR_NON_FINITE, "NaN/Inf in the latent: first at step " + std::to_string(step) + " (t=" +
                                   std::to_string(plan.timesteps[step]) + ") on " +
                                   manifest_.models[plan.step_model[step]].name +
                                   "; check the weights, the cfg scale and the engine precision");
}

MemoryReport StitchedLoop::memory_report() const {
  MemoryReport r;
  for (const auto& pair : cached_contexts_) r.contexts += pair.size();
  for (size_t m = 0; m < contexts_.size(); ++m) {
    r.contexts += contexts_[m].size();
    r.one_per_engine_bytes += engine_scratch_[m];
    r.one_per_context_bytes += contexts_[m].size() * engine_scratch_[m];
  }
  r.shared_scratch_bytes = scratch_.nbytes;
  for (const Buffer& b : owned_)
    if (b.ptr != scratch_.ptr) r.io_buffer_bytes += b.nbytes;
  r.allocations = allocations_;
  return r;
}

void StitchedLoop::close() {
  // Graphs, contexts, engines, then memory (contexts use the scratch until they are gone).
  graphs_.clear();
  cached_contexts_.clear();
  contexts_.clear();
  cached_engines_.clear();
  engines_.clear();
  for (const Buffer& b : owned_) device_.free(b.ptr);
  owned_.clear();
  for (auto* group : {&state_[0], &state_[1], &step_, &table_, &request_}) group->clear();
  kept_.clear();
  scratch_ = {};
  key_.clear();
  closed_ = true;
}

}  // namespace tstitch
