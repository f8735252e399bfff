"""The stitch schedule: which model (index in stitch order, smallest first) runs each step.

Exactly the T-Stitch reference rules, decided on the ORIGINAL timestep t (0..999) of each step:
- two models, ratio r: the small model while t / T >= 1 - r, else the large one;
- K models, fractions f: progress = 1 - t / T; the first model whose cumulative fraction is
  >= progress runs. The reference accumulates the fractions in float32; so do we, so that
  boundary steps land on the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stitch_schedule(
    timesteps: Sequence[int] | np.ndarray,
    num_models: int,
    ratio: float | None = None,
    fractions: Sequence[float] | None = None,
    num_timesteps: int = 1000,
) -> np.ndarray:
    """Model index per step for `timesteps` in sampling order (noisiest first)."""
    ts = [int(t) for t in timesteps]
    if (ratio is None) == (fractions is None):
        raise ValueError("give exactly one of ratio or fractions")
    if ratio is not None:
        if num_models != 2:
            raise ValueError(f"a ratio stitches exactly 2 models, the bundle has {num_models}; use fractions")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        return np.array([0 if t / num_timesteps >= 1 - ratio else 1 for t in ts], dtype=np.int64)
    assert fractions is not None
    check_fractions(fractions, num_models)
    milestones = np.cumsum(np.asarray(fractions, dtype=np.float32), dtype=np.float32).astype(np.float64)
    out = []
    for t in ts:
        progress = 1 - t / num_timesteps
        idx = next((i for i, m in enumerate(milestones) if progress <= m), num_models - 1)
        out.append(idx)
    return np.array(out, dtype=np.int64)


def check_fractions(fractions: Sequence[float], num_models: int) -> None:
    if len(fractions) != num_models:
        raise ValueError(f"got {len(fractions)} fractions for {num_models} models; give one per model")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0, got {list(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(fractions):g})")


def steps_per_model(step_model: np.ndarray, num_models: int) -> list[int]:
    return [int((step_model == i).sum()) for i in range(num_models)]


def stitch_schedule_by_call(
    n_calls: int, num_models: int, ratio: float | None = None, fractions: Sequence[float] | None = None
) -> np.ndarray:
    """The T-Stitch SD rule, by U-Net CALL index i (not timestep): progress = (i + 1) / n_calls.

    Two models, ratio r: the small model while progress <= r (PNDM 50 steps = 51 calls, r = 0.4 ->
    20 small calls). K models, fractions f: the first model whose cumulative fraction (float32, as
    the DiT rule) is >= progress.
    """
    if (ratio is None) == (fractions is None):
        raise ValueError("give exactly one of ratio or fractions")
    progress = [(i + 1) / n_calls for i in range(n_calls)]
    if ratio is not None:
        if num_models != 2:
            raise ValueError(f"a ratio stitches exactly 2 models, the bundle has {num_models}; use fractions")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        return np.array([0 if p <= ratio else 1 for p in progress], dtype=np.int64)
    check_fractions(fractions, num_models)
    milestones = np.cumsum(np.asarray(fractions, dtype=np.float32), dtype=np.float32).astype(np.float64)
    return np.array([next((i for i, m in enumerate(milestones) if p <= m), num_models - 1) for p in progress],
                    dtype=np.int64)
