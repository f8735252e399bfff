"""`tstitch-trt check`: every backend of a bundle against the torch StepModule (export/check.py, for DiT and
SD bundles alike); without torch, what can be checked without it (files, graph I/O), then one line saying
what to install and exit 2, like every other "install this" case."""

from __future__ import annotations

import argparse

from tstitch_trt.argtypes import MAX_SEED, int_in
from tstitch_trt.cli.common import INSTALL_BUILD, has_torch
from tstitch_trt.demo import DEMO_NAME, resolve_bundle
from tstitch_trt.errors import UserError

NAME = "check"
HELP = "compare every backend in a bundle against the torch StepModule"


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--bundle", default=DEMO_NAME, help="bundle directory, or 'demo'")
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


def command(args: argparse.Namespace) -> int:
    from tstitch_trt.outputs import OutputPlan

    outputs = OutputPlan()
    if args.report:
        outputs.add("--report", args.report)
    if not has_torch():
        from tstitch_trt.pipeline.integrity import check_integrity

        bundle = resolve_bundle(args.bundle)
        for line in check_integrity(bundle):
            print(line)
        raise UserError(f"numeric check not run: the reference (the torch StepModule) needs PyTorch "
                        f"({INSTALL_BUILD})")
    from tstitch_trt.export.check import run_check

    return run_check(args, outputs)
