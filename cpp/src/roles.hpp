// Binding by ROLE, not by DiT names: every step-graph tensor is one of
//   state   a ping-pong pair (input, output): step i reads slot i % 2, writes slot (i + 1) % 2
//           (x -> x_next carries the latent; prev_x0 <- x0 carries a multistep solver's history);
//   step    a per-step table row copied into place before each launch (t, coef, noise);
//   request a per-request constant uploaded once (y, guidance; SD: context, text_embeds, time_ids).
// The manifest's io may name the role of a tensor ("role": "state" + "pair", "step" + "table",
// "request" + "source"); without one, the DiT step-graph names below apply.
#pragma once

#include <string>
#include <vector>

#include "manifest.hpp"

namespace tstitch {

enum class Role { kStateIn, kStateOut, kStep, kRequest };

struct Binding {
  TensorSpec spec;
  Role role = Role::kRequest;
  std::string pair;    // state: the other half of the pair
  std::string source;  // step: "timestep" | "coef" | "noise"; request: "class_labels" | "guidance" | ...
  bool latent = false; // state input that carries the latent (the sample's result)
};

// Roles of the manifest's io; a bundle without io gets the DiT step graph for its latent shape.
std::vector<Binding> resolve_roles(const Manifest& m, int num_coefs);

// Elements of a tensor for batch B (B and 2B resolved).
std::vector<int64_t> resolve_dims(const TensorSpec& t, int64_t batch);
size_t dtype_size(const std::string& dtype);

}  // namespace tstitch
