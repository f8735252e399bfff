"""UNetStepModule: one Stable Diffusion U-Net call + guidance + sampler update as one module.

    (x, t, context, [text_embeds, time_ids], [control_image, control_guess], guidance,
     coef, prev_x0, eps_hist, saved, noise, [control_scale])
        -> (x_next, x0, eps_hist_next, saved_next)

Conditioning, computed once per request outside the loop: context (N, L, D) from the text
encoder(s); SDXL adds text_embeds (N, P) (the pooled prompt embedding) and time_ids (N, 6). N is
2B under "cfg" guidance (classifier-free guidance by batch doubling as diffusers does it, uncond
half first, u + g (c - u)) and B under "embedding" guidance (LCM: no doubling; a U-Net with
time_cond_proj_dim gets the guidance embedding of g - 1, one without it gets none).

An optional ControlNet runs on the same batch before the U-Net and its residuals feed whichever
U-Net runs the step (as T-Stitch does): control_image (B, 3, 8H, 8W) in [0, 1] is doubled like x
under cfg; control_scale is a per-step row (conditioning scale x diffusers' start/end keep);
control_guess (0 or 1) is diffusers' guess mode (no residuals on the uncond half, residuals
weighted by logspace(-1, 0)).

The U-Net and ControlNet run in their own precision (fp16 for engines), their output is cast back
to fp32 before the update of tstitch_trt.sampling.sd_samplers. Like StepModule for DiT, this is
what gets exported, the torch backend, and the reference the other backends are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tstitch_trt.sampling.sd_samplers import HISTORY, C

GUIDANCE_MODES = ("cfg", "embedding")
UNET_STEP_OUTPUTS = ("x_next", "x0", "eps_hist_next", "saved_next")
UNET_STATE = [["x", "x_next"], ["prev_x0", "x0"], ["eps_hist", "eps_hist_next"], ["saved", "saved_next"]]


@dataclass(frozen=True)
class StepConditions:
    """What a U-Net step graph takes besides the latent, timestep and text context; one per bundle."""

    guidance: str = "cfg"  # GUIDANCE_MODES
    added: bool = False  # SDXL text_embeds + time_ids
    control: bool = False  # a ControlNet inside the step graph

    @property
    def request(self) -> list[str]:
        names = ["context"]
        if self.added:
            names += ["text_embeds", "time_ids"]
        if self.control:
            names += ["control_image", "control_guess"]
        return names + ["guidance"]

    @property
    def step(self) -> list[str]:
        return ["t", "coef", "noise"] + (["control_scale"] if self.control else [])

    @property
    def inputs(self) -> tuple[str, ...]:
        """Graph input order (= UNetStepModule.forward's parameters)."""
        return ("x", "t", *self.request, "coef", "prev_x0", "eps_hist", "saved", "noise",
                *(["control_scale"] if self.control else []))

    @property
    def roles(self) -> dict[str, list]:
        """The manifest's io["roles"] (runtime/io_roles.py)."""
        return {"state": [list(p) for p in UNET_STATE], "step": self.step, "request": self.request}

    @property
    def cond_batch(self) -> str:
        """The symbolic batch of the conditioning tensors and of the U-Net call."""
        return "2B" if self.guidance == "cfg" else "B"


# SD 1.x without a ControlNet: the contract every existing SD bundle records
UNET_STEP_INPUTS = StepConditions().inputs
UNET_STEP_ROLES = StepConditions().roles


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of the guidance weight w (B,) that LCM U-Nets take as timestep_cond
    (diffusers' get_guidance_scale_embedding), fp32."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class UNetStepModule(nn.Module):
    def __init__(self, unet: nn.Module, controlnet: nn.Module | None = None, guidance: str = "cfg"):
        """unet: a diffusers UNet2DConditionModel (epsilon prediction); controlnet: a ControlNetModel."""
        super().__init__()
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode {guidance!r} is not one of {GUIDANCE_MODES}")
        self.unet = unet
        self.controlnet = controlnet
        cfg = unet.config
        self.channels = int(cfg.in_channels)
        self.sample_size = int(cfg.sample_size)
        self.cross_attention_dim = int(cfg.cross_attention_dim)
        self.time_cond_dim = cfg.time_cond_proj_dim  # LCM's guidance embedding width, or None
        added = cfg.addition_embed_type == "text_time"
        self.conditions = StepConditions(guidance, added, controlnet is not None)
        # SDXL: text_embeds width, and time_ids count from the added-embedding input width
        self.text_embeds_dim = int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim) \
            if added else 0
        self.control_channels = int(controlnet.config.conditioning_channels) if controlnet is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def guided_eps(self, x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                   guidance: torch.Tensor, control_scale: torch.Tensor | None = None) -> torch.Tensor:
        """cond: context, and (SDXL) text_embeds, time_ids, and (ControlNet) control_image, control_guess."""
        cfg = self.conditions.guidance == "cfg"
        dt = self.dtype
        x2 = torch.cat([x_in, x_in], 0) if cfg else x_in
        t2 = torch.cat([t, t], 0) if cfg else t
        x2 = x2.to(dt)
        context = cond["context"].to(dt)
        added = None
        if self.conditions.added:
            added = {"text_embeds": cond["text_embeds"].to(dt), "time_ids": cond["time_ids"].to(dt)}
        timestep_cond = None
        if not cfg and self.time_cond_dim is not None:
            w = (guidance - 1).reshape(1).expand(x_in.shape[0])
            timestep_cond = guidance_embedding(w, int(self.time_cond_dim)).to(dt)
        residuals = {}
        if self.controlnet is not None:
            assert control_scale is not None
            residuals = self._control_residuals(x2, t2, context, added, cond, control_scale, cfg)
        out = self.unet(x2, t2, encoder_hidden_states=context, timestep_cond=timestep_cond, added_cond_kwargs=added,
                        return_dict=False, **residuals)[0].float()
        if not cfg:
            return out
        uncond, c = out.chunk(2, dim=0)
        return uncond + guidance * (c - uncond)

    def _control_residuals(self, x2: torch.Tensor, t2: torch.Tensor, context: torch.Tensor,
                           added: dict[str, torch.Tensor] | None, cond: dict[str, torch.Tensor],
                           control_scale: torch.Tensor, cfg: bool) -> dict[str, object]:
        """The ControlNet's residuals, weighted as diffusers' ControlNet pipelines weight them."""
        assert self.controlnet is not None
        image = cond["control_image"]
        image = torch.cat([image, image], 0) if cfg else image
        down, mid = self.controlnet(x2, t2, encoder_hidden_states=context, controlnet_cond=image.to(x2.dtype),
                                    conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        levels = list(down) + [mid]
        guess = cond["control_guess"].float()
        # guess mode: level k weighted by logspace(-1, 0, n)[k] instead of 1 (made on the module's device: the
        # torch backend runs on CUDA too)
        ramp = torch.logspace(-1, 0, len(levels), dtype=torch.float32, device=x2.device)
        weights = control_scale.float() * (1 + guess * (ramp - 1))
        scaled = []
        for k, r in enumerate(levels):
            w = r.float() * weights[k]
            if cfg:  # guess mode under CFG: the uncond half gets no residuals (halves, not a batch-sized mask:
                # a factory sized by the traced batch would freeze it in the exported graph)
                uncond, c = w.chunk(2, dim=0)
                w = torch.cat([uncond * (1 - guess), c], 0)
            scaled.append(w.to(r.dtype))
        return {"down_block_additional_residuals": tuple(scaled[:-1]), "mid_block_additional_residual": scaled[-1]}

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs by position in StepConditions.inputs order (the ONNX export) or by name (the torch backend)."""
        named = dict(zip(self.conditions.inputs, args, strict=False))
        named.update(kwargs)
        cond = {n: named[n] for n in self.conditions.request if n != "guidance"}
        coef, x = named["coef"], named["x"]
        eps = self.guided_eps(coef[C["c_in"]] * x, named["t"], cond, named["guidance"], named.get("control_scale"))
        return sd_sampler_update(x, eps, coef, named["prev_x0"], named["eps_hist"], named["saved"], named["noise"])


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
