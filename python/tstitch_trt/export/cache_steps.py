"""A model's full and cached step modules under a bundle's caching scheme (manifest `cache`): DeepCache for
U-Nets (export/deep_cache.py), FORA for DiTs (export/fora.py). The torch backend and `check` use them.

Either pair has the same contract: full(**step inputs) -> (*step outputs, kept feature fp32);
cached(**step inputs, <cache input>=kept) -> step outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def cache_step_pair(step: nn.Module, cache: Mapping[str, Any], name: str) -> tuple[nn.Module, nn.Module]:
    if cache["scheme"] == "fora":
        from tstitch_trt.export.fora import ForaStep

        return ForaStep(step, "full"), ForaStep(step, "cached")  # type: ignore[arg-type]
    from tstitch_trt.export.deep_cache import CacheStep

    k = int(cache["branch"])
    return CacheStep(step, k, "full", name), CacheStep(step, k, "cached", name)


def cache_names(cache: Mapping[str, Any]) -> tuple[str, str]:
    """(the cached graphs' input, the full graphs' output) of the kept feature."""
    if cache["scheme"] == "fora":
        from tstitch_trt.export.fora import FORA_INPUT, FORA_OUTPUT

        return FORA_INPUT, FORA_OUTPUT
    from tstitch_trt.export.deep_cache import CACHE_INPUT, CACHE_OUTPUT

    return CACHE_INPUT, CACHE_OUTPUT
