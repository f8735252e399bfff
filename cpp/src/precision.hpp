// CPU inference precision per model (runtime/openvino_backend.py's resolve_precisions): the one rule
// that decides where bf16 runs, kept apart so it follows Python's rule as that rule changes.
#pragma once

#include <string>
#include <vector>

#include "manifest.hpp"

namespace tstitch {

constexpr const char* kPrecisions = "auto, fp32, bf16";

// Is this model's recorded bf16 verdict (ModelEntry.bf16, from `tstitch-trt check --precision bf16
// --record`) "safe" for this CPU? Today: safe == true (the CPU's native bf16 is checked by the caller).
bool bf16_verdict_safe(const nlohmann::json& verdict);

// "fp32" / "bf16" per model for `requested` ("auto", "fp32", "bf16"; "" = auto) on a CPU with or
// without native bf16; *why: one line saying why (Python's wording). Error(TSTITCH_ERR_INVALID_ARGUMENT)
// for an unknown precision or bf16 requested on a CPU without it.
std::vector<std::string> resolve_cpu_precisions(const Manifest& m, const std::string& requested, bool native_bf16,
                                                std::string* why);

}  // namespace tstitch
