"""Stable Diffusion 1.x parts from diffusers directories: U-Nets, and the large model's shared parts.

A --model is a diffusers pipeline directory (model_index.json), a bare U-Net directory
(config.json of a UNet2DConditionModel), or a hub id where a network exists. As T-Stitch does,
the LAST model must be a full pipeline: it supplies the tokenizer, text encoder, VAE and
scheduler; of the others only the U-Net is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tstitch_trt.errors import UserError

PIPELINE_KINDS = {"StableDiffusionPipeline": "sd"}  # model_index.json _class_name -> bundle pipeline kind
UNSUPPORTED_KINDS = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD 3",
                     "StableDiffusionControlNetPipeline": "ControlNet"}
# SD 1.x LCM pipelines (LatentConsistencyModelPipeline) ship the same parts; their U-Net takes LCM's guidance embedding
PIPELINE_KINDS["LatentConsistencyModelPipeline"] = "sd"


@dataclass(frozen=True)
class SdSource:
    """One --model: where its U-Net is, and (pipelines) the directory with the shared parts."""

    spec: str  # as given
    root: Path
    pipeline: Path | None  # the pipeline directory, None for a bare U-Net
    unet_dir: Path

    @property
    def name(self) -> str:
        return self.root.name or str(self.root)

    def unet_config(self) -> dict[str, Any]:
        return json.loads((self.unet_dir / "config.json").read_text())


def is_sd_model(spec: str) -> bool:
    """True where --model names a diffusers directory or hub id (the SD build), not ARCH=CHECKPOINT (DiT).

    A bare DiT architecture name (a forgotten =CHECKPOINT) stays with the DiT build and its error."""
    from tstitch_trt.models.dit import dit_arch_names

    return "=" not in spec and spec.strip() not in dit_arch_names()


def resolve_source(spec: str) -> SdSource:
    p = Path(spec)
    if not p.exists():
        p = _from_hub(spec)
    if (p / "model_index.json").is_file():
        index = _read_json(p / "model_index.json")
        cls = str(index.get("_class_name", ""))
        if cls in UNSUPPORTED_KINDS:
            raise UserError(f"{spec} is a {UNSUPPORTED_KINDS[cls]} pipeline ({cls}); this build stitches SD 1.x "
                            "(StableDiffusionPipeline) only")
        if cls not in PIPELINE_KINDS:
            raise UserError(f"{spec}: model_index.json names {cls!r}, not a StableDiffusionPipeline")
        if not (p / "unet" / "config.json").is_file():
            raise UserError(f"{spec} is a pipeline without unet/config.json; is the download complete?")
        return SdSource(spec, p, p, p / "unet")
    if (p / "config.json").is_file():
        cfg = _read_json(p / "config.json")
        if cfg.get("_class_name") != "UNet2DConditionModel":
            raise UserError(f"{spec}/config.json describes {cfg.get('_class_name')!r}, not a UNet2DConditionModel")
        return SdSource(spec, p, None, p)
    raise UserError(f"{spec} is neither a diffusers pipeline (model_index.json) nor a U-Net directory (config.json)")


def _from_hub(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--model {spec}: not a local directory, and the hub download failed ({first})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def check_pair(sources: list[SdSource]) -> dict[str, Any]:
    """Refuse models that cannot share one trajectory; returns the shared facts (from the last pipeline).

    Latent channels, cross-attention width (T-Stitch issue #2: SD 2 with BK-SDM is 1024 vs 768) and
    sample size must agree, and the U-Nets must fit the large pipeline's text encoder and VAE.
    """
    large = sources[-1]
    if large.pipeline is None:
        raise UserError(f"the last --model ({large.spec}) must be a full pipeline (model_index.json): it supplies "
                        "the tokenizer, text encoder, VAE and scheduler")
    for part in ("tokenizer", "text_encoder", "vae", "scheduler"):
        if not (large.pipeline / part).is_dir():
            raise UserError(f"{large.spec} has no {part}/ directory; the last --model must be a complete pipeline")
    text = _read_json(large.pipeline / "text_encoder" / "config.json")
    vae = _read_json(large.pipeline / "vae" / "config.json")
    configs = [s.unet_config() for s in sources]
    for key, what in (("in_channels", "latent channels"), ("cross_attention_dim", "cross-attention width"),
                      ("sample_size", "sample size")):
        ref = configs[-1].get(key)
        for s, c in zip(sources, configs, strict=True):
            if c.get(key) != ref:
                raise UserError(f"{s.name} and {large.name} cannot be stitched: {what} {c.get(key)} vs {ref}")
    for s, c in zip(sources, configs, strict=True):
        if c.get("cross_attention_dim") != text.get("hidden_size"):
            raise UserError(f"{s.name} and {large.name}'s text encoder cannot be stitched: cross-attention width "
                            f"{c.get('cross_attention_dim')} vs text width {text.get('hidden_size')}")
        if c.get("in_channels") != vae.get("latent_channels"):
            raise UserError(f"{s.name} and {large.name}'s VAE cannot be stitched: latent channels "
                            f"{c.get('in_channels')} vs {vae.get('latent_channels')}")
        if c.get("out_channels", c.get("in_channels")) != c.get("in_channels"):
            raise UserError(f"{s.name}: out_channels {c.get('out_channels')} differ from in_channels "
                            f"{c.get('in_channels')}; an epsilon-predicting SD U-Net has the same number")
        if c.get("addition_embed_type") or c.get("class_embed_type"):
            raise UserError(f"{s.name} takes added conditions ({c.get('addition_embed_type') or 'class'}); "
                            "SD 1.x U-Nets take text only")
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "latent_channels": int(configs[-1]["in_channels"]),
        "sample_size": int(configs[-1]["sample_size"]),
        "cross_attention_dim": int(configs[-1]["cross_attention_dim"]),
        "vae_factor": vae_factor,
        "latent_scale_factor": float(vae.get("scaling_factor", 0.18215)),
        "text_max_length": int(text.get("max_position_embeddings", 77)),
    }


def load_unet(unet_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the U-Net in {unet_dir}: {first}") from None
    return unet.eval()


def load_text_encoder(pipeline: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    try:
        return CLIPTextModel.from_pretrained(str(pipeline / "text_encoder")).eval()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the CLIP text encoder in {pipeline / 'text_encoder'}: {first}") from None


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1): tests and timing must not compare zero inits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return module
