"""The demo pair's quality/speed trade-off over the stitch ratio: table, plot and JSON.

    python benchmarks/quality_sweep.py                       # 500 digits at ratios 0, 0.1, ..., 1
    python benchmarks/quality_sweep.py --images 100 --ratios 0,0.4,1

Writes docs/demo_quality.png (the README figure) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tstitch_trt.demo import demo_bundle_dir
from tstitch_trt.eval.quality import DEFAULT_RATIOS, quality_sweep, quality_table, write_quality_report

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: the built-in demo pair)")
    p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)))
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=str(ROOT / "docs" / "demo_quality.png"))
    p.add_argument("--md", default=str(ROOT / "build" / "demo_quality.md"))
    p.add_argument("--json", default=str(ROOT / "build" / "demo_quality.json"))
    args = p.parse_args()
    t0 = time.perf_counter()
    result = quality_sweep(args.bundle or demo_bundle_dir(), [float(v) for v in args.ratios.split(",")],
                           args.images, backend=args.backend, steps=args.steps, cfg_scale=args.cfg_scale,
                           seed=args.seed, progress=True)
    for path in (args.md, args.json):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    print(quality_table(result))
    for path in write_quality_report(result, args.md, args.png, args.json):
        print(f"wrote {path}")
    print(f"sweep took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
