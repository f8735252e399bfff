"""`build --lora SMALL_OR_LARGE=FILE[:SCALE]`: fuse a LoRA into one U-Net before export.

T-Stitch's LCM pair runs SSD-1B with lcm-lora-ssd-1b fused as the small model; any LoRA in the
diffusers / PEFT (or kohya, which diffusers converts) safetensors format works the same way. The
fusion is diffusers' own: lora_state_dict -> unet.load_lora_adapter -> fuse_lora(scale) ->
unload_lora (peft), so the step graph carries the fused weights and nothing LoRA-specific.

Before loading, every LoRA module is checked against the U-Net (the module exists, its input and
output widths match): a LoRA made for another model is refused in one line instead of being
half-applied (diffusers only warns about keys it cannot place).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tstitch_trt.bundle.manifest import sha256_file
from tstitch_trt.errors import UserError, first_line

LORA_TARGETS = ("small", "large")
MAX_LORA_SCALE = 100.0  # the manifest schema's bound on models[].lora[].scale


@dataclass(frozen=True)
class LoraSpec:
    target: str  # "small", "large" or a --model's name
    path: Path
    scale: float
    spec: str  # as given


def parse_lora_spec(spec: str) -> LoraSpec:
    """TARGET=FILE[:SCALE]; FILE may itself contain ':' when it exists as given."""
    target, sep, rest = spec.partition("=")
    if not sep or not target.strip() or not rest.strip():
        raise UserError(f"--lora {spec!r}: expected SMALL_OR_LARGE=FILE[:SCALE], e.g. small=lcm-lora.safetensors:1.0")
    path, scale = rest, 1.0
    if ":" in rest and not Path(rest).is_file():
        path, _, text = rest.rpartition(":")
        try:
            scale = float(text)
        except ValueError:
            raise UserError(f"--lora {spec!r}: scale {text!r} is not a number") from None
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise UserError(f"--lora {spec!r}: scale {text!r} must be a number in [-{MAX_LORA_SCALE:g}, "
                            f"{MAX_LORA_SCALE:g}]")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--lora {spec!r}: {path} is not a file")
    return LoraSpec(target.strip(), p, scale, spec)


def lora_targets(specs: Sequence[LoraSpec], names: Sequence[str]) -> dict[int, list[LoraSpec]]:
    """Model index -> its LoRAs: "small" is the first --model, "large" the last, or a model's name."""
    out: dict[int, list[LoraSpec]] = {}
    for s in specs:
        if s.target == "small":
            i = 0
        elif s.target == "large":
            i = len(names) - 1
        elif s.target in names:
            i = list(names).index(s.target)
        else:
            raise UserError(f"--lora {s.spec!r}: {s.target!r} is neither small, large nor a model name "
                            f"({', '.join(names)})")
        out.setdefault(i, []).append(s)
    return out


def read_unet_lora(path: Path, unet_config: Any) -> tuple[dict[str, torch.Tensor], dict[str, float] | None,
                                                           dict[str, Any] | None]:
    """The U-Net part of a LoRA file as diffusers' lora_state_dict reads it (kohya / old formats converted,
    "unet." keys), its network alphas (kohya files) and its adapter metadata (lora_alpha, rank of PEFT files)."""
    from diffusers import StableDiffusionPipeline

    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), unet_config=unet_config,
                                                                           return_lora_metadata=True)
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot read the LoRA {path}: {first}") from None
    others = sorted({k.split(".")[0] for k in state if not k.startswith("unet.")})
    if others:
        raise UserError(f"the LoRA {path} also changes {', '.join(others)}; only U-Net LoRAs can be fused here")
    if not state:
        raise UserError(f"the LoRA {path} has no U-Net weights")
    return state, alphas, metadata


def lora_misfit(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why this LoRA does not fit `unet` (a module it names is missing or of another width), or None."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    peft = {k.removeprefix("unet."): v for k, v in state.items()}
    if not any("lora_A" in k for k in peft):
        peft = convert_unet_state_dict_to_peft(peft)
    modules = dict(unet.named_modules())
    for key, w in peft.items():
        name, _, part = key.partition(".lora_")
        if not part:
            return f"key {key} is not a LoRA weight"
        m = modules.get(name)
        weight = getattr(m, "weight", None)
        if weight is None:
            return f"it names {name}, which this U-Net does not have"
        if part == "A.weight" and w.shape[1] != weight.shape[1]:
            return f"{name} takes {weight.shape[1]} features, the LoRA {w.shape[1]}"
        if part == "B.weight" and w.shape[0] != weight.shape[0]:
            return f"{name} gives {weight.shape[0]} features, the LoRA {w.shape[0]}"
    return None


def _shape_only_unet(config: dict[str, Any]) -> torch.nn.Module:
    """The U-Net of `config` on the meta device: module names and weight shapes, no memory, no loading."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def check_loras(loras: dict[int, list[LoraSpec]], labels: Sequence[str], configs: Sequence[dict[str, Any]]) -> None:
    """Refuse, before any export, a LoRA that does not fit its U-Net; the line says which model it fits, if any.
    labels: how --lora names each model (small, large, or its name); configs: each U-Net's config.json."""
    shapes: dict[int, torch.nn.Module] = {}

    def unet(j: int) -> torch.nn.Module:
        if j not in shapes:
            shapes[j] = _shape_only_unet(configs[j])
        return shapes[j]

    for i, specs in loras.items():
        for s in specs:
            state = read_unet_lora(s.path, unet(i).config)[0]
            why = lora_misfit(unet(i), state)
            if why:
                fits = [labels[j] for j in range(len(configs)) if j != i and lora_misfit(unet(j), state) is None]
                hint = f"it fits {fits[0]}: give {fits[0]}={s.path}" if fits else "it fits neither model"
                raise UserError(f"--lora {s.spec}: the LoRA does not fit {labels[i]} ({why}); {hint}")


def fuse_loras(unet: torch.nn.Module, specs: Sequence[LoraSpec]) -> list[dict[str, Any]]:
    """Fuse each LoRA into `unet` (in place, checked by check_loras); the manifest's models[i].lora entries."""
    entries = []
    for n, s in enumerate(specs):
        state, alphas, metadata = read_unet_lora(s.path, unet.config)
        adapter = f"tstitch_lora_{n}"
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata, adapter_name=adapter)
        unet.fuse_lora(lora_scale=s.scale, adapter_names=[adapter])
        unet.unload_lora()
        entries.append({"source": str(s.path), "sha256": sha256_file(s.path), "scale": s.scale})
    return entries
