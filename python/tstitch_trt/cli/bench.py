"""`tstitch-trt bench`: the bench/ package measures (DiT workloads: bench/run.py; SD: bench/sd.py); this
module checks the output folder and what runs without torch before any work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tstitch_trt.cli.common import INSTALL_BUILD, has_torch, require_torch
from tstitch_trt.errors import UserError

NAME = "bench"
HELP = "speed, host overhead, memory and quality benchmarks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tstitch_trt.bench import add_bench_arguments

    add_bench_arguments(p)


def command(args: argparse.Namespace) -> int:
    from tstitch_trt.outputs import check_writable

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; bench writes a folder of results there")
    check_writable(out / "bench.json", "--out") if out.is_dir() else check_writable(out, "--out")
    if not has_torch() and not args.quality:
        if args.workload == "dit-s-xl" or "torch" in (args.backends or []):
            require_torch(f"bench {'--workload dit-s-xl' if args.workload else '--backends torch'}")
        if not args.no_reference:
            print(f"note: the reference PyTorch loop is skipped: torch is not installed ({INSTALL_BUILD})",
                  file=sys.stderr)
            args.no_reference = True
        args.backends = args.backends or ["ort"]
    from tstitch_trt.bench import run_bench

    return run_bench(args)
