// Binding by ROLE (runtime/io_roles.py), from the manifest's io.roles:
//   state   (input, output) pairs carried in ping-pong slots: step i reads slot i % 2, writes slot
//           (i + 1) % 2; the FIRST pair carries the latent (slot 0 starts as the initial latent,
//           every other state at zero). DiT: x -> x_next, prev_x0 <- x0; SD adds eps_hist, saved.
//   step    per-step rows of tables uploaded once per trajectory: t, coef, noise.
//   request per-request constants: the conditioning (the first request tensor that is not
//           guidance: DiT's class labels y (B,), SD's text context (2B, 77, D), uncond first), the
//           others by name (SDXL text_embeds / time_ids, a ControlNet's control_image / control_guess)
//           and guidance. Step tables beyond t / coef / noise (control_scale) come from the plan by name.
//   cache   feature caching's kept feature (io.roles.cache: DeepCache, FORA): not a Binding here, because it
//           differs per graph: each model's full graph outputs it, its cached graph reads it, in the model's own
//           shape (models[i].cached.feature). The loop keeps one buffer per model (loop.hpp).
// Bundles without io.roles are DiT bundles and get the DiT roles. Shapes come from io.inputs /
// io.outputs; "B" is the batch, other symbols (SD: "H", "W") take their value from the initial
// latent's shape, and "<k><Name>" is k times one ("2B": the CFG-doubled batch; "8H", "8W": a
// ControlNet image at the VAE's pixel size).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace tstitch {

enum class Role { kStateIn, kStateOut, kStep, kRequest };

struct Binding {
  TensorSpec spec;
  Role role = Role::kRequest;
  std::string pair;    // state: the other half of the pair
  std::string source;  // step: "timestep" | "coef" | "noise" | a plan table's name (control_scale);
                       // request: "cond" (the first: y / context) | "guidance" | the input's name (text_embeds ...)
  bool latent = false; // the first state pair's input: carries the latent (the sample's result)
};

using DimValues = std::map<std::string, int64_t>;

// Bindings of the step graph's I/O (inputs then outputs); io-less DiT bundles get the DiT step graph.
std::vector<Binding> resolve_roles(const Manifest& m, int num_coefs);

// Symbol values from the initial latent's shape (B, C, H, W): its spec's symbols, and "2B".
DimValues latent_dims(const TensorSpec& latent, const std::vector<int64_t>& latent_shape);
std::vector<int64_t> resolve_dims(const TensorSpec& t, const DimValues& dims);
// One symbolic dim: a name of `dims`, "<k><Name>", k times one ("2B", "8H"), or "<Name>/<k>", one over k ("H/2": a
// kept feature one level down; Error(TSTITCH_ERR_INVALID_ARGUMENT) where k does not divide it): io_roles.resolve_dim.
int64_t resolve_dim(const std::string& symbol, const DimValues& dims, const std::string& tensor);
size_t dtype_size(const std::string& dtype);

}  // namespace tstitch
