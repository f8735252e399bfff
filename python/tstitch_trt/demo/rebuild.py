"""The shipped demo pair's weights built again into another bundle, with other build settings (FORA's cached step
graphs: `--cache-scheme fora`), and the quality evaluator copied along, so `bench --quality` scores it like the
shipped pair. Needs the build extra (torch); benchmarks/fora_quality.py and the tests use it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.demo import demo_bundle_dir


def rebuild_demo(out: Path, backends: Sequence[str] = ("torch", "ort"), cache_scheme: str | None = "fora") -> Path:
    """The demo pair at its shipped settings (image size, classes, batch range) into `out`, plus eval/. A bundle
    already there with the same caching scheme and backends is reused."""
    from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

    demo = demo_bundle_dir()
    m = read_manifest(demo)
    want = None if cache_scheme is None else {"scheme": cache_scheme}
    if (out / "eval").is_dir():
        have = read_manifest(out)
        if have.cache == want and set(have.backends()) >= set(backends):
            return out
    models = [ModelSpec(x.name, str(demo / x.engines["torch"].file)) for x in m.models]
    build_bundle(BuildConfig(models=models, out=out, backends=list(backends), image_size=m.image_size,
                             num_classes=m.num_classes, latent_channels=m.latent_shape[0], downsample=1,
                             guidance_channels=m.guidance_channels,
                             batch_range=tuple(m.models[0].engines["ort"].batch_range), cache_scheme=cache_scheme))
    shutil.copytree(demo / "eval", out / "eval")  # the evaluator's classifier and held-out digits, as shipped
    return out
