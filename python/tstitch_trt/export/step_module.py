"""StepModule: one whole sampling step as one module (the graph every backend runs).

    (x, t, y, guidance, coef, prev_x0, noise) -> (x_next, x0)

Inside: classifier-free guidance by batch doubling with the null label, the denoiser in its own
precision (fp16 for engines), a cast back to fp32, and the sampler update of
tstitch_trt.sampling.coefficients. It is what gets exported, the torch backend, and the
reference every other backend is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from tstitch_trt.models.dit import DiT

STEP_INPUTS = ("x", "t", "y", "guidance", "coef", "prev_x0", "noise")
STEP_OUTPUTS = ("x_next", "x0")


class StepModule(nn.Module):
    def __init__(self, denoiser: DiT, guidance_channels: int | None = 3):
        """guidance_channels: how many eps channels get CFG (3 as in the DiT reference; None = all)."""
        super().__init__()
        self.denoiser = denoiser
        self.channels = denoiser.in_channels
        self.learn_sigma = denoiser.config.learn_sigma
        self.null_label = denoiser.num_classes
        g = self.channels if guidance_channels is None else min(guidance_channels, self.channels)
        self.guidance_channels = g

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.x_embedder.proj.weight.dtype

    def guided_output(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, v) in fp32 for the conditional half, eps guided on the first guidance_channels."""
        c, g = self.channels, self.guidance_channels
        x2 = torch.cat([x, x], 0).to(self.dtype)
        t2 = torch.cat([t, t], 0)
        y2 = torch.cat([y, torch.full_like(y, self.null_label)], 0)
        out = self.denoiser(x2, t2, y2).float()
        cond, uncond = out.chunk(2, dim=0)
        guided = uncond[:, :g] + guidance * (cond[:, :g] - uncond[:, :g])
        eps = torch.cat([guided, cond[:, g:c]], dim=1)
        v = cond[:, c:] if self.learn_sigma else torch.full_like(eps, -1.0)  # -1: posterior variance
        return eps, v

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor,
        coef: torch.Tensor,
        prev_x0: torch.Tensor,
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps, v = self.guided_output(x, t, y, guidance)
        return sampler_update(x, eps, v, coef, prev_x0, noise)


def sampler_update(
    x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, prev_x0: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficient-table update (see sampling/coefficients.py), fp32."""
    c = [coef[i] for i in range(coef.shape[0])]
    x0 = c[0] * x - c[1] * eps
    d = c[2] * x0 + c[3] * prev_x0
    logvar = c[10] + (v + 1) * 0.5 * (c[9] - c[10])
    std = c[7] + c[8] * torch.exp(0.5 * logvar)
    x_next = c[4] * x + c[5] * d + c[6] * eps + std * noise
    return x_next, x0
