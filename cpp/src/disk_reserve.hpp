// The model cache's disk reserve, Python's rule (runtime/openvino_compile.py blob_does_not_fit): a compiled
// model's blob (about its weights: 3.4 GB for SD 1.5's U-Net, 10 GB for SDXL's) is written only where it leaves
// the cache's file system max(2 GiB, 5% of its size) free, so a run never fills a disk with its cache.
#pragma once

#include <cstdint>
#include <string>

namespace tstitch {

constexpr uint64_t kSmallBlobBytes = 64ull << 20;  // always written
constexpr uint64_t kFreeReserveMinBytes = 2ull << 30;
constexpr double kFreeReserveFraction = 0.05;

// "" when a blob of blob_bytes may be written into dir (free_bytes available of total_bytes), else the run's
// note saying why not, in Python's words.
std::string blob_refusal(const std::string& dir, uint64_t blob_bytes, uint64_t free_bytes, uint64_t total_bytes);

}  // namespace tstitch
