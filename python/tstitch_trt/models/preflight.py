"""Checks of a diffusers model directory that `build` runs before it exports anything (no torch): its JSON files
are objects, its weights are safetensors with a sound header (never a pickle), and the sizes its config asks
for fit in this machine's memory. Each failure is one line naming the file; nothing is staged yet.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tstitch_trt.errors import UserError

MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A build holds a U-Net's fp32 weights about three times (the module, the traced graph, the serialized ONNX)
BUILD_COPIES = 3
MAX_LAYERS_PER_BLOCK = 64  # no published U-Net has more than a handful; each layer is many modules


def read_json_object(path: Path, what: str | None = None) -> dict[str, Any]:
    """A JSON file that must hold an object (a diffusers config, model_index.json)."""
    name = what or str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {name}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{name} holds a JSON {type(data).__name__}, not an object; is this a diffusers directory?")
    return data


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file: its length fits the file and it is a JSON object of tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError(f"its header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except (ValueError, struct.error, RecursionError) as e:
        raise UserError(f"{path} is not a valid .safetensors file ({str(e).splitlines()[0][:120]}); download or "
                        "save the weights again") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise UserError(f"{path} is not a valid .safetensors file (its header is not a table of tensors)")


def check_weights_dir(d: Path, what: str) -> None:
    """A model directory's weights: .safetensors with sound headers; a pickle alone is refused (it can run code)."""
    safetensors = sorted(d.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
        if pickles:
            raise UserError(f"{what} in {d} are a pickle ({pickles[0]}); tstitch-trt reads .safetensors only (a pickle "
                            "can run code): save them with save_pretrained(safe_serialization=True)")
        raise UserError(f"{what}: {d} holds no .safetensors weights; is the download complete?")
    for p in safetensors:
        check_safetensors(p)


def _positive_ints(config: dict[str, Any], key: str, where: str) -> list[int]:
    v = config.get(key)
    values = v if isinstance(v, list) else [v]
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values):
        raise UserError(f"{where}: {key} must be positive integers, got {str(v)[:60]}")
    return values


def unet_weight_bytes(config: dict[str, Any], where: str) -> int:
    """A lower estimate of a U-Net's (or ControlNet's) fp32 weights from its config: per block of width c, each
    ResNet layer's two 3x3 convolutions (18 c^2), the down path's layers_per_block, the up path's one more."""
    channels = _positive_ints(config, "block_out_channels", where)
    layers = _positive_ints(config, "layers_per_block", where) if config.get("layers_per_block") is not None else [2]
    if len(layers) == 1:
        layers = layers * len(channels)
    if len(layers) != len(channels):
        raise UserError(f"{where}: layers_per_block has {len(layers)} values for {len(channels)} blocks")
    if max(layers) > MAX_LAYERS_PER_BLOCK:
        raise UserError(f"{where}: layers_per_block {max(layers)} is beyond any U-Net (at most "
                        f"{MAX_LAYERS_PER_BLOCK} here); check the config")
    params = sum((2 * n + 1) * 18 * c * c for c, n in zip(channels, layers, strict=True))
    return 4 * params


def available_memory_bytes() -> int | None:
    """MemAvailable (Linux), None where unknown. (pipeline/resources.py reads the same for runs; models/ sits
    below pipeline/ in the layers, so it is read here too.)"""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_memory(configs: list[tuple[str, dict[str, Any]]], available: int | None) -> None:
    """Refuse, before any export, a U-Net config whose weights alone exceed the memory a build has."""
    for where, config in configs:
        need = unet_weight_bytes(config, where)
        if available is not None and BUILD_COPIES * need > available:
            raise UserError(f"{where}: its config (block_out_channels {str(config.get('block_out_channels'))[:40]}, "
                            f"layers_per_block {config.get('layers_per_block')}) makes at least "
                            f"{need / 2**30:.1f} GiB of fp32 weights, and a build needs about {BUILD_COPIES}x that; "
                            f"only {available / 2**30:.1f} GiB of memory is available")
