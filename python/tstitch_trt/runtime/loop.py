"""The stitched loop: the stitch schedule x the engines x the shared buffers."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tstitch_trt.errors import UserError
from tstitch_trt.runtime.backend import Backend, x_slots
from tstitch_trt.sampling.trajectory import TrajectoryPlan


class NonFiniteError(UserError):
    """A step produced NaN or Inf."""


class Cancelled(Exception):
    """The caller gave up on the trajectory (its `cancel` event was set); it stopped between two steps."""


@dataclass
class LoopResult:
    x: np.ndarray  # final latent (B, C, H, W) fp32
    step_ms: list[float]  # wall time of each step (launch + wait)
    engine_ms: list[float] | None  # engine time per step where the backend reports it
    total_seconds: float
    mode: str = "steps"  # "steps" (one launch per step) or "graph" (whole trajectory, one launch)
    notes: list[str] = field(default_factory=list)

    @property
    def host_overhead_ms_per_step(self) -> float | None:
        if not self.engine_ms:
            return None
        return float(np.mean(np.asarray(self.step_ms) - np.asarray(self.engine_ms)))


def run_stitched(
    backend: Backend,
    plan: TrajectoryPlan,
    x_init: np.ndarray,
    labels: np.ndarray,
    guidance: float,
    progress: bool | None = None,
    model_names: list[str] | None = None,
    cancel: threading.Event | None = None,
) -> LoopResult:
    """Run the whole trajectory; raises NonFiniteError naming the first bad step and model, and Cancelled
    when `cancel` is set before a step (a whole-trajectory CUDA graph is one launch: it runs to its end)."""
    t_start = time.perf_counter()
    backend.prepare(plan, x_init, labels, guidance)
    _check_cancel(cancel, 0)
    graph = getattr(backend, "run_graph", None)
    result: LoopResult | None = None
    if graph is not None:
        result = graph(plan)  # None when the backend decides it cannot (it says why in notes)
    if result is None:
        result = _run_steps(backend, plan, progress, cancel)
    take_notes = getattr(backend, "take_notes", None)
    if take_notes is not None:  # e.g. why a CUDA graph fell back: reported once, with the run it affected
        result.notes.extend(n for n in take_notes() if n not in result.notes)
    result.total_seconds = time.perf_counter() - t_start
    if not np.isfinite(result.x).all():
        step, model = locate_non_finite(backend, plan, x_init, labels, guidance)
        name = model_names[model] if model_names else f"model {model}"
        raise NonFiniteError(
            f"NaN/Inf in the latent: first at step {step} (t={int(plan.timesteps[step])}) on {name}; "
            "check the weights, the cfg scale and the engine precision (try --precision fp32)"
        )
    return result


def _check_cancel(cancel: threading.Event | None, step: int) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled before step {step}: the caller gave up")


def _run_steps(backend: Backend, plan: TrajectoryPlan, progress: bool | None,
               cancel: threading.Event | None = None) -> LoopResult:
    bar = _progress_bar(plan.steps, progress)
    step_ms: list[float] = []
    engine_ms: list[float] = []
    for i in range(plan.steps):
        _check_cancel(cancel, i)
        t0 = time.perf_counter()
        e = backend.launch(i, int(plan.step_model[i]))
        backend.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if e is not None:
            engine_ms.append(e)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    x = backend.read_x(x_slots(plan.steps - 1)[1])
    return LoopResult(x, step_ms, engine_ms if len(engine_ms) == plan.steps else None, 0.0)


def locate_non_finite(
    backend: Backend, plan: TrajectoryPlan, x_init: np.ndarray, labels: np.ndarray, guidance: float
) -> tuple[int, int]:
    """Replay the trajectory step by step (only after a failure) to find the first non-finite output."""
    backend.prepare(plan, x_init, labels, guidance)
    for i in range(plan.steps):
        model = int(plan.step_model[i])
        backend.launch(i, model)
        backend.synchronize()
        if not all(np.isfinite(a).all() for a in _state_outputs(backend, i)):
            return i, model
    return plan.steps - 1, int(plan.step_model[-1])


def _state_outputs(backend: Backend, step: int) -> list[np.ndarray]:
    """What step `step` wrote: every state by role where the backend binds by role, else x and x0."""
    dst = x_slots(step)[1]
    io = getattr(backend, "io", None)
    read_state = getattr(backend, "read_state", None)
    if read_state is not None and hasattr(io, "state"):
        return [read_state(name, dst) for name, _ in io.state]
    return [backend.read_x(dst), backend.read_x0(dst)]


def _progress_bar(total: int, progress: bool | None):  # -> tqdm | None
    if progress is None:
        progress = sys.stderr.isatty() and total >= 20
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False)
