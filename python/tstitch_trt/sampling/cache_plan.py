"""Which U-Net calls of a trajectory run the full step graph and which the cached one (DeepCache), computed once
per trajectory beside the sampler tables.

DeepCacheSDHelper's rule: a call is full when (i_t - i_start) % cache_interval == 0, where i_t is the index of
the call's timestep in the scheduler's timesteps (its FIRST occurrence: PNDM repeats one timestep, and both of
its calls count as that index) and i_start is i_t of the first call the helper sees. Composed with stitching
(a cache belongs to the model that made it), the helper starts afresh on each model at its first call after
a switch: every switch starts a new count, so that call is full and no model reads another's feature. The stitch
schedule itself is unchanged.
"""

from __future__ import annotations

import numpy as np

MAX_CACHE_INTERVAL = 1000  # no sampler here makes more U-Net calls per trajectory
MAX_CACHE_BRANCH = 63  # DeepCache's branch ids: 3 per up block (the manifest schema's bound)


def cached_calls(timesteps: np.ndarray, step_model: np.ndarray, interval: int) -> np.ndarray:
    """(N,) bool: call i runs its model's cached step graph. interval 1: none does."""
    n = len(timesteps)
    out = np.zeros(n, dtype=bool)
    if interval <= 1:
        return out
    ts = [float(t) for t in timesteps]
    first = {}
    for i, t in enumerate(ts):
        first.setdefault(t, i)
    index = [first[t] for t in ts]
    start = 0
    for i in range(n):
        if i == 0 or step_model[i] != step_model[i - 1]:  # a model's first call after a switch: a new count
            start = index[i]
        out[i] = (index[i] - start) % interval != 0
    return out
