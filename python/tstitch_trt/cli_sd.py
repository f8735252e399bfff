"""The text-to-image (SD) side of `tstitch-trt build | run | info`; cli.py dispatches here by bundle kind.

User errors are UserError (one line, exit 2, nothing half-written), as in cli.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tstitch_trt.cli_control import RUN_FLAGS as CONTROL_RUN_FLAGS
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import defaults

DIT_ONLY_RUN_FLAGS = ("class_labels",)
SD_ONLY_RUN_FLAGS = ("prompt", "negative_prompt", "num_images", "height", "width", "original_size", "crop_coords",
                     "target_size", *CONTROL_RUN_FLAGS)


def refuse_sd_flags(args: argparse.Namespace) -> None:
    """A DiT (class-conditional) bundle: prompts and sizes do not apply."""
    for name in SD_ONLY_RUN_FLAGS:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to text-to-image (sd) bundles; this bundle is class-conditional (DiT): "
                            "use --class-labels")


def cmd_run_sd(args: argparse.Namespace, bundle: Path, manifest) -> int:  # manifest: Manifest
    from tstitch_trt.cli import load_init_noise
    from tstitch_trt.outputs import IMAGE_FORMATS, OutputPlan, save_image
    from tstitch_trt.pipeline.dit import image_grid
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    if args.class_labels is not None:
        raise UserError("--class-labels applies to class-conditional (DiT) bundles; this is a text-to-image (sd) "
                        "bundle: give --prompt")
    if args.prompt is None:
        raise UserError("this is a text-to-image (sd) bundle: give --prompt TEXT")
    # every output is checked before any work (cli.cmd_run does the same for DiT)
    outputs = OutputPlan()
    outputs.add("--out", args.out or f"tstitch-{bundle.resolve().name}.png", tuple(IMAGE_FORMATS))
    if args.save_latents:
        outputs.add("--save-latents", args.save_latents, (".npy",))
    if args.report:
        outputs.add("--report", args.report)
    init = load_init_noise(args.init_noise) if args.init_noise else None
    from tstitch_trt.cli_control import control_request

    control = control_request(args, manifest.controlnet is not None)
    num_images = args.num_images if args.num_images is not None else 1
    pipe = StitchedSDPipeline.from_bundle(bundle, backend=args.backend, device=args.device)
    try:
        ratio, fractions = defaults.default_stitch(len(manifest.models), args.ratio, args.fractions)
        res = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=num_images, ratio=ratio,
                   fractions=fractions, steps=args.steps, sampler=args.sampler,
                   cfg_scale=args.cfg_scale, seed=args.seed,  # None: the kind's / sampler's default
                   height=args.height, width=args.width, eta=args.eta, init_noise=init, progress=args.progress,
                   control=control, **sdxl_time_id_args(args))
    finally:
        pipe.close()
    rep = res.report
    writers = {}
    if args.save_latents:
        writers["--save-latents"] = lambda p: np.save(p, res.latents)
    if res.images is not None:
        from PIL import Image

        # one image is written as is (same pixels as diffusers' output); more as a grid
        grid = res.images[0] if len(res.images) == 1 else image_grid(res.images, nrow=min(len(res.images), 4))
        writers["--out"] = lambda p: save_image(Image.fromarray(grid), p, outputs.paths["--out"])
    if args.report:
        writers["--report"] = lambda p: Path(p).write_text(json.dumps(rep, indent=2))
    outputs.write(writers)
    per_model = ", ".join(f"{n} {name}" for n, name in zip(rep["steps_per_model"], rep["models"], strict=True))
    print(f"{rep['steps']} {rep['sampler']} steps = {rep['unet_calls']} U-Net calls ({per_model}) on {rep['backend']} "
          f"[{rep['device']}], batch {rep['batch']}, {rep['height']}x{rep['width']}: {rep['total_seconds']:.2f} s")
    for flag in ("--out", "--save-latents", "--report"):
        if flag in writers:
            print(f"wrote {outputs.paths[flag].resolve()}")
    for note in rep["notes"]:
        print(f"note: {note}")
    return 0


def sdxl_time_id_args(args: argparse.Namespace) -> dict:
    """--original-size / --crop-coords / --target-size, given ones only (the pipeline refuses them off SDXL)."""
    given = {"original_size": getattr(args, "original_size", None), "crop_coords": getattr(args, "crop_coords", None),
             "target_size": getattr(args, "target_size", None)}
    return {k: tuple(v) for k, v in given.items() if v is not None}


def cmd_build_sd(args: argparse.Namespace) -> int:
    from tstitch_trt.export.lora import parse_lora_spec
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle
    from tstitch_trt.recipes import _batch, _capabilities

    for flag in ("recipe", "image_size", "num_classes", "latent_channels", "downsample", "vae", "guidance_channels"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag.replace('_', '-')} does not apply to a diffusers (SD) build: the sizes, VAE and "
                            "text encoder come from the last --model's pipeline")
    if not args.out:
        raise UserError("give --out DIR for the SD bundle")
    backends = [b.strip() for b in (args.backend or "torch,ort").split(",") if b.strip()]
    cfg = SdBuildConfig(models=list(args.model), out=Path(args.out), backends=backends,
                        precision=args.precision or "fp16", batch_range=args.batch_sizes or _batch("1-4"),
                        opt_level=args.opt_level if args.opt_level is not None else 3, timing_cache=args.timing_cache,
                        compute_capabilities=_capabilities(args.compute_capabilities or ""),
                        guidance=getattr(args, "guidance", None) or "auto",
                        loras=[parse_lora_spec(s) for s in getattr(args, "lora", None) or []],
                        controlnet=getattr(args, "controlnet", None))
    from tstitch_trt.progress import Stages, peak_rss_bytes

    with Stages() as stages:
        manifest = build_sd_bundle(cfg, stage=stages.stage)
    print(f"wrote bundle {cfg.out} ({', '.join(manifest.backends())}) in {stages.total_seconds:.1f} s, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GB")
    return 0


def describe_sd_bundle(bundle: Path, m) -> str:  # m: Manifest
    from tstitch_trt.sampling.sd_samplers import SCHEDULER_CLASSES

    c, h, w = m.latent_shape
    sched = m.scheduler or {}
    default = SCHEDULER_CLASSES.get(str(sched.get("_class_name")), "none: pass --sampler")
    te = m.text_encoder or {}
    lines = [
        f"bundle {bundle}: text-to-image ({m.pipeline}), {len(m.models)} U-Nets in stitch order (smallest first)",
        f"  latent {c}x{h}x{w} by default ({m.image_size}px), VAE scale factor {m.latent_scale_factor}",
        f"  scheduler {sched.get('_class_name')} (default sampler {default}), "
        f"{sched.get('beta_schedule')} over {sched.get('num_train_timesteps')} timesteps",
        f"  text encoder {te.get('kind')} ({te.get('hidden_state')} hidden state): {', '.join(te.get('engines', {}))}",
        f"  guidance {m.guidance_mode}" + (" (LCM's guidance embedding: prompts only, no negative prompt)"
                                           if m.guidance_mode == "embedding" else " (classifier-free, batch doubled)"),
    ]
    if m.text_encoder_2:
        te2, cond = m.text_encoder_2, m.conditioning or {}
        lines.append(f"  text encoder 2 {te2.get('kind')} ({te2.get('hidden_state')} hidden state, pooled text_embeds "
                     f"{cond.get('text_embeds_dim')}): {', '.join(te2.get('engines', {}))}")
        lines.append(f"  SDXL conditioning: time ids (original size, crop, target size), "
                     f"force_zeros_for_empty_prompt {cond.get('force_zeros_for_empty_prompt')}")
    for i, model in enumerate(m.models):
        a = model.arch
        lines.append(f"  [{i}] {model.name}: U-Net blocks {a.get('block_out_channels')}, layers/block "
                     f"{a.get('layers_per_block')}, mid block {a.get('mid_block_type', 'UNetMidBlock2DCrossAttn')}, "
                     f"cross-attention {a.get('cross_attention_dim')}"
                     + (f", guidance embedding {a['time_cond_proj_dim']}" if a.get("time_cond_proj_dim") else ""))
        for lora in model.lora or []:
            lines.append(f"      LoRA fused: {lora['source']} (scale {lora['scale']:g})")
        for kind, e in model.engines.items():
            lo, hi = e.batch_range
            lines.append(f"      {kind:8s} {e.file} ({e.precision}, batch {lo}-{hi})")
    lines.append(f"  VAE: {', '.join(m.vae['engines']) if m.vae else 'none'}")
    lines += [f"    {note}" for note in (m.vae or {}).get("notes", [])]
    if m.controlnet:
        net = m.controlnet
        lines.append(f"  ControlNet ({net['family']}, {net['conditioning_channels']}-channel image) inside every U-Net "
                     f"step graph, from {net.get('source', '?')}: run with --control-image FILE")
    lines.append(f"  backends usable for the whole set: {', '.join(m.backends()) or 'none'}")
    return "\n".join(lines)
