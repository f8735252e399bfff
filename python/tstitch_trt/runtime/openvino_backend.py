"""OpenVINO backend: the bundle's fp32 ONNX step graphs on the CPU, in fp32 or bf16.

The same graphs and the same shared host buffers as the ORT backend: every InferRequest has its
tensors bound once to ov.Tensor views of the backend's numpy arrays, so a step writes x_next and
x0 straight into the next step's inputs (no copies, no per-step allocation). Per model there are
two requests, one per ping-pong parity (OpenVINO's CPU plugin keeps activations per compiled
model, not per request, so the second request costs no memory); a step points its request at its
row of the t / coef / noise tables (ov.Tensor views made once per shape, no data moved).

bf16 is OpenVINO's INFERENCE_PRECISION_HINT: the network runs in bf16 with fp32 I/O, and the numerically
sensitive ops (timestep embedding, softmax, normalization, exp, CFG + sampler tail) are marked to stay
fp32 (runtime/openvino_precision.py), so bf16 is only in the matmul/conv body. It is used
only on CPUs with native bf16 (AVX512_BF16 / AMX) and, under `--precision auto`, only for models
whose bundle records bf16 as safe (`tstitch-trt check --precision bf16 --record`).
Each model is compiled for the batch in use (static shapes run ~10-15% faster than the dynamic
graph); compiled models are cached as blobs outside the bundle (which may be read-only), keyed without
reading the graph (runtime/openvino_compile.py): a cached run imports the blobs and never reads the ONNX,
and no ov.Model is kept once its compiled model exists (no second copy of the weights).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import BackendUnavailable, UserError
from tstitch_trt.runtime.host_buffers import HostStepBuffers
from tstitch_trt.runtime.io_roles import StepIO, state_slots
from tstitch_trt.runtime.openvino_compile import Compiled, compile_cached, has_blob
from tstitch_trt.runtime.openvino_precision import marked_for_bf16

PRECISIONS = ("auto", "fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}
ONNX_ENTRY = "ort"  # the bundle's fp32 ONNX step graphs, shared with the ORT backend


def import_openvino() -> Any:
    """The openvino module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install \"tstitch-trt[openvino]\" "
                                 "(or use --backend ort)") from None
    return openvino


def cpu_has_bf16(core: Any) -> bool:
    """Native bf16 on this CPU (OpenVINO reports BF16 for AVX512_BF16 / AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def model_cache_dir(manifest: Manifest) -> Path:
    """OpenVINO's compiled-model cache for this bundle: outside it, keyed by its graphs' checksums."""
    digest = hashlib.sha256("".join(m.engines[ONNX_ENTRY].sha256 for m in manifest.models).encode()).hexdigest()
    return cache_root() / digest[:16]


def cache_root() -> Path:
    """$TSTITCH_OPENVINO_CACHE, else $XDG_CACHE_HOME (~/.cache)/tstitch-trt/openvino."""
    root = os.environ.get("TSTITCH_OPENVINO_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "tstitch-trt" / "openvino")
    return Path(root)


def bf16_recorded_safe(model: Any) -> bool:
    """What `tstitch-trt check --record` wrote into the bundle for this model (ModelEntry.bf16)."""
    return bool((getattr(model, "bf16", None) or {}).get("safe", False))


def resolve_precisions(manifest: Manifest, requested: str, native_bf16: bool) -> tuple[list[str], str]:
    """(precision per model, one line saying why). bf16 needs a native-bf16 CPU; auto also needs the bundle's ok."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    names = [m.name for m in manifest.models]
    if requested == "fp32":
        return ["fp32"] * len(names), "fp32 (requested)"
    if requested == "bf16":
        if not native_bf16:
            raise UserError("--precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX) and this one has "
                            "none; use --precision fp32")
        return ["bf16"] * len(names), "bf16 (requested)"
    if not native_bf16:
        return ["fp32"] * len(names), "fp32: this CPU has no native bf16"
    safe = [bf16_recorded_safe(m) for m in manifest.models]
    precisions = ["bf16" if s else "fp32" for s in safe]
    if all(safe):
        return precisions, "bf16: the bundle records bf16 as safe for every model"
    if not any(safe):
        return precisions, "fp32: the bundle does not record bf16 as safe (tstitch-trt check --precision bf16 --record)"
    return precisions, "bf16 on " + ", ".join(n for n, s in zip(names, safe, strict=True) if s) + \
        ", fp32 elsewhere: the bundle records bf16 as safe only there"


def compile_static(core: Any, model: Any, shapes: dict[str, tuple[int, ...]], precision: str,
                   threads: int = 0) -> Any:
    """`model` compiled for the CPU with every input at its static shape in `shapes`, in `precision`."""
    static = model.clone()
    static.reshape({inp.get_any_name(): list(shapes[inp.get_any_name()]) for inp in model.inputs})
    if precision == "bf16":  # bf16 only inside the matmul/conv body, whatever the CPU's ISA
        static = marked_for_bf16(core, static)
    return core.compile_model(static, "CPU", compile_config(precision, threads))


def compile_config(precision: str, threads: int = 0) -> dict[str, Any]:
    """The CPU plugin's properties for `precision` (an imported blob needs them again: they are not all in it)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _HINT[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def read_onnx(core: Any, path: Path) -> Any:
    """The ov.Model of an ONNX graph, or one line saying OpenVINO cannot read it."""
    try:
        return core.read_model(str(path))
    except Exception as e:
        raise BackendUnavailable(f"OpenVINO cannot read {path.name}: {str(e).strip().splitlines()[0][:200]}; "
                                 "upgrade openvino or use --backend ort") from None


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


class OpenVinoBackend(HostStepBuffers):
    name = "openvino"
    device = "cpu"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, precision: str = "auto", threads: int | None = None,
                 cache_dir: str | Path | None = None):
        ov = import_openvino()
        self._ov = ov
        self.manifest = manifest
        self.core = ov.Core()
        self.precisions, self.precision_reason = resolve_precisions(manifest, precision, cpu_has_bf16(self.core))
        self.threads = threads or int(os.environ.get("TSTITCH_OPENVINO_THREADS", "0"))
        self.cache_dir: Path | None = Path(cache_dir) if cache_dir is not None else model_cache_dir(manifest)
        self._notes = []
        if not _writable_dir(self.cache_dir):
            self._notes = [f"OpenVINO model cache off: {self.cache_dir} is not writable"]
            self.cache_dir = None
        self._paths = []
        self._shas = []  # each graph's files' sha256 (verified when the bundle was opened): the cache keys
        for m in manifest.models:
            if ONNX_ENTRY not in m.engines:
                raise UserError(f"the bundle has no ONNX graph for {m.name}; rebuild with --backend ort")
            self._paths.append(artifact_path(bundle_dir, m.engines[ONNX_ENTRY]))
            self._shas.append([sha for _, sha in m.engines[ONNX_ENTRY].files()])
        # a graph this cache never compiled is read now (an OpenVINO too old for it refuses here, so `auto`
        # moves on) and kept only until its first compile; a cached one is never read (openvino_compile.py)
        self._read: list[Any] = [None if has_blob(self.cache_dir, sha) else read_onnx(self.core, path)
                                 for path, sha in zip(self._paths, self._shas, strict=True)]
        self.io = StepIO.from_io(manifest.io)
        self.allocations = 0
        self.compiles = 0
        self.compile_sources: list[str] = []  # per model: "cache" (blob imported) or "compiled", last compile
        self._shape_key: tuple | None = None
        self._compiled_for: tuple | None = None
        self._requests: list[list[Any]] = []  # [model][parity]
        self.compiled: list[Any] = []
        self._compiled: list[Compiled] = []

    # compiled models ------------------------------------------------------------------------------
    def _compile(self, dims: dict[str, int]) -> None:
        """Compile every model for these dims (static shapes); a cached blob is imported without the ONNX."""
        key = tuple(sorted(dims.items()))
        if key == self._compiled_for:
            return
        # the old shape's models go before new ones come
        self._requests, self._rows, self.compiled, self._compiled = [], [], [], []
        shapes = {n: self.io.shape(n, dims) for n in self.io.inputs}
        self._compiled = []
        for i, precision in enumerate(self.precisions):
            self._compiled.append(compile_cached(
                self.core, lambda i=i: self._take_model(i),
                lambda model, precision=precision: compile_static(self.core, model, shapes, precision, self.threads),
                self._shas[i], shapes, precision, self.threads, self.cache_dir,
                compile_config(precision, self.threads)))
        self.compiled = [c.model for c in self._compiled]
        self.compile_sources = [c.source for c in self._compiled]
        self.compiles += len(self.compiled)
        self._compiled_for = key

    def _take_model(self, i: int) -> Any:
        """The ov.Model of graph i, handed over (not kept): read at open, or read again for a new shape."""
        model, self._read[i] = self._read[i], None
        return model if model is not None else read_onnx(self.core, self._paths[i])

    # buffers: runtime/host_buffers.py (compiled for each new shape); bound here ------------------------
    def _prepare_shape(self, dims: dict[str, int]) -> None:
        self._compile(dims)

    def _tensor(self, a: np.ndarray) -> Any:
        return self._ov.Tensor(a, shared_memory=True)  # a view: OpenVINO reads and writes the numpy array

    def _bind_all(self, steps: int) -> None:
        """Per model one request per parity, states and request tensors bound once; row views of the tables."""
        io = self.io
        state = {n: [self._tensor(a) for a in pair] for n, pair in self.state.items()}
        request = {n: self._tensor(a) for n, a in self.request.items()}
        self._rows = [{n: self._tensor(self.tables[n][i, ...] if n in self.tables else self.zero_rows[n])
                       for n in io.step} for i in range(steps)]
        self._requests = []
        for compiled in self.compiled:
            per_parity = []
            for parity in (0, 1):
                src, dst = state_slots(parity)
                r = compiled.create_infer_request()
                for inp, out in io.state:
                    r.set_tensor(inp, state[inp][src])
                    r.set_tensor(out, state[inp][dst])
                for n in io.request:
                    r.set_tensor(n, request[n])
                per_parity.append(r)
            self._requests.append(per_parity)

    # Backend protocol (prepare, read_x, read_x0: HostStepBuffers) ---------------------------------
    def launch(self, step: int, model: int) -> float | None:
        t0 = time.perf_counter()
        r = self._requests[model][step % 2]
        for n, tensor in self._rows[step].items():
            r.set_tensor(n, tensor)
        r.infer()
        return (time.perf_counter() - t0) * 1e3

    def synchronize(self) -> None:
        pass

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        sources = [f"{m.name} {'from the model cache' if s == 'cache' else 'compiled (now cached)'}"
                   for m, s in zip(self.manifest.models, self.compile_sources, strict=False)]
        return [f"openvino precision: {self.precision_reason}", *notes,
                *([f"openvino models: {', '.join(sources)}"] if sources else [])]

    def close(self) -> None:
        self._requests = []
        self._rows = []
        self.compiled = []
        self._compiled = []
        self._shape_key = None
        self._compiled_for = None
