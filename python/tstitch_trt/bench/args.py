"""`tstitch-trt bench` arguments."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tstitch_trt.argtypes import MAX_SEED, finite, int_in, non_negative, unit

WORKLOADS = ("demo", "dit-s-xl", "sd-bk-tiny-sd15")
PARTS = ("steps", "e2e", "sweep")
DEFAULT_CACHE = Path(os.environ.get("TSTITCH_BENCH_CACHE", Path.home() / ".cache" / "tstitch-trt" / "bench"))


# --- arguments -----------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"ratios must be in [0, 1], got {text!r}")
    return vals


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=None, help="bundle directory ('demo' = --workload demo)")
    p.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="demo: the built-in demo pair (default); dit-s-xl: DiT-S/2 -> DiT-XL/2 at 256 px, random "
                        "weights, built once into --cache; sd-bk-tiny-sd15: random BK-SDM-Tiny -> SD 1.5 U-Nets "
                        "against diffusers' pipeline (tstitch_trt/bench/sd.py)")
    p.add_argument("--backends", type=_name_list, default=None,
                   help="comma list of trt, trt-rtx, ort, openvino, openvino-bf16, torch (default: every backend "
                        "in the bundle, and OpenVINO fp32 / bf16 where it is installed)")
    p.add_argument("--sweep-backends", type=_name_list, default=None,
                   help="backends that get the ratio sweep (default: all measured)")
    p.add_argument("--parts", type=_name_list, default=list(PARTS),
                   help=f"what to measure, comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference PyTorch loop")
    p.add_argument("--no-reference-bf16", action="store_true",
                   help="skip the second baseline: the reference loop under torch.autocast(bf16)")
    p.add_argument("--device", default="auto", help="torch backend and reference loop device: auto, cpu, cuda")
    p.add_argument("--steps", type=int_in(1, 100_000), default=None,
                   help="DDIM steps per trajectory (default: the workload's)")
    p.add_argument("--batch", type=int_in(1, 65536), default=None,
                   help="images per trajectory (default: the workload's)")
    p.add_argument("--step-batches", type=_int_list, default=None,
                   help="batches of the per-step figures (default 1,8,20; 1 for dit-s-xl on a CPU)")
    p.add_argument("--ratio", type=unit, default=0.4, help="stitch ratio of the end-to-end figure (0.4)")
    p.add_argument("--ratios", type=_float_list, default=None,
                   help="ratios of the sweep (default 0,0.1,...,1; 0 and 1 are always added: they define the "
                        "ideal line)")
    p.add_argument("--cfg-scale", type=finite, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--repeats", type=int_in(1, 1000), default=3, help="timed repeats of every figure (3)")
    p.add_argument("--warmup", type=int_in(0, 100), default=1, help="untimed runs before the first timed one (1)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None,
                   help="CPU threads for every backend and the reference (default: the cores this process may use)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the initial noise and labels")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where built workload bundles are kept and reused")
    p.add_argument("--out", default="bench-out", help="output directory (bench.json, bench.md, PNGs)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots (matplotlib; --quality always does)")
    p.add_argument("--wait-idle", type=non_negative, default=0.0, metavar="SECONDS",
                   help="shared machines: before each timed run, wait up to SECONDS for other processes to leave "
                        "the CPUs idle (Linux; 0 = off)")
    p.add_argument("--check-targets", action="store_true", help="exit 1 when a speed target is missed")
    p.add_argument("--quality", action="store_true", help="FID / accuracy sweep over the ratio (demo pair)")
    p.add_argument("--quality-images", type=int_in(10, 100_000), default=500,
                   help="images per ratio of the quality sweep")
    p.add_argument("--cache-interval", type=_int_list, default=None, metavar="N[,N...]",
                   help="--quality: FORA's cache interval, as `run --cache-interval` (1 = off, the default); a comma "
                        "list sweeps each ratio at each interval (e.g. 1,2,3). Needs a bundle built with "
                        "--cache-scheme fora")
