// numpy's default_rng(seed) in C++: SeedSequence -> PCG64 -> float32 ziggurat normals, bit for bit.
// Python draws x_init = rng.standard_normal((B,C,H,W), float32), then the plan's per-step noise
// from the same generator; a C++ run with the same seed therefore starts on the same trajectory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tstitch {

// numpy.random.SeedSequence(entropy) with pool_size 4 and no spawn key: the pool and generate_state.
class SeedSequence {
 public:
  explicit SeedSequence(uint64_t entropy);
  std::vector<uint32_t> generate_state_u32(size_t n_words) const;
  std::vector<uint64_t> generate_state_u64(size_t n_words) const;  // pairs of words, low word first
  const uint32_t* pool() const { return pool_; }

 private:
  uint32_t pool_[4];
};

// numpy.random.PCG64 (XSL-RR 128/64), including the buffered half word next_uint32 keeps.
class Pcg64 {
 public:
  explicit Pcg64(uint64_t seed);  // = np.random.PCG64(seed), i.e. via SeedSequence(seed)
  uint64_t next_u64();
  uint32_t next_u32();
  float next_float();  // (next_u32 >> 8) / 2^24, numpy's next_float

 private:
  unsigned __int128 state_ = 0;
  unsigned __int128 inc_ = 0;
  bool has_u32_ = false;
  uint32_t u32_ = 0;
};

// Generator.standard_normal(dtype=np.float32): fills `n` values, advancing `rng` as numpy does.
void standard_normal_f32(Pcg64& rng, float* out, size_t n);

// The float32 ziggurat tables (256 layers), generated from their definition at first use.
struct ZigguratF32 {
  uint32_t ki[256];
  float wi[256];
  float fi[256];
};
const ZigguratF32& ziggurat_f32();

}  // namespace tstitch
