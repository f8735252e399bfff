"""Choosing and opening a backend for a bundle (`--backend auto|trt|trt-rtx|ort|openvino|torch`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tstitch_trt.bundle.manifest import ARTIFACTS_OF, Manifest, read_manifest, verify_bundle
from tstitch_trt.errors import BackendUnavailable, UserError
from tstitch_trt.runtime import cuda as cuda_rt
from tstitch_trt.runtime.backend import Backend

BACKEND_CHOICES = ("auto", "trt", "trt-rtx", "ort", "openvino", "torch")


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
        if gpus == 0:  # the probe names a CUDA error (a driver older than the bindings' CUDA) rather than "no GPU"
            out.append((kind, False, f"{kind} engines need an NVIDIA GPU: {cuda_rt.probe_devices().message}"))
        elif tensorrt_module(kind) is None:
            out.append((kind, False, f"{module} is not installed (pip install {module.replace('_', '-')})"))
        else:
            why = _engine_refusal(manifest, kind)
            out.append((kind, why is None, why or f"{kind} engines match this GPU and {module}"))
    if "ort" in present:
        ort_ok = _has_module("onnxruntime")
        device = _ort_device(gpus) if ort_ok else None
        if ort_ok and device != "CPU":  # onnxruntime-gpu on a GPU comes before any CPU backend
            import onnxruntime

            out.append(("ort", True, f"ONNX Runtime {onnxruntime.__version__} ({device})"))
        if _has_module("openvino"):
            # on the CPU OpenVINO runs the same ONNX graphs faster than ONNX Runtime (benchmarks/RESULTS.md)
            out.append(("openvino", True, "OpenVINO (CPU) on the bundle's ONNX graphs"))
        else:
            out.append(("openvino", False, "OpenVINO is not installed (pip install \"tstitch-trt[openvino]\" "
                                           "runs the CPU faster)"))
        if ort_ok and device == "CPU":
            import onnxruntime

            out.append(("ort", True, f"ONNX Runtime {onnxruntime.__version__} (CPU)"))
        elif not ort_ok:
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
    available = backend_availability(manifest)
    reasons = [why for _, ok, why in available if not ok]
    out = [(kind, "; ".join([*reasons, f"using {why}"])) for kind, ok, why in available if ok]
    if out:
        return out
    raise BackendUnavailable(f"no backend of this bundle can run here ({'; '.join(reasons) or 'it has none'})")


def torch_device(device: str | None) -> str:
    """--device for the torch backend, checked before any model loads: cpu or cuda[:N] on a GPU PyTorch sees
    (None: cuda if there is one, else cpu). One line otherwise."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device[:40]!r} is not a device the torch backend runs on; give cpu, cuda or "
                        "cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "" if torch.version.cuda else " (this PyTorch is built without CUDA)"
            raise BackendUnavailable(f"--device {device}: PyTorch sees no CUDA GPU here{built}; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: PyTorch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return str(dev)


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
            raise BackendUnavailable("the torch backend needs PyTorch: pip install \"tstitch-trt[build]\"")
        from tstitch_trt.export.torch_backend import TorchBackend

        return TorchBackend(bundle_dir, manifest, device=torch_device(device))
    raise UserError(f"unknown backend {kind!r}")


def open_bundle(bundle_dir: str | Path) -> tuple[Path, Manifest]:
    """(directory, manifest) of a bundle ("demo" is the built-in pair), schema-valid and every file verified."""
    from tstitch_trt.demo import resolve_bundle

    path = resolve_bundle(bundle_dir)
    manifest = read_manifest(path)
    verify_bundle(path, manifest)
    return path, manifest


def open_first_backend(bundle_dir: str | Path, manifest: Manifest, requested: str = "auto",
                       device: str | None = None, precision: str = "auto") -> tuple[Backend, str]:
    """(backend, why) for the first candidate that opens, for every pipeline kind.

    auto moves on only when this machine cannot run an engine (BackendUnavailable: no GPU, another
    GPU or TensorRT version, a missing package); a damaged bundle (BundleError) stops here.
    """
    candidates = backend_candidates(manifest, requested, precision)
    refusals: list[str] = []
    for kind, why in candidates:
        try:
            return (open_backend(kind, bundle_dir, manifest, device=device, precision=precision),
                    "; ".join([*refusals, why]))
        except BackendUnavailable as e:
            if kind == candidates[-1][0]:
                raise
            refusals.append(f"{kind} cannot run here ({e})")
    raise AssertionError("unreachable: the last candidate raises")
