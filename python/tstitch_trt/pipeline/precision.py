"""The precision each part of a text-to-image bundle runs in: U-Nets, text encoder(s), VAE decoder.

`--precision auto|fp32|bf16` applies on the openvino backend, to every part, each by its own recorded
verdict (models[i].bf16, text_encoder.bf16, text_encoder_2.bf16, vae.bf16; `check --precision bf16
--record`): one part being bf16-safe says nothing about another (SDXL's VAE overflows fp16 where its
U-Net does not). Other backends run their artifacts' own precision (trt engines fp16 or fp32, ort and
torch fp32), and precision must be auto or fp32 there (backends.open_backend refuses bf16).
"""

from __future__ import annotations

from typing import Any

from tstitch_trt.bundle.manifest import ARTIFACTS_OF, Manifest

# report label -> manifest key of the parts outside the stitched loop
AUX_PARTS = {"text encoder": "text_encoder", "text encoder 2": "text_encoder_2", "VAE decoder": "vae"}


def aux_parts(manifest: Manifest) -> dict[str, dict]:
    """{label: manifest entry} of the bundle's text encoder(s) and VAE decoder that are present."""
    return {label: getattr(manifest, key) for label, key in AUX_PARTS.items() if getattr(manifest, key, None)}


def _artifact_precision(entry: dict, backend: str) -> str:
    engines = entry["engines"]
    kind = backend if backend in engines else ("ort" if "ort" in engines else "torch")
    e = engines.get(kind)
    return "fp32" if e is None or kind in ("ort", "torch") else str(e.precision)


def aux_precisions(manifest: Manifest, backend: Any, requested: str) -> tuple[dict[str, str], str | None]:
    """({label: precision} for the text encoder(s) and VAE, a line saying why on openvino, else None)."""
    parts = aux_parts(manifest)
    if backend.name != "openvino":
        return {label: _artifact_precision(entry, backend.name) for label, entry in parts.items()}, None
    from tstitch_trt.runtime.cpu_isa import bf16_isa
    from tstitch_trt.runtime.openvino_backend import choose_precisions, cpu_has_bf16

    labels = list(parts)
    precisions, why = choose_precisions([(label, parts[label].get("bf16")) for label in labels], requested,
                                        cpu_has_bf16(backend.core), bf16_isa())
    return dict(zip(labels, precisions, strict=True)), why


def unet_precisions(manifest: Manifest, backend: Any) -> dict[str, str]:
    """{U-Net name: precision} the backend runs (openvino chooses per model; others: their artifacts')."""
    chosen = getattr(backend, "precisions", None)
    if chosen is not None:
        return dict(zip((m.name for m in manifest.models), chosen, strict=True))
    kind = ARTIFACTS_OF.get(backend.name, backend.name)
    return {m.name: ("fp32" if kind in ("ort", "torch") else str(m.engines[kind].precision)) for m in manifest.models}
