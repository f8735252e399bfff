"""UNetStepModule: one Stable Diffusion U-Net call + CFG + sampler update as one module.

    (x, t, context, guidance, coef, prev_x0, eps_hist, saved, noise) -> (x_next, x0, eps_hist_next, saved_next)

context is (2B, 77, D), uncond half first, from the text encoder once per request. CFG is batch
doubling as diffusers does it (u + g (c - u)); the U-Net runs in its own precision (fp16 for
engines) and its output is cast back to fp32 before the update of
tstitch_trt.sampling.sd_samplers. Like StepModule for DiT, it is what gets exported, the torch
backend, and the reference the other backends are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from tstitch_trt.sampling.sd_samplers import HISTORY, C

UNET_STEP_INPUTS = ("x", "t", "context", "guidance", "coef", "prev_x0", "eps_hist", "saved", "noise")
UNET_STEP_OUTPUTS = ("x_next", "x0", "eps_hist_next", "saved_next")
# The roles the runtime binds by (manifest io["roles"]); see runtime/io_roles.py.
UNET_STEP_ROLES = {
    "state": [["x", "x_next"], ["prev_x0", "x0"], ["eps_hist", "eps_hist_next"], ["saved", "saved_next"]],
    "step": ["t", "coef", "noise"],
    "request": ["context", "guidance"],
}


class UNetStepModule(nn.Module):
    def __init__(self, unet: nn.Module):
        """unet: a diffusers UNet2DConditionModel (epsilon prediction)."""
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.channels = int(cfg.in_channels)
        self.sample_size = int(cfg.sample_size)
        self.cross_attention_dim = int(cfg.cross_attention_dim)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def guided_eps(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   guidance: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x_in, x_in], 0).to(self.dtype)
        t2 = torch.cat([t, t], 0)
        out = self.unet(x2, t2, encoder_hidden_states=context.to(self.dtype), return_dict=False)[0].float()
        uncond, cond = out.chunk(2, dim=0)
        return uncond + guidance * (cond - uncond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor,
                coef: torch.Tensor, prev_x0: torch.Tensor, eps_hist: torch.Tensor, saved: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        eps = self.guided_eps(coef[C["c_in"]] * x, t, context, guidance)
        return sd_sampler_update(x, eps, coef, prev_x0, eps_hist, saved, noise)


def sd_sampler_update(
    x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, prev_x0: torch.Tensor, eps_hist: torch.Tensor,
    saved: torch.Tensor, noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear update of sampling/sd_samplers.py, fp32. eps_hist is (B, HISTORY, C, H, W), newest first."""
    c = {name: coef[i] for name, i in C.items()}
    h = [eps_hist[:, j] for j in range(HISTORY)]
    src = c["k_x"] * x + c["k_s"] * saved
    e = c["a0"] * eps + c["a1"] * h[0] + c["a2"] * h[1] + c["a3"] * h[2]
    x0 = c["r"] * src - c["m"] * e
    d = c["d0"] * x0 + c["d1"] * prev_x0
    x_next = c["w_x"] * src + c["w_d"] * d + c["w_e"] * e + c["sigma"] * noise
    p = c["shift"]
    shifted = [eps, h[0], h[1]]
    hist_next = torch.stack([p * new + (1 - p) * old for new, old in zip(shifted, h, strict=True)], dim=1)
    saved_next = c["save"] * x + (1 - c["save"]) * saved
    return x_next, x0, hist_next, saved_next
