"""`tstitch-trt check`: every backend of a bundle against the torch StepModule (export issue)."""

from __future__ import annotations

import argparse

from tstitch_trt.errors import UserError


def run_check(args: argparse.Namespace) -> int:
    raise UserError("check is not implemented yet")
