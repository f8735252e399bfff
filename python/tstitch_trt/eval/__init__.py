"""Sample-quality evaluation for class-conditional pixel-space pairs (the demo pair): numpy + onnxruntime only.

    from tstitch_trt.eval import quality_sweep, write_quality_report
    result = quality_sweep("python/tstitch_trt/demo/pair", ratios=[0, 0.4, 1], images_per_point=500)
    write_quality_report(result, "quality.md", "quality.png")

Command line: `tstitch-trt bench --quality --out DIR`.
"""

from __future__ import annotations

from tstitch_trt.eval.frechet import feature_stats, frechet_distance
from tstitch_trt.eval.quality import quality_sweep, quality_table, write_quality_report

__all__ = ["feature_stats", "frechet_distance", "quality_sweep", "quality_table", "write_quality_report"]
