// Port of sampling/sd_samplers.py. Every expression keeps numpy's operation order and precision
// (float32 where numpy computes in float32) so the float32 tables are bit-identical.
#include "sd_samplers.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "errors.hpp"

namespace tstitch {
namespace {

enum Coef { c_in, k_x, k_s, a0, a1, a2, a3, r, m, d0, d1, w_x, w_d, w_e, sigma, shift, save };

[[noreturn]] void unsupported(const std::string& why) { fail(TSTITCH_ERR_BUNDLE, why); }

// np.linspace(start, stop, n) in float64: i * step + start, the last value exactly stop.
std::vector<double> linspace(double start, double stop, int n) {
  std::vector<double> y(static_cast<size_t>(std::max(n, 0)));
  const int div = n - 1;
  const double step = div > 0 ? (stop - start) / div : 0.0;
  for (int i = 0; i < n; ++i) y[i] = div > 0 ? static_cast<double>(i) * step + start : start;
  if (n > 1) y.back() = stop;
  return y;
}

// np.arange(start, stop, step) for doubles: len = ceil((stop - start) / step), then numpy's fill:
// v0 = start, delta = (start + step) - start, v_i = start + i * delta.
std::vector<double> arange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  std::vector<double> y(static_cast<size_t>(std::max(len, 0.0)));
  if (y.empty()) return y;
  y[0] = start;
  if (y.size() > 1) y[1] = start + step;
  const double delta = y.size() > 1 ? y[1] - y[0] : step;
  for (size_t i = 2; i < y.size(); ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

struct SdSchedule {
  std::vector<double> alphas_cumprod;
  int num_train_timesteps = 1000;
  int64_t steps_offset = 0;
  bool set_alpha_to_one = false;
  nlohmann::json config;

  static SdSchedule from_config(const nlohmann::json& cfg) {
    SdSchedule s;
    s.config = cfg.is_object() ? cfg : nlohmann::json::object();
    const nlohmann::json& c = s.config;
    s.num_train_timesteps = c.value("num_train_timesteps", 1000);
    const int t = s.num_train_timesteps;
    const std::string kind = c.value("beta_schedule", "linear");
    const double start = c.value("beta_start", 0.0001), end = c.value("beta_end", 0.02);
    std::vector<double> betas;
    if (c.contains("trained_betas") && !c["trained_betas"].is_null()) {
      betas = c["trained_betas"].get<std::vector<double>>();
    } else if (kind == "scaled_linear") {  // diffusers: linspace of the square roots in float32, squared
      for (double v : linspace(std::pow(start, 0.5), std::pow(end, 0.5), t)) {
        const float f = static_cast<float>(v);
        betas.push_back(static_cast<double>(f * f));
      }
    } else if (kind == "linear") {
      for (double v : linspace(start, end, t)) betas.push_back(static_cast<double>(static_cast<float>(v)));
    } else {
      unsupported("the scheduler config's beta_schedule '" + kind + "' is not supported (scaled_linear, linear)");
    }
    const std::string prediction = c.value("prediction_type", "epsilon");
    if (prediction != "epsilon")
      unsupported("prediction_type '" + prediction + "' is not supported; SD 1.x predicts epsilon");
    double acc = 1.0;
    for (double b : betas) s.alphas_cumprod.push_back(acc *= (1.0 - b));
    s.steps_offset = c.value("steps_offset", 0);
    s.set_alpha_to_one = c.value("set_alpha_to_one", false);
    return s;
  }

  std::string spacing(const std::string& sampler) const {
    static const std::map<std::string, std::string> defaults = {
        {"pndm", "leading"}, {"ddim", "leading"}, {"euler", "linspace"}, {"dpm-solver++", "linspace"}};
    const nlohmann::json v = config.value("timestep_spacing", nlohmann::json());
    return v.is_string() && !v.get<std::string>().empty() ? v.get<std::string>() : defaults.at(sampler);
  }
  double final_alpha_cumprod() const { return set_alpha_to_one ? 1.0 : alphas_cumprod[0]; }
  bool flag(const char* key) const { return config.contains(key) && config[key].is_boolean() && config[key].get<bool>(); }
};

std::vector<double> rows(size_t n) {
  std::vector<double> t(n * kSdNumCoefs, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double* row = &t[i * kSdNumCoefs];
    row[c_in] = row[k_x] = row[a0] = row[d0] = row[shift] = 1.0;
  }
  return t;
}

void vp_x0(double* row, double abar) {
  row[r] = 1.0 / std::sqrt(abar);
  row[m] = std::sqrt(1.0 - abar) / std::sqrt(abar);
}

SdTable finish(const std::vector<double>& timesteps, const std::vector<double>& table, float init) {
  SdTable out;
  for (double t : timesteps) out.timesteps.push_back(static_cast<float>(t));
  for (double v : table) out.coef.push_back(static_cast<float>(v));
  out.init_noise_sigma = init;
  return out;
}

[[noreturn]] void bad_spacing(const std::string& spacing) {
  unsupported("timestep_spacing '" + spacing + "' is not supported (leading, linspace, trailing)");
}

// Descending integer timesteps of PNDM / DDIM (diffusers' set_timesteps).
std::vector<int64_t> int_timesteps(const SdSchedule& s, const std::string& sampler, int steps) {
  const int t = s.num_train_timesteps;
  const std::string spacing = s.spacing(sampler);
  std::vector<int64_t> out;
  if (spacing == "leading") {
    for (int i = steps - 1; i >= 0; --i) out.push_back(static_cast<int64_t>(i) * (t / steps) + s.steps_offset);
  } else if (spacing == "linspace") {
    const std::vector<double> y = linspace(0, t - 1, steps);
    for (auto it = y.rbegin(); it != y.rend(); ++it) out.push_back(static_cast<int64_t>(std::nearbyint(*it)));
  } else if (spacing == "trailing") {
    for (double v : arange(t, 0, -static_cast<double>(t) / steps)) out.push_back(static_cast<int64_t>(std::nearbyint(v)) - 1);
  } else {
    bad_spacing(spacing);
  }
  return out;
}

SdTable pndm_table(const SdSchedule& s, int steps) {
  if (!s.flag("skip_prk_steps") && s.config.value("_class_name", "") == "PNDMScheduler")
    unsupported("the PNDM scheduler config has skip_prk_steps false (Runge-Kutta warm-up); only PLMS "
                "(skip_prk_steps true, as SD 1.x ships) is supported");
  std::vector<int64_t> ts = int_timesteps(s, "pndm", steps);
  std::reverse(ts.begin(), ts.end());  // ascending, as diffusers' _timesteps
  const long n = static_cast<long>(ts.size());
  std::vector<int64_t> plms(ts.begin(), ts.end() - 1);  // ts[:-1] + ts[-2:-1] + ts[-1:]
  if (n >= 2) plms.push_back(ts[n - 2]);
  plms.push_back(ts[n - 1]);
  std::reverse(plms.begin(), plms.end());
  const int64_t stride = s.num_train_timesteps / steps;
  const std::vector<double>& abar = s.alphas_cumprod;
  std::vector<double> table = rows(plms.size());
  int n_ets = 0;
  for (size_t k = 0; k < plms.size(); ++k) {
    int64_t t = plms[k], prev = plms[k] - stride;
    if (k != 1) {
      n_ets = std::min(n_ets, 3) + 1;
    } else {  // the repeated call: same interval as call 0, from the saved sample
      prev = t, t = t + stride;
    }
    double* row = &table[k * kSdNumCoefs];
    if (n_ets == 1 && k == 0) {
      row[save] = 1.0;
    } else if (n_ets == 1 && k == 1) {
      row[k_x] = 0.0, row[k_s] = 1.0, row[a0] = 0.5, row[a1] = 0.5;
    } else if (n_ets == 2) {
      row[a0] = 1.5, row[a1] = -0.5;
    } else if (n_ets == 3) {
      row[a0] = 23.0 / 12, row[a1] = -16.0 / 12, row[a2] = 5.0 / 12;
    } else {
      row[a0] = 55.0 / 24, row[a1] = -59.0 / 24, row[a2] = 37.0 / 24, row[a3] = -9.0 / 24;
    }
    if (k == 1) row[shift] = 0.0;  // the 2nd call's eps is not appended to the history
    const double a = abar[static_cast<size_t>(t)];
    const double a_prev = prev >= 0 ? abar[static_cast<size_t>(prev)] : s.final_alpha_cumprod();
    const double denom = a * std::sqrt(1 - a_prev) + std::sqrt(a * (1 - a) * a_prev);
    row[w_x] = std::sqrt(a_prev / a);
    row[w_e] = -(a_prev - a) / denom;
    vp_x0(row, a);
  }
  return finish(std::vector<double>(plms.begin(), plms.end()), table, 1.0f);
}

SdTable ddim_table(const SdSchedule& s, int steps, double eta) {
  if (s.flag("clip_sample") && s.config.value("_class_name", "") == "DDIMScheduler")
    unsupported("the DDIM scheduler config has clip_sample true; SD 1.x configs keep it false");
  const std::vector<int64_t> ts = int_timesteps(s, "ddim", steps);
  const int64_t stride = s.num_train_timesteps / steps;
  std::vector<double> table = rows(ts.size());
  for (size_t k = 0; k < ts.size(); ++k) {
    const double a = s.alphas_cumprod[static_cast<size_t>(ts[k])];
    const int64_t prev = ts[k] - stride;
    const double a_prev = prev >= 0 ? s.alphas_cumprod[static_cast<size_t>(prev)] : s.final_alpha_cumprod();
    const double var = (1 - a_prev) / (1 - a) * (1 - a / a_prev);
    const double std_ = eta * std::sqrt(var);
    double* row = &table[k * kSdNumCoefs];
    vp_x0(row, a);
    row[w_d] = std::sqrt(a_prev);
    row[w_x] = 0.0;
    row[w_e] = std::sqrt(std::max(1 - a_prev - std_ * std_, 0.0));
    row[sigma] = std_;
  }
  return finish(std::vector<double>(ts.begin(), ts.end()), table, 1.0f);
}

void karras_free(const SdSchedule& s, const std::string& name) {
  for (const char* flag : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"})
    if (s.flag(flag)) unsupported(std::string("the scheduler config sets ") + flag + "; " + name + " supports the default sigmas only");
}

// np.interp(x, arange(len(fp)), fp) for ascending x inside or beyond [0, len - 1].
double interp(double x, const std::vector<double>& fp) {
  const size_t n = fp.size();
  if (x <= 0) return fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  const size_t j = static_cast<size_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (fp[j + 1] - fp[j]) / (static_cast<double>(j + 1) - static_cast<double>(j));
  return slope * (x - static_cast<double>(j)) + fp[j];
}

// Interpolated sigmas at `timesteps` plus the final one (final_sigmas_type), through float32 as diffusers.
std::vector<double> sigmas(const SdSchedule& s, const std::vector<double>& timesteps) {
  std::vector<double> all;
  for (double a : s.alphas_cumprod) all.push_back(std::sqrt((1 - a) / a));
  std::vector<double> out;
  for (double t : timesteps) out.push_back(interp(t, all));
  out.push_back(s.config.value("final_sigmas_type", "zero") == "zero" ? 0.0 : all[0]);
  for (double& v : out) v = static_cast<double>(static_cast<float>(v));
  return out;
}

SdTable euler_table(const SdSchedule& s, int steps) {
  karras_free(s, "euler");
  if (s.config.value("interpolation_type", "linear") != "linear")
    unsupported("the Euler scheduler config's interpolation_type is not linear; not supported");
  const int t = s.num_train_timesteps;
  const std::string spacing = s.spacing("euler");
  std::vector<double> ts;  // float32 values
  if (spacing == "linspace") {
    const std::vector<double> y = linspace(0, t - 1, steps);
    for (auto it = y.rbegin(); it != y.rend(); ++it) ts.push_back(static_cast<float>(*it));
  } else if (spacing == "leading") {
    for (int i = steps - 1; i >= 0; --i)
      ts.push_back(static_cast<float>(static_cast<float>(i * (t / steps)) + static_cast<float>(s.steps_offset)));
  } else if (spacing == "trailing") {
    for (double v : arange(t, 0, -static_cast<double>(t) / steps)) ts.push_back(static_cast<float>(std::nearbyint(v)) - 1.0f);
  } else {
    bad_spacing(spacing);
  }
  const std::vector<double> sig = sigmas(s, ts);
  std::vector<double> table = rows(ts.size());
  for (size_t k = 0; k < ts.size(); ++k) {
    double* row = &table[k * kSdNumCoefs];
    row[c_in] = 1.0 / std::sqrt(sig[k] * sig[k] + 1);
    row[r] = 1.0, row[m] = sig[k];
    row[w_x] = 1.0;
    row[w_e] = sig[k + 1] - sig[k];
  }
  const double smax = static_cast<float>(*std::max_element(sig.begin(), sig.end() - 1));
  const double init = spacing == "linspace" || spacing == "trailing" ? smax : std::pow(smax * smax + 1, 0.5);
  return finish(ts, table, static_cast<float>(init));
}

SdTable dpmpp_2m_table(const SdSchedule& s, int steps) {
  karras_free(s, "dpm-solver++");
  const nlohmann::json& cfg = s.config;
  if (cfg.value("algorithm_type", "dpmsolver++") != "dpmsolver++" || cfg.value("solver_order", 2) != 2 ||
      cfg.value("solver_type", "midpoint") != "midpoint")
    unsupported("dpm-solver++ here is DPM-Solver++(2M) midpoint; the scheduler config asks for another variant");
  const int t = s.num_train_timesteps;
  const std::string spacing = s.spacing("dpm-solver++");
  std::vector<int64_t> ts;
  if (spacing == "linspace") {
    const std::vector<double> y = linspace(0, t - 1, steps + 1);
    for (size_t i = y.size() - 1; i >= 1; --i) ts.push_back(static_cast<int64_t>(std::nearbyint(y[i])));
  } else if (spacing == "leading") {
    for (int i = steps; i >= 1; --i) ts.push_back(static_cast<int64_t>(i) * (t / (steps + 1)) + s.steps_offset);
  } else if (spacing == "trailing") {
    for (double v : arange(t, 0, -static_cast<double>(t) / steps)) ts.push_back(static_cast<int64_t>(std::nearbyint(v)) - 1);
  } else {
    bad_spacing(spacing);
  }
  const std::vector<double> tsd(ts.begin(), ts.end());
  const std::vector<double> sig = sigmas(s, tsd);
  const size_t n = ts.size();
  const bool lower_final = cfg.value("lower_order_final", true), euler_final = cfg.value("euler_at_final", false);
  const bool zero_final = cfg.value("final_sigmas_type", "zero") == "zero";
  auto alpha_of = [](double x) { return 1.0 / std::sqrt(x * x + 1); };
  auto lam = [&](double x) {
    const double a = alpha_of(x), sg = x * a;
    return sg == 0 ? std::numeric_limits<double>::infinity() : std::log(a) - std::log(sg);
  };
  std::vector<double> table = rows(n);
  int lower_order_nums = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool last = i == n - 1;
    const bool first_order_final = last && (euler_final || (lower_final && n < 15) || zero_final);
    const double alpha_t = alpha_of(sig[i + 1]), sigma_t = sig[i + 1] * alpha_t;
    const double sigma_s0 = sig[i] * alpha_of(sig[i]);
    double* row = &table[i * kSdNumCoefs];
    row[r] = std::sqrt(sig[i] * sig[i] + 1);
    row[m] = sig[i];
    const double h = lam(sig[i + 1]) - lam(sig[i]);
    row[w_x] = sigma_t / sigma_s0;
    row[w_d] = -alpha_t * std::expm1(-h);
    row[w_e] = 0.0;
    if (!(lower_order_nums < 1 || first_order_final)) {  // second order: D = (1 + 1/2r) m0 - 1/2r m1
      const double r0 = (lam(sig[i]) - lam(sig[i - 1])) / h;
      row[d0] = 1 + 0.5 / r0, row[d1] = -0.5 / r0;
    }
    lower_order_nums = std::min(lower_order_nums + 1, 2);
  }
  return finish(tsd, table, 1.0f);
}

// diffusers' LCMScheduler (multistep consistency sampling): timesteps a subset of the original_inference_steps
// schedule; each call x0 = (x - sqrt(1 - a) eps) / sqrt(a), denoised = c_out x0 + c_skip x with the boundary
// scalings of t * timestep_scaling, x_next = sqrt(a_prev) denoised + sqrt(1 - a_prev) noise, and the last
// call returns denoised itself. One noise row per call (the last one's weight is 0).
SdTable lcm_table(const SdSchedule& s, int steps) {
  const nlohmann::json& cfg = s.config;
  for (const char* flag : {"thresholding", "clip_sample", "rescale_betas_zero_snr"})
    if (s.flag(flag)) unsupported(std::string("the LCM scheduler config sets ") + flag + "; lcm supports it off only");
  const int64_t t = s.num_train_timesteps;
  const nlohmann::json orig_v = cfg.value("original_inference_steps", nlohmann::json(50));
  const nlohmann::json scaling_v = cfg.value("timestep_scaling", nlohmann::json(10.0));
  if (!orig_v.is_number_integer() || orig_v.get<int64_t>() < 1 || !scaling_v.is_number() ||
      !std::isfinite(scaling_v.get<double>()))
    unsupported("the LCM scheduler config's original_inference_steps / timestep_scaling are not a positive integer / a number");
  const int64_t original = orig_v.get<int64_t>();
  const double scaling = scaling_v.get<double>();
  if (original > t)
    unsupported("the LCM scheduler config's original_inference_steps " + std::to_string(original) +
                " is more than its " + std::to_string(t) + " training timesteps");
  if (steps > original)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "steps " + std::to_string(steps) + " is more than the LCM scheduler's original_inference_steps " +
                                           std::to_string(original) + " (lcm's timesteps are a subset of those)");
  // set_timesteps: origin = [1..original] * (T // original) - 1, reversed; indices floor(linspace(0, original, steps,
  // endpoint=False))
  const int64_t k = t / original;
  std::vector<int64_t> ts;
  const double step = static_cast<double>(original) / steps;
  for (int i = 0; i < steps; ++i) {
    const int64_t index = static_cast<int64_t>(std::floor(static_cast<double>(i) * step));
    ts.push_back((original - index) * k - 1);
  }
  std::vector<double> table = rows(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const bool last = i + 1 == ts.size();
    const int64_t prev = last ? ts[i] : ts[i + 1];
    const double a = s.alphas_cumprod[static_cast<size_t>(ts[i])];
    const double a_prev = prev >= 0 ? s.alphas_cumprod[static_cast<size_t>(prev)] : s.final_alpha_cumprod();
    const double scaled = static_cast<double>(ts[i]) * scaling;  // get_scalings_for_boundary_condition_discrete
    const double c_skip = 0.25 / (scaled * scaled + 0.25), c_out = scaled / std::sqrt(scaled * scaled + 0.25);
    double* row = &table[i * kSdNumCoefs];
    vp_x0(row, a);
    const double keep = last ? 1.0 : std::sqrt(a_prev);  // the last call: x_next = denoised
    row[w_x] = keep * c_skip;
    row[w_d] = keep * c_out;  // D = x0 (d0 = 1)
    row[w_e] = 0.0;
    row[sigma] = last ? 0.0 : std::sqrt(1.0 - a_prev);
  }
  return finish(std::vector<double>(ts.begin(), ts.end()), table, 1.0f);
}

}  // namespace

const std::vector<std::string>& sd_sampler_names() {
  static const std::vector<std::string> names = {"pndm", "ddim", "euler", "dpm-solver++", "lcm"};
  return names;
}

std::string sd_default_sampler(const nlohmann::json& config) {
  static const std::map<std::string, std::string> classes = {{"PNDMScheduler", "pndm"},
                                                             {"DDIMScheduler", "ddim"},
                                                             {"EulerDiscreteScheduler", "euler"},
                                                             {"DPMSolverMultistepScheduler", "dpm-solver++"},
                                                             {"LCMScheduler", "lcm"}};
  const std::string name = config.is_object() ? config.value("_class_name", "") : "";
  auto it = classes.find(name);
  if (it == classes.end())
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the bundle's scheduler '" + name +
                                           "' has no sampler here; pass a sampler (pndm, ddim, euler, dpm-solver++, lcm)");
  return it->second;
}

SdTable sd_table(const std::string& sampler, const nlohmann::json& config, int steps, double eta) {
  if (steps < 1) fail(TSTITCH_ERR_INVALID_ARGUMENT, "steps must be >= 1, got " + std::to_string(steps));
  if (sampler != "ddim" && eta != 0.0) fail(TSTITCH_ERR_INVALID_ARGUMENT, "eta applies to ddim only, not " + sampler);
  const SdSchedule s = SdSchedule::from_config(config);
  if (steps > s.num_train_timesteps)
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "steps " + std::to_string(steps) + " is more than the scheduler's " +
                                           std::to_string(s.num_train_timesteps) + " training timesteps");
  if (sampler == "pndm") return pndm_table(s, steps);
  if (sampler == "ddim") return ddim_table(s, steps, eta);
  if (sampler == "euler") return euler_table(s, steps);
  if (sampler == "dpm-solver++") return dpmpp_2m_table(s, steps);
  if (sampler == "lcm") return lcm_table(s, steps);
  fail(TSTITCH_ERR_INVALID_ARGUMENT, "unknown sampler '" + sampler + "' for an SD bundle; choose one of pndm, ddim, euler, dpm-solver++, lcm");
}

bool sd_needs_noise(const std::string& sampler, double eta) { return (sampler == "ddim" && eta > 0) || sampler == "lcm"; }

}  // namespace tstitch
