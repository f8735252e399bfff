"""The VAE decoder of a DiT pipeline (diffusers AutoencoderKL), as bundle artifacts.

torch: the diffusers directory, copied; ort: an fp32 ONNX decoder graph (latent -> image);
trt / trt-rtx: an engine from the ONNX graph (fp16-typed when --precision fp16).
"""

from __future__ import annotations


import warnings
from pathlib import Path

import torch

from tstitch_trt.bundle.manifest import EngineEntry, sha256_file
from tstitch_trt.errors import UserError
from tstitch_trt.export.onnx_export import OPSET, clean_graph


class VaeDecoder(torch.nn.Module):
    """latent (already divided by the scale factor) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.to(self.vae.dtype)).sample.float()


def load_vae(source: str):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(source).eval()
    except Exception as e:
        raise UserError(f"cannot load the VAE {source!r} as a diffusers AutoencoderKL: {str(e).splitlines()[0]}") from None


def export_vae_decoder(vae, path: Path, latent_shape: tuple[int, int, int], precision: str = "fp32") -> Path:
    import onnx

    dec = VaeDecoder(vae.to(torch.float16 if precision == "fp16" else torch.float32)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(dec, (torch.randn(1, *latent_shape),), str(path), input_names=["latent"],
                          output_names=["image"], dynamic_axes={"latent": {0: "B"}, "image": {0: "B"}},
                          opset_version=OPSET, dynamo=False)
    onnx.save(clean_graph(onnx.load(str(path))), str(path))
    return path


def add_vae(bundle: Path, source: str, backends: list[str], batch_range: tuple[int, int],
            latent_shape: tuple[int, int, int] = (4, 32, 32)) -> dict:
    vae = load_vae(source)
    engines: dict[str, EngineEntry] = {}
    if "torch" in backends:
        dst = bundle / "vae" / "diffusers"
        vae.save_pretrained(str(dst), safe_serialization=True)
        weights = next(dst.glob("*.safetensors"))
        engines["torch"] = EngineEntry(file=str(weights.relative_to(bundle)), sha256=sha256_file(weights),
                                       extra={"dir": "vae/diffusers"})
    if "ort" in backends:
        rel = "vae/decoder-fp32.onnx"
        export_vae_decoder(vae, bundle / rel, latent_shape, "fp32")
        engines["ort"] = EngineEntry(file=rel, sha256=sha256_file(bundle / rel), batch_range=batch_range)
    return {"source": str(source), "kind": "AutoencoderKL", "engines": engines}


