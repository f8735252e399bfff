"""Choosing and opening a backend for a bundle (`--backend auto|trt|trt-rtx|ort|openvino|torch`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError
from tstitch_trt.runtime import cuda as cuda_rt
from tstitch_trt.runtime.backend import Backend

BACKEND_CHOICES = ("auto", "trt", "trt-rtx", "ort", "openvino", "torch")
# Backends that run another backend's artifacts: OpenVINO runs the fp32 ONNX graphs built for ort.
ARTIFACTS_OF = {"openvino": "ort"}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_module(kind: str):  # -> module | None
    """The real TensorRT module for `kind` ("trt" / "trt-rtx"), or None where it is missing or only stubs."""
    from tstitch_trt.runtime.trt_backend import import_tensorrt

    try:
        return import_tensorrt(kind)
    except UserError:
        return None


def _ort_device(gpus: int) -> str:
    from tstitch_trt.runtime.ort_backend import ort_providers

    return "CUDA execution provider" if gpus and "CUDAExecutionProvider" in ort_providers() else "CPU"


def backend_candidates(manifest: Manifest, requested: str, precision: str = "auto") -> list[tuple[str, str]]:
    """[(backend, why)] to try in order. auto: trt, trt-rtx, ort on CUDA, openvino, ort on CPU, torch."""
    present = manifest.backends()
    if requested == "auto" and precision == "bf16":  # only OpenVINO runs bf16
        if "ort" not in present or not _has_module("openvino"):
            raise UserError("--precision bf16 runs on the openvino backend, which needs the bundle's ONNX graphs and "
                            "OpenVINO (pip install 'tstitch-trt[openvino]'); or use --precision fp32")
        return [("openvino", "--precision bf16: OpenVINO (CPU) on the ONNX graphs")]
    if requested != "auto":
        if requested not in BACKEND_CHOICES:
            raise UserError(f"unknown backend {requested!r}; choose from {', '.join(BACKEND_CHOICES)}")
        if ARTIFACTS_OF.get(requested, requested) not in present:
            raise UserError(
                f"the bundle has no {requested} artifacts (it has: {', '.join(present) or 'none'}); "
                f"rebuild it with --backend {requested} or pick one of those"
            )
        return [(requested, "requested")]
    gpus = cuda_rt.device_count()
    reasons: list[str] = []
    out: list[tuple[str, str]] = []
    for kind in ("trt", "trt-rtx"):
        if kind not in present:
            reasons.append(f"no {kind} engines in the bundle")
        elif gpus == 0:
            reasons.append(f"{kind} engines need an NVIDIA GPU and none is visible")
        elif tensorrt_module(kind) is None:
            module = "tensorrt" if kind == "trt" else "tensorrt_rtx"
            reasons.append(f"{kind} engines present but {module} is not installed")
        else:
            out.append((kind, f"{kind} engines and an NVIDIA GPU are present"))
    ort_device = _ort_device(gpus) if _has_module("onnxruntime") else None
    if "ort" in present and ort_device != "CPU" and ort_device is not None:
        out.append(("ort", "; ".join(reasons) + f"; using ONNX Runtime ({ort_device})"))
    if "ort" in present and _has_module("openvino"):
        # on the CPU OpenVINO runs the same ONNX graphs faster than ONNX Runtime (benchmarks/RESULTS.md)
        out.append(("openvino", "; ".join(reasons) + "; using OpenVINO (CPU) on the ONNX graphs"))
    elif "ort" in present:
        reasons.append("OpenVINO is not installed (pip install 'tstitch-trt[openvino]' runs the CPU faster)")
    if "ort" in present and ort_device == "CPU":
        out.append(("ort", "; ".join(reasons) + "; using ONNX Runtime (CPU)"))
    if "torch" in present and _has_module("torch"):
        out.append(("torch", "; ".join(reasons) + "; using the torch StepModule"))
    if out:
        return out
    raise UserError(f"no usable backend for this bundle (has: {', '.join(present) or 'none'}; {'; '.join(reasons)})")


def open_backend(kind: str, bundle_dir: str | Path, manifest: Manifest, device: str | None = None,
                 precision: str = "auto", threads: int | None = None) -> Backend:
    """Open backend `kind`. precision (auto, fp32, bf16) applies to the CPU backend that has bf16 (openvino)."""
    if precision not in ("auto", "fp32") and kind != "openvino":
        raise UserError(f"--precision {precision} is for --backend openvino (CPU); {kind} runs its engines' "
                        "own precision")
    if kind == "openvino":
        from tstitch_trt.runtime.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle_dir, manifest, precision=precision, threads=threads)
    if kind == "ort":
        from tstitch_trt.runtime.ort_backend import open_ort_backend

        # CUDA execution provider on device buffers when onnxruntime-gpu can use a GPU, else the CPU
        return open_ort_backend(bundle_dir, manifest, device=device, threads=threads)
    if kind in ("trt", "trt-rtx"):
        from tstitch_trt.runtime.trt_backend import TrtBackend

        return TrtBackend(bundle_dir, manifest, kind=kind)
    if kind == "torch":
        if not _has_module("torch"):
            raise UserError("the torch backend needs PyTorch: pip install 'tstitch-trt[build]'")
        from tstitch_trt.export.torch_backend import TorchBackend

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend(bundle_dir, manifest, device=device)
    raise UserError(f"unknown backend {kind!r}")
