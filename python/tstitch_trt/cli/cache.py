"""The feature-caching flags of `tstitch-trt build` and `run` (DeepCache's names: cache_interval,
cache_branch_id; DiTs: build --cache-scheme fora, FORA's interval is the same --cache-interval).

Checked against the bundle in pipeline/caching.py (shared with the Python API and serve)."""

from __future__ import annotations

import argparse

from tstitch_trt.argtypes import int_in
from tstitch_trt.errors import UserError
from tstitch_trt.sampling.cache_plan import MAX_CACHE_BRANCH, MAX_CACHE_INTERVAL

DIT_CACHE_SCHEMES = ("fora",)  # export/build.py's (cli imports no torch module at parse time)


def add_build_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--cache-branch", type=int_in(0, MAX_CACHE_BRANCH), default=None,
                   help="SD: also write each U-Net's DeepCache step graph that keeps this branch (DeepCache's "
                        "cache_branch_id: 3 per up block from the shallow end; 0 = the shallowest, fastest); "
                        "enables run --cache-interval")
    b.add_argument("--cache-scheme", choices=DIT_CACHE_SCHEMES, default=None,
                   help="DiT: also write each DiT's FORA cached step graph (every block reuses its kept attention "
                        "and MLP outputs); enables run --cache-interval. SD U-Nets cache with --cache-branch")


def add_run_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--cache-interval", type=int_in(1, MAX_CACHE_INTERVAL), default=None,
                   help="feature caching's interval N: each model runs whole every N-th call (counted from its "
                        "first call after a stitch switch) and reuses its kept features between (default 1: off). "
                        "SD: DeepCache (the shallow path); DiT: FORA (every block's attention and MLP outputs)")
    r.add_argument("--cache-branch", type=int_in(0, MAX_CACHE_BRANCH), default=None,
                   help="SD: DeepCache's cache_branch_id; default and only choice: the one the bundle was built with "
                        "(DiT bundles: FORA has no branch)")


def refuse_sd_build(args: argparse.Namespace) -> None:
    """--cache-scheme names a DiT scheme; U-Nets take DeepCache's --cache-branch."""
    if getattr(args, "cache_scheme", None) is not None:
        raise UserError(f"--cache-scheme {args.cache_scheme} applies to DiT builds (FORA); SD U-Nets cache with "
                        "DeepCache: give --cache-branch K")


def refuse_dit_build(args: argparse.Namespace) -> None:
    """--cache-branch is DeepCache's (U-Nets); DiTs take --cache-scheme fora."""
    if getattr(args, "cache_branch", None) is not None:
        raise UserError(f"--cache-branch {args.cache_branch} applies to SD U-Nets (DeepCache); DiTs cache with FORA: "
                        "give --cache-scheme fora")


def run_kwargs(args: argparse.Namespace) -> dict:
    return {"cache_interval": args.cache_interval if args.cache_interval is not None else 1,
            "cache_branch": args.cache_branch}
