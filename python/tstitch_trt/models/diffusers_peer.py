"""The peer oracle of the SD tests and benchmarks: a plain diffusers pipeline runs the T-Stitch SD rule by
starting on the small U-Net and switching to the large one with callback_on_step_end after the small
model's calls (REFERENCE.md). One place, so every conformance test and benchmark switches the same way.

EmbeddingBlind corrects the peer's own LCM defect: diffusers computes timestep_cond (LCM's guidance
embedding) once, from the pipeline's FIRST U-Net, so a small U-Net without time_cond_proj_dim would leave
the large one without its embedding. Wrapped, the small U-Net's config reports the large's
time_cond_proj_dim (the pipeline computes the embedding) and it drops timestep_cond, which it cannot take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tstitch_trt.sampling.stitch import stitch_schedule_by_call


def stitch_by_callback(pipe: Any, small: Any, large: Any, n_calls: int, ratio: float,
                       cache: tuple[int, int] | None = None) -> Callable[..., dict]:
    """Put `pipe` on the U-Net that runs call 0 and return the callback_on_step_end that moves it to `large`
    after the small model's share of the n_calls U-Net calls. cache (interval, branch): the `deepcache`
    package's DeepCacheSDHelper runs on the first U-Net and is started afresh on `large` at the switch (a cache
    belongs to the model that made it); end_deepcache(unet) afterwards."""
    k = int((stitch_schedule_by_call(n_calls, 2, ratio=ratio) == 0).sum())
    pipe.unet = small if k > 0 else large
    if cache is not None:
        start_deepcache(pipe, *cache)

    def switch(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        if i + 1 == k:
            p.unet = large
            if cache is not None:
                start_deepcache(p, *cache)
        return {}

    return switch


def start_deepcache(pipe: Any, interval: int, branch: int) -> Any:
    """DeepCacheSDHelper (PyPI `deepcache` 0.1.1) enabled on pipe.unet with these cache_interval / cache_branch_id.

    One patch, made here and nowhere else: 0.1.1 wraps unet.mid_block unconditionally and fails on a U-Net without
    one (BK-SDM, the tiny small U-Net); such a block is skipped, which is what its rules do with the mid block's
    output anyway (a cached call never runs it). Everything else is the package's own code."""
    from DeepCache import DeepCacheSDHelper

    class Helper(DeepCacheSDHelper):
        def wrap_block_forward(self, block: Any, *args: Any, **kwargs: Any) -> None:
            if block is not None:
                super().wrap_block_forward(block, *args, **kwargs)

    helper = Helper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return helper


def end_deepcache(unet: Any) -> None:
    """Undo DeepCacheSDHelper's wrapping of `unet` (its own disable() has the mid-block failure of start_deepcache):
    it sets `forward` on module instances, so dropping those restores the classes' methods."""
    for m in unet.modules():
        m.__dict__.pop("forward", None)


class EmbeddingBlind(torch.nn.Module):
    """A U-Net without LCM's guidance embedding, presented to diffusers as one with it (the module docstring)."""

    def __init__(self, unet: Any, time_cond_proj_dim: int):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.unet = unet
        self.config = FrozenDict({**unet.config, "time_cond_proj_dim": time_cond_proj_dim})

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def add_embedding(self) -> Any:  # StableDiffusionXLPipeline checks the added-condition width on it
        return self.unet.add_embedding

    def forward(self, *args: Any, timestep_cond: Any = None, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)
