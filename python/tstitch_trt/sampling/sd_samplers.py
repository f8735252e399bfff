"""Stable Diffusion samplers as coefficient tables over one linear update (numpy only).

Each diffusers scheduler used with SD 1.x is linear in the current sample x, the guided eps, the
x0 estimate and a little history, with per-call weights. The U-Net step graph
(tstitch_trt.export.unet_step) computes, with `c` this call's row of the table:

    eps     = guided U-Net output at (c_in * x, t, context)            (Euler scales its input)
    src     = k_x * x + k_s * saved                                    (PLMS' 2nd call: the saved sample)
    e       = a0 * eps + a1 * h1 + a2 * h2 + a3 * h3                   (PLMS eps mixing; h = eps history)
    x0      = r * src - m * e                                          (x0 estimate)
    D       = d0 * x0 + d1 * prev_x0                                   (DPM-Solver++(2M) data term)
    x_next  = w_x * src + w_d * D + w_e * e + sigma * noise
    h_next  = shift ? (eps, h1, h2) : (h1, h2, h3)                     (blended: shift * new + (1-shift) * old)
    saved_next = save * x + (1 - save) * saved

State carried in ping-pong buffers: x, prev_x0 (<- x0), eps_hist (B, 3, C, H, W), saved.
One row per U-Net CALL (PNDM with skip_prk_steps makes N + 1 calls for N steps). Tables are
computed in float64 from the scheduler config dict (diffusers' scheduler_config.json) and stored
float32; every sampler is tested along whole trajectories against the diffusers class of its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tstitch_trt.errors import UserError

SD_COEF_NAMES = (
    "c_in", "k_x", "k_s", "a0", "a1", "a2", "a3", "r", "m", "d0", "d1", "w_x", "w_d", "w_e", "sigma", "shift", "save",
)
SD_NUM_COEFS = len(SD_COEF_NAMES)
C = {name: i for i, name in enumerate(SD_COEF_NAMES)}
SD_SAMPLERS = ("pndm", "ddim", "euler", "dpm-solver++", "lcm")
HISTORY = 3  # eps history depth (PLMS: the last three eps)
SCHEDULER_CLASSES = {  # diffusers class in the bundle's scheduler config -> our sampler name
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm-solver++",
    "LCMScheduler": "lcm",
}
# The same defaults diffusers' classes use where the (SD 1.x) config leaves a field out.
_SPACING_DEFAULT = {"pndm": "leading", "ddim": "leading", "euler": "linspace", "dpm-solver++": "linspace"}
# LCMScheduler's own defaults for the fields an SD 1.x / SDXL config (PNDM, Euler) does not carry
LCM_DEFAULTS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": True,
                "original_inference_steps": 50, "timestep_scaling": 10.0}
LCM_SIGMA_DATA = 0.5  # LCMScheduler.sigma_data (the consistency boundary condition)


@dataclass(frozen=True)
class SdSchedule:
    """What a sampler's table needs from a scheduler config (diffusers field names)."""

    alphas_cumprod: np.ndarray  # (T,) float64
    num_train_timesteps: int
    steps_offset: int
    set_alpha_to_one: bool
    config: Mapping[str, Any]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SdSchedule:
        t = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float64)
        elif kind == "scaled_linear":  # diffusers: linspace of the square roots in float32, squared
            betas = (np.linspace(start**0.5, end**0.5, t, dtype=np.float32) ** 2).astype(np.float64)
        elif kind == "linear":
            betas = np.linspace(start, end, t, dtype=np.float32).astype(np.float64)
        else:
            raise UserError(f"the scheduler config's beta_schedule {kind!r} is not supported (scaled_linear, linear)")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise UserError(f"prediction_type {config.get('prediction_type')!r} is not supported; SD 1.x predicts "
                            "epsilon")
        abar = np.cumprod(1.0 - betas)
        return cls(abar, t, int(config.get("steps_offset", 0)), bool(config.get("set_alpha_to_one", False)),
                   dict(config))

    def spacing(self, sampler: str) -> str:
        return str(self.config.get("timestep_spacing") or _SPACING_DEFAULT[sampler])

    @property
    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


@dataclass(frozen=True)
class SdTable:
    timesteps: np.ndarray  # (calls,) float32: the U-Net's timestep per call
    coef: np.ndarray  # (calls, SD_NUM_COEFS) float32
    init_noise_sigma: float  # the unit-Gaussian start is scaled by this (diffusers' init_noise_sigma)


def default_sampler(config: Mapping[str, Any]) -> str:
    name = str(config.get("_class_name", ""))
    if name not in SCHEDULER_CLASSES:
        raise UserError(f"the bundle's scheduler {name!r} has no sampler here; pass --sampler "
                        f"({', '.join(SD_SAMPLERS)})")
    return SCHEDULER_CLASSES[name]


def _rows(n: int) -> np.ndarray:
    table = np.zeros((n, SD_NUM_COEFS), dtype=np.float64)
    table[:, C["c_in"]] = table[:, C["k_x"]] = table[:, C["a0"]] = table[:, C["d0"]] = 1.0
    table[:, C["shift"]] = 1.0
    return table


def _vp_x0(table: np.ndarray, i: int, abar: float) -> None:
    table[i, C["r"]] = 1.0 / np.sqrt(abar)
    table[i, C["m"]] = np.sqrt(1.0 - abar) / np.sqrt(abar)


def _int_timesteps(s: SdSchedule, sampler: str, steps: int) -> np.ndarray:
    """Descending integer timesteps of PNDM / DDIM (diffusers' set_timesteps)."""
    t = s.num_train_timesteps
    spacing = s.spacing(sampler)
    if spacing == "leading":
        return (np.arange(0, steps) * (t // steps)).round()[::-1].astype(np.int64) + s.steps_offset
    if spacing == "linspace":
        return np.linspace(0, t - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "trailing":
        return np.round(np.arange(t, 0, -t / steps)).astype(np.int64) - 1
    raise UserError(f"timestep_spacing {spacing!r} is not supported (leading, linspace, trailing)")


def pndm_table(s: SdSchedule, steps: int) -> SdTable:
    """PNDMScheduler with skip_prk_steps (PLMS): N + 1 calls, the second reusing the first's sample."""
    if not s.config.get("skip_prk_steps", False) and s.config.get("_class_name") == "PNDMScheduler":
        raise UserError("the PNDM scheduler config has skip_prk_steps false (Runge-Kutta warm-up); only PLMS "
                        "(skip_prk_steps true, as SD 1.x ships) is supported")
    ts = _int_timesteps(s, "pndm", steps)[::-1]  # ascending, as diffusers' _timesteps
    plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    stride = s.num_train_timesteps // steps
    abar = s.alphas_cumprod
    table = _rows(len(plms))
    n_ets = 0
    for k, t in enumerate(plms):
        t, prev = int(t), int(t) - stride
        if k != 1:
            n_ets = min(n_ets, 3) + 1
        else:  # the repeated call: same interval as call 0, from the saved sample
            prev, t = t, t + stride
        row = table[k]
        if n_ets == 1 and k == 0:
            row[C["save"]] = 1.0
        elif n_ets == 1 and k == 1:
            row[C["k_x"]], row[C["k_s"]] = 0.0, 1.0
            row[C["a0"]], row[C["a1"]] = 0.5, 0.5
        elif n_ets == 2:
            row[C["a0"]], row[C["a1"]] = 1.5, -0.5
        elif n_ets == 3:
            row[C["a0"]], row[C["a1"]], row[C["a2"]] = 23 / 12, -16 / 12, 5 / 12
        else:
            row[C["a0"]], row[C["a1"]], row[C["a2"]], row[C["a3"]] = 55 / 24, -59 / 24, 37 / 24, -9 / 24
        if k == 1:
            row[C["shift"]] = 0.0  # the 2nd call's eps is not appended to the history
        a = abar[t]
        a_prev = abar[prev] if prev >= 0 else s.final_alpha_cumprod
        denom = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
        row[C["w_x"]] = np.sqrt(a_prev / a)
        row[C["w_e"]] = -(a_prev - a) / denom
        _vp_x0(table, k, a)
    return SdTable(plms.astype(np.float32), table.astype(np.float32), 1.0)


def ddim_sd_table(s: SdSchedule, steps: int, eta: float = 0.0) -> SdTable:
    """DDIMScheduler (clip_sample false, epsilon prediction), any eta."""
    if s.config.get("clip_sample", False) and s.config.get("_class_name") == "DDIMScheduler":
        raise UserError("the DDIM scheduler config has clip_sample true; SD 1.x configs keep it false")
    ts = _int_timesteps(s, "ddim", steps)
    stride = s.num_train_timesteps // steps
    table = _rows(len(ts))
    for k, t in enumerate(ts):
        a = s.alphas_cumprod[int(t)]
        prev = int(t) - stride
        a_prev = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = eta * np.sqrt(var)
        _vp_x0(table, k, a)
        table[k, C["w_d"]] = np.sqrt(a_prev)
        table[k, C["w_x"]] = 0.0
        table[k, C["w_e"]] = np.sqrt(max(1 - a_prev - std**2, 0.0))
        table[k, C["sigma"]] = std
    return SdTable(ts.astype(np.float32), table.astype(np.float32), 1.0)


def _karras_free(s: SdSchedule, name: str) -> None:
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if s.config.get(flag):
            raise UserError(f"the scheduler config sets {flag}; {name} supports the default sigmas only")


def _sigmas(s: SdSchedule, timesteps: np.ndarray) -> np.ndarray:
    """Interpolated sigmas at `timesteps` plus the final one (final_sigmas_type), float32 as diffusers."""
    all_sigmas = np.sqrt((1 - s.alphas_cumprod) / s.alphas_cumprod)
    sig = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    final = s.config.get("final_sigmas_type", "zero")
    last = 0.0 if final == "zero" else float(all_sigmas[0])
    return np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)


def euler_table(s: SdSchedule, steps: int) -> SdTable:
    """EulerDiscreteScheduler (no churn): x_next = x + (sigma_next - sigma) eps, input / sqrt(sigma^2 + 1)."""
    _karras_free(s, "euler")
    if s.config.get("interpolation_type", "linear") != "linear":
        raise UserError("the Euler scheduler config's interpolation_type is not linear; not supported")
    t, spacing = s.num_train_timesteps, s.spacing("euler")
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (t // steps)).round()[::-1].astype(np.float32) + s.steps_offset
    elif spacing == "trailing":
        ts = np.arange(t, 0, -t / steps).round().astype(np.float32) - 1
    else:
        raise UserError(f"timestep_spacing {spacing!r} is not supported (leading, linspace, trailing)")
    sig = _sigmas(s, ts.astype(np.float64))
    table = _rows(len(ts))
    for k in range(len(ts)):
        table[k, C["c_in"]] = 1.0 / np.sqrt(sig[k] ** 2 + 1)
        table[k, C["r"]], table[k, C["m"]] = 1.0, sig[k]
        table[k, C["w_x"]] = 1.0
        table[k, C["w_e"]] = sig[k + 1] - sig[k]
    smax = float(np.float32(sig[:-1].max()))
    init = smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
    return SdTable(ts.astype(np.float32), table.astype(np.float32), float(init))


def dpmpp_2m_sd_table(s: SdSchedule, steps: int) -> SdTable:
    """DPMSolverMultistepScheduler, algorithm_type dpmsolver++, solver_order 2, midpoint."""
    _karras_free(s, "dpm-solver++")
    cfg = s.config
    if cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or int(cfg.get("solver_order", 2)) != 2 \
            or cfg.get("solver_type", "midpoint") != "midpoint":
        raise UserError("dpm-solver++ here is DPM-Solver++(2M) midpoint; the scheduler config asks for another variant")
    t, spacing = s.num_train_timesteps, s.spacing("dpm-solver++")
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (t // (steps + 1))).round()[::-1][:-1].astype(np.int64) + s.steps_offset
    elif spacing == "trailing":
        ts = np.arange(t, 0, -t / steps).round().astype(np.int64) - 1
    else:
        raise UserError(f"timestep_spacing {spacing!r} is not supported (leading, linspace, trailing)")
    sig = _sigmas(s, ts.astype(np.float64))
    n = len(ts)
    lower_final = bool(cfg.get("lower_order_final", True))
    euler_final = bool(cfg.get("euler_at_final", False))
    zero_final = cfg.get("final_sigmas_type", "zero") == "zero"

    def alpha_sigma(x: float) -> tuple[float, float]:
        a = 1.0 / np.sqrt(x**2 + 1)
        return a, x * a

    def lam(x: float) -> float:
        a, sg = alpha_sigma(x)
        return np.inf if sg == 0 else np.log(a) - np.log(sg)

    table = _rows(n)
    lower_order_nums = 0
    for i in range(n):
        last = i == n - 1
        first_order_final = last and (euler_final or (lower_final and n < 15) or zero_final)
        alpha_t, sigma_t = alpha_sigma(sig[i + 1])
        _, sigma_s0 = alpha_sigma(sig[i])
        table[i, C["r"]] = np.sqrt(sig[i] ** 2 + 1)  # x0 = (x - sigma_s eps) / alpha_s
        table[i, C["m"]] = sig[i]
        h = lam(sig[i + 1]) - lam(sig[i])
        table[i, C["w_x"]] = sigma_t / sigma_s0
        table[i, C["w_d"]] = -alpha_t * np.expm1(-h)
        table[i, C["w_e"]] = 0.0
        if not (lower_order_nums < 1 or first_order_final):  # second order: D = (1 + 1/2r) m0 - 1/2r m1
            r0 = (lam(sig[i]) - lam(sig[i - 1])) / h
            table[i, C["d0"]], table[i, C["d1"]] = 1 + 0.5 / r0, -0.5 / r0
        lower_order_nums = min(lower_order_nums + 1, 2)
    return SdTable(ts.astype(np.float32), table.astype(np.float32), 1.0)


def lcm_table(s: SdSchedule, steps: int) -> SdTable:
    """LCMScheduler (epsilon prediction): the consistency boundary condition over the x0 estimate,
    denoised = c_out * x0 + c_skip * x, then x_next = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise
    (x_next = denoised at the last step, as diffusers returns it). Timesteps as set_timesteps picks them
    from the original_inference_steps schedule; LCM ignores steps_offset and timestep_spacing."""
    cfg = s.config  # with LCM_DEFAULTS under it (sd_table)
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        raise UserError("the LCM scheduler config clips or thresholds the x0 estimate; not supported")
    original = int(cfg["original_inference_steps"])
    t = s.num_train_timesteps
    if not 1 <= original <= t:
        raise UserError(f"the scheduler config's original_inference_steps {original} is outside [1, {t}]")
    if steps > original:
        raise UserError(f"--steps {steps} is more than LCM's original_inference_steps {original}; give at most "
                        f"{original} (LCM is meant for 2-8)")
    origin = (np.arange(1, original + 1) * (t // original) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    scaling = float(cfg["timestep_scaling"])
    table = _rows(len(ts))
    for k, tk in enumerate(ts):
        last = k == len(ts) - 1
        a = s.alphas_cumprod[int(tk)]
        a_prev = a if last else s.alphas_cumprod[int(ts[k + 1])]
        scaled = float(tk) * scaling
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / np.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
        _vp_x0(table, k, a)
        keep = 1.0 if last else np.sqrt(a_prev)  # the last step returns `denoised` itself
        table[k, C["w_d"]] = keep * c_out
        table[k, C["w_x"]] = keep * c_skip
        table[k, C["w_e"]] = 0.0
        table[k, C["sigma"]] = 0.0 if last else np.sqrt(1.0 - a_prev)
    return SdTable(ts.astype(np.float32), table.astype(np.float32), 1.0)


def sd_table(sampler: str, config: Mapping[str, Any], steps: int, eta: float = 0.0) -> SdTable:
    """The table of `sampler` (SD_SAMPLERS) for `steps` steps under the bundle's scheduler config."""
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if sampler != "ddim" and eta:
        raise UserError(f"--eta applies to ddim only, not {sampler}")
    if sampler == "lcm":  # LCMScheduler.from_config: the config's fields over LCM's own defaults
        config = {**LCM_DEFAULTS, **config}
    s = SdSchedule.from_config(config)
    if steps > s.num_train_timesteps:
        raise UserError(f"--steps {steps} is more than the scheduler's {s.num_train_timesteps} training timesteps")
    table = _usable_table(s, sampler, steps, eta)
    if table is None:
        # diffusers' own schedulers index past the schedule (IndexError) or divide by a zero step here
        lo, hi = 1, steps - 1  # the largest count that works: the failures sit at the top (offset, spacing)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _usable_table(s, sampler, mid, eta) is not None else (lo, mid - 1)
        raise UserError(f"--steps {steps} with {sampler} is more than this bundle's scheduler allows (its "
                        f"{s.spacing(sampler) if sampler != 'lcm' else 'LCM'} timesteps with steps_offset "
                        f"{s.steps_offset} leave the {s.num_train_timesteps}-step schedule); give at most {lo}")
    return table


def _usable_table(s: SdSchedule, sampler: str, steps: int, eta: float) -> SdTable | None:
    """The table, or None where `steps` makes it index past the schedule, repeat a timestep (a zero step)
    or hold a non-finite coefficient."""
    try:
        with np.errstate(all="ignore"):  # a zero step's division: detected below, never printed
            table = _table(s, sampler, steps, eta)
    except IndexError:
        return None
    ts = table.timesteps
    t_max = s.num_train_timesteps
    if not (np.isfinite(table.coef).all() and (ts >= 0).all() and (ts < t_max).all()):
        return None
    # PLMS repeats its first timestep by design (a one-call table has nothing to repeat)
    distinct = np.delete(ts, 1) if sampler == "pndm" and len(ts) > 1 else ts
    if len(np.unique(distinct)) != len(distinct):
        return None
    return table


def _table(s: SdSchedule, sampler: str, steps: int, eta: float) -> SdTable:
    if sampler == "pndm":
        return pndm_table(s, steps)
    if sampler == "ddim":
        return ddim_sd_table(s, steps, eta)
    if sampler == "euler":
        return euler_table(s, steps)
    if sampler == "dpm-solver++":
        return dpmpp_2m_sd_table(s, steps)
    if sampler == "lcm":
        return lcm_table(s, steps)
    raise UserError(f"unknown sampler {sampler!r} for an SD bundle; choose one of {', '.join(SD_SAMPLERS)}")


def sd_needs_noise(sampler: str, eta: float) -> bool:
    """Whether the table injects noise: ddim with eta > 0, and lcm between steps."""
    return (sampler == "ddim" and eta > 0) or sampler == "lcm"


def draw_step_noise(sampler: str, n_calls: int, batch_shape: tuple[int, ...], rng: np.random.Generator
                    ) -> np.ndarray:
    """The per-call noise rows (n_calls, *batch_shape) from `rng`: LCM injects none at its last step, so
    that row is zeros and only n_calls - 1 rows are drawn (as diffusers' LCMScheduler draws them)."""
    if sampler != "lcm":
        return rng.standard_normal((n_calls, *batch_shape), dtype=np.float32)
    noise = np.zeros((n_calls, *batch_shape), dtype=np.float32)
    noise[:-1] = rng.standard_normal((n_calls - 1, *batch_shape), dtype=np.float32)
    return noise


def check_sd_sampler(sampler: str, allowed: Sequence[str] = SD_SAMPLERS) -> None:
    if sampler not in allowed:
        raise UserError(f"unknown sampler {sampler!r} for an SD bundle; choose one of {', '.join(allowed)}")
