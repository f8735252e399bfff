#include "precision.hpp"

#include "errors.hpp"

namespace tstitch {

bool bf16_verdict_safe(const nlohmann::json& verdict) {
  return verdict.is_object() && verdict.contains("safe") && verdict["safe"].is_boolean() && verdict["safe"].get<bool>();
}

std::vector<std::string> resolve_cpu_precisions(const Manifest& m, const std::string& requested, bool native_bf16,
                                                std::string* why) {
  const size_t n = m.models.size();
  const std::string req = requested.empty() ? "auto" : requested;
  if (req != "auto" && req != "fp32" && req != "bf16")
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "unknown precision '" + req + "'; choose from " + kPrecisions + " (NULL: auto)");
  if (req == "fp32") {
    *why = "fp32 (requested)";
    return std::vector<std::string>(n, "fp32");
  }
  if (req == "bf16") {
    if (!native_bf16)
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX) and this one has "
                                         "none; use fp32");
    *why = "bf16 (requested)";
    return std::vector<std::string>(n, "bf16");
  }
  if (!native_bf16) {
    *why = "fp32: this CPU has no native bf16";
    return std::vector<std::string>(n, "fp32");
  }
  std::vector<std::string> out;
  std::string safe_names;
  size_t safe = 0;
  for (const ModelEntry& e : m.models) {
    const bool ok = bf16_verdict_safe(e.bf16);
    out.push_back(ok ? "bf16" : "fp32");
    if (ok) safe_names += (safe++ ? ", " : "") + e.name;
  }
  if (safe == n) *why = "bf16: the bundle records bf16 as safe for every model";
  else if (safe == 0) *why = "fp32: the bundle does not record bf16 as safe (tstitch-trt check --precision bf16 --record)";
  else *why = "bf16 on " + safe_names + ", fp32 elsewhere: the bundle records bf16 as safe only there";
  return out;
}

}  // namespace tstitch
