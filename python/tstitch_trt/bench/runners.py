"""What gets timed: one of our backends behind the pipeline, and the reference PyTorch loop."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tstitch_trt.bench.host import torch_device_memory
from tstitch_trt.bench.idle import IdleGate
from tstitch_trt.bench.workloads import start_latent, step_labels
from tstitch_trt.errors import UserError

# OpenVINO runs the bundle's ONNX graphs (the ort artifacts) at a fixed precision per runner
OPENVINO_RUNNERS = {"openvino": "fp32", "openvino-bf16": "bf16"}


@dataclass
class Trajectory:
    seconds: float  # end to end: planning, upload, all steps, read-back
    latent: np.ndarray
    steps_per_model: list[int]
    step_ms_mean: float | None = None
    engine_ms_total: float | None = None
    host_overhead_ms_per_step: float | None = None  # LoopResult: mean(step wall - engine)


class BackendRunner:
    """One of our backends behind the pipeline (what a user calls), without decoding."""

    def __init__(self, kind: str, bundle: Path, manifest, device: str, threads: int):
        from tstitch_trt.pipeline.dit import StitchedPipeline

        self.name = kind
        self.backend = open_bench_backend(kind, bundle, manifest, device, threads)
        self.pipe = StitchedPipeline(bundle, manifest, self.backend, "benchmark")
        self.device = self.backend.device

    def trajectory(self, z: np.ndarray, labels: np.ndarray, steps: int, ratio: float, cfg: float) -> Trajectory:
        t0 = time.perf_counter()
        res = self.pipe(class_labels=labels.tolist(), ratio=ratio, steps=steps, sampler="ddim", cfg_scale=cfg,
                        init_noise=z, progress=False, decode=False)
        seconds = time.perf_counter() - t0
        rep = res.report
        engine = rep["engine_ms"]
        return Trajectory(seconds, res.latents, rep["steps_per_model"], float(np.mean(rep["step_ms"])),
                          None if engine is None else float(np.sum(engine)), rep["host_overhead_ms_per_step"])

    def step_times(self, model: int, batch: int, repeats: int, warmup: int,
                   gate: IdleGate | None = None) -> tuple[list[float], list[float] | None]:
        """Wall (and engine) ms of single steps of `model` at `batch`: every step on that model."""
        from tstitch_trt.runtime.loop import run_stitched
        from tstitch_trt.sampling.trajectory import plan_trajectory

        m = self.pipe.manifest
        n_models = len(m.models)
        onehot = [1.0 if i == model else 0.0 for i in range(n_models)]
        shape = (batch, *m.latent_shape)
        x = start_latent(1, batch, m.latent_shape)
        labels = step_labels(batch, m.num_classes)

        def plan(n: int):
            return plan_trajectory("ddim", n, n_models, shape, np.random.default_rng(0), fractions=onehot)

        for _ in range(warmup):
            run_stitched(self.backend, plan(1), x, labels, 1.5)
        wall: list[float] = []
        engine: list[float] | None = []
        while len(wall) < repeats:
            if gate is not None:
                gate.wait()
            res = run_stitched(self.backend, plan(repeats), x, labels, 1.5)
            if res.mode == "steps":  # one sample per step
                wall += res.step_ms
                engine = engine + res.engine_ms if (engine is not None and res.engine_ms) else None
            else:  # one launch for the whole trajectory: one sample per trajectory
                wall.append(float(np.mean(res.step_ms)))
                engine = engine + [float(np.mean(res.engine_ms))] if (engine is not None and res.engine_ms) else None
        return wall[:repeats], None if engine is None else engine[:repeats]

    def memory(self) -> dict | None:
        """Device memory where the backend reports it (e.g. TensorRT scratch + buffers)."""
        report = getattr(self.backend, "memory_report", None)
        if callable(report):
            return report()
        if self.name == "torch" and str(self.device).startswith("cuda"):
            return torch_device_memory()
        return None

    def close(self) -> None:
        self.pipe.close()


class ReferenceRunner:
    """benchmarks/reference_loop.py on the bundle's torch weights; bf16=True: under torch.autocast(bf16).

    The autocast variant is the one-line change a user would make to the reference loop: the second
    baseline, the one a CPU engine in bf16 has to beat.
    """

    def __init__(self, bundle: Path, manifest, device: str, bf16: bool = False, models: list | None = None):
        self.name = "reference-bf16" if bf16 else "reference"
        self.bf16 = bf16
        self.ref = load_reference_loop()
        self.device = device
        self.manifest = manifest
        # autocast leaves the fp32 weights as they are, so both baselines can share one set (DiT-XL/2: 2.7 GB)
        self.models = models if models is not None else self.ref.load_reference_models(bundle, manifest, device=device)

    def trajectory(self, z: np.ndarray, labels: np.ndarray, steps: int, ratio: float, cfg: float) -> Trajectory:
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        zt = torch.from_numpy(z).to(self.device)
        st: dict = {}
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.ref.reference_sample(self.models, zt, [int(v) for v in labels], steps, ratio=ratio,
                                            cfg_scale=cfg, guidance_channels=self.manifest.guidance_channels, stats=st)
        latent = out.float().cpu().numpy()  # the caller gets a host latent, as from our pipeline
        return Trajectory(time.perf_counter() - t0, latent, st["calls_per_model"])

    def memory(self) -> dict | None:
        if self.device.startswith("cuda"):
            return torch_device_memory()
        return None

    def close(self) -> None:
        self.models = []


def open_bench_backend(kind: str, bundle: Path, manifest, device: str, threads: int):
    """Our backend `kind`, with the benchmark's thread count for the CPU ones."""
    if kind == "ort":
        from tstitch_trt.runtime import ort_backend

        opener = getattr(ort_backend, "open_ort_backend", None)
        if opener is not None:  # CUDA execution provider where onnxruntime-gpu and a GPU exist
            return opener(bundle, manifest, device=None if device == "auto" else device, threads=threads)
        return ort_backend.OrtBackend(bundle, manifest, providers=["CPUExecutionProvider"], threads=threads)
    if kind == "torch":
        from tstitch_trt.export.torch_backend import TorchBackend

        return TorchBackend(bundle, manifest, device=device)
    if kind in OPENVINO_RUNNERS:
        from tstitch_trt.runtime.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle, manifest, precision=OPENVINO_RUNNERS[kind], threads=threads)
    from tstitch_trt.pipeline.backends import open_backend

    return open_backend(kind, bundle, manifest, device=device)


def benchmarks_dir() -> Path | None:
    """The source checkout's benchmarks/ (the reference loop is a benchmark, not part of the package)."""
    env = os.environ.get("TSTITCH_BENCHMARKS_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "benchmarks", Path.cwd() / "benchmarks"]
    return next((c for c in candidates if (c / "reference_loop.py").is_file()), None)


def load_reference_loop():  # -> module
    name = "tstitch_bench_reference_loop"
    if name in sys.modules:
        return sys.modules[name]
    d = benchmarks_dir()
    if d is None:
        raise UserError("benchmarks/reference_loop.py was not found (it ships with the source checkout); "
                        "run from the repository, set TSTITCH_BENCHMARKS_DIR, or pass --no-reference")
    spec = importlib.util.spec_from_file_location(name, d / "reference_loop.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
