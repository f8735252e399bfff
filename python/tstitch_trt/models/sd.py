"""Stable Diffusion 1.x and SDXL parts from diffusers directories: U-Nets, and the large model's shared parts.

A --model is a diffusers pipeline directory (model_index.json), a bare U-Net directory
(config.json of a UNet2DConditionModel), or a hub id where a network exists. As T-Stitch does,
the LAST model must be a full pipeline: it supplies the tokenizer(s), text encoder(s), VAE and
scheduler; of the others only the U-Net is used (SSD-1B's own text encoders are never used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tstitch_trt.errors import UserError, first_line

# model_index.json _class_name -> bundle pipeline kind
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
UNSUPPORTED_KINDS = {"StableDiffusion3Pipeline": "SD 3", "StableDiffusionXLImg2ImgPipeline": "SDXL img2img / refiner",
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
    kind: str | None = None  # PIPELINE_KINDS value of a pipeline, None for a bare U-Net

    @property
    def name(self) -> str:
        return self.root.name or str(self.root)

    def unet_config(self) -> dict[str, Any]:
        return _read_json(self.unet_dir / "config.json")


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
                            "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)")
        if cls not in PIPELINE_KINDS:
            raise UserError(f"{spec}: model_index.json names {cls!r}, not a StableDiffusionPipeline or "
                            "StableDiffusionXLPipeline")
        if index.get("requires_aesthetics_score"):
            raise UserError(f"{spec} requires an aesthetic score (an SDXL refiner); stitch SDXL base-type models "
                            "(SSD-1B -> SDXL base)")
        if not (p / "unet" / "config.json").is_file():
            raise UserError(f"{spec} is a pipeline without unet/config.json; is the download complete?")
        return SdSource(spec, p, p, p / "unet", PIPELINE_KINDS[cls])
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
        first = first_line(e)
        raise UserError(f"--model {spec}: not a local directory, and the hub download failed ({first})") from None


def _read_json(path: Path) -> dict:
    from tstitch_trt.models.preflight import read_json_object

    return read_json_object(path)


def unet_family(config: dict[str, Any]) -> str:
    """"sdxl" for a U-Net with SDXL's added conditions (text_time: pooled text + time ids), else "sd"."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


FAMILY_NAMES = {"sd": "SD 1.x", "sdxl": "SDXL"}


def check_pair(sources: list[SdSource]) -> dict[str, Any]:
    """Refuse models that cannot share one trajectory; returns the shared facts (from the last pipeline).

    Latent channels, cross-attention width (T-Stitch issue #2: SD 2 with BK-SDM is 1024 vs 768) and
    sample size must agree, and the U-Nets must fit the large pipeline's text encoder(s) and VAE.
    SDXL (pipeline kind "sdxl"): every U-Net is of the SDXL family with the same added-condition sizes,
    whose pooled width is text_encoder_2's projection, and the cross-attention width is both encoders'.
    """
    large = sources[-1]
    if large.pipeline is None:
        raise UserError(f"the last --model ({large.spec}) must be a full pipeline (model_index.json): it supplies "
                        "the tokenizer, text encoder, VAE and scheduler")
    kind = large.kind or "sd"
    parts = ("tokenizer", "text_encoder", "vae", "scheduler")
    if kind == "sdxl":
        parts += ("tokenizer_2", "text_encoder_2")
    for part in parts:
        if not (large.pipeline / part).is_dir():
            raise UserError(f"{large.spec} has no {part}/ directory; the last --model must be a complete pipeline")
    text = _read_json(large.pipeline / "text_encoder" / "config.json")
    vae = _read_json(large.pipeline / "vae" / "config.json")
    configs = [s.unet_config() for s in sources]
    for s, c in zip(sources, configs, strict=True):
        fam = unet_family(c)
        if (s.kind is not None and s.kind != kind) or fam != kind:
            what = f"an {FAMILY_NAMES[fam]} U-Net" if fam != kind else f"an {FAMILY_NAMES[str(s.kind)]} pipeline"
            raise UserError(f"{s.name} and {large.name} cannot be stitched: {s.name} is {what}, {large.name} an "
                            f"{FAMILY_NAMES[kind]} pipeline; stitch models of one family")
    for key, what in (("in_channels", "latent channels"), ("cross_attention_dim", "cross-attention width"),
                      ("sample_size", "sample size"), ("projection_class_embeddings_input_dim",
                                                       "added-condition input width (projection_class_embeddings_"
                                                       "input_dim)"),
                      ("addition_time_embed_dim", "time-id embedding width (addition_time_embed_dim)")):
        ref = configs[-1].get(key)
        for s, c in zip(sources, configs, strict=True):
            if c.get(key) != ref:
                raise UserError(f"{s.name} and {large.name} cannot be stitched: {what} {c.get(key)} vs {ref}")
    text_width = int(text.get("hidden_size", 0))
    facts: dict[str, Any] = {}
    if kind == "sdxl":
        facts = _sdxl_facts(large, configs[-1])
        text_width += facts["text_2_width"]
    for s, c in zip(sources, configs, strict=True):
        if c.get("cross_attention_dim") != text_width:
            encoders = "text encoders (text_encoder + text_encoder_2)" if kind == "sdxl" else "text encoder"
            raise UserError(f"{s.name} and {large.name}'s {encoders} cannot be stitched: cross-attention width "
                            f"{c.get('cross_attention_dim')} vs text width {text_width}")
        if c.get("in_channels") != vae.get("latent_channels"):
            raise UserError(f"{s.name} and {large.name}'s VAE cannot be stitched: latent channels "
                            f"{c.get('in_channels')} vs {vae.get('latent_channels')}")
        if c.get("out_channels", c.get("in_channels")) != c.get("in_channels"):
            raise UserError(f"{s.name}: out_channels {c.get('out_channels')} differ from in_channels "
                            f"{c.get('in_channels')}; an epsilon-predicting SD U-Net has the same number")
        if c.get("class_embed_type") or (kind == "sd" and c.get("addition_embed_type")):
            raise UserError(f"{s.name} takes added conditions ({c.get('addition_embed_type') or 'class'}); "
                            "SD 1.x U-Nets take text only")
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        raise UserError(f"{large.name}'s VAE config sets latents_mean / latents_std; only a plain scaling_factor "
                        "is supported")
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "pipeline": kind,
        "latent_channels": int(configs[-1]["in_channels"]),
        "sample_size": int(configs[-1]["sample_size"]),
        "cross_attention_dim": int(configs[-1]["cross_attention_dim"]),
        "text_width": int(text.get("hidden_size", 0)),
        "vae_factor": vae_factor,
        "latent_scale_factor": float(vae.get("scaling_factor", 0.18215)),
        "text_max_length": int(text.get("max_position_embeddings", 77)),
        **facts,
    }


def _sdxl_facts(large: SdSource, unet: dict[str, Any]) -> dict[str, Any]:
    """text_encoder_2's widths, checked against the U-Net's added-condition input, and force_zeros."""
    assert large.pipeline is not None
    text_2 = _read_json(large.pipeline / "text_encoder_2" / "config.json")
    proj = int(text_2.get("projection_dim", 0))
    time_dim = int(unet.get("addition_time_embed_dim") or 0)
    added = int(unet.get("projection_class_embeddings_input_dim") or 0)
    if added != 6 * time_dim + proj:
        raise UserError(f"{large.name}: the U-Net's added-condition input width {added} is not 6 time ids x "
                        f"{time_dim} + text_encoder_2's projection {proj} = {6 * time_dim + proj} (an SDXL refiner "
                        "or an aesthetic-score U-Net?); not supported")
    text = _read_json(large.pipeline / "text_encoder" / "config.json")
    lengths = (int(text.get("max_position_embeddings", 77)), int(text_2.get("max_position_embeddings", 77)))
    if lengths[0] != lengths[1]:
        raise UserError(f"{large.name}: text_encoder and text_encoder_2 take {lengths[0]} vs {lengths[1]} tokens; "
                        "their hidden states are concatenated per token and must have one length")
    index = _read_json(large.pipeline / "model_index.json")
    return {
        "text_2_width": int(text_2.get("hidden_size", 0)),
        "text_2_max_length": int(text_2.get("max_position_embeddings", 77)),
        "text_embeds_dim": proj,
        # diffusers' StableDiffusionXLPipeline registers force_zeros_for_empty_prompt=True by default
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
    }


def load_unet(unet_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot load the U-Net in {unet_dir}: {first}") from None
    return unet.eval()


def load_text_encoder(pipeline: Path, part: str = "text_encoder") -> torch.nn.Module:
    """text_encoder: CLIPTextModel; text_encoder_2 (SDXL): CLIPTextModelWithProjection (pooled text_embeds)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    try:
        return cls.from_pretrained(str(pipeline / part)).eval()
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot load the CLIP text encoder in {pipeline / part}: {first}") from None


_CHUNK = 1 << 24  # elements drawn at once for weights larger than this (64 MB of fp32)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1): tests and timing must not compare zero inits."""
    dev = next(module.parameters()).device  # drawn where the module lives (SDXL-size U-Nets on a GPU)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fill_random_(p, name, gen)
    return module


def fill_random_(p: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """Parameter `name`'s random values, drawn from `gen` into `p` (randomize_'s rule, in its order: a writer that
    streams parameters one by one, models/real_configs.py, draws the same values)."""
    dev = p.device
    with torch.no_grad():
        if p.dim() >= 2 and p.numel() > _CHUNK:  # row blocks: no second full-size copy of a huge weight
            rows = max(1, _CHUNK // p[0].numel())
            for r in range(0, p.shape[0], rows):
                block = p[r:r + rows]
                block.copy_(torch.randn(block.shape, generator=gen, device=dev) / math.sqrt(p[0].numel()))
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, device=dev) / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=dev))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen, device=dev))
    return p
