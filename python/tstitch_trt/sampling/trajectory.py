"""Everything a trajectory needs, precomputed on the host and uploaded once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tstitch_trt.sampling.coefficients import coefficient_table
from tstitch_trt.sampling.schedule import dit_schedule
from tstitch_trt.sampling.stitch import stitch_schedule


@dataclass(frozen=True)
class TrajectoryPlan:
    """Per-step tables, in sampling order. noise is None for samplers that take none."""

    sampler: str
    timesteps: np.ndarray  # (N,) int64 original timesteps
    coef: np.ndarray  # (N, K) float32
    step_model: np.ndarray  # (N,) int64, model index in stitch order
    noise: np.ndarray | None  # (N, B, C, H, W) float32
    tables: Mapping[str, np.ndarray] = field(default_factory=dict)  # other per-step inputs by name, (N, ...)
    # (N,) bool: call i runs its model's cached step graph (DeepCache: sampling/cache_plan.py); None: all full
    cached: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def sampler_needs_noise(sampler: str, eta: float) -> bool:
    return sampler == "ddpm" or (sampler == "ddim" and eta > 0)


def plan_trajectory(
    sampler: str,
    steps: int,
    num_models: int,
    latent_shape: Sequence[int],
    rng: np.random.Generator,
    ratio: float | None = None,
    fractions: Sequence[float] | None = None,
    eta: float = 0.0,
    num_timesteps: int = 1000,
    noise: np.ndarray | None = None,
) -> TrajectoryPlan:
    """Tables for one trajectory; per-step noise (N, B, C, H, W) is `noise` when given (a served batch
    concatenates each request's own), else drawn from `rng` after the caller's draws."""
    schedule = dit_schedule(steps, num_timesteps)
    timesteps = schedule.timesteps[::-1].copy()
    table = coefficient_table(sampler, schedule, eta)
    step_model = stitch_schedule(timesteps, num_models, ratio=ratio, fractions=fractions,
                                 num_timesteps=num_timesteps)
    if not sampler_needs_noise(sampler, eta):
        noise = None
    elif noise is None:
        noise = rng.standard_normal((len(timesteps), *latent_shape), dtype=np.float32)
    elif noise.shape != (len(timesteps), *latent_shape):
        raise ValueError(f"per-step noise has shape {noise.shape}, expected {(len(timesteps), *latent_shape)}")
    return TrajectoryPlan(sampler, timesteps, table, step_model, noise)
