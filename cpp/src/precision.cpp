#include "precision.hpp"

#include <fstream>
#include <sstream>

#include "errors.hpp"

namespace tstitch {

std::string cpu_bf16_isa(const std::string& cpuinfo_path) {
  std::ifstream in(cpuinfo_path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) return "";
    std::istringstream words(line.substr(colon + 1));
    bool amx = false, avx512 = false;
    for (std::string w; words >> w;) {
      amx = amx || w == "amx_bf16";
      avx512 = avx512 || w == "avx512_bf16";
    }
    return amx ? "amx_bf16" : avx512 ? "avx512_bf16" : "";
  }
  return "";
}

std::string bf16_verdict_gap(const nlohmann::json& verdict, const std::string& isa) {
  const bool safe = verdict.is_object() && verdict.contains("safe") && verdict["safe"].is_boolean() &&
                    verdict["safe"].get<bool>();
  if (!safe) return "the bundle does not record bf16 as safe (tstitch-trt check --precision bf16 --record)";
  std::vector<std::string> measured;
  if (verdict.contains("isa") && verdict["isa"].is_array())
    for (const auto& v : verdict["isa"])
      if (v.is_string()) measured.push_back(v.get<std::string>());
  if (measured.empty())
    return "the bundle's bf16 verdict does not name the CPU ISA it was measured on (recorded by an older check); "
           "run tstitch-trt check --precision bf16 --record on this CPU";
  if (isa.empty()) return "this CPU's bf16 ISA cannot be told (no /proc/cpuinfo flags)";
  for (const std::string& m : measured)
    if (m == isa) return "";
  std::string list;
  for (size_t i = 0; i < measured.size(); ++i) list += (i ? ", " : "") + measured[i];
  return "bf16 verdict measured on " + list + ", this CPU is " + isa;
}

std::vector<std::string> resolve_cpu_precisions(const Manifest& m, const std::string& requested, bool native_bf16,
                                                const std::string& isa, std::string* why) {
  std::vector<PartVerdict> parts;
  for (const ModelEntry& e : m.models) parts.emplace_back(e.name, e.bf16);
  return choose_cpu_precisions(parts, requested, native_bf16, isa, why);
}

std::vector<std::string> choose_cpu_precisions(const std::vector<PartVerdict>& parts, const std::string& requested,
                                               bool native_bf16, const std::string& isa, std::string* why) {
  const size_t n = parts.size();
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
  std::vector<std::string> out, reasons;
  std::string bf16_names;
  for (const auto& [name, verdict] : parts) {
    const std::string gap = bf16_verdict_gap(verdict, isa);
    out.push_back(gap.empty() ? "bf16" : "fp32");
    if (gap.empty()) bf16_names += (bf16_names.empty() ? "" : ", ") + name;
    bool seen = gap.empty();
    for (const std::string& r : reasons) seen = seen || r == gap;
    if (!seen) reasons.push_back(gap);
  }
  std::string joined;
  for (size_t i = 0; i < reasons.size(); ++i) joined += (i ? "; " : "") + reasons[i];
  if (reasons.empty()) *why = "bf16: the bundle records bf16 as safe on " + isa + " for every part";
  else if (bf16_names.empty()) *why = "fp32: " + joined;
  else *why = "bf16 on " + bf16_names + ", fp32 elsewhere: " + joined;
  return out;
}

}  // namespace tstitch
