"""`tstitch-trt run`: sample images with a bundle; DiT (class labels) or SD / SDXL (prompts, ControlNet, LCM)
by the bundle's kind. Every output is checked before any work: a run never fails at the end for a path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tstitch_trt.argtypes import MAX_SEED, finite, int_in, non_negative, parse_fractions, parse_labels, unit
from tstitch_trt.cli import cache, control
from tstitch_trt.cli.common import one_line
from tstitch_trt.demo import DEMO_NAME as DEMO
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import defaults

NAME = "run"
HELP = "sample images with a bundle (default: the built-in demo pair)"

DIT_ONLY_FLAGS = ("class_labels",)
SD_ONLY_FLAGS = ("prompt", "negative_prompt", "num_images", "height", "width", "original_size", "crop_coords",
                 "target_size", *control.RUN_FLAGS)


def add_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo'")
    r.add_argument("--backend", default="auto", help="auto, trt, trt-rtx, ort, openvino, torch")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="CPU backends (openvino), every part (models; SD: U-Nets, text encoders, VAE): bf16 needs a "
                        "CPU with native bf16; auto uses it only where the bundle records it as safe on this CPU's "
                        "bf16 ISA (tstitch-trt check --precision bf16 --record)")
    r.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "dpm-solver++", "pndm", "euler", "lcm"],
                   help="DiT: ddim, ddpm, dpm-solver++ (default ddim); SD: pndm, ddim, euler, dpm-solver++, lcm "
                        "(default: the bundle's scheduler)")
    r.add_argument("--steps", type=int_in(1, 100_000), default=None,
                   help=f"sampling steps (default {defaults.DEFAULT_STEPS}; lcm {defaults.DEFAULT_LCM_STEPS})")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=unit, default=None,
                   help="share of early steps on the small model, 0..1 (default 0.4 with two models)")
    g.add_argument("--fractions", type=parse_fractions,
                   help="one share per model in stitch order, summing to 1 (default: equal shares with 3+ models)")
    r.add_argument("--cfg-scale", type=finite, default=None, help="classifier-free guidance scale (default: DiT 1.5, "
                                                                   "SD 7.5, SDXL 5.0, --sampler lcm 8.5, or 1 where "
                                                                   "a U-Net lacks LCM's guidance embedding)")
    r.add_argument("--eta", type=non_negative, default=defaults.DEFAULT_ETA, help="DDIM eta (0 = deterministic)")
    r.add_argument("--class-labels", type=parse_labels, default=None,
                   help="DiT: comma list of class labels (default: 0-9 twice for the demo, the reference's 8 labels "
                        "otherwise)")
    r.add_argument("--prompt", help="SD (text-to-image) bundles: the prompt")
    r.add_argument("--negative-prompt", help="SD: the negative prompt (default: the empty string, as diffusers)")
    r.add_argument("--num-images", type=int_in(1, 65536), help="SD: images per prompt (default 1)")
    r.add_argument("--height", type=int_in(8, 16384),
                   help="SD: image height (default: U-Net sample size x VAE factor)")
    r.add_argument("--width", type=int_in(8, 16384), help="SD: image width (default as --height)")
    # SDXL's added time ids, diffusers' names and order (pipeline/sd.py: StitchedSDPipeline.sdxl_time_ids)
    r.add_argument("--original-size", nargs=2, type=int_in(1, 65536), metavar=("H", "W"),
                   help="SDXL: the original-size time id (default: --height --width)")
    r.add_argument("--crop-coords", nargs=2, type=int_in(0, 65536), metavar=("TOP", "LEFT"),
                   help="SDXL: the crop top-left time id (default 0 0)")
    r.add_argument("--target-size", nargs=2, type=int_in(1, 65536), metavar=("H", "W"),
                   help="SDXL: the target-size time id (default: --height --width)")
    r.add_argument("--seed", type=int_in(0, MAX_SEED), default=defaults.DEFAULT_SEED,
                   help="seed of the initial and per-step noise")
    r.add_argument("--init-noise", help=".npy starting latent (B, C, H, W) float; sets the batch")
    r.add_argument("--save-latents", help="also write the final latent (before decoding) to this .npy")
    r.add_argument("--out", help="image (grid) to write: .png, .jpg or .webp (default ./tstitch-BUNDLE.png)")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--device", default=None, help="torch backend device: cpu or cuda (default: cuda if available)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: on a terminal, for 20+ steps)")
    control.add_run_flags(r)
    cache.add_run_flags(r)


def command(args: argparse.Namespace) -> int:
    from tstitch_trt.bundle.manifest import read_manifest

    bundle = resolve_bundle(args.bundle)
    manifest = read_manifest(bundle)  # a broken manifest is refused before anything else
    if manifest.text_to_image:  # sd / sdxl, ControlNet and LCM bundles included
        return run_sd(args, bundle, manifest)
    return run_dit(args, bundle, manifest)


# --- DiT: class labels -------------------------------------------------------------------------------
def run_dit(args: argparse.Namespace, bundle: Path, manifest) -> int:  # manifest: Manifest
    from tstitch_trt.outputs import IMAGE_FORMATS, OutputPlan
    from tstitch_trt.pipeline.dit import StitchedPipeline, decodes_to_images

    refuse_sd_flags(args)
    if args.sampler in ("pndm", "euler", "lcm"):
        raise UserError(f"--sampler {args.sampler} is for text-to-image (sd) bundles; DiT bundles take ddim, ddpm "
                        "or dpm-solver++")
    args.sampler = args.sampler or defaults.DEFAULT_SAMPLER
    args.cfg_scale = defaults.DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    is_demo = args.bundle == DEMO
    outputs = OutputPlan()
    name = DEMO if is_demo else Path(str(bundle)).resolve().name
    makes_images = decodes_to_images(manifest)
    if makes_images:
        outputs.add("--out", args.out or f"tstitch-{name}.png", tuple(IMAGE_FORMATS))
    elif args.out:
        raise UserError(f"--out {args.out}: this bundle has no VAE, so it makes latents, not images; "
                        "use --save-latents FILE.npy (or rebuild it with --vae)")
    latents_path = args.save_latents or (None if makes_images else f"tstitch-{name}-latents.npy")
    if latents_path:
        outputs.add("--save-latents", latents_path, (".npy",))
    if args.report:
        outputs.add("--report", args.report)
    init = load_init_noise(args.init_noise) if args.init_noise else None

    pipe = StitchedPipeline.from_bundle(bundle, backend=args.backend, device=args.device, precision=args.precision)
    try:
        nc = pipe.manifest.num_classes
        labels = args.class_labels
        if labels is None:
            labels = defaults.default_class_labels(nc, is_demo)
        ratio, fractions = defaults.default_stitch(len(pipe.manifest.models), args.ratio, args.fractions)
        steps = defaults.DEFAULT_STEPS if args.steps is None else args.steps
        res = pipe(class_labels=labels, ratio=ratio, fractions=fractions, steps=steps, sampler=args.sampler,
                   cfg_scale=args.cfg_scale, seed=args.seed, eta=args.eta, init_noise=init, progress=args.progress,
                   **cache.run_kwargs(args))
    finally:
        pipe.close()
    rep = res.report
    writers = {}
    if "--save-latents" in outputs.paths:
        writers["--save-latents"] = lambda p: np.save(p, res.latents)
    if res.images is not None:
        from PIL import Image

        from tstitch_trt.outputs import save_image
        from tstitch_trt.pipeline.dit import image_grid

        nrow = min(nc, 10) if is_demo and args.class_labels is None else min(len(res.images), 8)
        grid = image_grid(res.images, nrow=max(1, nrow))
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        writers["--out"] = lambda p: save_image(img, p, outputs.paths["--out"])
    if args.report:
        writers["--report"] = lambda p: Path(p).write_text(json.dumps(rep, indent=2))
    outputs.write(writers)
    per_model = ", ".join(f"{n} {name}" for n, name in zip(rep["steps_per_model"], rep["models"], strict=True))
    print(f"{rep['steps']} {rep['sampler']} steps ({per_model}) on {rep['backend']} [{rep['device']}], "
          f"batch {rep['batch']}: {rep['total_seconds']:.2f} s")
    if rep["backend_reason"] not in ("requested", ""):
        print(f"backend: {rep['backend']} ({rep['backend_reason']})")
    if rep.get("cache"):
        print(f"FORA interval {rep['cache']['interval']}: full calls {rep['cache']['full_calls']}")
    if "--out" in outputs.paths:
        print(f"wrote {outputs.paths['--out'].resolve()}")
    if "--save-latents" in outputs.paths:
        why = "" if makes_images else " (this bundle has no VAE to decode them; build it with --vae to get images)"
        print(f"wrote latents {outputs.paths['--save-latents'].resolve()}{why}")
    if args.report:
        print(f"wrote report {outputs.paths['--report'].resolve()}")
    for note in rep["notes"]:
        print(f"note: {note}")
    return 0


def refuse_sd_flags(args: argparse.Namespace) -> None:
    """A DiT (class-conditional) bundle: prompts and sizes do not apply."""
    for name in SD_ONLY_FLAGS:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to text-to-image (sd) bundles; this bundle is class-conditional (DiT): "
                            "use --class-labels")


# --- SD 1.x / SDXL: prompts (ControlNet, LCM and LoRA bundles are SD bundles) ----------------------------
def run_sd(args: argparse.Namespace, bundle: Path, manifest) -> int:  # manifest: Manifest
    from tstitch_trt.outputs import IMAGE_FORMATS, OutputPlan, save_image
    from tstitch_trt.pipeline.dit import image_grid
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    for name in DIT_ONLY_FLAGS:
        if getattr(args, name, None) is not None:
            raise UserError(f"--{name.replace('_', '-')} applies to class-conditional (DiT) bundles; this is a "
                            "text-to-image (sd) bundle: give --prompt")
    if args.prompt is None:
        raise UserError("this is a text-to-image (sd) bundle: give --prompt TEXT")
    outputs = OutputPlan()
    outputs.add("--out", args.out or f"tstitch-{bundle.resolve().name}.png", tuple(IMAGE_FORMATS))
    if args.save_latents:
        outputs.add("--save-latents", args.save_latents, (".npy",))
    if args.report:
        outputs.add("--report", args.report)
    init = load_init_noise(args.init_noise) if args.init_noise else None
    from tstitch_trt.pipeline.control import control_size_limit

    control_req = control.control_request(args, manifest.controlnet is not None, control_size_limit(manifest))
    num_images = args.num_images if args.num_images is not None else 1
    pipe = StitchedSDPipeline.from_bundle(bundle, backend=args.backend, device=args.device, precision=args.precision)
    try:
        ratio, fractions = defaults.default_stitch(len(manifest.models), args.ratio, args.fractions)
        res = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=num_images, ratio=ratio,
                   fractions=fractions, steps=args.steps, sampler=args.sampler,
                   cfg_scale=args.cfg_scale, seed=args.seed,  # None: the kind's / sampler's default
                   height=args.height, width=args.width, eta=args.eta, init_noise=init, progress=args.progress,
                   control=control_req, **sdxl_time_id_args(args), **cache.run_kwargs(args))
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
    print("precision: " + ", ".join(f"{part} {p}" for part, p in rep["precisions"].items()))
    if rep.get("cache"):
        c = rep["cache"]
        print(f"DeepCache interval {c['interval']} branch {c['branch']}: full calls {c['full_calls']}")
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


# --- both kinds ----------------------------------------------------------------------------------------
def load_init_noise(path: str) -> np.ndarray:
    """A float .npy array, read without pickles; its shape is checked against the bundle later."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise UserError(f"--init-noise {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --init-noise {path} as a .npy array ({one_line(str(e))[:120]})") from None
    if not isinstance(arr, np.ndarray):  # np.load gives an NpzFile for .npz archives
        raise UserError(f"--init-noise {path} is an .npz archive; save one array with np.save(FILE.npy, latent)")
    if arr.dtype.kind != "f":
        raise UserError(f"--init-noise {path} holds {arr.dtype} values; the starting latent must be float")
    if arr.ndim != 4:
        raise UserError(f"--init-noise {path} has shape {tuple(arr.shape)}; expected (B, C, H, W)")
    if arr.nbytes > 16 << 30:
        raise UserError(f"--init-noise {path} is {arr.nbytes / 2**30:.1f} GiB, far beyond any batch this engine runs")
    x = np.array(arr, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"--init-noise {path} contains NaN or Inf")
    return x
