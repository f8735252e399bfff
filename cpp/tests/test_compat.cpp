// Engine compatibility refusals (a port of tests/test_runtime_gpu.py::test_compat_refuses_other_gpu_and_version).
#include <gtest/gtest.h>

#include "compat.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::error_of;

namespace {
const RuntimeIdentity kRtx{"tensorrt_rtx", "1.7.1.116", "trt-rtx"};
nlohmann::json info() {
  return {{"module", "tensorrt_rtx"}, {"version", "1.7.1.116"}, {"compute_capabilities", {"8.6"}},
          {"hardware_compatibility", "none"}, {"version_compatible", false}};
}
}  // namespace

TEST(Compat, RefusesOtherGpuVersionAndModule) {
  const std::string rebuild = "rebuild the bundle on this machine (`tstitch-trt build --backend trt-rtx`)";
  EXPECT_EQ(error_of([] { check_engine_compat(info(), kRtx, {8, 6}, "E"); }), "");
  tstitch_status s = TSTITCH_OK;
  EXPECT_EQ(error_of([] { check_engine_compat(info(), kRtx, {9, 0}, "E"); }, &s),
            "E was built for GPU compute capability 8.6, but this GPU is 9.0; engines are specific to the GPU "
            "architecture: " + rebuild);
  EXPECT_EQ(s, TSTITCH_ERR_INCOMPATIBLE);
  EXPECT_EQ(error_of([] { check_engine_compat(info(), {"tensorrt_rtx", "1.8.0.1", "trt-rtx"}, {8, 6}, "E"); }),
            "E was built with tensorrt_rtx 1.7.1.116, but 1.8.0.1 is installed; engines only load in the TensorRT "
            "version that built them: install tensorrt_rtx==1.7.1.116 or " + rebuild);
  EXPECT_EQ(error_of([] { check_engine_compat(info(), {"tensorrt", "10.13.0.35", "trt"}, {8, 6}, "E"); }),
            "E was built with tensorrt_rtx, but this backend runs tensorrt; use the matching --backend or rebuild the "
            "bundle on this machine (`tstitch-trt build --backend trt`)");
}

TEST(Compat, RelaxationsTheBuilderCanRecord) {
  nlohmann::json j = info();
  j["version_compatible"] = true;
  EXPECT_EQ(error_of([&] { check_engine_compat(j, {"tensorrt_rtx", "1.9.0", "trt-rtx"}, {8, 6}, "E"); }), "");
  EXPECT_NE(error_of([&] { check_engine_compat(j, {"tensorrt_rtx", "2.0.0", "trt-rtx"}, {8, 6}, "E"); }), "");
  j = info();
  j["hardware_compatibility"] = "ampere_plus";
  EXPECT_EQ(error_of([&] { check_engine_compat(j, kRtx, {9, 0}, "E"); }), "");
  EXPECT_NE(error_of([&] { check_engine_compat(j, kRtx, {7, 5}, "E"); }).find("Ampere"), std::string::npos);
  EXPECT_EQ(error_of([] { check_engine_compat(nlohmann::json::object(), kRtx, {7, 5}, "E"); }), "");  // left to TensorRT
}

TEST(Compat, CcStrings) {
  EXPECT_EQ(cc_string("SM89"), "8.9");
  EXPECT_EQ(cc_string("sm_90"), "9.0");
  EXPECT_EQ(cc_string("12.0"), "12.0");
  EXPECT_EQ(cc_string("sm_120"), "12.0");
  EXPECT_EQ(cc_string(8, 6), "8.6");
  EXPECT_NE(error_of([] { cc_string("ampere"); }), "");
}
