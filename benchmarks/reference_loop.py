"""The baseline users compare us with: T-Stitch sampling written the way the public code runs it.

NVlabs/T-Stitch `dit/sample_t_stitch.py` on facebookresearch/DiT `diffusion/`: eager PyTorch,
the respaced DDIM loop in Python. Per step, as `SpacedDiffusion.ddim_sample` does it:

- the wrapped model maps the respaced index to the ORIGINAL timestep (a fresh map tensor per call);
- `TStitch.forward_with_cfg` picks the model from that timestep: small if t/1000 >= 1 - ratio
  (`MultiTStitch`: the first model whose cumulative fraction >= progress = 1 - t/1000);
- `DiT.forward_with_cfg`: the batch was doubled once up front (z = cat(z, z), y = cat(y, null)),
  every step re-duplicates the first half, runs the network on 2B, guides the first 3 eps channels;
- `p_mean_variance`: coefficients are pulled from float64 numpy tables into fresh tensors
  (`_extract_into_tensor`), the learned-range variance and the posterior mean are computed even
  though DDIM does not use them, pred_xstart from eps;
- `ddim_sample`: eps re-derived from pred_xstart, the DDIM update, a fresh noise draw (x sigma).

Written from those formulas for this benchmark (nothing is imported from the reference), with
this package's DiT class and the bundle's weights, so the baseline runs the same network on the
same weights as the engines. It is neither handicapped nor tuned: model.eval(), inference mode,
the thread count the caller sets for every backend, and no synchronisation beyond the
reference's own per-step `t[0].item()`. On CUDA it allows TF32 matmuls as the reference script does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tstitch_trt.bundle.manifest import Manifest, read_manifest
from tstitch_trt.models.checkpoints import load_dit
from tstitch_trt.models.dit import DiT, DiTConfig


def reference_space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`space_timesteps(T, str(steps))` with one section: evenly strided, rounded positions."""
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    taken, pos = [], 0.0
    for _ in range(steps):
        taken.append(round(pos))
        pos += stride
    return sorted(set(taken))


class ReferenceDDIM:
    """The tables of `GaussianDiffusion` for a respaced linear schedule (float64 numpy, as there)."""

    def __init__(self, steps: int, num_timesteps: int = 1000):
        scale = 1000 / num_timesteps
        base_betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
        base_abar = np.cumprod(1.0 - base_betas)
        use = set(reference_space_timesteps(num_timesteps, steps))
        self.timestep_map: list[int] = []
        betas, last = [], 1.0
        for i, abar in enumerate(base_abar):  # SpacedDiffusion.__init__
            if i in use:
                betas.append(1 - abar / last)
                last = abar
                self.timestep_map.append(i)
        self.num_timesteps = num_timesteps
        self.betas = np.array(betas, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.log(self.betas)  # one step: the reference fails
        )
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)
        )

    def __len__(self) -> int:
        return len(self.betas)


def extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`_extract_into_tensor`: index a float64 numpy table on the device, float32, broadcast."""
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    while res.dim() < len(shape):
        res = res[..., None]
    return res + torch.zeros(shape, device=t.device)


def forward_with_cfg(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                     guidance_channels: int = 3) -> torch.Tensor:
    """`DiT.forward_with_cfg`: guidance on the first 3 eps channels, as the reference does."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    g = guidance_channels
    eps, rest = model_out[:, :g], model_out[:, g:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


class ReferenceTStitch:
    """`TStitch` (ratio, two models) / `MultiTStitch` (fractions) behind SpacedDiffusion's wrapper."""

    def __init__(self, models: Sequence[DiT], timestep_map: list[int], ratio: float | None = None,
                 fractions: Sequence[float] | None = None, guidance_channels: int = 3,
                 diffusion_steps: int = 1000):
        self.models = list(models)
        self.timestep_map = timestep_map
        self.ratio = ratio
        self.fractions = fractions
        self.guidance_channels = guidance_channels
        self.diffusion_steps = diffusion_steps
        self.calls = [0] * len(self.models)

    def pick(self, t_orig: torch.Tensor) -> int:
        time_step = t_orig[0].item()  # the reference's per-step host sync
        if self.fractions is None:
            assert self.ratio is not None
            return 0 if time_step / self.diffusion_steps >= (1 - self.ratio) else 1
        progress = 1 - time_step / self.diffusion_steps
        milestones = torch.cumsum(torch.tensor(self.fractions), dim=0)  # float32, as the reference
        for idx, m in enumerate(milestones):
            if progress <= m:
                return idx
        return len(self.models) - 1

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)  # _WrappedModel
        t_orig = map_tensor[ts]
        idx = self.pick(t_orig)
        self.calls[idx] += 1
        return forward_with_cfg(self.models[idx], x, t_orig, y, cfg_scale, self.guidance_channels)


def ddim_step(d: ReferenceDDIM, model: ReferenceTStitch, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              cfg_scale: float, eta: float, generator: torch.Generator | None) -> torch.Tensor:
    """`ddim_sample` with `p_mean_variance` (learned range variance, clip_denoised=False)."""
    b, c = x.shape[:2]
    model_output = model(x, t, y, cfg_scale)
    model_output, model_var_values = torch.split(model_output, c, dim=1)
    min_log = extract(d.posterior_log_variance_clipped, t, x.shape)
    max_log = extract(np.log(d.betas), t, x.shape)
    frac = (model_var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    _model_variance = torch.exp(model_log_variance)  # computed by the reference, unused by DDIM
    pred_xstart = (extract(d.sqrt_recip_alphas_cumprod, t, x.shape) * x
                   - extract(d.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
    _mean = (extract(d.posterior_mean_coef1, t, x.shape) * pred_xstart
             + extract(d.posterior_mean_coef2, t, x.shape) * x)  # q_posterior_mean_variance
    _post_var = extract(d.posterior_variance, t, x.shape)
    _post_log = extract(d.posterior_log_variance_clipped, t, x.shape)

    eps = ((extract(d.sqrt_recip_alphas_cumprod, t, x.shape) * x - pred_xstart)
           / extract(d.sqrt_recipm1_alphas_cumprod, t, x.shape))
    alpha_bar = extract(d.alphas_cumprod, t, x.shape)
    alpha_bar_prev = extract(d.alphas_cumprod_prev, t, x.shape)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    noise = torch.randn(x.shape, device=x.device, generator=generator)  # drawn every step, as randn_like
    mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
    return mean_pred + nonzero_mask * sigma * noise


def reference_sample(models: Sequence[DiT], z: torch.Tensor, labels: Sequence[int], steps: int,
                     ratio: float | None = 0.4, cfg_scale: float = 1.5, fractions: Sequence[float] | None = None,
                     eta: float = 0.0, guidance_channels: int = 3, generator: torch.Generator | None = None,
                     stats: dict | None = None) -> torch.Tensor:
    """The stitched DDIM trajectory from latent z (B, C, H, W); returns the final latent (B, C, H, W).

    `stats`, if given, receives the number of network calls per model.
    """
    device = z.device
    d = ReferenceDDIM(steps)
    stitch = ReferenceTStitch(models, d.timestep_map, ratio=ratio, fractions=fractions,
                              guidance_channels=guidance_channels)
    n = len(labels)
    null = models[0].num_classes
    with torch.inference_mode():
        x = torch.cat([z, z], 0)
        y = torch.cat([torch.tensor(list(labels), device=device), torch.tensor([null] * n, device=device)], 0)
        for i in reversed(range(len(d))):  # ddim_sample_loop_progressive
            t = torch.tensor([i] * x.shape[0], device=device)
            x = ddim_step(d, stitch, x, t, y, cfg_scale, eta, generator)
        samples, _ = x.chunk(2, dim=0)
    if stats is not None:
        stats["calls_per_model"] = list(stitch.calls)
    return samples


def load_reference_models(bundle_dir: str | Path, manifest: Manifest | None = None,
                          device: str = "cpu") -> list[DiT]:
    """The bundle's networks (its torch weights) as plain fp32 DiT modules, eval mode."""
    manifest = manifest or read_manifest(bundle_dir)
    from tstitch_trt.bundle.manifest import artifact_path

    models = []
    for m in manifest.models:
        if "torch" not in m.engines:
            raise FileNotFoundError(f"the bundle has no torch weights for {m.name} (build with --backend torch)")
        net = load_dit(DiTConfig.from_dict(m.arch), artifact_path(bundle_dir, m.engines["torch"]))
        models.append(net.to(device).eval())
    return models
