"""`tstitch-trt build | run | info | check | bench | serve`.

User errors print one line (`error: ...`) and exit 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from tstitch_trt.demo import DEMO_NAME as DEMO
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import defaults


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _parse_labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"class labels must be integers separated by commas, got {text!r}") from None


def _parse_fractions(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions must be numbers separated by commas, got {text!r}") from None


def _parse_batch_sizes(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes takes N or MIN-MAX, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"--batch-sizes needs 1 <= MIN <= MAX, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tstitch-trt", description="T-Stitch diffusion sampling on TensorRT / ONNX Runtime step engines")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    b = sub.add_parser("build", help="export checkpoints to a bundle of step graphs / engines")
    b.add_argument("--recipe", help="TOML file with the same settings (command-line flags override it)")
    b.add_argument("--model", action="append", metavar="ARCH=CHECKPOINT",
                   help="e.g. DiT-S/2=DiT-S-2.pt (smallest first; CHECKPOINT may be random:SEED)")
    b.add_argument("--image-size", type=int)
    b.add_argument("--num-classes", type=int)
    b.add_argument("--latent-channels", type=int)
    b.add_argument("--downsample", type=int, help="VAE factor (8; 1 for pixel-space models)")
    b.add_argument("--vae", help="diffusers AutoencoderKL directory (or hub id where a network exists)")
    b.add_argument("--backend", help="comma list of torch, ort, trt, trt-rtx")
    b.add_argument("--precision", choices=["fp16", "fp32"])
    b.add_argument("--batch-sizes", type=_parse_batch_sizes, help="MIN-MAX batch of the engines' profile")
    b.add_argument("--guidance-channels", help="'3' (DiT reference) or 'all'")
    b.add_argument("--opt-level", type=int, help="TensorRT builder optimization level (0-5)")
    b.add_argument("--timing-cache", help="TensorRT timing cache file, reused and updated")
    b.add_argument("--compute-capabilities", help="TensorRT-RTX target GPUs, e.g. 8.9,12.0 (default: portable set)")
    b.add_argument("--out", help="bundle directory (default engines/NAME)")

    r = sub.add_parser("run", help="sample images with a bundle (default: the built-in demo pair)")
    r.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo' (default)")
    r.add_argument("--backend", default="auto", help="auto, trt, trt-rtx, ort, torch")
    r.add_argument("--sampler", default=defaults.DEFAULT_SAMPLER, choices=["ddim", "ddpm", "dpm-solver++"])
    r.add_argument("--steps", type=int, default=None)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="share of early steps on the small model (0..1)")
    g.add_argument("--fractions", type=_parse_fractions, help="one share per model, summing to 1")
    r.add_argument("--cfg-scale", type=float, default=defaults.DEFAULT_CFG_SCALE)
    r.add_argument("--eta", type=float, default=defaults.DEFAULT_ETA, help="DDIM eta")
    r.add_argument("--class-labels", type=_parse_labels, default=None)
    r.add_argument("--seed", type=int, default=defaults.DEFAULT_SEED)
    r.add_argument("--init-noise", help=".npy starting latent (B, C, H, W); sets the batch")
    r.add_argument("--save-latents", help="write the final latent (before decoding) to this .npy")
    r.add_argument("--out", help="PNG grid to write (default ./tstitch-<bundle>.png)")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--device", default=None, help="torch backend device (cpu, cuda)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("--bundle", default=DEMO)

    c = sub.add_parser("check", help="compare every backend in a bundle against the torch StepModule")
    c.add_argument("--bundle", default=DEMO, help="bundle directory, or 'demo' (default)")
    c.add_argument("--backend", default=None, help="comma list (default: every backend present)")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--report", help="write the comparison as JSON here")

    from tstitch_trt.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="speed, host overhead, memory and quality benchmarks"))

    from tstitch_trt.serve.launch import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve a bundle over HTTP on Ray Serve (needs the serve extra)"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed on one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"build": cmd_build, "run": cmd_run, "info": cmd_info, "check": cmd_check,
                "bench": cmd_bench, "serve": cmd_serve}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from tstitch_trt.bundle.manifest import read_manifest

    bundle = resolve_bundle(args.bundle)
    print(describe_bundle(bundle, read_manifest(bundle)))
    return 0


def describe_bundle(bundle: Path, m) -> str:  # m: Manifest
    c, h, w = m.latent_shape
    lines = [
        f"bundle {bundle}: {m.pipeline}, {len(m.models)} models in stitch order (smallest first)",
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
    lines.append(f"  VAE: {', '.join(m.vae['engines']) + ' from ' + m.vae['source'] if m.vae else 'none'}")
    lines.append(f"  backends usable for the whole pair: {', '.join(m.backends()) or 'none'}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from tstitch_trt.pipeline.dit import StitchedPipeline, image_grid

    bundle = resolve_bundle(args.bundle)
    is_demo = args.bundle == DEMO
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    init = None
    if args.init_noise:
        try:
            init = np.load(args.init_noise, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --init-noise {args.init_noise}: {e}") from None
    pipe = StitchedPipeline.from_bundle(bundle, backend=args.backend, device=args.device)
    try:
        nc = pipe.manifest.num_classes
        labels = args.class_labels
        if labels is None:
            labels = defaults.default_class_labels(nc, is_demo)
        ratio, fractions = defaults.default_stitch(len(pipe.manifest.models), args.ratio, args.fractions)
        steps = args.steps if args.steps is not None else defaults.DEFAULT_STEPS
        res = pipe(class_labels=labels, ratio=ratio, fractions=fractions, steps=steps, sampler=args.sampler,
                   cfg_scale=args.cfg_scale, seed=args.seed, eta=args.eta, init_noise=init, progress=args.progress)
    finally:
        pipe.close()
    rep = res.report
    if args.save_latents:
        _atomic_write(Path(args.save_latents), lambda p: np.save(p, res.latents))
    written = None
    if res.images is not None:
        from PIL import Image

        nrow = min(nc, 10) if is_demo and args.class_labels is None else min(len(res.images), 8)
        grid = image_grid(res.images, nrow=max(1, nrow))
        out = Path(args.out or f"tstitch-{DEMO if is_demo else Path(str(bundle)).name}.png")
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        _atomic_write(out, lambda p: img.save(p, format="PNG"))
        written = out
    if args.report:
        _atomic_write(Path(args.report), lambda p: Path(p).write_text(json.dumps(rep, indent=2)))
    per_model = ", ".join(f"{n} {name}" for n, name in zip(rep["steps_per_model"], rep["models"], strict=True))
    print(f"{rep['steps']} {rep['sampler']} steps ({per_model}) on {rep['backend']} [{rep['device']}], "
          f"batch {rep['batch']}: {rep['total_seconds']:.2f} s")
    if written:
        print(f"wrote {written.resolve()}")
    for note in rep["notes"]:
        print(f"note: {note}")
    return 0


def _atomic_write(path: Path, write) -> None:  # write(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cmd_build(args: argparse.Namespace) -> int:
    from tstitch_trt.recipes import build_config_from_args

    cfg = build_config_from_args(args)
    from tstitch_trt.export.build import build_bundle

    manifest = build_bundle(cfg, on_model=lambda name: print(f"exporting {name} ...", flush=True))
    times = manifest.io.get("build_seconds", {})
    for k, v in times.items():
        print(f"  {k}: {v:.1f} s")
    print(f"wrote bundle {cfg.out} ({', '.join(manifest.backends())})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tstitch_trt.export.check import run_check

    return run_check(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from tstitch_trt.bench import run_bench

    return run_bench(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from tstitch_trt.serve.launch import serve_forever, service_config

    return serve_forever(service_config(args), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
