"""ONNX step graph -> TensorRT or TensorRT-RTX engine plan, behind one interface.

`tensorrt` (>= 10.8) builds on, and for, the NVIDIA GPU of the build machine. `tensorrt_rtx` has
the same Python API and builds ahead of time WITHOUT a GPU: the plan targets the compute
capabilities set in the builder config (default: portable across the GPUs the release
supports) and is specialised just in time on the GPU it runs on. The same code drives both
modules; where they differ it asks the module (hasattr, deprecation warnings), never a table.

Networks are strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): fp16 comes from the
fp16-typed ONNX graph, never from BuilderFlag.FP16 (deprecated in 10.12, gone in 11). One
optimization profile spans the requested batch range.

Type-checked against tensorrt-stubs by .ci/typecheck.sh: module-level names are read through
`if TYPE_CHECKING: import tensorrt as trt / else: trt = self.trt`, so the stubs see every call.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tstitch_trt.errors import UserError
from tstitch_trt.runtime.engine_compat import builder_info, cc_string
from tstitch_trt.runtime.trt_backend import import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt_types

log = logging.getLogger("tstitch_trt.trt")

DEFAULT_OPT_BATCH = 8  # the DiT reference samples 8 images; the profile's opt is this, clamped to the range


def cuda_gpu() -> dict[str, Any] | None:
    """{name, compute_capability} of CUDA device 0 (cuda-python, else torch), or None if none is visible."""
    from tstitch_trt.runtime import cuda as cuda_rt

    if cuda_rt.device_count() > 0:
        try:
            major, minor = cuda_rt.compute_capability(0)
            return {"name": cuda_rt.device_name(0), "compute_capability": f"{major}.{minor}"}
        except cuda_rt.CudaError:
            pass
    try:  # no cuda-python (the gpu extra): torch may still see the GPU
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    return None


class EngineBuilder:
    """Builds plans for one kind ("trt" or "trt-rtx") with fixed builder options."""

    def __init__(self, kind: str, trt_module: ModuleType, opt_level: int = 3, timing_cache: str | None = None,
                 compute_capabilities: Sequence[str] = (), opt_batch: int = DEFAULT_OPT_BATCH,
                 gpu: dict[str, Any] | None = None):
        if not 0 <= opt_level <= 5:
            raise UserError(f"--opt-level must be 0..5 (TensorRT builder optimization level), got {opt_level}")
        self.kind = kind
        self.trt = trt_module
        self.opt_level = opt_level
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.compute_capabilities = list(compute_capabilities)
        self.opt_batch = opt_batch
        self.gpu = gpu

    # -------------------------------------------------------------------------------------------
    def build(self, onnx_path: str | Path, plan_path: str | Path, batch_range: tuple[int, int],
              io_spec: dict) -> dict[str, Any]:
        """Parse `onnx_path`, build one plan over `batch_range`, write it; return the manifest's builder info."""
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.trt
        onnx_path, plan_path = Path(onnx_path), Path(plan_path)
        t0 = time.perf_counter()
        logger = capturing_logger(trt)
        builder = trt.Builder(logger)
        if builder is None:
            raise UserError(f"{self.module_name} could not create a builder: {logger.last_error()}")
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        self._parse(parser, onnx_path)
        config = builder.create_builder_config()
        config.builder_optimization_level = self.opt_level
        profile_shapes = self._add_profile(builder, network, config, batch_range, io_spec)
        targets = self._set_targets(config)
        cache = self._load_timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UserError(f"{self.module_name} could not build an engine from {onnx_path.name}: "
                            f"{logger.last_error()}")
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        with open(plan_path, "wb") as f:
            f.write(memoryview(plan))
        if cache is not None:
            self._save_timing_cache(config)
        plan_bytes = plan_path.stat().st_size
        del plan
        # the keys runtime/engine_compat.py checks before deserializing, then ours
        return {
            **builder_info(trt, targets.pop("compute_capabilities"), hardware_compatibility="none"),
            "kind": self.kind,
            **targets,
            "options": {
                "strongly_typed": True,
                "builder_optimization_level": self.opt_level,
                "profile": profile_shapes,
                "timing_cache": cache,
            },
            "build_seconds": round(time.perf_counter() - t0, 3),
            "plan_bytes": plan_bytes,
        }

    @property
    def module_name(self) -> str:
        return self.trt.__name__

    # -------------------------------------------------------------------------------------------
    def _parse(self, parser: trt_types.OnnxParser, onnx_path: Path) -> None:
        if not onnx_path.is_file():
            raise UserError(f"ONNX graph {onnx_path} does not exist")
        # from file, not bytes: the parser then finds external weights (graphs over 2 GB) itself
        if parser.parse_from_file(str(onnx_path)):
            return
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        if not errors:
            raise UserError(f"{self.module_name} cannot parse {onnx_path} (no error reported); re-export it")
        e = errors[0]
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        if e.node() < 0 and not e.node_name():
            raise UserError(f"{self.module_name} cannot read {onnx_path}: {e.desc()}{more}; "
                            f"the file is corrupt or not ONNX, re-export it with `tstitch-trt build`")
        raise UserError(f"{self.module_name} rejected node {e.node_name()!r} ({e.node_operator()}, node "
                        f"#{e.node()}) of {onnx_path.name}: {e.desc()}{more}")

    def _add_profile(self, builder: trt_types.Builder, network: trt_types.INetworkDefinition,
                     config: trt_types.IBuilderConfig, batch_range: tuple[int, int],
                     io_spec: dict) -> dict[str, list[list[int]]]:
        """One optimization profile: 'B' (io_spec) -> (min, opt, max) of the batch range, '2B' twice it, and
        any other symbolic dim (SD: H, W) -> io_spec["dim_ranges"][dim] = [min, opt, max]."""
        lo, hi = batch_range
        if not 1 <= lo <= hi:
            raise UserError(f"batch range {lo}-{hi} is not 1 <= MIN <= MAX")
        opt = min(max(self.opt_batch, lo), hi)
        sizes = {"B": (lo, opt, hi), "2B": (2 * lo, 2 * opt, 2 * hi)}
        sizes.update({k: tuple(int(x) for x in v) for k, v in io_spec.get("dim_ranges", {}).items()})
        specs = io_spec.get("inputs", {})
        profile = builder.create_optimization_profile()
        shapes: dict[str, list[list[int]]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if all(d >= 0 for d in dims):
                continue
            symbolic = specs.get(tensor.name, {}).get("shape")
            if symbolic is None or len(symbolic) != len(dims):
                raise UserError(f"input {tensor.name!r} of the graph has dynamic dims {dims} that the io spec does "
                                f"not name; re-export the graph")
            triple = []
            for k in range(3):
                shape = []
                for d, sym in zip(dims, symbolic, strict=True):
                    if d >= 0:
                        shape.append(d)
                    elif isinstance(sym, str) and sym in sizes:
                        shape.append(sizes[sym][k])
                    else:
                        raise UserError(f"input {tensor.name!r}: dynamic dim {sym!r} has no size range")
                triple.append(shape)
            profile.set_shape(tensor.name, triple[0], triple[1], triple[2])
            shapes[tensor.name] = triple
        config.add_optimization_profile(profile)
        return shapes

    def _set_targets(self, config: trt_types.IBuilderConfig) -> dict[str, Any]:
        """What the plan runs on: the build GPU (trt) or the config's compute capabilities (trt-rtx)."""
        if self.kind == "trt":
            if self.compute_capabilities:
                raise UserError("TensorRT builds for the GPU it runs on; target compute capabilities are a "
                                "trt-rtx option")
            gpu = self.gpu or {}
            cc = gpu.get("compute_capability")
            return {"gpu": gpu.get("name"), "compute_capabilities": [cc] if cc else []}
        # TensorRT-RTX: ahead-of-time build; the config lists target compute capabilities
        enum = getattr(self.trt, "ComputeCapability", None)
        if not hasattr(config, "set_compute_capability") or enum is None:
            if self.compute_capabilities:
                raise UserError(f"{self.module_name} {self.trt.__version__} has no compute capability setting")
            return {"compute_capabilities": [], "targets": "builder default"}
        cfg: Any = config  # the TensorRT stubs do not know the RTX-only calls
        if self.compute_capabilities:
            names = [c.upper().replace(".", "") for c in self.compute_capabilities]
            names = [n if n.startswith("SM") else f"SM{n}" for n in names]
            unknown = [n for n in names if not hasattr(enum, n)]
            if unknown:
                known = ", ".join(k for k in enum.__members__ if k.startswith("SM"))
                raise UserError(f"compute capability {unknown[0]} is not a {self.module_name} target ({known})")
            cfg.num_compute_capabilities = len(names)
            for i, name in enumerate(names):
                if not cfg.set_compute_capability(getattr(enum, name), i):
                    raise UserError(f"{self.module_name} refused target compute capability {name}")
        count = int(cfg.num_compute_capabilities)
        names = [cfg.get_compute_capability(i).name for i in range(count)]
        # 0 targets: the release's portable default (TensorRT-RTX docs: Ampere and later RTX GPUs,
        # not Turing); recorded as no list, so the runtime leaves the check to TensorRT-RTX itself
        return {"compute_capabilities": [cc_string(name) for name in names if name.startswith("SM")],
                "targets": names or "portable (builder default)"}

    def _load_timing_cache(self, config: trt_types.IBuilderConfig) -> str | None:
        """Load (or start) the timing cache; None when not asked for or a no-op in this module."""
        if self.timing_cache is None:
            return None
        data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = config.create_timing_cache(data)
            accepted = cache is not None and config.set_timing_cache(cache, False)
        # TensorRT-RTX keeps the calls but deprecates them as no-ops: ask the module, don't assume
        if any(issubclass(w.category, DeprecationWarning) and "no-op" in str(w.message) for w in caught):
            log.info("%s ignores timing caches; %s not used", self.module_name, self.timing_cache)
            return None
        if not accepted:
            raise UserError(f"timing cache {self.timing_cache} does not match {self.module_name} "
                            f"{self.trt.__version__} or this GPU; delete it and rebuild")
        return str(self.timing_cache)

    def _save_timing_cache(self, config: trt_types.IBuilderConfig) -> None:
        assert self.timing_cache is not None
        cache = config.get_timing_cache()
        if cache is None:
            return
        tmp = self.timing_cache.with_name(f".{self.timing_cache.name}.tmp-{os.getpid()}")
        self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(memoryview(cache.serialize()))
        os.replace(tmp, self.timing_cache)  # atomic: a concurrent build never reads half a cache


def make_engine_builder(kind: str, opt_level: int = 3, timing_cache: str | None = None,
                        compute_capabilities: Sequence[str] = ()) -> EngineBuilder:
    """An EngineBuilder for "trt" or "trt-rtx", or a one-line UserError saying what is missing."""
    mod = import_tensorrt(kind)
    gpu = None
    if kind == "trt":
        gpu = cuda_gpu()
        if gpu is None:
            from tstitch_trt.runtime import cuda as cuda_rt

            raise UserError("--backend trt builds engines on the NVIDIA GPU they will run on, and none is usable "
                            f"here ({cuda_rt.probe_devices().message}); --backend trt-rtx builds without a GPU")
    return EngineBuilder(kind, mod, opt_level=opt_level, timing_cache=timing_cache,
                         compute_capabilities=compute_capabilities, gpu=gpu)


def capturing_logger(trt: Any) -> Any:
    """An ILogger of `trt` that routes messages to logging and keeps the errors for our messages."""

    class CapturingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                # RTX logs a harmless "[F] Thread context has not been set" on every builder config
                if "Thread context has not been set" not in msg:
                    self.errors.append(msg)
                log.debug("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("%s", msg)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from the builder"

    return CapturingLogger()
