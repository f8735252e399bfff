// bf16 only inside the matmul/conv body (runtime/openvino_precision.py in C++): under
// INFERENCE_PRECISION_HINT bf16, OpenVINO's CPU plugin lowers every fp32 node to bf16 but an ISA-dependent
// graph tail; the Python runtime marks the numerically sensitive nodes (the sinusoidal timestep embedding,
// softmax, normalization and their statistics, exp/log, the graph tail: CFG combine and sampler update) to
// stay fp32, after OpenVINO's common (MOC) simplifications. The C++ engine compiles exactly the same marked
// graph, so its bf16 equals Python's bf16 (and t = 999 stays 999, not 1000).
#pragma once

#include <memory>
#include <set>
#include <string>

namespace ov {
class Model;
}

namespace tstitch {

// Friendly names of the nodes of `model` that must run in fp32 (openvino_precision.keep_f32_nodes).
std::set<std::string> keep_f32_nodes(const ov::Model& model);

// `model` (changed in place: MOC simplifications + FP32 subnormals flushed, as Python's
// apply_moc_transformations(model, cf=True)) with DisablePrecisionConversion on every keep_f32_nodes node
// (openvino_precision.marked_for_bf16). Returns the number of nodes marked.
size_t mark_for_bf16(const std::shared_ptr<ov::Model>& model);

}  // namespace tstitch
