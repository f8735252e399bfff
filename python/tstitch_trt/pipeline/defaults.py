"""What `tstitch-trt run` (and `serve`, field for field) uses when the user leaves a setting out."""

from __future__ import annotations

from collections.abc import Sequence

REFERENCE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the DiT reference's sample labels
DEFAULT_STEPS = 50
DEFAULT_SAMPLER = "ddim"
DEFAULT_CFG_SCALE = 1.5
DEFAULT_SD_CFG_SCALE = 7.5  # text-to-image (sd) bundles, as diffusers' StableDiffusionPipeline
DEFAULT_SDXL_CFG_SCALE = 5.0  # sdxl bundles, as diffusers' StableDiffusionXLPipeline
DEFAULT_ETA = 0.0
DEFAULT_SEED = 0
DEFAULT_RATIO = 0.4  # two models: T-Stitch's usual share of early steps on the small model


def default_class_labels(num_classes: int, is_demo: bool) -> list[int]:
    """The demo pair: two rows of the digits 0-9; a DiT bundle: the reference's labels (mod num_classes)."""
    labels = [c for _ in range(2) for c in range(min(num_classes, 10))] if is_demo else REFERENCE_LABELS
    return [v % num_classes for v in labels]


def default_stitch(num_models: int, ratio: float | None,
                   fractions: Sequence[float] | None) -> tuple[float | None, list[float] | None]:
    """(ratio, fractions) as given, else ratio 0.4 for a pair and equal fractions for other counts."""
    if ratio is not None or fractions is not None:
        return ratio, None if fractions is None else list(fractions)
    if num_models == 2:
        return DEFAULT_RATIO, None
    return None, [1.0 / num_models] * num_models


def default_sd_cfg_scale(pipeline: str) -> float:
    """The guidance scale diffusers' pipeline of this bundle kind uses: SDXL 5.0, SD 1.x 7.5."""
    return DEFAULT_SDXL_CFG_SCALE if pipeline == "sdxl" else DEFAULT_SD_CFG_SCALE
