"""The contract between the stitched loop and a backend (trt, trt-rtx, ort, torch).

A backend owns one step engine per model of the bundle and ONE set of buffers that all engines
bind: the x and x0 ping-pong pairs plus t, y, guidance, coef and noise. Step i reads slot i % 2
and writes slot (i + 1) % 2 of x; it writes x0 slot i % 2 and reads the previous x0 from the
other slot. The per-trajectory tables (t, coef, noise) are uploaded once; a step only selects
its row. Switching models is launching another engine on the same buffers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tstitch_trt.sampling.trajectory import TrajectoryPlan


class Backend(Protocol):
    name: str  # "ort", "trt", ...
    device: str  # "cpu", "cuda:0"
    allocations: int  # buffer allocations so far: a reused pipeline must not add any

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: np.ndarray, guidance: float) -> None:
        """(Re)allocate buffers only if shapes changed, then upload the trajectory's inputs and tables."""

    def launch(self, step: int, model: int) -> float | None:
        """Enqueue step `step` on engine `model`; returns engine milliseconds where they are known."""

    def synchronize(self) -> None: ...

    def read_x(self, slot: int) -> np.ndarray:
        """Copy x ping-pong slot `slot` to the host."""

    def read_x0(self, slot: int) -> np.ndarray: ...

    def close(self) -> None:
        """Release engines and buffers."""


def x_slots(step: int) -> tuple[int, int]:
    """(input slot, output slot) of x for step `step`; x0 is written to the input slot's parity."""
    return step % 2, (step + 1) % 2
