"""The role-bound host buffers of the CPU backends (ONNX Runtime on the CPU, OpenVINO).

One set per shape (runtime/io_roles.py): a ping-pong pair per state tensor, one array per request
constant, a per-trajectory table per step input (a zero row where the sampler takes no noise), one
kept-feature buffer per model where the bundle has DeepCache's cached graphs (the cache role). A
backend mixes this in and binds its engine's inputs and outputs to these arrays in `_bind_all`; a
reused backend allocates nothing new while the shape stays the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tstitch_trt.errors import UserError
from tstitch_trt.runtime.io_roles import StepIO
from tstitch_trt.sampling.trajectory import TrajectoryPlan


class HostStepBuffers:
    io: StepIO
    allocations: int
    _shape_key: tuple | None

    def _allocate(self, plan: TrajectoryPlan, latent_shape: tuple[int, ...]) -> None:
        key = (tuple(latent_shape), plan.steps, plan.noise is not None, int(plan.coef.shape[1]))
        if key == self._shape_key:
            return
        io = self.io
        dims = io.dims(latent_shape)
        self._prepare_shape(dims)
        self.state = {n: [np.zeros(io.shape(n, dims), io.dtype(n)) for _ in range(2)] for n, _ in io.state}
        self.request = {n: np.zeros(io.shape(n, dims), io.dtype(n)) for n in io.request}
        self.tables = {n: np.zeros((plan.steps, *io.shape(n, dims)), io.dtype(n)) for n in io.step
                       if n != "noise" or plan.noise is not None}
        self.zero_rows = {n: np.zeros(io.shape(n, dims), io.dtype(n)) for n in io.step if n not in self.tables}
        self.kept = [np.zeros(f.resolve(dims), f.dtype) for f in io.features]  # one per model, not ping-ponged
        self.allocations += (2 * len(self.state) + len(self.request) + len(self.tables) + len(self.zero_rows)
                             + len(self.kept))
        self._shape_key = key
        self._bind_all(plan.steps)

    def _prepare_shape(self, dims: dict[str, int]) -> None:
        """Hook before binding a new shape (OpenVINO compiles its static-shape models here)."""

    def _bind_all(self, steps: int) -> None:
        raise NotImplementedError

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, cond: Any, guidance: float) -> None:
        """cond: the conditioning array (DiT labels (B,), SD context (2B, 77, D)) or a dict by input name."""
        self._allocate(plan, x_init.shape)
        self._cached = check_cached(plan, self.io)
        for k in self.kept:
            k[...] = 0
        dims = self.io.dims(x_init.shape)
        for n, pair in self.state.items():
            pair[0][...] = x_init if n == self.io.latent else 0
        for n, a in self.io.request_arrays(cond, guidance).items():
            self.request[n][...] = a
        for n, t in self.io.step_tables(plan, dims).items():
            if t is not None:
                self.tables[n][...] = t

    def read_state(self, name: str, slot: int) -> np.ndarray:
        """A state tensor (by its input name) from ping-pong slot `slot`."""
        return self.state[name][slot].copy()

    def read_x(self, slot: int) -> np.ndarray:
        return self.read_state(self.io.latent, slot)

    def read_x0(self, slot: int) -> np.ndarray:
        return self.read_state("prev_x0", slot)


def check_cached(plan: TrajectoryPlan, io: StepIO) -> list[bool]:
    """The plan's per-call full / cached choice, refused where the bundle has no cached graphs."""
    if plan.cached is None or not plan.cached.any():
        return [False] * plan.steps
    if io.cache is None:
        raise UserError("this bundle has no cached step graphs (DeepCache); rebuild it with --cache-branch K, or "
                        "run with --cache-interval 1")
    return [bool(c) for c in plan.cached]
