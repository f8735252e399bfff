"""`tstitch-trt build`: checkpoints -> a bundle; DiT checkpoints, or diffusers SD / SDXL directories (with a
ControlNet, LCM's guidance embedding, LoRAs) by what --model names. Needs the build extra (torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tstitch_trt.argtypes import int_in, parse_batch_sizes
from tstitch_trt.cli import cache, control
from tstitch_trt.cli.common import require_torch
from tstitch_trt.errors import UserError

NAME = "build"
HELP = "export checkpoints to a bundle of step graphs / engines (needs the build extra)"

SD_ONLY_FLAGS = ("guidance", "lora")  # DiT builds refuse them (and --controlnet: cli/control.py)
DIT_ONLY_FLAGS = ("recipe", "image_size", "num_classes", "latent_channels", "downsample", "vae", "guidance_channels")


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--recipe", help="TOML file with the same settings (command-line flags override it)")
    b.add_argument("--model", action="append", metavar="ARCH=CHECKPOINT|DIR",
                   help="a model to stitch, smallest first, repeated: DiT-S/2=DiT-S-2.pt (CHECKPOINT may be "
                        "random:SEED), or a diffusers SD pipeline / U-Net directory (the last one a full pipeline)")
    b.add_argument("--image-size", type=int_in(1, 16384), help="DiT: image size in pixels (default 256)")
    b.add_argument("--num-classes", type=int_in(1, 1_000_000), help="DiT: class count of the models (default 1000)")
    b.add_argument("--latent-channels", type=int_in(1, 1024), help="DiT: latent channels (default 4)")
    b.add_argument("--downsample", type=int_in(1, 64), help="DiT: VAE factor (default 8; 1 for pixel-space models)")
    b.add_argument("--vae", help="diffusers AutoencoderKL directory (or hub id where a network exists)")
    b.add_argument("--backend", help="comma list of torch, ort, trt, trt-rtx (default torch,ort)")
    b.add_argument("--precision", choices=["fp16", "fp32"], help="engine precision for trt / trt-rtx (default fp16)")
    b.add_argument("--batch-sizes", type=parse_batch_sizes, help="MIN-MAX batch the bundle accepts (default 1-16)")
    b.add_argument("--guidance-channels", help="eps channels that get CFG: '3' (DiT reference) or 'all' (default 3)")
    b.add_argument("--opt-level", type=int_in(0, 5), help="TensorRT builder optimization level 0-5 (default 3)")
    b.add_argument("--timing-cache", help="TensorRT timing cache file, reused and updated")
    b.add_argument("--compute-capabilities", help="TensorRT-RTX target GPUs, e.g. 8.9,12.0 (default: portable set)")
    b.add_argument("--guidance", choices=["auto", "cfg", "embedding"],
                   help="SD: how the step graphs take the guidance scale: cfg (batch doubling), embedding (LCM's "
                        "time_cond_proj_dim, no negative prompt); default auto: embedding if a U-Net has it")
    b.add_argument("--lora", action="append", metavar="SMALL_OR_LARGE=FILE[:SCALE]",
                   help="SD: fuse a LoRA (diffusers/PEFT safetensors) into the first (small) or last (large) --model, "
                        "or the one of that name, before export; SCALE default 1 (repeatable)")
    b.add_argument("--out", help="bundle directory (default engines/NAME); an existing one must be a bundle or empty")
    control.add_build_flags(b)
    cache.add_build_flags(b)


def command(args: argparse.Namespace) -> int:
    require_torch("`tstitch-trt build`")
    from tstitch_trt.models.sd import is_sd_model

    if args.model and any(is_sd_model(m) for m in args.model):
        return build_sd(args)
    return build_dit(args)


# --- DiT: checkpoints (or a recipe) ----------------------------------------------------------------------
def build_dit(args: argparse.Namespace) -> int:
    from tstitch_trt.recipes import build_config_from_args

    for flag in SD_ONLY_FLAGS:
        if getattr(args, flag, None):
            raise UserError(f"--{flag} applies to diffusers (SD) builds, not DiT")
    control.refuse_controlnet_build(args)
    cache.refuse_dit_build(args)
    cfg = build_config_from_args(args)
    from tstitch_trt.export.build import build_bundle
    from tstitch_trt.progress import Stages, peak_rss_bytes
    from tstitch_trt.quiet import quiet_stderr

    with Stages() as stages, quiet_stderr():  # torch's and ONNX Runtime's warnings: the user sees our lines only
        manifest = build_bundle(cfg, stage=stages.stage)
    print(f"wrote bundle {cfg.out} ({', '.join(manifest.backends())}) in {stages.total_seconds:.1f} s, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GB")
    return 0


# --- SD 1.x / SDXL: diffusers directories (ControlNet, LCM guidance, LoRA) -----------------------------------
def build_sd(args: argparse.Namespace) -> int:
    from tstitch_trt.export.lora import parse_lora_spec
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle
    from tstitch_trt.recipes import _batch, _capabilities

    for flag in DIT_ONLY_FLAGS:
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag.replace('_', '-')} does not apply to a diffusers (SD) build: the sizes, VAE and "
                            "text encoder come from the last --model's pipeline")
    cache.refuse_sd_build(args)
    if not args.out:
        raise UserError("give --out DIR for the SD bundle")
    backends = [b.strip() for b in (args.backend or "torch,ort").split(",") if b.strip()]
    cfg = SdBuildConfig(models=list(args.model), out=Path(args.out), backends=backends,
                        precision=args.precision or "fp16", batch_range=args.batch_sizes or _batch("1-4"),
                        opt_level=args.opt_level if args.opt_level is not None else 3, timing_cache=args.timing_cache,
                        compute_capabilities=_capabilities(args.compute_capabilities or ""),
                        guidance=getattr(args, "guidance", None) or "auto",
                        loras=[parse_lora_spec(s) for s in getattr(args, "lora", None) or []],
                        controlnet=getattr(args, "controlnet", None),
                        cache_branch=getattr(args, "cache_branch", None))
    from tstitch_trt.progress import Stages, peak_rss_bytes
    from tstitch_trt.quiet import quiet_stderr

    # diffusers' progress bars, ONNX Runtime's warnings: the user sees our lines only
    with Stages() as stages, quiet_stderr():
        manifest = build_sd_bundle(cfg, stage=stages.stage)
    print(f"wrote bundle {cfg.out} ({', '.join(manifest.backends())}) in {stages.total_seconds:.1f} s, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GB")
    return 0
