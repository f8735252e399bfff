// CPU inference precision per model (runtime/openvino_backend.py's choose_precisions): the one rule
// that decides where bf16 runs, kept apart so it follows Python's rule as that rule changes.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "manifest.hpp"

namespace tstitch {

constexpr const char* kPrecisions = "auto, fp32, bf16";

// This CPU's bf16 instruction set as runtime/cpu_isa.py names it: "amx_bf16" (best first: an AMX CPU
// also has AVX512_BF16), "avx512_bf16", or "" (none, or no flags line in `cpuinfo_path`).
std::string cpu_bf16_isa(const std::string& cpuinfo_path = "/proc/cpuinfo");

// "" where a recorded bf16 verdict (ModelEntry.bf16, from `tstitch-trt check --precision bf16 --record`)
// lets auto use bf16 on `isa`, else why not (Python's verdict_covers phrase): the verdict must be safe
// AND list `isa` among the ISAs it was measured on (OpenVINO picks other kernels on AMX).
std::string bf16_verdict_gap(const nlohmann::json& verdict, const std::string& isa);

// One part and its recorded bf16 verdict (null: none): a stitched model, the text encoder(s), the VAE decoder.
using PartVerdict = std::pair<std::string, nlohmann::json>;

// "fp32" / "bf16" per part (choose_precisions in runtime/openvino_backend.py) for `requested` ("auto", "fp32", "bf16"; "" = auto) on a CPU with or
// without native bf16 whose bf16 ISA is `isa`; *why: one line saying why (Python's wording).
// Error(TSTITCH_ERR_INVALID_ARGUMENT) for an unknown precision or bf16 requested on a CPU without it.
std::vector<std::string> choose_cpu_precisions(const std::vector<PartVerdict>& parts, const std::string& requested,
                                               bool native_bf16, const std::string& isa, std::string* why);
// choose_cpu_precisions for the bundle's stitched models (their models[i].bf16 verdicts).
std::vector<std::string> resolve_cpu_precisions(const Manifest& m, const std::string& requested, bool native_bf16,
                                                const std::string& isa, std::string* why);

}  // namespace tstitch
