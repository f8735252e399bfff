"""Sampler coefficient tables: every sampler is the same step graph with a different table.

The step graph (tstitch_trt.export.step_module) computes, per step, with eps and the variance
value v from the (guided) denoiser and `c` this step's row of the table:

    x0      = c[0] * x - c[1] * eps                                   (eps -> x0)
    D       = c[2] * x0 + c[3] * prev_x0                              (multistep data term)
    logvar  = c[10] + (v + 1) / 2 * (c[9] - c[10])                    (learned-range variance)
    x_next  = c[4] * x + c[5] * D + c[6] * eps + (c[7] + c[8] * exp(logvar / 2)) * noise

Rows are in sampling order (noisiest first). Tables are computed in float64 and stored float32.
"""

from __future__ import annotations

import numpy as np

from tstitch_trt.sampling.schedule import RespacedSchedule

COEF_NAMES = (
    "sqrt_recip_abar",  # 0
    "sqrt_recipm1_abar",  # 1
    "d_x0",  # 2
    "d_prev_x0",  # 3
    "w_x",  # 4
    "w_d",  # 5
    "w_eps",  # 6
    "sigma",  # 7  fixed noise std (DDIM eta > 0)
    "learned_sigma",  # 8  1 where the learned variance adds noise (DDPM, t > 0)
    "max_log",  # 9  log beta_t
    "min_log",  # 10 clipped log posterior variance
)
NUM_COEFS = len(COEF_NAMES)
SAMPLERS = ("ddim", "ddpm", "dpm-solver++")


def _base(s: RespacedSchedule) -> np.ndarray:
    table = np.zeros((len(s), NUM_COEFS), dtype=np.float64)
    table[:, 0] = np.sqrt(1.0 / s.alphas_cumprod)
    table[:, 1] = np.sqrt(1.0 / s.alphas_cumprod - 1.0)
    table[:, 2] = 1.0  # D = x0 unless a multistep solver says otherwise
    return table


def ddim_table(s: RespacedSchedule, eta: float = 0.0) -> np.ndarray:
    """DDIM (Song et al.): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    a, a_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    table = _base(s)
    table[:, 5] = np.sqrt(a_prev)
    table[:, 6] = np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0))
    table[:, 7] = sigma  # zero on the last step by construction (abar_prev = 1)
    return _to_sampling_order(table)


def ddpm_table(s: RespacedSchedule) -> np.ndarray:
    """Ancestral DDPM with DiT's learned-range variance; no noise on the last step."""
    a, a_prev, betas = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    post_var = betas * (1 - a_prev) / (1 - a)
    # log(0) at the first step is clipped to the next value, as improved-diffusion does.
    post_log_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(s) > 1 else np.log(betas)
    table = _base(s)
    table[:, 4] = (1 - a_prev) * np.sqrt(1 - betas) / (1 - a)  # posterior mean coef on x_t
    table[:, 5] = betas * np.sqrt(a_prev) / (1 - a)  # posterior mean coef on x0
    table[:, 8] = (np.arange(len(s)) > 0).astype(np.float64)
    table[:, 9] = np.log(betas)
    table[:, 10] = post_log_clipped
    return _to_sampling_order(table)


def dpmpp_2m_table(s: RespacedSchedule) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction; first and final steps first order.

    From abar_t to abar_prev, with lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
    x_prev = (sigma_prev / sigma_t) x - alpha_prev (exp(-h) - 1) D,
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_last, r = h_last / h. The final step lands on sigma = 0.
    """
    table = _base(s)
    order = np.arange(len(s))[::-1]  # sampling order: index into the ascending schedule
    a = s.alphas_cumprod
    lam = 0.5 * np.log(a / (1 - a))
    h_last = None
    for k, i in enumerate(order):
        final = i == 0
        a_next = 1.0 if final else a[i - 1]
        if final:
            w_x, w_d, h = 0.0, np.sqrt(a_next), np.inf  # sigma_next = 0: x_prev = D = x0
        else:
            h = lam[i - 1] - lam[i]
            w_x = np.sqrt(1 - a_next) / np.sqrt(1 - a[i])
            w_d = -np.sqrt(a_next) * np.expm1(-h)
        table[i, 4], table[i, 5] = w_x, w_d
        if k > 0 and not final and h_last is not None:
            r = h_last / h
            table[i, 2], table[i, 3] = 1 + 0.5 / r, -0.5 / r
        h_last = h
    return _to_sampling_order(table)


def coefficient_table(sampler: str, s: RespacedSchedule, eta: float = 0.0) -> np.ndarray:
    """(N, NUM_COEFS) float32 table in sampling order for `sampler` in SAMPLERS."""
    if sampler == "ddim":
        return ddim_table(s, eta)
    if sampler == "ddpm":
        return ddpm_table(s)
    if sampler == "dpm-solver++":
        return dpmpp_2m_table(s)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def _to_sampling_order(table: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(table[::-1]).astype(np.float32)
