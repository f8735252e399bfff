// Binding by role (runtime/io_roles.py): io.roles names the state pairs, step rows and request
// constants, so a step graph with other tensor names (SD's sample / context, the PLMS history pair)
// binds without code changes; bundles without io.roles get the DiT roles. Symbolic dims (B, 2B, H,
// W) take their values from the initial latent.
#include <gtest/gtest.h>

#include "roles.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::error_of;

namespace {
const Binding& find(const std::vector<Binding>& v, const std::string& n) {
  return *std::find_if(v.begin(), v.end(), [&](const Binding& b) { return b.spec.name == n; });
}
Dim B() { return {0, "B"}; }
Dim sym(const char* s) { return {0, s}; }
Dim n(int64_t v) { return {v, ""}; }
}  // namespace

TEST(Roles, DitDefaultsWithoutIo) {
  Manifest m;
  m.models.resize(1);
  m.models[0].channels = 4, m.models[0].height = m.models[0].width = 32;
  m.roles = {{{"x", "x_next"}, {"prev_x0", "x0"}}, {"t", "coef", "noise"}, {"y", "guidance"}, {}};
  const auto b = resolve_roles(m, 11);
  ASSERT_EQ(b.size(), 9u);
  EXPECT_TRUE(find(b, "x").latent);
  EXPECT_FALSE(find(b, "prev_x0").latent);
  EXPECT_EQ(find(b, "x").role, Role::kStateIn);
  EXPECT_EQ(find(b, "x").pair, "x_next");
  EXPECT_EQ(find(b, "x_next").pair, "x");
  EXPECT_EQ(find(b, "x0").role, Role::kStateOut);
  EXPECT_EQ(find(b, "t").source, "timestep");
  EXPECT_EQ(find(b, "y").source, "cond");
  EXPECT_EQ(find(b, "guidance").source, "guidance");
  const DimValues dims = latent_dims(find(b, "x").spec, {3, 4, 32, 32});
  EXPECT_EQ(resolve_dims(find(b, "coef").spec, dims), std::vector<int64_t>{11});
  EXPECT_EQ(resolve_dims(find(b, "x").spec, dims), (std::vector<int64_t>{3, 4, 32, 32}));
}

TEST(Roles, SdRolesBindOtherNamesAndSymbolicDims) {
  Manifest m;
  m.models.resize(1);
  const std::vector<Dim> lat = {B(), n(4), sym("H"), sym("W")};
  const std::vector<Dim> hist = {n(3), B(), n(4), sym("H"), sym("W")};
  m.io = {{"sample", true, "float32", lat},           {"eps_hist", true, "float32", hist},
          {"t", true, "int64", {B()}},                {"coef", true, "float32", {n(17)}},
          {"context", true, "float32", {sym("2B"), n(77), n(32)}}, {"guidance", true, "float32", {}},
          {"sample_next", false, "float32", lat},     {"eps_hist_next", false, "float32", hist}};
  m.roles = {{{"sample", "sample_next"}, {"eps_hist", "eps_hist_next"}}, {"t", "coef"}, {"context", "guidance"}, {}};
  m.roles_recorded = true;
  const auto b = resolve_roles(m, 17);
  EXPECT_TRUE(find(b, "sample").latent);
  EXPECT_FALSE(find(b, "eps_hist").latent);
  EXPECT_EQ(find(b, "eps_hist_next").role, Role::kStateOut);
  EXPECT_EQ(find(b, "eps_hist_next").pair, "eps_hist");
  EXPECT_EQ(find(b, "context").source, "cond");
  const DimValues dims = latent_dims(find(b, "sample").spec, {2, 4, 8, 6});
  EXPECT_EQ(resolve_dims(find(b, "context").spec, dims), (std::vector<int64_t>{4, 77, 32}));
  EXPECT_EQ(resolve_dims(find(b, "eps_hist").spec, dims), (std::vector<int64_t>{3, 2, 4, 8, 6}));
  EXPECT_EQ(error_of([&] { latent_dims(find(b, "sample").spec, {2, 3, 8, 8}); }),
            "the latent has shape (2, 3, 8, 8), the step graphs take ['B', 4, 'H', 'W']");
}

TEST(Roles, RefusalsNameTheTensor) {
  Manifest m;
  m.models.resize(1);
  m.io = {{"x", true, "float32", {B(), n(4)}}, {"x_next", false, "float32", {B(), n(4)}}, {"h", true, "float32", {n(1)}}};
  m.roles = {{{"x", "x_next"}, {"h", "h_next"}}, {}, {}, {}};
  m.roles_recorded = true;
  EXPECT_EQ(error_of([&] { resolve_roles(m, 11); }), "the bundle manifest's io has no shape for h_next; rebuild the bundle");
  m.io.push_back({"h_next", false, "float32", {n(2)}});
  EXPECT_EQ(error_of([&] { resolve_roles(m, 11); }),
            "the bundle manifest's io pairs h [1] float32 with h_next [2] float32; a state pair has one shape and dtype; "
            "rebuild the bundle");
  m.io.back().shape = {n(1)};
  m.io.push_back({"late", true, "float32", {sym("T")}});
  m.roles.request = {"late"};
  const auto b = resolve_roles(m, 11);
  const DimValues dims = latent_dims(find(b, "x").spec, {2, 4});
  EXPECT_EQ(error_of([&] { resolve_dims(find(b, "late").spec, dims); }),
            "the step input late has the dimension 'T', which the latent's shape does not define; rebuild the bundle");
}
