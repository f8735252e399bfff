"""`tstitch-trt bench`: speed, host overhead, memory (benchmarks issue) and quality (demo issue).

Placeholder wiring: the benchmark harness lands with the benchmarks issue.
"""

from __future__ import annotations

import argparse

from tstitch_trt.errors import UserError


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="demo")
    p.add_argument("--quality", action="store_true", help="FID / accuracy sweep over the ratio (demo pair)")


def run_bench(args: argparse.Namespace) -> int:
    raise UserError("benchmarks are not implemented yet")
