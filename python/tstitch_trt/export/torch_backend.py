"""The torch backend: the StepModule itself, on CPU or CUDA, behind the runtime's Backend protocol.

It lives in the export layer because it needs torch; the runtime stays torch-free and the
pipeline picks this backend by name.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import UserError
from tstitch_trt.export.step_module import StepModule
from tstitch_trt.models.checkpoints import load_dit
from tstitch_trt.models.dit import DiTConfig
from tstitch_trt.runtime.backend import x_slots
from tstitch_trt.runtime.loop import LoopResult
from tstitch_trt.sampling.trajectory import TrajectoryPlan


def load_step_modules(bundle_dir: str | Path, manifest: Manifest, guidance_channels: int | None = None,
                      dtype: torch.dtype = torch.float32) -> list[StepModule]:
    g = manifest.guidance_channels if guidance_channels is None else guidance_channels
    mods = []
    for m in manifest.models:
        if "torch" not in m.engines:
            raise UserError(f"the bundle has no torch weights for {m.name}; rebuild with --backend torch")
        path = artifact_path(bundle_dir, m.engines["torch"])
        net = load_dit(DiTConfig.from_dict(m.arch), path).to(dtype)
        mods.append(StepModule(net, guidance_channels=g).eval())
    return mods


class TorchBackend:
    name = "torch"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, device: str = "cpu",
                 guidance_channels: int | None = None, cuda_graph: bool = True):
        self.manifest = manifest
        self._setup(load_step_modules(bundle_dir, manifest, guidance_channels), manifest.latent_shape, device,
                    cuda_graph)

    @classmethod
    def from_modules(cls, modules: list[StepModule], latent_shape: tuple[int, int, int], device: str = "cpu",
                     cuda_graph: bool = True) -> TorchBackend:
        """A backend over in-memory StepModules (benchmarks, tests): no bundle needed."""
        self = cls.__new__(cls)
        self.manifest = None
        self._setup(modules, latent_shape, device, cuda_graph)
        return self

    def _setup(self, modules: list[StepModule], latent_shape: tuple[int, int, int], device: str,
               cuda_graph: bool) -> None:
        self.device = device
        self.latent_shape = tuple(latent_shape)
        self.modules = [m.to(device) for m in modules]
        self.allocations = 0
        self._key: tuple | None = None
        self.use_cuda_graph = cuda_graph and device.startswith("cuda")
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.notes: list[str] = []

    def _allocate(self, plan: TrajectoryPlan, batch: int) -> None:
        key = (batch, plan.steps, plan.noise is not None)
        if key == self._key:
            return
        c, h, w = self.latent_shape
        dev = self.device
        lat = (batch, c, h, w)
        self.x = [torch.zeros(lat, device=dev), torch.zeros(lat, device=dev)]
        self.x0 = [torch.zeros(lat, device=dev), torch.zeros(lat, device=dev)]
        self.y = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.guidance = torch.zeros((), device=dev)
        self.t_table = torch.zeros((plan.steps, batch), dtype=torch.int64, device=dev)
        self.coef_table = torch.zeros(plan.coef.shape, device=dev)
        self.noise_table = torch.zeros((plan.steps, *lat), device=dev) if plan.noise is not None else None
        self.zero_noise = torch.zeros(lat, device=dev)
        self.allocations += 10
        self._key = key
        self._graphs.clear()  # graphs captured on the old buffers must never replay

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: np.ndarray, guidance: float) -> None:
        self._allocate(plan, x_init.shape[0])
        self._x_init = x_init
        self.x[0].copy_(torch.from_numpy(x_init))
        self.x0[1].zero_()
        self.y.copy_(torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        self.guidance.fill_(float(guidance))
        self.t_table.copy_(torch.from_numpy(np.repeat(plan.timesteps[:, None], x_init.shape[0], 1)))
        self.coef_table.copy_(torch.from_numpy(plan.coef))
        if self.noise_table is not None:
            self.noise_table.copy_(torch.from_numpy(plan.noise))

    @torch.inference_mode()
    def _step(self, step: int, model: int) -> None:
        src, dst = x_slots(step)
        noise = self.noise_table[step] if self.noise_table is not None else self.zero_noise
        x_next, x0 = self.modules[model](
            self.x[src], self.t_table[step], self.y, self.guidance, self.coef_table[step], self.x0[dst], noise
        )
        self.x[dst].copy_(x_next)
        self.x0[src].copy_(x0)

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
        key = (self._key, tuple(plan.step_model.tolist()))
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
                self.x[0].copy_(torch.from_numpy(self._x_init))
                self.x0[1].zero_()
        except RuntimeError as e:
            self.use_cuda_graph = False
            self.notes.append(f"CUDA graph capture failed, using plain launches: {str(e).splitlines()[0]}")
            torch.cuda.synchronize()
            self.x[0].copy_(torch.from_numpy(self._x_init))  # warm-up steps may have run: start over
            self.x0[1].zero_()
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

    def read_x(self, slot: int) -> np.ndarray:
        return self.x[slot].detach().cpu().numpy().copy()

    def read_x0(self, slot: int) -> np.ndarray:
        return self.x0[slot].detach().cpu().numpy().copy()

    def close(self) -> None:
        self._graphs.clear()
        self.modules = []
        self._key = None
