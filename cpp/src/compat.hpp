// Is this engine plan usable here? A port of runtime/engine_compat.py: what the builder recorded
// in the manifest (module, version, compute capabilities, relaxations) against the running
// TensorRT and GPU, checked before deserializing, with the same messages.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

namespace tstitch {

struct RuntimeIdentity {
  std::string module;   // "tensorrt" or "tensorrt_rtx": the Python module name the builder records
  std::string version;  // e.g. "10.13.0.35"
  std::string kind;     // manifest engine key, "trt" / "trt-rtx" (for the rebuild hint)
};

std::string cc_string(const std::string& cc);  // "SM89" / "sm_90" / "8.9" -> "8.9"
std::string cc_string(int major, int minor);

// Error(TSTITCH_ERR_INCOMPATIBLE) naming what differs and what to do.
void check_engine_compat(const nlohmann::json& builder, const RuntimeIdentity& here, std::pair<int, int> device_cc,
                         const std::string& what);

}  // namespace tstitch
