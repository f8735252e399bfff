"""The stitch schedule: the exact T-Stitch rules on original timesteps."""

from __future__ import annotations

import numpy as np
import pytest

from tstitch_trt.sampling.schedule import dit_schedule
from tstitch_trt.sampling.stitch import steps_per_model, stitch_schedule


def schedule(n: int, **kw) -> np.ndarray:
    ts = dit_schedule(n).timesteps[::-1]
    return stitch_schedule(ts, kw.pop("num_models", 2), **kw)


@pytest.mark.parametrize("steps, small", [(100, 40), (50, 20), (250, 100)])
def test_ratio_04_counts(steps: int, small: int) -> None:
    s = schedule(steps, ratio=0.4)
    assert steps_per_model(s, 2) == [small, steps - small]
    # the small model takes the EARLY (noisy) steps: one switch, small first
    assert (s[:small] == 0).all() and (s[small:] == 1).all()


def test_extremes() -> None:
    assert (schedule(100, ratio=0.0) == 1).all()
    assert (schedule(100, ratio=1.0) == 0).all()


def test_rule_is_on_original_timestep() -> None:
    ts = np.array([999, 600, 599, 0])
    assert stitch_schedule(ts, 2, ratio=0.4).tolist() == [0, 0, 1, 1]  # t/1000 >= 0.6


def test_three_models_cumulative_fractions() -> None:
    s = schedule(100, num_models=3, fractions=[0.3, 0.3, 0.4])
    counts = steps_per_model(s, 3)
    assert sum(counts) == 100 and counts == [30, 30, 40]
    assert (np.diff(s) >= 0).all()  # S, then B, then XL
    # progress = 1 - t/1000 <= cumsum: t=990 -> progress 0.01 -> model 0; t=0 -> progress 1 -> last
    assert stitch_schedule([990, 0], 3, fractions=[0.3, 0.3, 0.4]).tolist() == [0, 2]
    # float32 accumulation as in the reference: 0.1+0.2 in float32 is 0.3000000119 >= progress 0.3
    assert stitch_schedule([700], 3, fractions=[0.1, 0.2, 0.7]).tolist() == [1]


def test_single_model_fraction_equals_ratio_extremes() -> None:
    np.testing.assert_array_equal(schedule(50, num_models=2, fractions=[0.0, 1.0]), schedule(50, ratio=0.0))
    np.testing.assert_array_equal(schedule(50, num_models=2, fractions=[1.0, 0.0]), schedule(50, ratio=1.0))


@pytest.mark.parametrize("kw, msg", [
    (dict(ratio=1.5), "ratio must be in"),
    (dict(ratio=-0.1), "ratio must be in"),
    (dict(fractions=[0.5, 0.6]), "sum to 1"),
    (dict(fractions=[0.5, 0.25, 0.25]), "3 fractions for 2 models"),
    (dict(), "exactly one"),
])
def test_bad_arguments(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        stitch_schedule([999, 0], 2, **kw)
