"""Decoding latents with the bundle's VAE on the backend's side of the stack."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import UserError


def open_decoder(bundle_dir: Path, manifest: Manifest, backend: str,
                 precision: str = "fp32") -> Callable[[np.ndarray], np.ndarray]:
    """A function latent/scale (B, 4, h, w) -> image (B, 3, H, W) in [-1, 1].

    precision (fp32, bf16) applies on the openvino backend, which runs the ONNX decoder built for ort."""
    assert manifest.vae is not None
    engines = manifest.vae["engines"]
    kind = backend if backend in engines else ("ort" if "ort" in engines else "torch")
    if kind not in engines:
        raise UserError(f"the bundle's VAE has no artifact usable with {backend} (has: {', '.join(engines)})")
    entry = engines[kind]
    if backend == "openvino" and kind == "ort":
        from tstitch_trt.runtime.openvino_graph import OpenVinoGraph

        graph = OpenVinoGraph(artifact_path(bundle_dir, entry), precision,
                              graph_sha256=[sha for _, sha in entry.files()])
        return lambda z: graph({"latent": z.astype(np.float32)})["image"]
    if kind == "ort":
        from tstitch_trt.runtime.ort_backend import aux_session, maps_weights

        sess = aux_session(artifact_path(bundle_dir, entry), maps_weights(bundle_dir, manifest))
        return lambda z: sess.run(["image"], {"latent": z.astype(np.float32)})[0]
    if kind == "torch":
        import torch
        from diffusers import AutoencoderKL

        artifact_path(bundle_dir, entry)  # checksum of the weights
        vae = AutoencoderKL.from_pretrained(str(bundle_dir / entry.extra["dir"])).eval()

        def decode(z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return vae.decode(torch.from_numpy(z.astype(np.float32))).sample.float().numpy()

        return decode
    if kind in ("trt", "trt-rtx"):
        from tstitch_trt.runtime.trt_engine import TrtEngineRunner

        runner = TrtEngineRunner(bundle_dir, entry, kind, "VAE decoder")
        return lambda z: runner({"latent": z.astype(np.float32)})["image"].astype(np.float32)
    raise UserError(f"decoding with the {kind} VAE engine is not supported by this runtime yet; use --backend ort")
