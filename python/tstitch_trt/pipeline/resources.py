"""How much host memory a request needs, estimated up front, so a too-large one is refused, not swapped.

The estimate is deliberately simple and on the high side: the weights of every model (they are all
loaded), the trajectory's buffers (x and x0 ping-pong pairs, and the per-step noise table when the
sampler takes noise), and the largest model's activations at the CFG-doubled batch: one transformer
block's live tensors (tokens x hidden for the residual, qkv, attention output and the MLP, plus the
heads x tokens^2 attention scores), times 2 for the runtime's arena.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    kept = sum(kept_feature_bytes(m.arch, batch) for m in manifest.models) if manifest.cache is not None else 0
    return buffers + weights + activations + kept


def kept_feature_bytes(arch: dict, batch: int) -> int:
    """FORA's kept-feature buffer of one DiT (export/fora.py: (2B, depth, 2, tokens, hidden) fp32): a bundle built
    with --cache-scheme fora holds one per model whether or not a run caches (its full graphs write it)."""
    tokens = (int(arch["input_size"]) // int(arch["patch_size"])) ** 2
    return 2 * batch * int(arch["depth"]) * 2 * tokens * int(arch["hidden_size"]) * 4


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


# The interpreter, the runtimes' libraries and their arenas beyond the largest activation: measured on the real
# SD 1.5 pair at 512 px (benchmarks/RESULTS.md): ort peak 10.85 GB = 5.4 GB of files + 4.3 GB estimated
# activations + ~1.2 GB; rounded up.
RUNTIME_OVERHEAD = 3 << 29  # 1.5 GiB


# --- text-to-image bundles (U-Nets): estimated from the files a backend loads, before it loads them ---------
def backend_file_bytes(bundle_dir: str | Path, manifest: Manifest, backend: str) -> int:
    """Bytes of every artifact `backend` loads (step graphs with their external weights, text encoders, VAE,
    ControlNet): what it holds resident, one copy per engine."""
    return sum(_artifact_bytes(bundle_dir, manifest, backend))


def resident_weight_bytes(bundle_dir: str | Path, manifest: Manifest, backend: str) -> int:
    """The weights `backend` must hold in memory at once: all its artifacts, except in the CPU backends' low-memory
    modes (runtime/host_memory.py): ORT with memory-mapped weights (page cache: a call needs only its own model's
    pages resident) and OpenVINO compiling one model at a time: the largest artifact."""
    sizes = _artifact_bytes(bundle_dir, manifest, backend)
    if backend == "ort" and sizes:
        from tstitch_trt.runtime.ort_backend import maps_weights

        if maps_weights(bundle_dir, manifest):
            return max(sizes)
    if backend == "openvino" and sizes:
        from tstitch_trt.runtime.host_memory import graphs_over_half_memory
        from tstitch_trt.runtime.openvino_backend import ONE_MODEL_ENV

        if graphs_over_half_memory(bundle_dir, manifest, ONE_MODEL_ENV):  # one compiled model at a time
            return max(sizes)
    return sum(sizes)


def _artifact_bytes(bundle_dir: str | Path, manifest: Manifest, backend: str) -> list[int]:
    """Bytes of each artifact `backend` loads (a graph with its external weights counts as one)."""
    from tstitch_trt.bundle.manifest import ARTIFACTS_OF
    from tstitch_trt.runtime.host_memory import artifact_sizes

    return artifact_sizes(bundle_dir, manifest, ARTIFACTS_OF.get(backend, backend))


def unet_activation_bytes(arch: dict, batch: int, height: int, width: int, vae_factor: int = 8) -> int:
    """The largest attention of a U-Net call: heads x tokens^2 fp32 scores (and their softmax) at the first level
    with attention, at the CFG-doubled batch, times the arena factor; plus the VAE decoder's full-size features
    (128 channels x 4 live tensors)."""
    h, w = height // vae_factor, width // vae_factor
    kinds = list(arch.get("down_block_types", []))
    level = next((i for i, k in enumerate(kinds) if "Attn" in k), 0)
    tokens = (h >> level) * (w >> level)
    channels = list(arch.get("block_out_channels", [320]))[min(level, len(arch.get("block_out_channels", [1])) - 1)]
    head_dim = arch.get("attention_head_dim", 8)
    head_dim = head_dim[level] if isinstance(head_dim, list) else head_dim
    # diffusers' SD 1.x configs name the head COUNT attention_head_dim (8); SDXL's give 64-wide heads per level
    heads = int(head_dim) if arch.get("addition_embed_type") is None else max(1, channels // 64)
    attention = 2 * batch * heads * tokens * tokens * 4 * 2
    vae = batch * 128 * height * width * 4 * 4
    return int(ARENA_FACTOR * max(attention, vae))


def check_sd_fits(bundle_dir: str | Path, manifest: Manifest, backends: list[str], batch: int, height: int,
                  width: int) -> None:
    """Refuse up front, in one line, a text-to-image run no candidate backend can hold in this machine's memory
    (a real-size SDXL bundle on a small host): the weights it must hold at once (resident_weight_bytes) plus the
    largest attention / VAE activation."""
    from tstitch_trt.errors import UserError

    have = available_memory_bytes()
    if have is None or not backends:
        return
    acts = max(unet_activation_bytes(m.arch, batch, height, width) for m in manifest.models)
    need = min(resident_weight_bytes(bundle_dir, manifest, b) for b in backends) + acts + RUNTIME_OVERHEAD
    if need > have:
        raise UserError(f"this bundle needs about {need / 2**30:.1f} GiB of memory on {'/'.join(backends)} "
                        f"({height}x{width}, batch {batch}) but only {have / 2**30:.1f} GiB is available; free "
                        "memory, or use a machine with more")
