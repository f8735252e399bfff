"""The peer oracle of the SD tests and benchmarks: a plain diffusers pipeline runs the T-Stitch SD rule by
starting on the small U-Net and switching to the large one with callback_on_step_end after the small
model's calls (REFERENCE.md). One place, so every conformance test and benchmark switches the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tstitch_trt.sampling.stitch import stitch_schedule_by_call


def stitch_by_callback(pipe: Any, small: Any, large: Any, n_calls: int, ratio: float) -> Callable[..., dict]:
    """Put `pipe` on the U-Net that runs call 0 and return the callback_on_step_end that moves it to `large`
    after the small model's share of the n_calls U-Net calls."""
    k = int((stitch_schedule_by_call(n_calls, 2, ratio=ratio) == 0).sum())
    pipe.unet = small if k > 0 else large

    def switch(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        if i + 1 == k:
            p.unet = large
        return {}

    return switch
