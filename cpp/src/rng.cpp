#include "rng.hpp"

#include <cmath>

namespace tstitch {
namespace {

// SeedSequence constants (numpy/random/bit_generator.pyx; O'Neill's seed_seq_fe).
constexpr uint32_t kInitA = 0x43b0d7e5u, kMultA = 0x931e8875u;
constexpr uint32_t kInitB = 0x8b51f9ddu, kMultB = 0x58f38dedu;
constexpr uint32_t kMixMultL = 0xca01f9ddu, kMixMultR = 0x4973f715u;
constexpr int kXShift = 16;
constexpr size_t kPoolSize = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> kXShift;
  return value;
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t r = kMixMultL * x - kMixMultR * y;
  return r ^ (r >> kXShift);
}

// PCG64's 128-bit LCG multiplier.
const unsigned __int128 kPcgMult =
    (static_cast<unsigned __int128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;

}  // namespace

SeedSequence::SeedSequence(uint64_t entropy) {
  // The entropy int as little-endian 32-bit words ([0] for 0), as _coerce_to_uint32_array does.
  std::vector<uint32_t> words;
  do {
    words.push_back(static_cast<uint32_t>(entropy & 0xffffffffu));
    entropy >>= 32;
  } while (entropy != 0);
  uint32_t hash_const = kInitA;
  for (size_t i = 0; i < kPoolSize; ++i) pool_[i] = hashmix(i < words.size() ? words[i] : 0u, hash_const);
  for (size_t src = 0; src < kPoolSize; ++src)
    for (size_t dst = 0; dst < kPoolSize; ++dst)
      if (src != dst) pool_[dst] = mix(pool_[dst], hashmix(pool_[src], hash_const));
  for (size_t src = kPoolSize; src < words.size(); ++src)
    for (size_t dst = 0; dst < kPoolSize; ++dst) pool_[dst] = mix(pool_[dst], hashmix(words[src], hash_const));
}

std::vector<uint32_t> SeedSequence::generate_state_u32(size_t n_words) const {
  std::vector<uint32_t> state(n_words);
  uint32_t hash_const = kInitB;
  for (size_t i = 0; i < n_words; ++i) {
    uint32_t v = pool_[i % kPoolSize];
    v ^= hash_const;
    hash_const *= kMultB;
    v *= hash_const;
    v ^= v >> kXShift;
    state[i] = v;
  }
  return state;
}

std::vector<uint64_t> SeedSequence::generate_state_u64(size_t n_words) const {
  std::vector<uint32_t> w = generate_state_u32(2 * n_words);
  std::vector<uint64_t> out(n_words);
  for (size_t i = 0; i < n_words; ++i) out[i] = static_cast<uint64_t>(w[2 * i]) | (static_cast<uint64_t>(w[2 * i + 1]) << 32);
  return out;
}

Pcg64::Pcg64(uint64_t seed) {
  std::vector<uint64_t> v = SeedSequence(seed).generate_state_u64(4);
  unsigned __int128 init_state = (static_cast<unsigned __int128>(v[0]) << 64) | v[1];
  unsigned __int128 init_seq = (static_cast<unsigned __int128>(v[2]) << 64) | v[3];
  // pcg_setseq_128_srandom_r
  state_ = 0;
  inc_ = (init_seq << 1) | 1;
  state_ = state_ * kPcgMult + inc_;
  state_ += init_state;
  state_ = state_ * kPcgMult + inc_;
}

uint64_t Pcg64::next_u64() {
  state_ = state_ * kPcgMult + inc_;  // step, then output of the new state (XSL-RR)
  uint64_t hi = static_cast<uint64_t>(state_ >> 64), lo = static_cast<uint64_t>(state_);
  unsigned rot = static_cast<unsigned>(state_ >> 122);
  uint64_t x = hi ^ lo;
  return (x >> rot) | (x << ((64 - rot) & 63));
}

uint32_t Pcg64::next_u32() {
  if (has_u32_) {
    has_u32_ = false;
    return u32_;
  }
  uint64_t next = next_u64();
  has_u32_ = true;
  u32_ = static_cast<uint32_t>(next >> 32);
  return static_cast<uint32_t>(next & 0xffffffffu);
}

float Pcg64::next_float() { return static_cast<float>(next_u32() >> 8) * (1.0f / 16777216.0f); }

// Marsaglia & Tsang's ziggurat, 256 layers, for 23-bit magnitudes: r is the rightmost layer's edge,
// v the common area of every layer. Layer 0 is the base strip (with the tail), as in their zigset.
const ZigguratF32& ziggurat_f32() {
  static const ZigguratF32 tables = [] {
    ZigguratF32 z{};
    const long double m1 = 8388608.0L;  // 2^23
    const long double r = 3.6541528853610087963519472518L, v = 0.00492867323399L;
    long double dn = r, tn = r;
    const long double q = v / std::exp(-0.5L * dn * dn);
    z.ki[0] = static_cast<uint32_t>((dn / q) * m1);
    z.ki[1] = 0;
    z.wi[0] = static_cast<float>(q / m1);
    z.wi[255] = static_cast<float>(dn / m1);
    z.fi[0] = 1.0f;
    z.fi[255] = static_cast<float>(std::exp(-0.5L * dn * dn));
    for (int i = 254; i >= 1; --i) {
      dn = std::sqrt(-2.0L * std::log(v / dn + std::exp(-0.5L * dn * dn)));
      z.ki[i + 1] = static_cast<uint32_t>((dn / tn) * m1);
      tn = dn;
      z.fi[i] = static_cast<float>(std::exp(-0.5L * dn * dn));
      z.wi[i] = static_cast<float>(dn / m1);
    }
    return z;
  }();
  return tables;
}

namespace {

float normal_f32(Pcg64& rng, const ZigguratF32& z) {
  const float r = 3.6541528853610087963519472518f;
  const float inv_r = 0.27366123732975827203338247596f;
  for (;;) {
    uint32_t bits = rng.next_u32();
    int idx = static_cast<int>(bits & 0xff);
    bool negative = (bits >> 8) & 0x1;
    uint32_t rabs = (bits >> 9) & 0x0007fffff;
    float x = static_cast<float>(rabs) * z.wi[idx];
    if (negative) x = -x;
    if (rabs < z.ki[idx]) return x;  // inside the layer's rectangle: ~99% of draws
    if (idx == 0) {                  // the tail beyond r (1 - U avoids log(0))
      for (;;) {
        float xx = -inv_r * std::log1p(-rng.next_float());
        float yy = -std::log1p(-rng.next_float());
        if (yy + yy > xx * xx) return ((rabs >> 8) & 0x1) ? -(r + xx) : r + xx;
      }
    }
    // The wedge: compared in double, as numpy's C expression promotes exp(-0.5 * x * x).
    if ((z.fi[idx - 1] - z.fi[idx]) * rng.next_float() + z.fi[idx] < std::exp(-0.5 * x * x)) return x;
  }
}

}  // namespace

void standard_normal_f32(Pcg64& rng, float* out, size_t n) {
  const ZigguratF32& z = ziggurat_f32();
  for (size_t i = 0; i < n; ++i) out[i] = normal_f32(rng, z);
}

}  // namespace tstitch
