"""Is this engine plan usable here? Checked from the manifest BEFORE deserializing (no GPU needed).

TensorRT plans are specific to the TensorRT build and the GPU architecture. Deserializing a foreign
plan fails with a terse log line at best, so the runtime compares what the builder recorded in
the manifest (EngineEntry.builder) with the running module and device, and says what to do.

The builder records (export/trt_build.py should produce it with `builder_info`):

    module                  "tensorrt" or "tensorrt_rtx": the Python module that built the plan
    version                 that module's __version__, e.g. "10.13.0.35" or "1.7.1.116"
    compute_capabilities    ["8.9", ...]: the GPU architectures the plan targets
                            (TensorRT: the build GPU's; TensorRT-RTX: the ones it was built for)
    hardware_compatibility  optional: "none" (default), "ampere_plus" (any GPU >= 8.0) or
                            "same_compute_capability"
    version_compatible      optional bool: built with BuilderFlag.VERSION_COMPATIBLE, so any
                            runtime of the same major version may load it

Missing keys are not checked (older bundles); TensorRT's own check still applies at load.

TensorRT-RTX targets only some GPU architectures (consumer / workstation ones: no Hopper sm_90, no
data-centre Blackwell sm_100). A trt-rtx plan built portable (compute_capabilities []) would pass the
list check anywhere and then fail in deserialization with advice to rebuild with trt-rtx, which cannot
work there; so a GPU the module does not target is refused up front, advising --backend trt. The
targets come from the module's own ComputeCapability enum (rtx_targets), RTX_FALLBACK_TARGETS where
it has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tstitch_trt.errors import BackendUnavailable

KEYS = ("module", "version", "compute_capabilities", "hardware_compatibility", "version_compatible")
# TensorRT-RTX's documented targets where its module has no ComputeCapability enum: Turing, Ampere (GA10x),
# Ada, Blackwell (RTX); "12.x" stands for every 12.* compute capability
RTX_FALLBACK_TARGETS = ("7.5", "8.6", "8.9", "12.x")


def cc_string(cc: Sequence[int] | str) -> str:
    """(8, 9) or "sm_89" or "SM89" or "8.9" -> "8.9"."""
    if isinstance(cc, str):
        s = cc.strip().lower().removeprefix("sm_").removeprefix("sm")
        if "." in s:
            major, minor = s.split(".", 1)
            return f"{int(major)}.{int(minor)}"
        return f"{int(s[:-1])}.{int(s[-1])}"
    return f"{int(cc[0])}.{int(cc[1])}"


def rtx_targets(trt_module: Any) -> list[str]:
    """The compute capabilities a TensorRT-RTX module builds for: its ComputeCapability enum's SM members
    (SM75 -> "7.5"; NONE / CURRENT are not architectures), else RTX_FALLBACK_TARGETS."""
    enum = getattr(trt_module, "ComputeCapability", None)
    members = getattr(enum, "__members__", None) or {}
    found = sorted({cc_string(name) for name in members if name.upper().startswith("SM") and name[2:].isdigit()},
                   key=lambda c: tuple(int(p) for p in c.split(".")))
    return found or list(RTX_FALLBACK_TARGETS)


def targets_gpu(targets: Sequence[str], device_cc: Sequence[int]) -> bool:
    """Is the GPU `device_cc` among `targets` ("8.9"; "12.x" matches any 12.*)?"""
    here = cc_string(device_cc)
    major = here.split(".")[0]
    return any(t == here or (t.endswith(".x") and t[:-2] == major) for t in targets)


def builder_info(trt_module: Any, compute_capabilities: Iterable[Sequence[int] | str],
                 hardware_compatibility: str = "none", version_compatible: bool = False) -> dict:
    """The manifest `builder` dict for a plan built by `trt_module` for `compute_capabilities`."""
    return {
        "module": trt_module.__name__,
        "version": str(trt_module.__version__),
        "compute_capabilities": sorted({cc_string(c) for c in compute_capabilities}),
        "hardware_compatibility": hardware_compatibility,
        "version_compatible": bool(version_compatible),
    }


def check_engine_compat(builder: dict, trt_module: Any, device_cc: Sequence[int], what: str = "the engine",
                        kind: str | None = None) -> None:
    """Raise BackendUnavailable if a plan built as described by `builder` cannot run on this module and GPU."""
    kind = kind or ("trt-rtx" if trt_module.__name__.startswith("tensorrt_rtx") else "trt")
    rebuild = f"rebuild the bundle on this machine (`tstitch-trt build --backend {kind}`)"
    module = builder.get("module")
    here_module = trt_module.__name__
    if module and module != here_module:
        raise BackendUnavailable(f"{what} was built with {module}, but this backend runs {here_module}; "
                        f"use the matching --backend or {rebuild}")
    version = builder.get("version")
    here_version = str(trt_module.__version__)
    if version and str(version) != here_version:
        same_major = str(version).split(".")[0] == here_version.split(".")[0]
        if not (builder.get("version_compatible") and same_major):
            raise BackendUnavailable(f"{what} was built with {module or here_module} {version}, but {here_version} is "
                            f"installed; engines only load in the TensorRT version that built them: install "
                            f"{module or here_module}=={version} or {rebuild}")
    here_cc = cc_string(device_cc)
    if kind == "trt-rtx":
        rtx = rtx_targets(trt_module)
        if not targets_gpu(rtx, device_cc):  # no trt-rtx plan, portable or not, can run here: say so before loading
            raise BackendUnavailable(f"{what} is a TensorRT-RTX plan and {here_module} does not target this GPU "
                                     f"(compute capability {here_cc}; it targets {', '.join(rtx)}); use "
                                     f"--backend trt (build the bundle with `tstitch-trt build --backend trt` "
                                     f"on this machine)")
    level = str(builder.get("hardware_compatibility") or "none").lower()
    if level == "ampere_plus":
        if tuple(device_cc) < (8, 0):
            raise BackendUnavailable(f"{what} was built for Ampere and newer GPUs (compute capability >= 8.0), "
                            f"this GPU is {here_cc}; {rebuild}")
        return
    targets = [cc_string(c) for c in builder.get("compute_capabilities") or []]
    if targets and here_cc not in targets:
        raise BackendUnavailable(f"{what} was built for GPU compute capability {', '.join(targets)}, but this GPU is "
                        f"{here_cc}; engines are specific to the GPU architecture: {rebuild}")
