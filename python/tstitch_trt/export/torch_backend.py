"""The torch backend: the StepModule itself, on CPU or CUDA, behind the runtime's Backend protocol.

It lives in the export layer because it needs torch; the runtime stays torch-free and the
pipeline picks this backend by name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tstitch_trt.bundle.manifest import Manifest, ModelEntry, artifact_path
from tstitch_trt.errors import UserError
from tstitch_trt.export.step_module import StepModule
from tstitch_trt.models.checkpoints import load_dit
from tstitch_trt.models.dit import DiTConfig
from tstitch_trt.runtime.backend import x_slots
from tstitch_trt.runtime.host_buffers import check_cached
from tstitch_trt.runtime.io_roles import StepIO, state_slots, step_io
from tstitch_trt.runtime.loop import LoopResult
from tstitch_trt.sampling.trajectory import TrajectoryPlan


def load_step_modules(bundle_dir: str | Path, manifest: Manifest, guidance_channels: int | None = None,
                      dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    """The step module of every model: StepModule (family dit) or UNetStepModule (family unet)."""
    return list(iter_step_modules(bundle_dir, manifest, guidance_channels, dtype))


def iter_step_modules(bundle_dir: str | Path, manifest: Manifest, guidance_channels: int | None = None,
                      dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """The step modules one at a time, loaded as they are asked for and held by nothing here, so that a
    caller that drops each before the next (`check` at real size) holds one model's weights at a time."""
    g = manifest.guidance_channels if guidance_channels is None else guidance_channels
    controlnet = _load_controlnet(bundle_dir, manifest, dtype)
    for m in manifest.models:
        yield _load_step_module(bundle_dir, manifest, m, controlnet, g, dtype)


def _load_step_module(bundle_dir: str | Path, manifest: Manifest, m: ModelEntry, controlnet: nn.Module | None,
                      guidance_channels: int, dtype: torch.dtype) -> nn.Module:
    if "torch" not in m.engines:
        raise UserError(f"the bundle has no torch weights for {m.name}; rebuild with --backend torch")
    path = artifact_path(bundle_dir, m.engines["torch"])
    if m.family == "unet":
        from tstitch_trt.export.unet_step import UNetStepModule
        from tstitch_trt.models.sd import load_unet

        unet = load_unet(Path(bundle_dir) / m.engines["torch"].extra["dir"]).to(dtype)
        return UNetStepModule(unet, controlnet, guidance=manifest.guidance_mode).eval()
    net = load_dit(DiTConfig.from_dict(m.arch), path).to(dtype)
    return StepModule(net, guidance_channels=guidance_channels).eval()


def _load_controlnet(bundle_dir: str | Path, manifest: Manifest, dtype: torch.dtype) -> nn.Module | None:
    """The bundle's ControlNet (one module, shared by every U-Net step module, as in the step graphs)."""
    net = manifest.controlnet
    if net is None:
        return None
    if "torch" not in net["engines"]:
        raise UserError("the bundle has no torch weights for its ControlNet; rebuild with --backend torch")
    from tstitch_trt.models.controlnet import load_controlnet

    entry = net["engines"]["torch"]
    artifact_path(bundle_dir, entry)  # inside the bundle, checksum verified
    return load_controlnet(Path(bundle_dir) / entry.extra["dir"], dtype)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class TorchBackend:
    name = "torch"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, device: str = "cpu",
                 guidance_channels: int | None = None, cuda_graph: bool = True):
        self.manifest = manifest
        self._setup(load_step_modules(bundle_dir, manifest, guidance_channels), step_io(manifest), device,
                    cuda_graph)
        if manifest.cache is not None:  # DeepCache / FORA: each model's full and cached step (the same weights)
            from tstitch_trt.export.cache_steps import cache_step_pair

            self.cache_modules = [cache_step_pair(m, manifest.cache, mm.name)
                                  for m, mm in zip(self.modules, manifest.models, strict=True)]

    @classmethod
    def from_modules(cls, modules: list[nn.Module], latent_shape: tuple[int, int, int] | None = None,
                     device: str = "cpu", cuda_graph: bool = True, io: StepIO | None = None) -> TorchBackend:
        """A backend over in-memory step modules (benchmarks, tests): no bundle needed.

        io: the step I/O by role; default: the DiT step graph of modules[0] (latent_shape is then implied).
        """
        self = cls.__new__(cls)
        self.manifest = None
        if io is None:
            from tstitch_trt.export.onnx_export import io_spec

            io = StepIO.from_io(io_spec(modules[0]))
        self._setup(modules, io, device, cuda_graph)
        return self

    def _setup(self, modules: list[nn.Module], io: StepIO, device: str, cuda_graph: bool) -> None:
        self.device = device
        self.io = io
        self.modules = [m.to(device) for m in modules]
        self.allocations = 0
        self._key: tuple | None = None
        self.use_cuda_graph = cuda_graph and device.startswith("cuda")
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.notes: list[str] = []
        self.cache_modules: list[tuple[nn.Module, nn.Module]] = []
        self._cached: list[bool] = []

    def _allocate(self, plan: TrajectoryPlan, latent_shape: tuple[int, ...]) -> None:
        key = (tuple(latent_shape), plan.steps, plan.noise is not None, int(plan.coef.shape[1]))
        if key == self._key:
            return
        io, dev = self.io, self.device
        dims = io.dims(latent_shape)

        def zeros(shape: tuple[int, ...], name: str) -> torch.Tensor:
            return torch.zeros(shape, dtype=_TORCH_DTYPES[io.dtype(name).name], device=dev)

        self.state = {n: [zeros(io.shape(n, dims), n) for _ in range(2)] for n, _ in io.state}
        self.request = {n: zeros(io.shape(n, dims), n) for n in io.request}
        self.tables = {n: zeros((plan.steps, *io.shape(n, dims)), n) for n in io.step
                       if n != "noise" or plan.noise is not None}
        self.zero_rows = {n: zeros(io.shape(n, dims), n) for n in io.step if n not in self.tables}
        self.kept = [torch.zeros(f.resolve(dims), dtype=_TORCH_DTYPES[f.dtype.name], device=dev) for f in io.features]
        self.allocations += (2 * len(self.state) + len(self.request) + len(self.tables) + len(self.zero_rows)
                             + len(self.kept))
        self._key = key
        self._graphs.clear()  # graphs captured on the old buffers must never replay

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: Any, guidance: float) -> None:
        """labels: the conditioning (DiT labels (B,), SD context (2B, 77, D)) or a dict by input name."""
        self._allocate(plan, x_init.shape)
        self._cached = check_cached(plan, self.io)
        dims = self.io.dims(x_init.shape)
        self._x_init = x_init
        self._reset_state()
        for n, a in self.io.request_arrays(labels, guidance).items():
            self.request[n].copy_(torch.from_numpy(a))
        for n, t in self.io.step_tables(plan, dims).items():
            if t is not None:
                self.tables[n].copy_(torch.from_numpy(t))

    def _reset_state(self) -> None:
        for n, pair in self.state.items():
            if n == self.io.latent:
                pair[0].copy_(torch.from_numpy(np.ascontiguousarray(self._x_init, dtype=np.float32)))
            else:
                pair[0].zero_()
        for k in self.kept:
            k.zero_()

    @torch.inference_mode()
    def _step(self, step: int, model: int) -> None:
        src, dst = state_slots(step)
        io = self.io
        kwargs = {n: self.state[n][src] for n, _ in io.state}
        kwargs.update(self.request)
        kwargs.update({n: self.tables[n][step] if n in self.tables else self.zero_rows[n] for n in io.step})
        if io.cache is None:
            outs = self.modules[model](**kwargs)
        elif self._cached[step]:  # the cached path on the model's kept feature (DeepCache, FORA)
            outs = self.cache_modules[model][1](**kwargs, **{io.cache[0]: self.kept[model]})
        else:
            *outs, kept = self.cache_modules[model][0](**kwargs)
            self.kept[model].copy_(kept)
        for (n, _), out in zip(io.state, outs, strict=True):
            self.state[n][dst].copy_(out)

    def launch(self, step: int, model: int) -> float | None:
        if self.device == "cpu":
            t0 = time.perf_counter()
            self._step(step, model)
            return (time.perf_counter() - t0) * 1e3
        self._step(step, model)
        return None

    def run_graph(self, plan: TrajectoryPlan) -> LoopResult | None:
        """Capture the whole trajectory (both models, all steps) as one CUDA graph and replay it."""
        if not self.use_cuda_graph:
            return None
        key = (self._key, tuple(plan.step_model.tolist()), tuple(self._cached))
        g = self._graphs.get(key)
        try:
            if g is None:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                # warm-up outside capture (allocator, cuBLAS/cuDNN handles, lazy kernel loading):
                # both parities and the first step of every model the graph will run
                firsts = {int(m): i for i, m in reversed(list(enumerate(plan.step_model)))}
                with torch.cuda.stream(stream):
                    for i in sorted(set(range(min(2, plan.steps))) | set(firsts.values())):
                        self._step(i, int(plan.step_model[i]))
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(plan.steps):
                        self._step(i, int(plan.step_model[i]))
                self._graphs[key] = g
                # warm-up ran real steps on the buffers: restore the trajectory's start state
                self._reset_state()
        except RuntimeError as e:
            self.use_cuda_graph = False
            self.notes.append(f"CUDA graph capture failed, using plain launches: {str(e).splitlines()[0]}")
            torch.cuda.synchronize()
            self._reset_state()  # warm-up steps may have run: start over
            return None
        return self._replay(g, plan)

    def take_notes(self) -> list[str]:
        """Notes not yet reported (the loop adds them to its result once)."""
        notes, self.notes = self.notes, []
        return notes

    def _replay(self, g: torch.cuda.CUDAGraph, plan: TrajectoryPlan) -> LoopResult:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        gpu_ms = start.elapsed_time(end)
        x = self.read_x(x_slots(plan.steps - 1)[1])
        n = plan.steps
        # One launch: per-step times are the trajectory's wall / GPU time divided by the steps.
        return LoopResult(x, [wall / n] * n, [gpu_ms / n] * n, 0.0, mode="graph")

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def read_state(self, name: str, slot: int) -> np.ndarray:
        return self.state[name][slot].detach().cpu().numpy().copy()

    def read_x(self, slot: int) -> np.ndarray:
        return self.read_state(self.io.latent, slot)

    def read_x0(self, slot: int) -> np.ndarray:
        return self.read_state("prev_x0", slot)

    def close(self) -> None:
        self._graphs.clear()
        self.modules = []
        self._key = None
