"""The published architectures of every family, with random weights, written as diffusers directories /
official checkpoints: what only real sizes show (the 2 GB limit, memory, build time, attention over
4,096 tokens, fp16 overflow, bundle size), without downloading a checkpoint (no hub here).

Configs are the published config.json files' architecture fields (cited per constant); fields at
diffusers' defaults are left out. PUBLISHED_PARAMS are the counts the model cards / papers give;
tests/test_real_configs.py counts each config on the meta device (no memory) against them.

    python -m tstitch_trt.models.real_configs sd15-pair OUT      # OUT/bk-sdm-tiny (U-Net), OUT/sd15 (pipeline)
    python -m tstitch_trt.models.real_configs sdxl-pair OUT      # OUT/ssd-1b (U-Net), OUT/sdxl (pipeline)
    python -m tstitch_trt.models.real_configs dit-pair OUT       # OUT/DiT-S-2.safetensors, OUT/DiT-XL-2.safetensors
    python -m tstitch_trt.models.real_configs PART OUT           # one part (see PARTS)

Writing streams: each part is built on the meta device (structure only) and its parameters are drawn one at a
time (models/sd.fill_random_, randomize_'s values in randomize_'s order) straight into its safetensors file, so
writing the SDXL pair holds one parameter at a time (~0.5 GB peak), not the 10.3 GB fp32 SDXL U-Net.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": list(_SD_UP),
}
# nota-ai/bk-sdm-small unet/config.json: SD 1.5 with one residual+attention pair removed per down stage (up
# stages keep two of three: diffusers' up blocks hold layers_per_block + 1) and no mid block
BK_SDM_SMALL_UNET: dict[str, Any] = {**SD15_UNET, "layers_per_block": 1, "mid_block_type": None}
# nota-ai/bk-sdm-tiny unet/config.json: BK-SDM-Small without the innermost (1280, no attention) stage
BK_SDM_TINY_UNET: dict[str, Any] = {
    **BK_SDM_SMALL_UNET, "block_out_channels": [320, 640, 1280], "down_block_types": list(_SD_DOWN[:3]),
    "up_block_types": list(_SD_UP[1:]),
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# segmind/SSD-1B unet/config.json: SDXL with the transformer depth per stage cut from [1, 2, 10] to [1, 2, 4]
# (segmind's SSD-1B card: "transformer layers removed" from each stage). NOT copied from the file (no hub
# here): its count, 1,316.3 M, is 1.1 % below the published 1,331 M; the published file differs somewhere
# in the up path (see PUBLISHED_PARAMS and tests/test_real_configs.py, which pin both numbers).
SSD_1B_UNET: dict[str, Any] = {**SDXL_UNET, "transformer_layers_per_block": [1, 2, 4]}
# latent-consistency/lcm-sdxl unet/config.json: SDXL base's U-Net distilled with LCM's guidance embedding (a
# 256-wide w-embedding projected into the time embedding: +81,920 parameters, no bias), the large model of
# T-Stitch's sdxl_lcm_lora setup (REFERENCE.md: small SSD-1B with lcm-lora-ssd-1b fused)
LCM_SDXL_UNET: dict[str, Any] = {**SDXL_UNET, "time_cond_proj_dim": 256}

UNETS = {"sd15": SD15_UNET, "bk-sdm-tiny": BK_SDM_TINY_UNET, "bk-sdm-small": BK_SDM_SMALL_UNET, "sdxl": SDXL_UNET,
         "ssd-1b": SSD_1B_UNET, "lcm-sdxl": LCM_SDXL_UNET}

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14's text tower; SDXL's text_encoder too)
CLIP_L_TEXT: dict[str, Any] = {
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14, with projection)
OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
    "num_hidden_layers": 32, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1280,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# runwayml/stable-diffusion-v1-5 vae/config.json
SD_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: the SD VAE's architecture, its own scale, and
# force_upcast (it overflows in fp16; the build's fp16 probe decides on this real architecture)
SDXL_VAE: dict[str, Any] = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# lllyasviel/sd-controlnet-canny config.json
SD15_CONTROLNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768, "down_block_types": list(_SD_DOWN), "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32,
}
# latent-consistency/lcm-lora-ssd-1b adapter_config.json: rank 64, alpha 64, on the modules
# diffusers' train_lcm_distill_lora_sdxl.py adapts (its lora target list): with these, rank 64 counts 67.3 M on SD
# 1.5, 104.7 M on the SSD-1B config here and 196.8 M on SDXL against the LCM-LoRA paper's 67.5 M / 105 M / 197 M
# (Luo et al. 2023, arXiv 2311.05556, Table 1); the attention projections alone would be 42 M on SSD-1B
LCM_LORA_SSD_1B = {"rank": 64, "alpha": 64}
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json is models/sd_random.SD15_SCHEDULER;
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json:
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

# Published parameter counts, in millions (model cards, papers; DiT: Peebles & Xie 2023, Table 1 of
# facebookresearch/DiT counts with 1000 classes, learned sigma)
PUBLISHED_PARAMS = {
    "sd15": 859.5, "bk-sdm-tiny": 323.4, "bk-sdm-small": 482.3, "sdxl": 2567.5, "ssd-1b": 1331.0,
    "clip-l": 123.1, "openclip-bigg": 694.7, "sd-vae": 83.7, "sd-controlnet": 361.3, "DiT-S/2": 33.0,
    "DiT-XL/2": 675.1,
}
# LoRA parameter counts at LCM_LORA_SSD_1B's rank (LCM-LoRA paper, Table 1), by the U-Net they adapt
PUBLISHED_LORA_PARAMS = {"sd15": 67.5, "ssd-1b": 105.0, "sdxl": 197.0}


def unet_meta(name: str) -> torch.nn.Module:
    """The U-Net `name` (UNETS) on the meta device: its structure and parameter count, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**UNETS[name])


def meta_part(part: str) -> torch.nn.Module:
    """Any part of PUBLISHED_PARAMS on the meta device."""
    if part in UNETS:
        return unet_meta(part)
    from diffusers import AutoencoderKL, ControlNetModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tstitch_trt.models.dit import DiT, dit_config

    with torch.device("meta"):
        if part == "clip-l":
            return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        if part == "openclip-bigg":
            return CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT))
        if part == "sd-vae":
            return AutoencoderKL(**SD_VAE)
        if part == "sd-controlnet":
            return ControlNetModel(**SD15_CONTROLNET)
        if part.startswith("DiT-"):
            return DiT(dit_config(part, input_size=32, num_classes=1000))
    raise ValueError(f"unknown part {part!r}; one of {', '.join(PUBLISHED_PARAMS)}")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _materialize(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Built on the meta device (no init cost), given memory, then every parameter drawn (randomize_):
    one copy of the weights, never two."""
    from tstitch_trt.models.sd import randomize_

    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    for name, buf in module.named_buffers():  # buffers (position ids) are not parameters: rebuild them
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return randomize_(module, seed).eval()


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def stream_random(factory: Callable[[], torch.nn.Module], out: Path, seed: int) -> Path:
    """The module `factory` builds, saved as its library's save_pretrained would (config.json + one safetensors
    file) with _materialize's random weights, written one parameter at a time: never the whole module in memory.
    diffusers models (ConfigMixin) write diffusion_pytorch_model.safetensors, transformers ones model.safetensors."""
    with torch.device("meta"):
        module = factory()
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(str(out))
        weights = out / "diffusion_pytorch_model.safetensors"
    else:  # transformers: save_pretrained names the class in the config
        module.config.architectures = [type(module).__name__]
        module.config.save_pretrained(str(out))
        weights = out / "model.safetensors"
    stream_weights(module, weights, seed)
    return out


def stream_weights(module: torch.nn.Module, weights: Path, seed: int) -> Path:
    """The meta-device `module`'s parameters (and rebuildable buffers) as one safetensors file, _materialize's random
    values drawn and written one parameter at a time."""
    from tstitch_trt.models.sd import fill_random_

    params = dict(module.named_parameters())
    state = module.state_dict()  # parameters and persistent buffers, as save_pretrained would write them
    for name in state:
        if name not in params and not name.endswith("position_ids"):
            raise RuntimeError(f"internal error: {type(module).__name__} has a persistent buffer {name} this writer "
                               "cannot rebuild")
    if set(params) - set(state):
        raise RuntimeError(f"internal error: {type(module).__name__} has tied parameters; this writer writes none")
    names = list(params) + [n for n in state if n not in params]  # parameters in randomize_'s order
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    tmp = weights.with_name(weights.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            meta = state[name]
            if name in params:
                t = fill_random_(torch.empty(meta.shape, dtype=meta.dtype), name, gen)
            else:  # position ids: 0 .. n-1, as _materialize rebuilds them
                t = torch.arange(meta.shape[-1], dtype=meta.dtype).expand(meta.shape).contiguous()
            f.write(memoryview(t.numpy()).cast("B"))
            del t
    tmp.replace(weights)
    return weights


def write_unet(name: str, out: Path, seed: int = 0) -> Path:
    from diffusers import UNet2DConditionModel

    return stream_random(lambda: UNet2DConditionModel(**UNETS[name]), out, seed)


def write_controlnet(out: Path, seed: int = 11) -> Path:
    from diffusers import ControlNetModel

    return stream_random(lambda: ControlNetModel(**SD15_CONTROLNET), out, seed)


def write_pipeline(kind: str, out: Path, unet: str | None = None, seed: int = 0) -> Path:
    """A full diffusers pipeline directory at the published architecture: kind "sd15" (StableDiffusionPipeline:
    U-Net `unet` or SD 1.5, CLIP-L, SD VAE, PNDM, the real CLIP tokenizer) or "sdxl"
    (StableDiffusionXLPipeline: SDXL U-Net, CLIP-L + OpenCLIP-bigG, SDXL VAE, Euler, both tokenizers).
    Written part by part: model_index.json names them, as save_pretrained would."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tstitch_trt.models.sd_random import SD15_SCHEDULER, write_clip_tokenizer

    sdxl = kind == "sdxl"
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"pipeline kind {kind!r}: sd15 or sdxl")
    out.mkdir(parents=True, exist_ok=True)
    write_unet(unet or kind, out / "unet", seed)
    vae_cfg = SDXL_VAE if sdxl else SD_VAE
    stream_random(lambda: AutoencoderKL(**vae_cfg), out / "vae", seed + 1)
    stream_random(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), out / "text_encoder", seed + 2)
    tok_src = write_clip_tokenizer(out / ".clip-vocab")
    tok = CLIPTokenizer.from_pretrained(str(tok_src))
    tok.save_pretrained(str(out / "tokenizer"))
    index: dict[str, Any] = {
        "_diffusers_version": _diffusers_version(), "feature_extractor": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    scheduler = SDXL_SCHEDULER if sdxl else SD15_SCHEDULER
    if sdxl:
        stream_random(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
                      out / "text_encoder_2", seed + 3)
        tok2 = CLIPTokenizer.from_pretrained(str(tok_src), pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        tok2.save_pretrained(str(out / "tokenizer_2"))
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "scheduler": ["diffusers", "EulerDiscreteScheduler"]})
        del index["feature_extractor"]
    else:
        index.update({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                      "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"]})
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    import shutil

    shutil.rmtree(tok_src)
    return out


def write_dit(arch: str, out: Path, seed: int = 0) -> Path:
    """A DiT checkpoint in facebookresearch/DiT's keys at 256 px, 1000 classes, as models/checkpoints.save_dit
    writes it (a safetensors state dict: name `out` *.safetensors, which is how build reads it), streamed: DiT-XL/2's
    2.7 GB are never held (_materialize's values)."""
    from tstitch_trt.models.dit import DiT, dit_config

    with torch.device("meta"):
        net = DiT(dit_config(arch, input_size=32, num_classes=1000))
    out.parent.mkdir(parents=True, exist_ok=True)
    return stream_weights(net, out, seed)


def lora_shapes(unet: torch.nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The LCM-LoRA's tensors for `unet` (any device, meta included), diffusers' format of the LCM-LoRA release
    (train_lcm_distill_lora_*.py: PEFT state -> convert_state_dict_to_diffusers -> save_lora_weights):
    "unet.MODULE.lora.down.weight" (rank, in[, kh, kw]) and "unet.MODULE.lora.up.weight" (out, rank[, 1, 1]).
    Convolutions get a kh x kw down convolution and a 1x1 up one, as PEFT's Conv2d LoRA does."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, m in unet.named_modules():
        if not name.endswith(LCM_LORA_TARGETS) or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight
        tail = tuple(w.shape[2:])
        shapes[f"unet.{name}.lora.down.weight"] = (rank, w.shape[1], *tail)
        shapes[f"unet.{name}.lora.up.weight"] = (w.shape[0], rank, *(1,) * len(tail))
    return shapes


def write_lcm_lora(unet: str | dict[str, Any], out: Path, seed: int = 5, rank: int = LCM_LORA_SSD_1B["rank"]
                   ) -> Path:
    """A LoRA of the LCM-LoRA release's format and rank for the U-Net `unet` (a UNETS name or a config), random
    fp16 weights (the release is fp16), as OUT/pytorch_lora_weights.safetensors. alpha = rank (LCM_LORA_SSD_1B),
    so the file carries no alphas: diffusers then scales by 1, as it does the release."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        net = UNet2DConditionModel(**(UNETS[unet] if isinstance(unet, str) else unet))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in lora_shapes(net, rank).items():
        fan_in = int(torch.tensor(shape[1:]).prod())
        # small enough that the fused U-Net stays finite, large enough to change it (PEFT zero-inits "up")
        state[key] = (torch.randn(shape, generator=gen) / fan_in**0.5 * (0.1 if ".up." in key else 1.0)).half()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


PARTS = {
    "sd15-pair": lambda out: (write_unet("bk-sdm-tiny", out / "bk-sdm-tiny", 1), write_pipeline("sd15", out / "sd15")),
    "bk-sdm-small": lambda out: write_unet("bk-sdm-small", out, 2),
    "sdxl-pair": lambda out: (write_unet("ssd-1b", out / "ssd-1b", 1), write_pipeline("sdxl", out / "sdxl")),
    # the SD 1.5 pipeline alone, for pairs that reuse it (BK-SDM-Small -> SD 1.5; the ControlNet pair)
    "sd15-pipeline": lambda out: write_pipeline("sd15", out),
    # an SD 1.5-architecture U-Net with other weights (seed 3): the small model of the ControlNet pair, since
    # BK-SDM's U-Nets lack SD 1.5's skips and cannot take its ControlNet (docs/sd.md#controlnet)
    "sd15-unet": lambda out: write_unet("sd15", out, 3),
    "sd15-controlnet": lambda out: write_controlnet(out),
    "lcm-lora-ssd-1b": lambda out: write_lcm_lora("ssd-1b", out),
    # T-Stitch's LCM pair: SSD-1B (the sdxl-pair's, same seed) + lcm-lora-ssd-1b -> an SDXL pipeline whose U-Net
    # is LCM-SDXL's (the release is a U-Net that users put into SDXL base's pipeline)
    "ssd-1b": lambda out: write_unet("ssd-1b", out, 1),
    "lcm-sdxl-pipeline": lambda out: write_pipeline("sdxl", out, unet="lcm-sdxl"),
    "dit-pair": lambda out: (write_dit("DiT-S/2", out / "DiT-S-2.safetensors", 1),
                             write_dit("DiT-XL/2", out / "DiT-XL-2.safetensors")),
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tstitch_trt.models.real_configs",
                                description="write real-architecture parts with random weights")
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    PARTS[args.part](args.out)
    print(f"wrote {args.part} under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
