"""How much host memory a request needs, estimated up front, so a too-large one is refused, not swapped.

The estimate is deliberately simple and on the high side: the weights of every model (they are all
loaded), the trajectory's buffers (x and x0 ping-pong pairs, and the per-step noise table when the
sampler takes noise), and the largest model's activations at the CFG-doubled batch: one transformer
block's live tensors (tokens x hidden for the residual, qkv, attention output and the MLP, plus the
heads x tokens^2 attention scores), times 2 for the runtime's arena.
"""

from __future__ import annotations

import os

from tstitch_trt.bundle.manifest import Manifest

ARENA_FACTOR = 2.0


def activation_bytes(arch: dict, batch: int) -> int:
    tokens = (int(arch["input_size"]) // int(arch["patch_size"])) ** 2
    hidden, heads = int(arch["hidden_size"]), int(arch["num_heads"])
    mlp = int(hidden * float(arch.get("mlp_ratio", 4.0)))
    per_sample = tokens * (6 * hidden + 2 * mlp) + 2 * heads * tokens * tokens
    return int(2 * batch * per_sample * 4 * ARENA_FACTOR)


def estimate_request_bytes(manifest: Manifest, batch: int, steps: int, with_noise: bool) -> int:
    c, h, w = manifest.latent_shape
    latent = batch * c * h * w * 4
    buffers = latent * (4 + (steps if with_noise else 1)) + steps * (batch * 8 + 64)
    weights = sum(_params_bytes(m.arch) for m in manifest.models)
    activations = max(activation_bytes(m.arch, batch) for m in manifest.models)
    return buffers + weights + activations


def _params_bytes(arch: dict) -> int:
    d, depth = int(arch["hidden_size"]), int(arch["depth"])
    mlp = int(d * float(arch.get("mlp_ratio", 4.0)))
    per_block = 4 * d * d + 2 * d * mlp + 6 * d * d
    return 4 * (depth * per_block + (int(arch["num_classes"]) + 1) * d)


def available_memory_bytes() -> int | None:
    """MemAvailable on Linux (what can be used without swapping); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
