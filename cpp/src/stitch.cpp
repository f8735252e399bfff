// Port of sampling/stitch.py plus the SD call-index rule (REFERENCE.md, tstitch_sd_utils.py).
#include <cmath>
#include <sstream>

#include "errors.hpp"
#include "sampling.hpp"

namespace tstitch {
namespace {

std::string list_text(const std::vector<double>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

void check_ratio(int num_models, double ratio) {
  if (num_models != 2)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "a ratio stitches exactly 2 models, the bundle has " +
                                           std::to_string(num_models) + "; use fractions");
  if (!(ratio >= 0.0 && ratio <= 1.0)) {
    std::ostringstream os;
    os << "ratio must be in [0, 1], got " << ratio;
    fail(TSTITCH_ERR_INVALID_ARGUMENT, os.str());
  }
}

}  // namespace

std::vector<int> stitch_by_timestep(const std::vector<int64_t>& timesteps, int num_models, double ratio,
                                    int num_timesteps) {
  check_ratio(num_models, ratio);
  std::vector<int> out;
  for (int64_t t : timesteps)
    out.push_back(static_cast<double>(t) / num_timesteps >= 1 - ratio ? 0 : 1);
  return out;
}

void check_fractions(const std::vector<double>& fractions, int num_models) {
  if (static_cast<int>(fractions.size()) != num_models)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "got " + std::to_string(fractions.size()) + " fractions for " +
                                           std::to_string(num_models) + " models; give one per model");
  double sum = 0.0;
  for (double f : fractions) {
    if (!(f >= 0)) fail(TSTITCH_ERR_INVALID_ARGUMENT, "fractions must be >= 0, got " + list_text(fractions));
    sum += f;
  }
  if (!(std::fabs(sum - 1.0) <= 1e-6)) {
    std::ostringstream os;
    os << "fractions must sum to 1, got " << list_text(fractions) << " (sum " << sum << ")";
    fail(TSTITCH_ERR_INVALID_ARGUMENT, os.str());
  }
}

std::vector<int> stitch_by_fractions(const std::vector<int64_t>& timesteps, const std::vector<double>& fractions,
                                     int num_timesteps) {
  const int num_models = static_cast<int>(fractions.size());
  check_fractions(fractions, num_models);
  std::vector<double> milestones;
  float acc = 0.0f;  // the reference accumulates in float32: boundary steps land on the same model
  for (double f : fractions) milestones.push_back(static_cast<double>(acc += static_cast<float>(f)));
  std::vector<int> out;
  for (int64_t t : timesteps) {
    const double progress = 1 - static_cast<double>(t) / num_timesteps;
    int idx = num_models - 1;
    for (int i = 0; i < num_models; ++i)
      if (progress <= milestones[i]) {
        idx = i;
        break;
      }
    out.push_back(idx);
  }
  return out;
}

namespace {
std::vector<double> milestones_of(const std::vector<double>& fractions) {
  std::vector<double> milestones;
  float acc = 0.0f;  // the reference accumulates in float32: boundary steps land on the same model
  for (double f : fractions) milestones.push_back(static_cast<double>(acc += static_cast<float>(f)));
  return milestones;
}
}  // namespace

std::vector<int> stitch_by_call_fractions(int n_calls, const std::vector<double>& fractions) {
  const int num_models = static_cast<int>(fractions.size());
  check_fractions(fractions, num_models);
  const std::vector<double> milestones = milestones_of(fractions);
  std::vector<int> out;
  for (int i = 0; i < n_calls; ++i) {
    const double progress = static_cast<double>(i + 1) / n_calls;
    int idx = num_models - 1;
    for (int k = 0; k < num_models; ++k)
      if (progress <= milestones[k]) {
        idx = k;
        break;
      }
    out.push_back(idx);
  }
  return out;
}

std::vector<int> stitch_by_call_index(int n_calls, int num_models, double ratio) {
  check_ratio(num_models, ratio);
  std::vector<int> out;
  for (int i = 0; i < n_calls; ++i) out.push_back(static_cast<double>(i + 1) / n_calls <= ratio ? 0 : 1);
  return out;
}

}  // namespace tstitch
