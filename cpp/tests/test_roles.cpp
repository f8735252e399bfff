// Binding by role: the manifest's io may name roles, so a step graph with other tensor names (SD's
// sample / context, a PLMS history pair) binds without code changes; the DiT names are the default.
#include <gtest/gtest.h>

#include "roles.hpp"
#include "test_util.hpp"

using namespace tstitch;
using tstitch::testing::error_of;

namespace {
TensorSpec spec(const std::string& name, bool input, std::vector<int64_t> dims, nlohmann::json extra,
                const std::string& dtype = "float32") {
  TensorSpec t;
  t.name = name, t.input = input, t.dims = std::move(dims), t.extra = std::move(extra), t.dtype = dtype;
  return t;
}
const Binding& find(const std::vector<Binding>& v, const std::string& n) {
  return *std::find_if(v.begin(), v.end(), [&](const Binding& b) { return b.spec.name == n; });
}
}  // namespace

TEST(Roles, DitDefaultsWithoutIo) {
  Manifest m;
  m.models.resize(1);
  m.models[0].channels = 4, m.models[0].height = m.models[0].width = 32;
  const auto b = resolve_roles(m, 11);
  ASSERT_EQ(b.size(), 9u);
  EXPECT_TRUE(find(b, "x").latent);
  EXPECT_EQ(find(b, "x").role, Role::kStateIn);
  EXPECT_EQ(find(b, "x_next").pair, "x");
  EXPECT_EQ(find(b, "prev_x0").pair, "x0");
  EXPECT_EQ(find(b, "t").source, "timestep");
  EXPECT_EQ(find(b, "y").source, "class_labels");
  EXPECT_EQ(find(b, "coef").spec.dims, std::vector<int64_t>{11});
  EXPECT_EQ(resolve_dims(find(b, "x").spec, 3), (std::vector<int64_t>{3, 4, 32, 32}));
}

TEST(Roles, ExplicitRolesBindOtherNames) {
  const int64_t B = TensorSpec::kBatch, B2 = TensorSpec::kDoubleBatch;
  Manifest m;
  m.models.resize(1);
  m.io = {spec("sample", true, {B, 4, 64, 64}, {{"role", "state"}, {"pair", "sample_next"}, {"latent", true}}),
          spec("sample_next", false, {B, 4, 64, 64}, {{"role", "state"}, {"pair", "sample"}}),
          spec("eps_hist", true, {3, B, 4, 64, 64}, {{"role", "state"}, {"pair", "eps_hist_next"}}),
          spec("eps_hist_next", false, {3, B, 4, 64, 64}, {{"role", "state"}, {"pair", "eps_hist"}}),
          spec("timestep", true, {B}, {{"role", "step"}, {"table", "timestep"}}, "int64"),
          spec("context", true, {B2, 77, 768}, {{"role", "request"}, {"source", "text_embeddings"}})};
  const auto b = resolve_roles(m, 11);
  EXPECT_TRUE(find(b, "sample").latent);
  EXPECT_FALSE(find(b, "eps_hist").latent);
  EXPECT_EQ(find(b, "eps_hist_next").role, Role::kStateOut);
  EXPECT_EQ(find(b, "context").source, "text_embeddings");
  EXPECT_EQ(resolve_dims(find(b, "context").spec, 2), (std::vector<int64_t>{4, 77, 768}));
}

TEST(Roles, RefusalsNameTheTensor) {
  Manifest m;
  m.models.resize(1);
  m.io = {spec("x", true, {-1, 4}, nlohmann::json::object()), spec("x_next", false, {-1, 4}, nlohmann::json::object()),
          spec("mystery", true, {1}, nlohmann::json::object())};
  EXPECT_EQ(error_of([&] { resolve_roles(m, 11); }),
            "manifest.json: io.inputs.mystery has no role and is not a DiT step-graph tensor; rebuild the bundle with "
            "this version");
  m.io[2] = spec("h", true, {1}, {{"role", "state"}, {"pair", "nowhere"}});
  EXPECT_NE(error_of([&] { resolve_roles(m, 11); }).find("io.inputs.h pairs with 'nowhere'"), std::string::npos);
  m.io[2] = spec("h", true, {1}, {{"role", "ghost"}});
  EXPECT_NE(error_of([&] { resolve_roles(m, 11); }).find("role 'ghost' is unknown"), std::string::npos);
  m.io.pop_back();
  m.io[0].extra = {{"role", "state"}, {"pair", "x_next"}, {"latent", false}};
  EXPECT_NE(error_of([&] { resolve_roles(m, 11); }).find("names 0 latent state inputs"), std::string::npos);
}
