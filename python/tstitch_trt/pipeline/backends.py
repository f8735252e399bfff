"""Choosing and opening a backend for a bundle (`--backend auto|trt|trt-rtx|ort|torch`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import BackendUnavailable, UserError
from tstitch_trt.runtime import cuda as cuda_rt
from tstitch_trt.runtime.backend import Backend

BACKEND_CHOICES = ("auto", "trt", "trt-rtx", "ort", "torch")


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


def backend_availability(manifest: Manifest) -> list[tuple[str, bool, str]]:
    """(backend, can run here, why) for every backend the bundle has artifacts for, in auto's order."""
    present = manifest.backends()
    gpus = cuda_rt.device_count()
    out: list[tuple[str, bool, str]] = []
    for kind in ("trt", "trt-rtx"):
        if kind not in present:
            continue
        module = "tensorrt" if kind == "trt" else "tensorrt_rtx"
        if gpus == 0:
            out.append((kind, False, f"{kind} engines need an NVIDIA GPU and none is visible"))
        elif tensorrt_module(kind) is None:
            out.append((kind, False, f"{module} is not installed (pip install {module.replace('_', '-')})"))
        else:
            why = _engine_refusal(manifest, kind)
            out.append((kind, why is None, why or f"{kind} engines match this GPU and {module}"))
    if "ort" in present:
        if _has_module("onnxruntime"):
            import onnxruntime

            out.append(("ort", True, f"ONNX Runtime {onnxruntime.__version__} ({_ort_device(gpus)})"))
        else:
            out.append(("ort", False, "onnxruntime is not installed (pip install onnxruntime)"))
    if "torch" in present:
        missing = [m for m in ("torch", "safetensors") if not _has_module(m)]
        if missing:
            out.append(("torch", False, f"{' and '.join(missing)} not installed (pip install \"tstitch-trt[build]\")"))
        else:
            out.append(("torch", True, "PyTorch StepModule"))
    return out


def _engine_refusal(manifest: Manifest, kind: str) -> str | None:
    """Why this GPU / TensorRT cannot run the bundle's `kind` engines, from the manifest (None: it can)."""
    from tstitch_trt.errors import BackendUnavailable
    from tstitch_trt.runtime.engine_compat import check_engine_compat

    try:
        cc = cuda_rt.compute_capability(0)
        for m in manifest.models:
            check_engine_compat(m.engines[kind].builder, tensorrt_module(kind), cc, what=f"the {m.name} engine",
                                kind=kind)
    except BackendUnavailable as e:
        return str(e)
    return None


def backend_candidates(manifest: Manifest, requested: str) -> list[tuple[str, str]]:
    """[(backend, why)] to try in order. auto: trt, trt-rtx, ort on CUDA, ort on CPU, torch."""
    present = manifest.backends()
    if requested != "auto":
        if requested not in BACKEND_CHOICES:
            raise UserError(f"unknown backend {requested!r}; choose from {', '.join(BACKEND_CHOICES)}")
        if requested not in present:
            raise UserError(
                f"the bundle has no {requested} artifacts (it has: {', '.join(present) or 'none'}); "
                f"rebuild it with --backend {requested} or pick one of those"
            )
        return [(requested, "requested")]
    available = backend_availability(manifest)
    reasons = [why for _, ok, why in available if not ok]
    out = [(kind, "; ".join([*reasons, f"using {why}"])) for kind, ok, why in available if ok]
    if out:
        return out
    raise BackendUnavailable(f"no backend of this bundle can run here ({'; '.join(reasons) or 'it has none'})")


def open_backend(kind: str, bundle_dir: str | Path, manifest: Manifest, device: str | None = None) -> Backend:
    if kind == "ort":
        from tstitch_trt.runtime.ort_backend import open_ort_backend

        # CUDA execution provider on device buffers when onnxruntime-gpu can use a GPU, else the CPU
        return open_ort_backend(bundle_dir, manifest, device=device)
    if kind in ("trt", "trt-rtx"):
        from tstitch_trt.runtime.trt_backend import TrtBackend

        return TrtBackend(bundle_dir, manifest, kind=kind)
    if kind == "torch":
        if not _has_module("torch"):
            raise BackendUnavailable("the torch backend needs PyTorch: pip install \"tstitch-trt[build]\"")
        from tstitch_trt.export.torch_backend import TorchBackend

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend(bundle_dir, manifest, device=device)
    raise UserError(f"unknown backend {kind!r}")


def open_first_backend(bundle_dir: str | Path, manifest: Manifest, requested: str = "auto",
                       device: str | None = None) -> tuple[Backend, str]:
    """(backend, why) for the first candidate that opens; auto falls through refusals (another GPU, version).

    The same selection as StitchedPipeline.from_bundle (DiT), for pipelines added since (SD)."""
    candidates = backend_candidates(manifest, requested)
    refusals: list[str] = []
    for kind, why in candidates:
        try:
            return open_backend(kind, bundle_dir, manifest, device=device), "; ".join([*refusals, why])
        except UserError as e:
            if kind == candidates[-1][0]:
                raise
            refusals.append(f"{kind} refused ({e})")
    raise AssertionError("unreachable: the last candidate raises")
