"""`tstitch-trt build | run | info | check | bench | serve`.

User errors print one line (`error: ...`) and exit 2; nothing half-written is left behind. Any other
exception is a bug: one line saying so and where the full traceback was written, exit 1. SIGTERM
unwinds like Ctrl-C, so staging directories and temporary outputs are removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from tstitch_trt import __version__, cli_control
from tstitch_trt.argtypes import (
    MAX_SEED,
    finite,
    int_in,
    non_negative,
    parse_batch_sizes,
    parse_fractions,
    parse_labels,
    unit,
)
from tstitch_trt.demo import DEMO_NAME as DEMO
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import defaults

INSTALL_BUILD = "pip install \"tstitch-trt[build]\""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup (staging directories, temp files) runs."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default (flags without one say nothing about it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or "default" in text:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tstitch-trt", formatter_class=_Help,
                description="T-Stitch diffusion sampling on TensorRT / ONNX Runtime step engines")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)

    b = command("build", "export checkpoints to a bundle of step graphs / engines (needs the build extra)")
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
    cli_control.add_build_flags(b)

    r = command("run", "sample images with a bundle (default: the built-in demo pair)")
    r.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo'")
    r.add_argument("--backend", default="auto", help="auto, trt, trt-rtx, ort, openvino, torch")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="CPU backends (openvino): bf16 needs a CPU with native bf16; auto uses it only where the "
                        "bundle records it as safe (tstitch-trt check --precision bf16 --record)")
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
    cli_control.add_run_flags(r)

    i = command("info", "describe a bundle and which of its backends can run here")
    i.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo'")

    c = command("check", "compare every backend in a bundle against the torch StepModule")
    c.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo'")
    c.add_argument("--backend", default=None, help="comma list (default: every backend present)")
    c.add_argument("--batch", type=int_in(1, 1024), default=2, help="batch of the compared step")
    c.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the compared inputs")
    c.add_argument("--report", help="write the comparison as JSON here")
    c.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: also measure OpenVINO bf16 per step and, for a bundle with the demo evaluator, "
                        "FID / accuracy at ratio 0 and 0.4, and give the bf16 verdict per model")
    c.add_argument("--quality-images", type=int_in(10, 100_000), default=500,
                   help="images per point of the bf16 quality gate")
    c.add_argument("--record", action="store_true", help="write the bf16 verdict into the bundle's manifest.json")

    from tstitch_trt.bench import add_bench_arguments

    add_bench_arguments(command("bench", "speed, host overhead, memory and quality benchmarks"))

    from tstitch_trt.serve.launch import add_serve_arguments

    add_serve_arguments(command("serve", "serve a bundle over HTTP on Ray Serve (needs the serve extra)"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, already printed on one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _install_sigterm()
    try:
        return {"build": cmd_build, "run": cmd_run, "info": cmd_info, "check": cmd_check,
                "bench": cmd_bench, "serve": cmd_serve}[args.command](args)
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        return 143
    except Exception as e:  # a bug: one line here, the traceback in a file
        log = _write_crash_log(e)
        print(f"error: internal error ({type(e).__name__}: {_one_line(str(e))[:200]}); this is a bug in "
              f"tstitch-trt {__version__}: the full traceback is in {log}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _install_sigterm():  # -> previous handler or None
    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        return None


def _write_crash_log(error: BaseException) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"tstitch-trt-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"tstitch-trt {__version__}, python {sys.version.split()[0]}\nargv: {sys.argv}\n\n")
        f.write("".join(traceback.format_exception(error)))
    return Path(name)


def _has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _require_torch(what: str) -> None:
    if not _has_torch():
        raise UserError(f"{what} needs PyTorch and the export tools, which are not installed: {INSTALL_BUILD}")


# ---------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from tstitch_trt.bundle.manifest import read_manifest, verify_bundle
    from tstitch_trt.pipeline.backends import backend_availability

    bundle = resolve_bundle(args.bundle)
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    if manifest.text_to_image:
        from tstitch_trt.cli_sd import describe_sd_bundle

        print(describe_sd_bundle(bundle, manifest))
    else:
        print(describe_bundle(bundle, manifest))
    print("  backends on this machine:")
    for kind, ok, reason in backend_availability(manifest):
        print(f"    {kind:8s} {'can run' if ok else 'cannot run'}: {reason}")
    return 0


def describe_bundle(bundle: Path, m) -> str:  # m: Manifest
    c, h, w = m.latent_shape
    lines = [
        f"bundle {bundle}: {m.pipeline}, {len(m.models)} models in stitch order (smallest first); files verified",
        f"  latent {c}x{h}x{w}, image {m.image_size}px, {m.num_classes} classes, scale factor {m.latent_scale_factor}",
        f"  schedule: {m.schedule.get('kind')} over {m.schedule.get('num_timesteps')} timesteps; "
        f"CFG on {m.guidance_channels} eps channel(s)",
    ]
    for i, model in enumerate(m.models):
        a = model.arch
        lines.append(f"  [{i}] {model.name}: depth {a['depth']}, hidden {a['hidden_size']}, heads {a['num_heads']}, "
                     f"patch {a['patch_size']}, {model.macs_per_forward / 1e9:.2f} GMACs/forward")
        for kind, e in model.engines.items():
            extra = ""
            if e.builder:
                extra = ", " + ", ".join(f"{k} {v}" for k, v in e.builder.items())
            lo, hi = e.batch_range
            lines.append(f"      {kind:8s} {e.file} ({e.precision}, batch {lo}-{hi}{extra})")
        if model.bf16:  # `check --precision bf16 --record`
            lines.append(f"      bf16     {'safe' if model.bf16.get('safe') else 'not safe'} on CPU backends "
                         f"({model.bf16.get('checked_with', '?')})")
    lines.append(f"  VAE: {', '.join(m.vae['engines']) + ' from ' + str(m.vae.get('source')) if m.vae else 'none'}")
    lines.append(f"  artifacts for the whole pair: {', '.join(m.backends()) or 'none'}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.cli_sd import cmd_run_sd, refuse_sd_flags
    from tstitch_trt.outputs import IMAGE_FORMATS, OutputPlan
    from tstitch_trt.pipeline.dit import StitchedPipeline, decodes_to_images

    bundle = resolve_bundle(args.bundle)
    manifest = read_manifest(bundle)  # a broken manifest is refused before anything else
    if manifest.text_to_image:
        return cmd_run_sd(args, bundle, manifest)
    refuse_sd_flags(args)
    if args.sampler in ("pndm", "euler", "lcm"):
        raise UserError(f"--sampler {args.sampler} is for text-to-image (sd) bundles; DiT bundles take ddim, ddpm "
                        "or dpm-solver++")
    args.sampler = args.sampler or defaults.DEFAULT_SAMPLER
    args.cfg_scale = defaults.DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    is_demo = args.bundle == DEMO
    # Every output is checked before any work: a run never fails at the end for a path.
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
                   cfg_scale=args.cfg_scale, seed=args.seed, eta=args.eta, init_noise=init, progress=args.progress)
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


def load_init_noise(path: str) -> np.ndarray:
    """A float .npy array, read without pickles; its shape is checked against the bundle later."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise UserError(f"--init-noise {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --init-noise {path} as a .npy array ({_one_line(str(e))[:120]})") from None
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


def cmd_build(args: argparse.Namespace) -> int:
    _require_torch("`tstitch-trt build`")
    from tstitch_trt.models.sd import is_sd_model
    from tstitch_trt.recipes import build_config_from_args

    if args.model and any(is_sd_model(m) for m in args.model):
        from tstitch_trt.cli_sd import cmd_build_sd

        return cmd_build_sd(args)
    for flag in ("guidance", "lora"):
        if getattr(args, flag, None):
            raise UserError(f"--{flag} applies to diffusers (SD) builds, not DiT")
    cli_control.refuse_controlnet_build(args)
    cfg = build_config_from_args(args)
    from tstitch_trt.export.build import build_bundle
    from tstitch_trt.progress import Stages, peak_rss_bytes

    with Stages() as stages:
        manifest = build_bundle(cfg, stage=stages.stage)
    print(f"wrote bundle {cfg.out} ({', '.join(manifest.backends())}) in {stages.total_seconds:.1f} s, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GB")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tstitch_trt.outputs import OutputPlan

    outputs = OutputPlan()
    if args.report:
        outputs.add("--report", args.report)
    if not _has_torch():
        from tstitch_trt.pipeline.integrity import check_integrity

        bundle = resolve_bundle(args.bundle)
        for line in check_integrity(bundle):
            print(line)
        print(f"numeric check not run: the reference (the torch StepModule) needs PyTorch: {INSTALL_BUILD}")
        return 1
    from tstitch_trt.export.check import run_check

    return run_check(args, outputs)


def cmd_bench(args: argparse.Namespace) -> int:
    from tstitch_trt.outputs import check_writable

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; bench writes a folder of results there")
    check_writable(out / "bench.json", "--out")  if out.is_dir() else check_writable(out, "--out")
    if not _has_torch() and not args.quality:
        if args.workload == "dit-s-xl" or "torch" in (args.backends or []):
            _require_torch(f"bench {'--workload dit-s-xl' if args.workload else '--backends torch'}")
        if not args.no_reference:
            print(f"note: the reference PyTorch loop is skipped: torch is not installed ({INSTALL_BUILD})",
                  file=sys.stderr)
            args.no_reference = True
        args.backends = args.backends or ["ort"]
    from tstitch_trt.bench import run_bench

    return run_bench(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from tstitch_trt.serve.launch import serve_forever, service_config

    return serve_forever(service_config(args), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
