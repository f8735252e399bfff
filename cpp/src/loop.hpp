// The stitched loop (runtime/loop.py + the buffer logic of runtime/trt_backend.py): the stitch
// schedule x the engines x ONE set of shared buffers. Every engine binds the same buffers; each
// engine has two contexts, one per ping-pong parity, bound once per allocation; all contexts share
// ONE scratch of the largest engine's size (engines never run concurrently). The whole trajectory
// is captured as one graph after a warm-up run, cached per (buffers, steps, schedule, batch),
// checked against the plain run, and dropped with a note (plain launches) when capture fails.
// Feature caching (DeepCache, FORA; io.roles.cache): each model also has a CACHED engine and ONE kept-feature
// buffer of its own shape (never ping-ponged, never bound to another model's engines): its full engine writes it,
// its cached engine reads it; which engine runs call i is the plan's `cached` row (cached_calls).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"
#include "roles.hpp"
#include "trajectory.hpp"

namespace tstitch {

struct RequestInputs {
  int batch = 1;
  std::vector<int64_t> latent_shape;  // (B, C, H, W); empty: (batch, the manifest's C, H, W)
  std::vector<float> x_init;          // B * C * H * W
  std::vector<int64_t> class_labels;  // DiT conditioning: batch
  std::vector<float> context;         // SD conditioning: (2B, L, D) text embeddings, uncond first ((B, L, D) under
                                      // "embedding" guidance)
  std::map<std::string, std::vector<float>> tensors;  // the other request inputs by name (text_embeds, time_ids,
                                                      // control_image, control_guess), float32, row-major
  float guidance = 1.0f;
};

struct LoopResult {
  std::vector<float> x;  // final latent
  std::vector<double> step_ms, engine_ms;
  bool graph = false;
  std::vector<std::string> notes;
  double host_overhead_ms_per_step() const;  // -1 when engine times are unknown
};

struct MemoryReport {
  size_t contexts = 0, shared_scratch_bytes = 0, one_per_engine_bytes = 0, one_per_context_bytes = 0;
  size_t io_buffer_bytes = 0, allocations = 0;
};

class StitchedLoop {
 public:
  // cached_engines: one per model where the manifest has io.roles.cache (its engines then output the kept
  // feature), else none.
  StitchedLoop(const Manifest& manifest, Device& device, std::vector<std::unique_ptr<StepEngine>> engines,
               bool cuda_graph, std::vector<std::unique_ptr<StepEngine>> cached_engines = {});
  ~StitchedLoop();
  StitchedLoop(const StitchedLoop&) = delete;
  StitchedLoop& operator=(const StitchedLoop&) = delete;

  // Runs the trajectory; Error(TSTITCH_ERR_NON_FINITE) naming the first bad step and model.
  LoopResult run(const TrajectoryPlan& plan, const RequestInputs& in);
  void close();

  size_t allocations() const { return allocations_; }
  size_t captures() const { return captures_; }
  bool graph_enabled() const { return use_graph_; }
  MemoryReport memory_report() const;
  const std::vector<Binding>& bindings() const { return bindings_; }

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t nbytes = 0;
  };
  struct CachedGraph {
    std::unique_ptr<Graph> graph;
  };
  Buffer alloc(size_t nbytes, const std::string& what);
  void free_buffers();
  void check_engines();
  void check_engine(StepEngine& engine, const std::string& name, const TensorSpec* extra);
  TensorSpec kept_spec(size_t model, bool cached_graph) const;  // the kept feature as one graph's I/O
  void bind_cached();
  bool is_cached(const TrajectoryPlan& plan, int step) const {
    return !plan.cached.empty() && plan.cached[static_cast<size_t>(step)] != 0;
  }
  void allocate(const TrajectoryPlan& plan, const DimValues& dims);
  void bind();
  // every shared buffer into one context (`engine` names it in the refusal: "the engine of X", ...)
  void bind_buffers(StepContext& ctx, int parity, const std::string& engine);
  bool grow_scratch(size_t need);  // reallocates the shared scratch when `need` is larger; true if it did
  void set_scratch_everywhere();
  void* address(const Binding& b, int parity);  // the buffer a context of this parity binds to b
  void prepare(const TrajectoryPlan& plan, const RequestInputs& in);
  void restore_start();
  void enqueue(int step, int model, bool cached);
  LoopResult plain_run(const TrajectoryPlan& plan);
  LoopResult replay(Graph& g, const TrajectoryPlan& plan);
  LoopResult run_graph(const TrajectoryPlan& plan);
  std::unique_ptr<Graph> capture(const TrajectoryPlan& plan);
  std::vector<float> read_latent(int slot);
  void locate_non_finite(const TrajectoryPlan& plan, const RequestInputs& in);
  void require_open() const;

  const Manifest& manifest_;
  Device& device_;
  std::vector<std::unique_ptr<StepEngine>> engines_;
  std::vector<std::vector<std::unique_ptr<StepContext>>> contexts_;  // [model][parity]
  std::vector<std::unique_ptr<StepEngine>> cached_engines_;          // [model]: feature caching's cached graphs
  std::vector<std::vector<std::unique_ptr<StepContext>>> cached_contexts_;  // [model][parity]
  bool caching_ = false;                 // the manifest has io.roles.cache: the full engines output the kept feature
  uint64_t cached_bound_ = 0;            // the buffer generation the cached contexts are bound to (0: none)
  std::vector<Binding> bindings_;
  std::vector<size_t> engine_scratch_;
  bool use_graph_;
  bool closed_ = false;
  std::vector<Buffer> owned_;  // every live allocation (freed together on out-of-memory)
  Buffer scratch_;
  std::map<std::string, Buffer> state_[2];      // by state input name: slot 0 / 1
  std::map<std::string, Buffer> step_, table_;  // by step tensor name
  std::map<std::string, Buffer> request_;
  std::vector<Buffer> kept_;                    // [model]: the kept feature, kept across calls
  std::map<std::string, size_t> row_bytes_;
  std::vector<int64_t> key_;  // (steps, has_noise, k, dims...) of the current buffers
  DimValues dims_;            // symbol values of the current buffers (B, 2B, H, W, ...)
  uint64_t generation_ = 0;   // bumped when buffers change: graphs of older generations are dropped
  std::map<std::vector<int64_t>, CachedGraph> graphs_;
  std::vector<std::string> notes_;
  std::vector<std::vector<char>> staging_;  // host sources of pending uploads
  std::vector<float> x_init_;
  size_t latent_count_ = 0;
  std::string latent_name_;
  size_t allocations_ = 0, captures_ = 0;
};

}  // namespace tstitch
