"""The bundle's text encoder: token ids (N, L) int64 -> embeddings (N, L, D) fp32, on the backend's side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import UserError


def open_text_encoder(bundle_dir: Path, manifest: Manifest, backend: str) -> Callable[[np.ndarray], np.ndarray]:
    if manifest.text_encoder is None:
        raise UserError("the bundle has no text encoder; rebuild it from a full SD pipeline directory")
    engines = manifest.text_encoder["engines"]
    kind = backend if backend in engines else ("ort" if "ort" in engines else "torch")
    if kind not in engines:
        raise UserError(f"the bundle's text encoder has no artifact usable with {backend} (has: {', '.join(engines)})")
    entry = engines[kind]
    if kind == "ort":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(artifact_path(bundle_dir, entry)), providers=["CPUExecutionProvider"])
        out = sess.get_outputs()[0].name
        return lambda ids: sess.run([out], {sess.get_inputs()[0].name: ids.astype(np.int64)})[0]
    if kind == "torch":
        import torch
        from transformers import CLIPTextModel

        artifact_path(bundle_dir, entry)  # checksum of the weights
        clip = CLIPTextModel.from_pretrained(str(bundle_dir / entry.extra["dir"])).eval()

        def encode(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return clip(torch.from_numpy(ids.astype(np.int64)), return_dict=False)[0].float().numpy()

        return encode
    from tstitch_trt.runtime.trt_engine import TrtEngineRunner

    runner = TrtEngineRunner(bundle_dir, entry, kind, "text encoder")  # once per request, before the U-Net loop
    out = runner.outputs[0]
    return lambda ids: runner({runner.inputs[0]: ids})[out].astype(np.float32)
