"""The feature-caching flags of `tstitch-trt build` and `run` (DeepCache's names: cache_interval,
cache_branch_id).

Checked against the bundle in pipeline/caching.py (shared with the Python API and serve)."""

from __future__ import annotations

import argparse

from tstitch_trt.argtypes import int_in
from tstitch_trt.errors import UserError
from tstitch_trt.sampling.cache_plan import MAX_CACHE_BRANCH, MAX_CACHE_INTERVAL


def add_build_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--cache-branch", type=int_in(0, MAX_CACHE_BRANCH), default=None,
                   help="SD: also write each U-Net's DeepCache step graph that keeps this branch (DeepCache's "
                        "cache_branch_id: 3 per up block from the shallow end; 0 = the shallowest, fastest); "
                        "enables run --cache-interval")


def add_run_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--cache-interval", type=int_in(1, MAX_CACHE_INTERVAL), default=None,
                   help="SD: DeepCache's cache_interval: each U-Net runs whole every N-th call (counted from its "
                        "first call after a stitch switch) and only its shallow path between (default 1: off)")
    r.add_argument("--cache-branch", type=int_in(0, MAX_CACHE_BRANCH), default=None,
                   help="SD: DeepCache's cache_branch_id; default and only choice: the one the bundle was built with")


def refuse_dit(args: argparse.Namespace) -> None:
    """DiT bundles and builds have no feature caching (yet)."""
    for name in ("cache_interval", "cache_branch"):
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to text-to-image (sd) bundles (DeepCache); DiT bundles have no feature "
                            "caching yet")


def run_kwargs(args: argparse.Namespace) -> dict:
    return {"cache_interval": args.cache_interval if args.cache_interval is not None else 1,
            "cache_branch": args.cache_branch}
