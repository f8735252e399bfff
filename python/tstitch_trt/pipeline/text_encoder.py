"""The bundle's text encoder(s): token ids (N, L) int64 -> embeddings (N, L, D) fp32, on the backend's side.

SDXL's text_encoder_2 also outputs the pooled text_embeds (N, P): open_text_encoder_outputs returns
every output of an encoder by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import UserError

TEXT_OUTPUT = "text_embeddings"  # = export.unet_export.TEXT_OUTPUT (that module needs torch)


def open_text_encoder(bundle_dir: Path, manifest: Manifest, backend: str,
                      precision: str = "fp32") -> Callable[[np.ndarray], np.ndarray]:
    """The first text encoder's hidden state (SD 1.x: the context)."""
    if manifest.text_encoder is None:
        raise UserError("the bundle has no text encoder; rebuild it from a full SD pipeline directory")
    from tstitch_trt.runtime.ort_backend import maps_weights

    encode = open_text_encoder_outputs(bundle_dir, manifest.text_encoder, backend, precision,
                                       mapped=maps_weights(bundle_dir, manifest))
    return lambda ids: encode(ids)[TEXT_OUTPUT]


def open_text_encoder_outputs(bundle_dir: Path, te: Mapping[str, Any], backend: str, precision: str = "fp32",
                              mapped: bool = False) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A manifest text-encoder entry -> a function ids -> {output name: fp32 array} (its io's outputs).

    precision (fp32, bf16) applies on the openvino backend, which runs the ONNX graph built for ort; mapped: an
    ORT session keeps its weights memory-mapped (the bundle's runtime/ort_backend.maps_weights)."""
    engines = te["engines"]
    names = list(te["io"]["outputs"])
    kind = backend if backend in engines else ("ort" if "ort" in engines else "torch")
    if kind not in engines:
        raise UserError(f"the bundle's text encoder has no artifact usable with {backend} (has: {', '.join(engines)})")
    entry = engines[kind]
    if backend == "openvino" and kind == "ort":
        from tstitch_trt.runtime.openvino_graph import OpenVinoGraph

        graph = OpenVinoGraph(artifact_path(bundle_dir, entry), precision,
                              graph_sha256=[sha for _, sha in entry.files()])
        in_name = next(iter(te["io"]["inputs"]))
        return lambda ids: {n: a for n, a in graph({in_name: ids.astype(np.int64)}).items() if n in names}
    if kind == "ort":
        from tstitch_trt.runtime.ort_backend import aux_session

        sess = aux_session(artifact_path(bundle_dir, entry), mapped)
        inp = sess.get_inputs()[0].name
        return lambda ids: dict(zip(names, sess.run(names, {inp: ids.astype(np.int64)}), strict=True))
    if kind == "torch":
        import torch
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from tstitch_trt.export.unet_export import TextEncoder

        artifact_path(bundle_dir, entry)  # checksum of the weights
        cls = CLIPTextModelWithProjection if te.get("kind") == "CLIPTextModelWithProjection" else CLIPTextModel
        clip = cls.from_pretrained(str(Path(bundle_dir) / entry.extra["dir"])).eval()
        enc = TextEncoder(clip, str(te.get("hidden_state", "last")), bool(te.get("pooled"))).eval()

        def encode(ids: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = enc(torch.from_numpy(ids.astype(np.int64)))
            outs = out if isinstance(out, tuple) else (out,)
            return {n: o.float().numpy() for n, o in zip(names, outs, strict=True)}

        return encode
    from tstitch_trt.runtime.trt_engine import TrtEngineRunner

    runner = TrtEngineRunner(bundle_dir, entry, kind, "text encoder")  # once per request, before the U-Net loop
    return lambda ids: {n: a.astype(np.float32) for n, a in runner({runner.inputs[0]: ids}).items() if n in names}

