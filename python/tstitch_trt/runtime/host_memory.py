"""Whether a bundle's weights are large for this machine: the switch of the CPU backends' low-memory modes.

A bundle whose ONNX graphs (the fp32 graphs ORT and OpenVINO both run: step models, text encoders, VAE decoder,
ControlNet) are over half the machine's memory cannot keep a private copy of every weight next to a real-size
request's activations: an SDXL pair is 19.5 GB of graphs, a 24 GB machine has ~18 GB to give. ORT then maps its
weights (ort_backend.maps_weights), OpenVINO compiles one step model at a time (openvino_backend). MemTotal, not
MemAvailable, decides: the same answer for every session of a bundle on one machine, whatever else runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from tstitch_trt.bundle.manifest import Manifest


def artifact_sizes(bundle_dir: str | Path, manifest: Manifest, kind: str) -> list[int]:
    """Bytes of each artifact of `kind` ("ort", "trt", ...) a run opens: every step model's, the text encoder(s)',
    the VAE decoder's and the ControlNet's (a graph with its external weights counts as one)."""
    entries = [m.engines[kind] for m in manifest.models if kind in m.engines]
    for part in (manifest.text_encoder, manifest.text_encoder_2, manifest.vae, manifest.controlnet):
        if part and kind in part.get("engines", {}):
            entries.append(part["engines"][kind])
    sizes = []
    for e in entries:
        size = 0
        for rel, _ in e.files():
            try:
                size += (Path(bundle_dir) / rel).stat().st_size
            except OSError:
                pass  # a missing file is the checksum pass's to report
        sizes.append(size)
    return sizes


def ort_graph_bytes(bundle_dir: str | Path, manifest: Manifest) -> int:
    """Bytes of the ONNX graphs (with their .data) a CPU run opens."""
    return sum(artifact_sizes(bundle_dir, manifest, "ort"))


def mem_total() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def graphs_over_half_memory(bundle_dir: str | Path, manifest: Manifest, env: str) -> bool:
    """The bundle's graphs are over half of MemTotal; $env = 1 / 0 forces the answer."""
    forced = os.environ.get(env, "")
    if forced in ("0", "1"):
        return forced == "1"
    total = mem_total()
    return total is not None and ort_graph_bytes(bundle_dir, manifest) > total // 2
