#include "disk_reserve.hpp"

#include <algorithm>
#include <cstdio>

namespace tstitch {

std::string blob_refusal(const std::string& dir, uint64_t blob_bytes, uint64_t free_bytes, uint64_t total_bytes) {
  if (blob_bytes <= kSmallBlobBytes) return "";
  const auto reserve = std::max<uint64_t>(kFreeReserveMinBytes, static_cast<uint64_t>(kFreeReserveFraction * total_bytes));
  if (free_bytes >= blob_bytes && free_bytes - blob_bytes >= reserve) return "";
  const double gib = 1024.0 * 1024.0 * 1024.0;
  char sizes[160];
  std::snprintf(sizes, sizeof sizes, "%.1f GiB blob, %.1f GiB free in ", blob_bytes / gib, free_bytes / gib);
  char kept[64];
  std::snprintf(kept, sizeof kept, ", %.1f GiB kept free", reserve / gib);
  return "OpenVINO model cache: not written for this graph (" + std::string(sizes) + dir + kept +
         "); the next run compiles it again";
}

}  // namespace tstitch
