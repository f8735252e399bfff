"""Pipelines: conditioning -> stitched loop -> decode -> images. Python API: StitchedPipeline."""
