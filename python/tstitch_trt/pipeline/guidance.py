"""How a text-to-image run's guidance scale reaches the U-Nets: the checks, value and defaults (numpy-free).

A bundle's step graphs take guidance one of two ways (manifest.conditioning.guidance):
- "cfg": classifier-free guidance by batch doubling; g <= 1 means the conditional prediction alone.
- "embedding" (LCM): no doubling, no negative prompt; a U-Net with time_cond_proj_dim gets the
  guidance embedding of g - 1 (for any g, as diffusers computes it), one without it gets no guidance
  at all, so g > 1 with such a U-Net would silently be ignored: refused instead.
The LCM sampler guides through the embedding only, so on a "cfg" bundle it runs with g <= 1 only.
"""

from __future__ import annotations

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import defaults, values


def unets_without_embedding(manifest: Manifest) -> list[str]:
    """Names of the U-Nets that lack LCM's guidance embedding (no time_cond_proj_dim in their config)."""
    return [m.name for m in manifest.models if not m.arch.get("time_cond_proj_dim")]


def guidance_through_embedding(manifest: Manifest, sampler: str) -> bool:
    """Whether g reaches the U-Nets as LCM's embedding (the bundle's mode, or the LCM sampler)."""
    return manifest.guidance_mode == "embedding" or sampler == "lcm"


def default_cfg_scale(manifest: Manifest, sampler: str) -> float:
    """diffusers' defaults: LatentConsistencyModelPipeline 8.5 for lcm, else the bundle kind's pipeline (SD 7.5,
    SDXL 5.0); 1.0 (no guidance) where guidance would go through an embedding some U-Net lacks (an LCM-LoRA
    small model)."""
    kind_default = defaults.default_sd_cfg_scale(manifest.pipeline)
    if not guidance_through_embedding(manifest, sampler):
        return kind_default
    if unets_without_embedding(manifest) or manifest.guidance_mode != "embedding":
        return 1.0
    return defaults.DEFAULT_LCM_CFG_SCALE if sampler == "lcm" else kind_default


def default_steps(sampler: str) -> int:
    return defaults.DEFAULT_LCM_STEPS if sampler == "lcm" else defaults.DEFAULT_STEPS


def check_guidance(manifest: Manifest, sampler: str, cfg_scale: float, negative_given: bool) -> None:
    """Refuse what the bundle's step graphs cannot do (one line each)."""
    values.check_cfg_scale(cfg_scale)  # NaN first: it is neither <= 1 nor > 1
    embedding = manifest.guidance_mode == "embedding"
    check_negative_prompt(manifest, negative_given)
    if not guidance_through_embedding(manifest, sampler) or cfg_scale <= 1:
        return
    lacking = unets_without_embedding(manifest)
    if lacking:
        raise UserError(f"--cfg-scale {cfg_scale:g} > 1 with {'--sampler lcm' if sampler == 'lcm' else 'LCM guidance'} "
                        f"needs the guidance embedding (time_cond_proj_dim), which U-Net {lacking[0]} lacks; give "
                        "--cfg-scale 1 or less (no guidance)")
    if not embedding:
        raise UserError(f"--sampler lcm with --cfg-scale {cfg_scale:g} > 1 guides through the U-Nets' guidance "
                        "embedding, but this bundle was built with --guidance cfg; rebuild with --guidance embedding, "
                        "or give --cfg-scale 1 or less")


def check_negative_prompt(manifest: Manifest, negative_given: bool) -> None:
    """An "embedding"-guided bundle has no uncond batch to put a negative prompt in: refused, never dropped."""
    if manifest.guidance_mode == "embedding" and negative_given:
        raise UserError("a negative prompt needs classifier-free guidance, but this bundle guides through LCM's "
                        "guidance embedding (no uncond batch): drop --negative-prompt, or rebuild with --guidance cfg")


def graph_guidance(manifest: Manifest, cfg_scale: float) -> float:
    """The `guidance` input of the step graphs: g itself under "embedding" (the graph embeds g - 1, as
    diffusers does for any g); under "cfg" max(g, 1), since u + 1 (c - u) is the conditional half alone
    (diffusers turns CFG off at g <= 1)."""
    if manifest.guidance_mode == "embedding":
        return float(cfg_scale)
    return float(cfg_scale) if cfg_scale > 1 else 1.0
