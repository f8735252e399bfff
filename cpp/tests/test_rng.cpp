// numpy's SeedSequence, PCG64 and float32 ziggurat normals, bit for bit (goldens from numpy).
#include <gtest/gtest.h>

#include <cmath>

#include "manifest.hpp"
#include "rng.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::bits;
using tstitch::testing::golden;

TEST(Rng, SeedSequencePoolAndState) {
  const nlohmann::json gold = golden("rng");  // a named copy: a temporary's subobject would dangle
  ASSERT_EQ(gold["seeds"].size(), 7u);
  for (const auto& g : gold["seeds"]) {
    const uint64_t seed = g["seed"].get<uint64_t>();
    SeedSequence ss(seed);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(ss.pool()[i], g["pool"][i].get<uint32_t>()) << "seed " << seed;
    EXPECT_EQ(ss.generate_state_u64(4), g["state_u64"].get<std::vector<uint64_t>>()) << "seed " << seed;
  }
}

TEST(Rng, Pcg64RawOutput) {
  const nlohmann::json gold = golden("rng");  // a named copy: a temporary's subobject would dangle
  ASSERT_EQ(gold["seeds"].size(), 7u);
  for (const auto& g : gold["seeds"]) {
    Pcg64 rng(g["seed"].get<uint64_t>());
    for (const auto& want : g["raw_u64"]) EXPECT_EQ(rng.next_u64(), want.get<uint64_t>());
  }
}

TEST(Rng, StandardNormalFloat32BitEqual) {
  const nlohmann::json gold = golden("rng");  // a named copy: a temporary's subobject would dangle
  ASSERT_EQ(gold["seeds"].size(), 7u);
  for (const auto& g : gold["seeds"]) {
    Pcg64 rng(g["seed"].get<uint64_t>());
    std::vector<float> v(1000000);
    standard_normal_f32(rng, v.data(), v.size());
    const std::vector<float> first(v.begin(), v.begin() + 32);
    EXPECT_EQ(bits(first), g["normal_first_bits"].get<std::vector<uint32_t>>());
    // a million draws visit every layer, the wedges and the tail
    EXPECT_EQ(sha256_bytes(v.data(), v.size() * 4), g["normal_1m_sha256"].get<std::string>()) << "seed " << g["seed"];
  }
}

TEST(Rng, DrawsContinueAcrossCallsLikeOneGenerator) {
  // x_init, then the plan's noise, then more: an odd count leaves numpy's buffered half word in place.
  const auto g = golden("rng")["sequence"];
  Pcg64 rng(g["seed"].get<uint64_t>());
  std::vector<float> all;
  for (const auto& n : g["counts"]) {
    std::vector<float> part(n.get<size_t>());
    standard_normal_f32(rng, part.data(), part.size());
    all.insert(all.end(), part.begin(), part.end());
  }
  EXPECT_EQ(bits(all), g["bits"].get<std::vector<uint32_t>>());
}

TEST(Rng, ZigguratTablesHaveTheirDefiningShape) {
  const ZigguratF32& z = ziggurat_f32();
  EXPECT_EQ(z.ki[1], 0u);  // layer 1 always goes to the wedge test
  EXPECT_EQ(z.fi[0], 1.0f);
  for (int i = 1; i < 256; ++i) EXPECT_LT(z.fi[i], z.fi[i - 1]);  // densities fall layer by layer
  EXPECT_NEAR(z.wi[255] * 8388608.0, 3.6541528853610088, 1e-6);  // the last layer ends at r
  EXPECT_NEAR(z.fi[255], std::exp(-0.5 * 3.6541528853610088 * 3.6541528853610088), 1e-9);
}
