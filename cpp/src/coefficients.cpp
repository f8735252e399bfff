// Port of sampling/coefficients.py: same float64 expressions, then float32 in sampling order.
#include <cmath>
#include <limits>

#include "errors.hpp"
#include "sampling.hpp"

namespace tstitch {
namespace {

using Table = std::vector<double>;  // (N x kNumCoefs) row-major, ascending schedule order

Table base(const RespacedSchedule& s) {
  Table t(s.size() * kNumCoefs, 0.0);
  for (size_t i = 0; i < s.size(); ++i) {
    const double a = s.alphas_cumprod[i];
    t[i * kNumCoefs + 0] = std::sqrt(1.0 / a);
    t[i * kNumCoefs + 1] = std::sqrt(1.0 / a - 1.0);
    t[i * kNumCoefs + 2] = 1.0;  // D = x0 unless a multistep solver says otherwise
  }
  return t;
}

std::vector<float> to_sampling_order(const Table& t, size_t n) {
  std::vector<float> out(t.size());
  for (size_t i = 0; i < n; ++i)
    for (int k = 0; k < kNumCoefs; ++k) out[i * kNumCoefs + k] = static_cast<float>(t[(n - 1 - i) * kNumCoefs + k]);
  return out;
}

std::vector<float> ddim(const RespacedSchedule& s, double eta) {
  const std::vector<double> prev = s.alphas_cumprod_prev();
  Table t = base(s);
  for (size_t i = 0; i < s.size(); ++i) {
    const double a = s.alphas_cumprod[i], ap = prev[i];
    const double sigma = eta * std::sqrt((1 - ap) / (1 - a)) * std::sqrt(1 - a / ap);
    t[i * kNumCoefs + 5] = std::sqrt(ap);
    t[i * kNumCoefs + 6] = std::sqrt(std::max(1 - ap - sigma * sigma, 0.0));
    t[i * kNumCoefs + 7] = sigma;
  }
  return to_sampling_order(t, s.size());
}

std::vector<float> ddpm(const RespacedSchedule& s) {
  const std::vector<double> prev = s.alphas_cumprod_prev();
  const size_t n = s.size();
  std::vector<double> post_var(n);
  for (size_t i = 0; i < n; ++i) post_var[i] = s.betas[i] * (1 - prev[i]) / (1 - s.alphas_cumprod[i]);
  Table t = base(s);
  for (size_t i = 0; i < n; ++i) {
    const double a = s.alphas_cumprod[i], ap = prev[i], b = s.betas[i];
    // log(0) at the first step is clipped to the next value, as improved-diffusion does.
    const double clipped = n > 1 ? std::log(post_var[i == 0 ? 1 : i]) : std::log(b);
    t[i * kNumCoefs + 4] = (1 - ap) * std::sqrt(1 - b) / (1 - a);
    t[i * kNumCoefs + 5] = b * std::sqrt(ap) / (1 - a);
    t[i * kNumCoefs + 8] = i > 0 ? 1.0 : 0.0;
    t[i * kNumCoefs + 9] = std::log(b);
    t[i * kNumCoefs + 10] = clipped;
  }
  return to_sampling_order(t, n);
}

std::vector<float> dpmpp_2m(const RespacedSchedule& s) {
  const size_t n = s.size();
  Table t = base(s);
  const std::vector<double>& a = s.alphas_cumprod;
  std::vector<double> lam(n);
  for (size_t i = 0; i < n; ++i) lam[i] = 0.5 * std::log(a[i] / (1 - a[i]));
  bool have_h_last = false;
  double h_last = 0.0;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = n - 1 - k;  // sampling order: index into the ascending schedule
    const bool final = i == 0;
    const double a_next = final ? 1.0 : a[i - 1];
    double w_x, w_d, h;
    if (final) {
      w_x = 0.0, w_d = std::sqrt(a_next), h = std::numeric_limits<double>::infinity();
    } else {
      h = lam[i - 1] - lam[i];
      w_x = std::sqrt(1 - a_next) / std::sqrt(1 - a[i]);
      w_d = -std::sqrt(a_next) * std::expm1(-h);
    }
    t[i * kNumCoefs + 4] = w_x, t[i * kNumCoefs + 5] = w_d;
    if (k > 0 && !final && have_h_last) {
      const double r = h_last / h;
      t[i * kNumCoefs + 2] = 1 + 0.5 / r, t[i * kNumCoefs + 3] = -0.5 / r;
    }
    h_last = h, have_h_last = true;
  }
  return to_sampling_order(t, n);
}

}  // namespace

const std::vector<std::string>& sampler_names() {
  static const std::vector<std::string> names = {"ddim", "ddpm", "dpm-solver++"};
  return names;
}

std::vector<float> coefficient_table(const std::string& sampler, const RespacedSchedule& s, double eta) {
  if (sampler == "ddim") return ddim(s, eta);
  if (sampler == "ddpm") return ddpm(s);
  if (sampler == "dpm-solver++") return dpmpp_2m(s);
  fail(TSTITCH_ERR_INVALID_ARGUMENT, "unknown sampler '" + sampler + "'; choose one of ddim, ddpm, dpm-solver++");
}

bool sampler_needs_noise(const std::string& sampler, double eta) {
  return sampler == "ddpm" || (sampler == "ddim" && eta > 0);
}

}  // namespace tstitch
