"""The training objective of DiT / improved-diffusion: L_hybrid = MSE(eps) + L_vlb (learned variance).

The model outputs (eps, v); the variance is exp(frac * log beta_t + (1 - frac) * log beta~_t) with
frac = (v + 1) / 2, exactly what the DDPM coefficient table samples with. As in Nichol & Dhariwal,
the VLB term sees a stop-gradient copy of eps, so it trains only the variance and the MSE term
alone trains the mean. Timesteps are uniform over the same 1000-step linear schedule sampling uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tstitch_trt.sampling.schedule import linear_betas


class HybridLoss:
    def __init__(self, num_timesteps: int = 1000):
        betas = linear_betas(num_timesteps)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            "post_c_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "post_c_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            # log(0) at t=0 clipped to the t=1 value, as improved-diffusion (and the DDPM table) do
            "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
            "log_beta": np.log(betas),
        }
        self.num_timesteps = num_timesteps
        self.t = {k: torch.from_numpy(v).float() for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.t[name][t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_abar", t) * x0 + self._at("sqrt_1m_abar", t) * noise

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("post_c_x0", t) * x0 + self._at("post_c_xt", t) * xt

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means: {"loss", "mse", "vb"} (vb in bits per dimension, as improved-diffusion)."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y)
        c = x0.shape[1]
        eps, v = out[:, :c], out[:, c:]
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        # VLB on the variance only: the mean comes from a detached eps
        x0_pred = self._at("sqrt_recip_abar", t) * xt - self._at("sqrt_recipm1_abar", t) * eps.detach()
        mean_pred = self.posterior_mean(x0_pred, xt, t)
        frac = (v + 1) / 2
        log_var = frac * self._at("log_beta", t) + (1 - frac) * self._at("post_log_var", t)
        true_mean = self.posterior_mean(x0, xt, t)
        kl = normal_kl(true_mean, self._at("post_log_var", t), mean_pred, log_var).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, mean_pred, 0.5 * log_var).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit images in [-1, 1] under a Gaussian discretized to bins of width 2/255."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
