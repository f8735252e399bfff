"""The ControlNet of `build --controlnet`: where it is, whether it fits the stitched U-Nets, loading it.

A --controlnet is a diffusers ControlNetModel directory (config.json), a pipeline directory with a
controlnet/ folder, or a hub id where a network exists. One ControlNet feeds whichever U-Net runs
a step (T-Stitch's rule), so it must fit EVERY U-Net of the bundle: same family (SD 1.x or SDXL),
text width, latent channels, SDXL added-condition sizes, and the same residual layout (the U-Net
adds the ControlNet's residuals to its own skip connections one by one; diffusers zips the two
lists, so a mismatch would be silently truncated or fail deep inside the U-Net).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tstitch_trt.errors import UserError, first_line

FAMILIES = ("sd", "sdxl")


@dataclass(frozen=True)
class ControlNetSource:
    spec: str  # as given
    root: Path  # the ControlNetModel directory (config.json + weights)
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return Path(self.spec).name or self.spec

    @property
    def family(self) -> str:
        return family_of(self.config)

    @property
    def conditioning_channels(self) -> int:
        return int(self.config.get("conditioning_channels", 3))


def family_of(config: dict[str, Any]) -> str:
    """"sdxl" for a model with SDXL's added conditions (text_embeds + time_ids), else "sd"."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def resolve_controlnet(spec: str) -> ControlNetSource:
    p = Path(spec)
    if not p.exists():
        p = _from_hub(spec)
    if not (p / "config.json").is_file() and (p / "controlnet" / "config.json").is_file():
        p = p / "controlnet"  # a ControlNet pipeline directory
    if not (p / "config.json").is_file():
        raise UserError(f"--controlnet {spec}: no config.json there; give a diffusers ControlNetModel directory")
    from tstitch_trt.models.preflight import read_json_object

    config = read_json_object(p / "config.json", f"--controlnet {spec}: {p / 'config.json'}")
    if config.get("_class_name") != "ControlNetModel":
        raise UserError(f"--controlnet {spec}: config.json describes {config.get('_class_name')!r}, not a "
                        "diffusers ControlNetModel")
    return ControlNetSource(spec, p, config)


def _from_hub(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        first = first_line(e)
        raise UserError(f"--controlnet {spec}: not a local directory, and the hub download failed ({first})") from None


def residual_layout(config: dict[str, Any]) -> list[str]:
    """The skip residuals a U-Net (or ControlNet) down path makes, as "channels/downsampling": conv_in, each
    resnet of each down block, each downsampler, then the mid block's output."""
    channels = list(config["block_out_channels"])
    n = len(channels)
    per_block = config.get("layers_per_block", 2)
    layers = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n
    out = [(channels[0], 0)]
    for i in range(n):
        out += [(channels[i], i)] * int(layers[i])
        if i < n - 1:
            out.append((channels[i], i + 1))
    out.append((channels[-1], n - 1))
    return [f"{c}/{2 ** level}" for c, level in out]


def check_controlnet(net: ControlNetSource, unets: list[tuple[str, dict[str, Any]]], vae_factor: int) -> None:
    """Refuse a ControlNet that cannot feed every U-Net (name, config): one line naming both values."""
    c = net.config
    for name, u in unets:
        if family_of(c) != family_of(u):
            raise UserError(f"--controlnet {net.name} is an {family_of(c).upper()} ControlNet (addition_embed_type "
                            f"{c.get('addition_embed_type')}) but {name} is an {family_of(u).upper()} U-Net "
                            f"(addition_embed_type {u.get('addition_embed_type')}); use a ControlNet of the U-Nets' "
                            "family")
        for key, what in (("cross_attention_dim", "cross-attention width"), ("in_channels", "latent channels"),
                          ("projection_class_embeddings_input_dim", "added-condition width"),
                          ("addition_time_embed_dim", "time-id embedding width")):
            if c.get(key) != u.get(key):
                raise UserError(f"--controlnet {net.name} does not fit {name}: {what} ({key}) {c.get(key)} vs "
                                f"{u.get(key)}")
        mine, theirs = residual_layout(c), residual_layout(u)
        if mine != theirs:
            raise UserError(f"--controlnet {net.name} does not fit {name}: its residuals (channels/downsampling) "
                            f"{' '.join(mine)} vs the U-Net's skips {' '.join(theirs)}; every stitched U-Net must "
                            "have the ControlNet's down-block layout")
    if c.get("global_pool_conditions"):
        raise UserError(f"--controlnet {net.name} pools its conditions (global_pool_conditions, a shuffle-style "
                        "ControlNet); it is not supported, use a spatial ControlNet")
    embed = c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    factor = 2 ** (len(embed) - 1)
    if factor != vae_factor:
        raise UserError(f"--controlnet {net.name} downsamples its image {factor}x "
                        f"(conditioning_embedding_out_channels {list(embed)}) but the VAE's factor is {vae_factor}")
    if net.conditioning_channels != 3:
        raise UserError(f"--controlnet {net.name} takes {net.conditioning_channels}-channel conditions; `run "
                        "--control-image` gives an RGB image (3 channels)")
    if c.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
        raise UserError(f"--controlnet {net.name}: unknown controlnet_conditioning_channel_order "
                        f"{c.get('controlnet_conditioning_channel_order')!r}")


def load_controlnet(root: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import ControlNetModel

    try:
        net = ControlNetModel.from_pretrained(str(root), torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot load the ControlNet in {root}: {first}") from None
    return net.eval()
