"""Noise schedules and DiT-style respacing (numpy, float64, as the reference computes them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so any length spans the same range as 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """The original timesteps kept when respacing to `steps` (ascending).

    `steps` is an int N (DiT's `create_diffusion(str(N))`: N evenly strided, rounded positions) or
    "ddimN" (the stride that gives exactly N steps starting at 0, as in DDIM's code).
    """
    if isinstance(steps, str) and steps.startswith("ddim"):
        want = int(steps[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make {want} equally strided steps from {num_timesteps}")
    n = int(steps)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {n}")
    stride = 1.0 if n <= 1 else (num_timesteps - 1) / (n - 1)
    taken, pos = [], 0.0
    for _ in range(n):
        taken.append(round(pos))
        pos += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class RespacedSchedule:
    """A schedule restricted to `timesteps` (ascending original timesteps).

    alphas_cumprod[i] is the original alpha-bar at timesteps[i]; betas are the respaced betas
    1 - abar_i / abar_{i-1} that DiT's SpacedDiffusion derives.
    """

    timesteps: np.ndarray  # (N,) int64, ascending
    alphas_cumprod: np.ndarray  # (N,) float64
    betas: np.ndarray  # (N,) float64

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    def __len__(self) -> int:
        return len(self.timesteps)


def respace(betas: np.ndarray, timesteps: list[int]) -> RespacedSchedule:
    abar = np.cumprod(1.0 - betas)
    ts = np.asarray(sorted(timesteps), dtype=np.int64)
    kept = abar[ts]
    new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return RespacedSchedule(timesteps=ts, alphas_cumprod=kept, betas=new_betas)


def dit_schedule(steps: int | str, num_timesteps: int = 1000) -> RespacedSchedule:
    """The schedule DiT samples with: linear betas over 1000 steps, respaced to `steps`."""
    return respace(linear_betas(num_timesteps), space_timesteps(num_timesteps, steps))
