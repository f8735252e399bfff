"""The VAE decoder of a DiT pipeline (diffusers AutoencoderKL), as bundle artifacts.

torch: the diffusers directory, copied; ort: an fp32 ONNX decoder graph (latent -> image);
trt / trt-rtx: an engine from the ONNX graph, fp16-typed when --precision fp16 AND the fp16 graph
decodes within FP16_MIN_PSNR_DB of the fp32 graph on a seeded latent (measured at build time with
ONNX Runtime; else the engine is built from the fp32 graph and the manifest says why).

The fp16 graph keeps GroupNorm statistics and the attention softmax in fp32, as the DiT step
graph does for LayerNorm / softmax: convolutions and matmuls are fp16, the rest stays safe.
Both graphs sum each GroupNorm's statistics axis by axis (_GroupNormTwoLevel): the decoder's groups reach
4M elements at 1024 px, which one fp32 sum cannot hold to the check's bound on every runtime.
Measured on a small random AutoencoderKL (block_out_channels (32, 64), every parameter random,
latent 4x8x8; ONNX Runtime CPU): fp16 vs fp32 decode PSNR 71.5 .. 73.6 dB over 2 models x 3
latents. On that model keeping GroupNorm in fp32 made no measurable difference in ONNX Runtime;
it is kept because TensorRT may otherwise compute the statistics in fp16.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tstitch_trt.bundle.manifest import EngineEntry, onnx_entry, sha256_file
from tstitch_trt.errors import UserError, first_line
from tstitch_trt.export.onnx_export import OPSET, finish_export

FP16_MIN_PSNR_DB = 40.0  # below this on the build-time probe, the VAE engine stays fp32


class VaeDecoder(torch.nn.Module):
    """latent (already divided by the scale factor) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.to(self.vae.dtype)).sample.float()


class _GroupNormFp32(torch.nn.Module):
    """GroupNorm with fp32 statistics and affine, whatever the network's dtype (the U-Nets' fp16 graphs).

    Exported as torch exports GroupNorm (one InstanceNormalization per group), as the fp32 U-Net graphs are: a
    U-Net's groups are at most 164K elements at 1024 px, and ORT's SDXL step graphs stay within 4.1e-6 of torch.
    The VAE decoder's reach 4M, where that one fp32 sum is not enough (_GroupNormTwoLevel)."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = torch.nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = torch.nn.Parameter(norm.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


def _mean_per_group(t: torch.Tensor) -> torch.Tensor:
    """The mean over every axis after (N, G) of t, one axis at a time, last first (keepdim)."""
    for axis in range(t.dim() - 1, 1, -1):
        t = t.mean(axis, keepdim=True)
    return t


class _GroupNormTwoLevel(_GroupNormFp32):
    """GroupNorm in fp32 whose mean and variance are means of means: over W, then H, then the group's channels.

    torch exports GroupNorm as one InstanceNormalization over the flattened group, and ONNX Runtime's CPU kernel
    sums it in fp32 lanes: 1.1e-5 off float64 over a 1M-element group, 8.1e-5 over the 4M of the VAE decoder's
    last level at 1024 px (benchmarks/ort_instancenorm_accuracy.py), so the SDXL decode was 1.38e-4 off torch.
    Axis by axis no ORT sum is longer than max(W, H, C / G) (OpenVINO merges the chain back into one Reduce, whose
    kernel is still closer than its MVN): the SD VAE's fp32 decode at 512 px is 9.1e-7 off float64
    on ORT (was 1.7e-5) and 3.2e-6 on OpenVINO (was 6.7e-6), in the same time on ORT and OpenVINO bf16 and 2-3%
    more on OpenVINO fp32, whose MVN fusion it does not match (benchmarks/RESULTS.md, "The VAE's GroupNorm in two
    levels"). The SDXL decode at 1024 px: 1.1e-6 off torch on ORT, 7.4e-6 on OpenVINO."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        # shapes from x.shape, not unflatten / flatten: the trace keeps them symbolic (dynamic h, w, batch)
        grouped = x32.reshape(x.shape[0], self.num_groups, -1, *x.shape[2:])  # (N, G, C / G, *spatial)
        centered = grouped - _mean_per_group(grouped)
        normed = (centered * torch.rsqrt(_mean_per_group(centered * centered) + self.eps)).reshape(x.shape)
        affine = (1, -1) + (1,) * (x.dim() - 2)
        y = normed * self.weight.view(affine) + self.bias.view(affine)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def load_vae(source: str):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False).eval()
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot load the VAE {source!r} as a diffusers AutoencoderKL: {first}") from None


def randomized_vae(block_out_channels: tuple[int, ...] = (32, 64), seed: int = 0, latent_channels: int = 4):
    """A small diffusers AutoencoderKL with EVERY parameter random (norm affines included): tests, timing."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=block_out_channels, layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=min(32, block_out_channels[0]))
    from tstitch_trt.models.sd import randomize_

    return randomize_(vae, seed).eval()


def _export_ready(vae, precision: str):
    """A copy of `vae` in `precision` with two-level fp32 GroupNorm and an fp32 (upcast) attention softmax."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor

    vae = copy.deepcopy(vae).to(torch.float16 if precision == "fp16" else torch.float32)
    for parent in list(vae.decoder.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, child_name, _GroupNormTwoLevel(child))
    if precision == "fp16":
        # the classic processor honours the VAE's upcast_softmax (SDPA would export an fp16 softmax)
        vae.set_attn_processor(AttnProcessor())
    return vae.eval()


def export_vae_decoder(vae, path: Path, latent_shape: tuple[int, int, int], precision: str = "fp32",
                       dynamic_hw: bool = False) -> Path:
    """latent (B, C, h, w) fp32 -> image (B, 3, H, W) fp32 graph; fp16 inside when precision is fp16.

    dynamic_hw: h and w are symbolic too (SD: --height / --width at run time)."""

    dec = VaeDecoder(_export_ready(vae, precision)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = latent_shape
    if dynamic_hw and precision != "fp32":
        # h and w are symbolic: an 8x8 trace, not SD's 64x64 (fp16 convolutions on a CPU without fp16 kernels
        # are ~1000x slower than fp32; see export/unet_export.trace_size)
        example = (latent_shape[0], min(8, latent_shape[1]), min(8, latent_shape[2]))
    with tempfile.TemporaryDirectory(prefix="tstitch-vae-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(dec, (torch.randn(1, *example),), str(raw), input_names=["latent"],
                              output_names=["image"], dynamic_axes=_vae_axes(dynamic_hw),
                              opset_version=OPSET, dynamo=False)
        finish_export(raw, path)
    return path


def _vae_axes(dynamic_hw: bool) -> dict:
    if dynamic_hw:
        return {"latent": {0: "B", 2: "h", 3: "w"}, "image": {0: "B", 2: "H", 3: "W"}}
    return {"latent": {0: "B"}, "image": {0: "B"}}


def vae_io_spec(latent_shape: tuple[int, int, int], downsample: int = 8, dynamic_hw: bool = False) -> dict:
    c, h, w = latent_shape
    if dynamic_hw:
        return {"inputs": {"latent": {"shape": ["B", c, "h", "w"], "dtype": "float32"}},
                "outputs": {"image": {"shape": ["B", 3, "H", "W"], "dtype": "float32"}},
                "dim_ranges": {"h": [max(1, h // 2), h, 2 * h], "w": [max(1, w // 2), w, 2 * w]}}
    return {"inputs": {"latent": {"shape": ["B", c, h, w], "dtype": "float32"}},
            "outputs": {"image": {"shape": ["B", 3, h * downsample, w * downsample], "dtype": "float32"}}}


def psnr_db(reference: np.ndarray, test: np.ndarray, peak_to_peak: float = 2.0) -> float:
    """PSNR of images in [-1, 1] (both clipped to it, as a saved image would be)."""
    a = np.clip(reference.astype(np.float64), -1, 1)
    b = np.clip(test.astype(np.float64), -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def fp16_decode_psnr(fp32_onnx: Path, fp16_onnx: Path, latent_shape: tuple[int, int, int], seed: int = 0,
                     scale: float = 1.0, probes: int = 1) -> float:
    """The lowest PSNR of the fp16 graph's decode against the fp32 graph's over `probes` seeded latents
    N(0,1) x scale (ORT, CPU). scale 1 / scaling_factor is what a pipeline decodes (SDXL: x 7.7)."""
    import onnxruntime as ort

    sess = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_onnx, fp16_onnx)]
    worst = math.inf
    for k in range(probes):
        z = np.random.default_rng(seed + k).standard_normal((1, *latent_shape), dtype=np.float32) * np.float32(scale)
        ref, got = (s.run(["image"], {"latent": z})[0] for s in sess)
        if not np.isfinite(got).all():
            return -math.inf
        worst = min(worst, psnr_db(ref, got))
    return worst


def add_vae(bundle: Path, source: str, backends: list[str], batch_range: tuple[int, int],
            latent_shape: tuple[int, int, int] = (4, 32, 32), precision: str = "fp32",
            engine_builders: Mapping[str, Any] | None = None, downsample: int = 8, dynamic_hw: bool = False,
            probe_scale: float | None = None, honour_force_upcast: bool = False) -> dict:
    """Write the VAE artifacts for `backends` into `bundle`; returns the manifest's `vae` entry.

    probe_scale: the fp16 check decodes 3 latents N(0,1) x probe_scale (a pipeline's 1 / scaling_factor)
    instead of the one N(0,1) latent of the default.
    honour_force_upcast: a VAE whose config sets `force_upcast` gets fp32 engines without a probe, as diffusers'
    SDXL pipeline decodes it in fp32 (the trained SDXL VAE overflows in fp16; random weights cannot show that, so
    the checkpoint's own flag decides). A VAE with `force_upcast: false` (an fp16-fix VAE) is probed."""
    vae = load_vae(source)
    engines: dict[str, EngineEntry] = {}
    notes: list[str] = []
    if "torch" in backends:
        from tstitch_trt.export.torch_dirs import save_model_dir

        engines["torch"] = save_model_dir(vae, bundle, "vae/diffusers", source)
    graphs: dict[str, Path] = {}
    if "ort" in backends or engine_builders:
        graphs["fp32"] = export_vae_decoder(vae, bundle / "vae/decoder-fp32.onnx", latent_shape, "fp32",
                                             dynamic_hw)
    if "ort" in backends:
        rel = "vae/decoder-fp32.onnx"
        engines["ort"] = onnx_entry(bundle, rel, batch_range=batch_range)
    if engine_builders:
        engine_precision = "fp32"
        if precision == "fp16" and honour_force_upcast and bool(getattr(vae.config, "force_upcast", False)):
            notes.append("the VAE's config sets force_upcast (diffusers decodes it in fp32: the SDXL VAE overflows "
                         "in fp16; use a VAE with force_upcast false, e.g. an fp16-fix VAE, for fp16): "
                         "VAE engines are fp32")
        elif precision == "fp16":
            graphs["fp16"] = export_vae_decoder(vae, bundle / "vae/decoder-fp16.onnx", latent_shape, "fp16",
                                                 dynamic_hw)
            scale, probes = (1.0, 1) if probe_scale is None else (probe_scale, 3)
            psnr = fp16_decode_psnr(graphs["fp32"], graphs["fp16"], latent_shape, scale=scale, probes=probes)
            if psnr >= FP16_MIN_PSNR_DB:
                engine_precision = "fp16"
            probe = "" if probe_scale is None else f" (lowest of {probes} latents N(0,1) x {scale:.4g})"
            notes.append(f"fp16 vs fp32 decode PSNR {psnr:.1f} dB{probe} (threshold {FP16_MIN_PSNR_DB} dB): "
                         f"VAE engines are {engine_precision}")
        for kind, builder in engine_builders.items():
            rel = f"vae/decoder-{kind}-{engine_precision}.plan"
            info = builder.build(graphs[engine_precision], bundle / rel, batch_range,
                                 vae_io_spec(latent_shape, downsample, dynamic_hw))
            engines[kind] = EngineEntry(file=rel, sha256=sha256_file(bundle / rel), precision=engine_precision,
                                        batch_range=batch_range, builder=info)
        if "ort" not in backends:
            _remove_graph(graphs["fp32"])
        if "fp16" in graphs:
            _remove_graph(graphs["fp16"])
    return {"source": str(source), "kind": "AutoencoderKL", "engines": engines, "notes": notes}


def _remove_graph(path: Path) -> None:
    """A source graph and its external weights (`NAME.onnx.data`, written for graphs of real size)."""
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
