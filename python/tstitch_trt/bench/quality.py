"""--quality: the demo pair's FID / accuracy sweep over the ratio, and over FORA's cache interval with
--cache-interval (tstitch_trt.eval.quality)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tstitch_trt.bench.log import logger
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError


def run_quality(args: argparse.Namespace) -> int:
    """FID / class accuracy / ms per image against the ratio: tstitch_trt.eval.quality on the demo pair."""
    from tstitch_trt.eval import quality

    if args.workload not in (None, "demo"):
        raise UserError(f"--quality scores digits with the demo pair's classifier; it does not apply to "
                        f"--workload {args.workload} (use --bundle DIR with a demo-style bundle, or no --workload)")
    bundle = resolve_bundle(args.bundle)
    if args.quality_images < 2:
        raise UserError(f"--quality-images must be >= 2 (a covariance needs two samples), got {args.quality_images}")
    ratios = args.ratios if args.ratios is not None else list(quality.DEFAULT_RATIOS)
    backend = args.backends[0] if args.backends else "auto"
    result = quality.quality_sweep(bundle, ratios, args.quality_images, backend=backend, steps=args.steps or 50,
                                   cfg_scale=args.cfg_scale, seed=args.seed, progress=True,
                                   cache_intervals=args.cache_interval or [1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = quality.write_quality_report(result, markdown_path=out / "quality.md", png_path=out / "quality.png",
                                           json_path=out / "quality.json")
    print(quality.quality_table(result))
    logger()("wrote " + ", ".join(str(p) for p in written))
    if out / "quality.png" not in written:
        logger()("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0
