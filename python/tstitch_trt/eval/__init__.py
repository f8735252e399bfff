"""Sample-quality evaluation for class-conditional pixel-space pairs (the demo pair): numpy + onnxruntime only.

    from tstitch_trt.eval import quality_sweep, write_quality_report
    result = quality_sweep("python/tstitch_trt/demo/pair", ratios=[0, 0.4, 1], images_per_point=500)
    write_quality_report(result, "quality.md", "quality.png")

Command line: `python -m tstitch_trt.eval.quality --images 500 --md table.md --png plot.png`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["feature_stats", "frechet_distance", "quality_sweep", "quality_table", "write_quality_report"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m tstitch_trt.eval.quality` does not import the module twice.
    if name in ("feature_stats", "frechet_distance"):
        from tstitch_trt.eval import frechet

        return getattr(frechet, name)
    if name in ("quality_sweep", "quality_table", "write_quality_report"):
        from tstitch_trt.eval import quality

        return getattr(quality, name)
    raise AttributeError(f"module 'tstitch_trt.eval' has no attribute {name!r}")
