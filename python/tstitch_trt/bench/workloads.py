"""What the bench runs: the demo pair, DiT-S/2 -> DiT-XL/2 (built once into the cache) or a bundle."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError

# The reference's demo labels (REFERENCE.md); cycled and taken modulo the bundle's class count.
DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)


@dataclass
class Workload:
    name: str
    bundle: Path
    steps: int
    batch: int
    step_batches: list[int]
    notes: list[str] = field(default_factory=list)


def workload_defaults(name: str, gpu: bool) -> tuple[int, int, list[int]]:
    """(steps, batch, step batches). The paper's setting on a GPU; a CPU-sized one for DiT-XL on a CPU."""
    if name == "dit-s-xl" and not gpu:
        # DiT-XL/2 is ~240 GFLOP per step at batch 1 (CFG: 2 rows): minutes per trajectory on a few cores.
        # 5 steps keep the ratio grid exact at 0.2 (s of the 5 steps on DiT-S/2 at ratio s/5).
        return 5, 1, [1]
    return (100 if name == "dit-s-xl" else 50), 8, [1, 8, 20]


def resolve_workload(args: argparse.Namespace, gpu: bool, log: Callable[[str], None]) -> Workload:
    name = args.workload
    bundle_arg = args.bundle
    if bundle_arg == "demo":
        bundle_arg, name = None, name or "demo"
    if bundle_arg is not None and name is not None:
        raise UserError("give either --bundle DIR or --workload NAME, not both")
    notes: list[str] = []
    if bundle_arg is not None:
        bundle, name = Path(bundle_arg), "bundle"
    elif (name or "demo") == "demo":
        name = "demo"
        bundle = resolve_bundle(None)
    else:
        bundle = dit_s_xl_bundle(Path(args.cache), log)
    steps, batch, step_batches = workload_defaults(name, gpu)
    w = Workload(name, bundle, args.steps or steps, args.batch or batch, args.step_batches or step_batches, notes)
    if w.steps < 1 or w.batch < 1:
        raise UserError(f"--steps and --batch must be >= 1 (got {w.steps}, {w.batch})")
    return w


def dit_s_xl_bundle(cache: Path, log: Callable[[str], None]) -> Path:
    """DiT-S/2 -> DiT-XL/2 at 256 px (latent 4x32x32), random weights, torch + ort; built once, reused."""
    out = cache / "dit-s-xl"
    if not _bundle_ok(out, ["torch", "ort"], names=["DiT-S/2", "DiT-XL/2"]):
        log(f"building DiT-S/2 -> DiT-XL/2 (random weights, torch + ort) into {out}; once, several minutes "
            "(the XL fp32 graph is ~2.7 GB) ...")
        from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

        build_bundle(BuildConfig(models=[ModelSpec("DiT-S/2", "random:0"), ModelSpec("DiT-XL/2", "random:1")],
                                 out=out, backends=["torch", "ort"]),
                     on_model=lambda n: log(f"  exporting {n} ..."))
    return out


def _bundle_ok(path: Path, backends: list[str], names: list[str] | None = None) -> bool:
    from tstitch_trt.bundle.manifest import read_manifest

    try:
        m = read_manifest(path)
    except UserError:
        return False
    return all(b in m.backends() for b in backends) and (names is None or [x.name for x in m.models] == names)

def step_labels(batch: int, num_classes: int) -> np.ndarray:
    return np.array([DEMO_LABELS[i % len(DEMO_LABELS)] % num_classes for i in range(batch)], dtype=np.int64)


def start_latent(seed: int, batch: int, shape: Sequence[int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)
