"""The contract between the stitched loop and a backend (trt, trt-rtx, ort, torch).

A backend owns one step engine per model of the bundle and ONE set of buffers that all engines
bind, by ROLE (runtime/io_roles.py): state ping-pong pairs (x -> x_next, prev_x0 <- x0, and for
SD samplers eps_hist, saved), per-step table rows (t, coef, noise) and per-request constants
(y or context, guidance). Step i reads every state from slot i % 2 and writes slot (i + 1) % 2.
The per-trajectory tables are uploaded once; a step only selects its row. Switching models is
launching another engine on the same buffers.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from tstitch_trt.sampling.trajectory import TrajectoryPlan


class Backend(Protocol):
    name: str  # "ort", "trt", ...
    device: str  # "cpu", "cuda:0"
    allocations: int  # buffer allocations so far: a reused pipeline must not add any

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: Any, guidance: float) -> None:
        """(Re)allocate buffers only if shapes changed, then upload the trajectory's inputs and tables.

        `labels` is the conditioning: DiT class labels (B,), SD context (2B, 77, D), or a dict by input name.
        """

    def launch(self, step: int, model: int) -> float | None:
        """Enqueue step `step` on engine `model`; returns engine milliseconds where they are known."""

    def synchronize(self) -> None: ...

    def read_x(self, slot: int) -> np.ndarray:
        """Copy x ping-pong slot `slot` to the host."""

    def read_x0(self, slot: int) -> np.ndarray:
        """Copy the x0 estimate written into slot `slot` (the prev_x0 pair)."""

    def close(self) -> None:
        """Release engines and buffers."""


def x_slots(step: int) -> tuple[int, int]:
    """(input slot, output slot) of every state pair at step `step` (= io_roles.state_slots)."""
    return step % 2, (step + 1) % 2
