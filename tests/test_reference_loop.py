"""The benchmark's baseline (benchmarks/reference_loop.py) computes what our engines compute.

If it did not, "speedup vs the reference loop" would compare different work. It is checked against
the torch backend (the StepModule every other backend is tested against) on a tiny random pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tstitch_trt.bench import load_reference_loop
from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.pipeline.dit import StitchedPipeline
from tstitch_trt.sampling.schedule import dit_schedule


def test_reference_tables_match_the_respaced_schedule() -> None:
    ref = load_reference_loop()
    for steps in (5, 10, 100, 250):
        d = ref.ReferenceDDIM(steps)
        ours = dit_schedule(steps)
        assert d.timestep_map == ours.timesteps.tolist()
        np.testing.assert_allclose(d.alphas_cumprod, ours.alphas_cumprod, rtol=1e-12)


def test_reference_loop_matches_torch_backend(tiny_pair: Path) -> None:
    ref = load_reference_loop()
    manifest = read_manifest(tiny_pair)
    models = ref.load_reference_models(tiny_pair, manifest)
    labels = [1, 2, 3]
    z = np.random.default_rng(5).standard_normal((3, *manifest.latent_shape), dtype=np.float32)
    pipe = StitchedPipeline.from_bundle(tiny_pair, backend="torch", device="cpu")
    try:
        results = {}
        for ratio in (0.4, 0.0):
            ours = pipe(class_labels=labels, ratio=ratio, steps=10, cfg_scale=1.5, init_noise=z, decode=False)
            stats: dict = {}
            theirs = ref.reference_sample(models, torch.from_numpy(z), labels, 10, ratio=ratio, cfg_scale=1.5,
                                          stats=stats).numpy()
            assert stats["calls_per_model"] == ours.report["steps_per_model"]
            results[ratio] = (ours.latents, theirs)
    finally:
        pipe.close()
    ours, theirs = results[0.4]
    scale = float(np.abs(theirs).max())
    assert scale > 0.5  # random weights: a real trajectory, not zeros
    assert np.abs(ours - theirs).max() < 1e-4 * scale
    assert results[0.4][1].shape == (3, *manifest.latent_shape)
    # the stitch happened in both: 4 of 10 steps on the small model, and it changes the result
    assert np.abs(results[0.0][1] - theirs).max() > 1e-3 * scale
    assert np.abs(results[0.0][0] - results[0.0][1]).max() < 1e-4 * scale
