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
whose bundle records bf16 as safe on this CPU's bf16 ISA (`tstitch-trt check --precision bf16 --record`
names the ISA it measured on: amx_bf16 or avx512_bf16, runtime/cpu_isa.py).
Each model is compiled for the batch in use (static shapes run ~10-15% faster than the dynamic
graph); compiled models are cached as blobs outside the bundle (which may be read-only), keyed without
reading the graph (runtime/openvino_compile.py): a cached run imports the blobs and never reads the ONNX,
and no ov.Model is kept once its compiled model exists (no second copy of the weights).

A bundle whose graphs are over half the machine's memory (an SDXL pair: 19.5 GB) cannot hold a compiled copy of
every step model at once (the CPU plugin repacks each weight into its own buffers): then one step model is
compiled at a time, at its first call, and the previous one is released first (runtime/host_memory.py;
$TSTITCH_OPENVINO_ONE_MODEL=1/0 forces it). A stitched trajectory calls its models in order, so each is compiled
once per request; the compile time is in that model's first step, and the run's notes say so.
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
from tstitch_trt.runtime.cpu_isa import bf16_isa
from tstitch_trt.runtime.host_buffers import HostStepBuffers, check_cached
from tstitch_trt.runtime.host_memory import graphs_over_half_memory, ort_graph_bytes
from tstitch_trt.runtime.io_roles import state_slots, step_io
from tstitch_trt.runtime.openvino_compile import Compiled, compile_cached, has_blob
from tstitch_trt.runtime.openvino_precision import marked_for_bf16
from tstitch_trt.sampling.trajectory import TrajectoryPlan

PRECISIONS = ("auto", "fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}
ONNX_ENTRY = "ort"  # the bundle's fp32 ONNX step graphs, shared with the ORT backend
ONE_MODEL_ENV = "TSTITCH_OPENVINO_ONE_MODEL"


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


def verdict_covers(verdict: dict | None, isa: str | None) -> str | None:
    """None where a recorded bf16 verdict lets auto use bf16 on this CPU's bf16 ISA, else why not (a phrase)."""
    if not verdict or not verdict.get("safe", False):
        return "the bundle does not record bf16 as safe (tstitch-trt check --precision bf16 --record)"
    measured = verdict.get("isa") or []
    if not measured:
        return ("the bundle's bf16 verdict does not name the CPU ISA it was measured on (recorded by an older "
                "check); run tstitch-trt check --precision bf16 --record on this CPU")
    if isa is None:
        return "this CPU's bf16 ISA cannot be told (no /proc/cpuinfo flags)"
    if isa not in measured:
        return f"bf16 verdict measured on {', '.join(measured)}, this CPU is {isa}"
    return None


def choose_precisions(parts: list[tuple[str, dict | None]], requested: str, native_bf16: bool,
                      isa: str | None) -> tuple[list[str], str]:
    """(precision per part, one line saying why) for parts = [(name, its recorded bf16 verdict)].

    bf16 needs a native-bf16 CPU; auto also needs a safe verdict measured on this CPU's bf16 ISA.
    """
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    names = [n for n, _ in parts]
    if requested == "fp32":
        return ["fp32"] * len(names), "fp32 (requested)"
    if requested == "bf16":
        if not native_bf16:
            raise UserError("--precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX) and this one has "
                            "none; use --precision fp32")
        return ["bf16"] * len(names), "bf16 (requested)"
    if not native_bf16:
        return ["fp32"] * len(names), "fp32: this CPU has no native bf16"
    why_not = [verdict_covers(v, isa) for _, v in parts]
    precisions = ["fp32" if w else "bf16" for w in why_not]
    reasons = "; ".join(dict.fromkeys(w for w in why_not if w))
    if not reasons:
        return precisions, f"bf16: the bundle records bf16 as safe on {isa} for every part"
    if "bf16" not in precisions:
        return precisions, f"fp32: {reasons}"
    return precisions, "bf16 on " + ", ".join(n for n, p in zip(names, precisions, strict=True) if p == "bf16") + \
        f", fp32 elsewhere: {reasons}"


def resolve_precisions(manifest: Manifest, requested: str, native_bf16: bool,
                       isa: str | None) -> tuple[list[str], str]:
    """choose_precisions for the bundle's step models (their models[i].bf16 verdicts)."""
    return choose_precisions([(m.name, getattr(m, "bf16", None)) for m in manifest.models], requested, native_bf16,
                             isa)


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
        self.precisions, self.precision_reason = resolve_precisions(manifest, precision, cpu_has_bf16(self.core),
                                                                    bf16_isa())
        self.threads = threads or int(os.environ.get("TSTITCH_OPENVINO_THREADS", "0"))
        self.cache_dir: Path | None = Path(cache_dir) if cache_dir is not None else model_cache_dir(manifest)
        self._notes = []
        if not _writable_dir(self.cache_dir):
            self._notes = [f"OpenVINO model cache off: {self.cache_dir} is not writable"]
            self.cache_dir = None
        self.bundle_dir = Path(bundle_dir)
        self._paths = []
        self._shas = []  # each graph's files' sha256 (verified when the bundle was opened): the cache keys
        for m in manifest.models:
            if ONNX_ENTRY not in m.engines:
                raise UserError(f"the bundle has no ONNX graph for {m.name}; rebuild with --backend ort")
            self._paths.append(artifact_path(bundle_dir, m.engines[ONNX_ENTRY]))
            self._shas.append([sha for _, sha in m.engines[ONNX_ENTRY].files()])
        self.one_model_at_a_time = graphs_over_half_memory(bundle_dir, manifest, ONE_MODEL_ENV)
        if self.one_model_at_a_time:
            size = ort_graph_bytes(bundle_dir, manifest) / 2**30
            self._notes.append(f"openvino: one step model compiled at a time ({size:.1f} GiB of graphs): each at "
                               "its first call, which includes its compile time")
        # a graph this cache never compiled is read now (an OpenVINO too old for it refuses here, so `auto`
        # moves on) and kept only until its first compile; a cached one is never read (openvino_compile.py)
        self._read: list[Any] = [None if has_blob(self.cache_dir, sha) else read_onnx(self.core, path)
                                 for path, sha in zip(self._paths, self._shas, strict=True)]
        # DeepCache's cached graphs: found at the first trajectory that uses them, compiled through the same cache
        self._cached_paths: list[Path] = []
        self._cached_shas: list[list[str]] = []
        self.cached_compiled: list[Any] = []
        self._cached_compiled: list[Compiled] = []
        self._cached_requests: list[list[Any]] = []
        self._cached: list[bool] = []
        self.io = step_io(manifest)
        self.allocations = 0
        self.compiles = 0
        self.compile_sources: list[str] = []  # per model: "cache" (blob imported) or "compiled", last compile
        self._written: list[bool] = []  # per model: its compile wrote a blob to the cache
        self._not_written: list[str | None] = []  # per model: why its compile wrote no blob on purpose (disk reserve)
        self._shape_key: tuple | None = None
        self._compiled_for: tuple | None = None
        self._requests: list[list[Any]] = []  # [model][parity]
        self.compiled: list[Any] = []
        self._compiled: list[Compiled] = []

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, cond: Any, guidance: float) -> None:
        if any(check_cached(plan, self.io)) and not self._cached_paths:
            entries = []
            for m in self.manifest.models:
                entry = (m.cached or {}).get("engines", {}).get(ONNX_ENTRY)
                if entry is None:
                    raise UserError(f"the bundle has no cached ONNX graph for {m.name}; rebuild it with --backend "
                                    "ort --cache-branch K")
                entries.append(entry)
            self._cached_paths = [artifact_path(self.bundle_dir, e) for e in entries]
            self._cached_shas = [[sha for _, sha in e.files()] for e in entries]
            self._shape_key = self._compiled_for = None  # compile and bind them too
        super().prepare(plan, x_init, cond, guidance)

    # compiled models ------------------------------------------------------------------------------
    def _compile(self, dims: dict[str, int]) -> None:
        """Compile every model for these dims (static shapes); a cached blob is imported without the ONNX."""
        key = tuple(sorted(dims.items()))
        if key == self._compiled_for:
            return
        # the old shape's models go before new ones come
        self._requests, self._rows, self.compiled, self._compiled = [], [], [], []
        shapes = {n: self.io.shape(n, dims) for n in self.io.inputs}
        self._shapes = shapes
        if self._one_at_a_time():  # compiled at each model's first call (_load_only)
            n = len(self.precisions)
            self._compiled, self.compiled, self.compile_sources = [None] * n, [None] * n, [""] * n
            self._written, self._not_written = [False] * n, [None] * n
            self._compiled_for = key
            return
        self._compiled = [self._note_uncached(self._compile_model(i)) for i in range(len(self.precisions))]
        self.compiled = [c.model for c in self._compiled]
        self.compile_sources = [c.source for c in self._compiled]
        self._written = [c.written for c in self._compiled]
        self._not_written = [c.note for c in self._compiled]
        self.compiles += len(self.compiled)
        self.cached_compiled, self._cached_compiled = [], []
        if self._cached_paths and self.io.cache is not None:  # + the kept feature, in each model's own shape
            for i, precision in enumerate(self.precisions):
                cached_shapes = {**shapes, self.io.cache[0]: self.io.features[i].resolve(dims)}
                self._cached_compiled.append(self._note_uncached(compile_cached(
                    self.core, lambda i=i: read_onnx(self.core, self._cached_paths[i]),
                    lambda model, precision=precision, cached_shapes=cached_shapes: compile_static(
                        self.core, model, cached_shapes, precision, self.threads),
                    self._cached_shas[i], cached_shapes, precision, self.threads, self.cache_dir,
                    compile_config(precision, self.threads))))
            self.cached_compiled = [c.model for c in self._cached_compiled]  # _cached_compiled keeps blob maps alive
            self.compiles += len(self.cached_compiled)
        self._compiled_for = key

    def _note_uncached(self, c: Compiled) -> Compiled:
        """The run's notes say why a compiled model was not cached (its blob would take the disk under its reserve)."""
        if c.note and c.note not in self._notes:
            self._notes.append(c.note)
        return c

    def _one_at_a_time(self) -> bool:
        # DeepCache's cached graphs alternate with the full ones: every model stays compiled there
        return self.one_model_at_a_time and not self._cached_paths

    def _compile_model(self, i: int) -> Compiled:
        precision, shapes = self.precisions[i], self._shapes
        return compile_cached(
            self.core, lambda: self._take_model(i),
            lambda model: compile_static(self.core, model, shapes, precision, self.threads),
            self._shas[i], shapes, precision, self.threads, self.cache_dir, compile_config(precision, self.threads))

    def _load_only(self, model: int) -> None:
        """One-model-at-a-time mode: release every other step model (its requests, then its compiled model), then
        compile this one and bind its requests."""
        for j in range(len(self.compiled)):
            if j != model:
                self._requests[j] = None
                self.compiled[j] = self._compiled[j] = None
        c = self._note_uncached(self._compile_model(model))
        self._compiled[model], self.compiled[model] = c, c.model
        self.compile_sources[model] = c.source
        self._written[model] = c.written
        self._not_written[model] = c.note
        self.compiles += 1
        self._requests[model] = self._make_requests(c.model, model, False)

    def release_step_models(self) -> None:
        """One-model-at-a-time mode, after a trajectory: the last step model's compiled copy goes (the VAE decoder
        comes next); the next trajectory compiles each model again at its first call."""
        if self._one_at_a_time() and self._compiled_for is not None:
            for j in range(len(self.compiled)):
                self._requests[j] = None
                self.compiled[j] = self._compiled[j] = None

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
        kept = [self._tensor(a) for a in self.kept]

        def requests(compiled: Any, model: int, cached: bool) -> list[Any]:
            per_parity = []
            for parity in (0, 1):
                src, dst = state_slots(parity)
                r = compiled.create_infer_request()
                for inp, out in io.state:
                    r.set_tensor(inp, state[inp][src])
                    r.set_tensor(out, state[inp][dst])
                for n in io.request:
                    r.set_tensor(n, request[n])
                if io.cache is not None:  # the model's kept feature: the full graph writes it, the cached reads it
                    r.set_tensor(io.cache[0] if cached else io.cache[1], kept[model])
                per_parity.append(r)
            return per_parity

        self._make_requests = requests
        self._requests = [None if c is None else requests(c, m, False) for m, c in enumerate(self.compiled)]
        self._cached_requests = [requests(c, m, True) for m, c in enumerate(self.cached_compiled)]

    # Backend protocol (prepare, read_x, read_x0: HostStepBuffers) ---------------------------------
    def launch(self, step: int, model: int) -> float | None:
        t0 = time.perf_counter()
        if not self._cached[step] and self._requests[model] is None:
            self._load_only(model)
        r = (self._cached_requests if self._cached[step] else self._requests)[model][step % 2]
        for n, tensor in self._rows[step].items():
            r.set_tensor(n, tensor)
        r.infer()
        return (time.perf_counter() - t0) * 1e3

    def synchronize(self) -> None:
        pass

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []

        def said(source: str, written: bool, skipped: str | None) -> str:
            if source == "cache":
                return "from the model cache"
            if self.cache_dir is None:
                return "compiled"
            if written:
                return "compiled (now cached)"
            if skipped:
                return "compiled (not cached: the disk's free-space reserve, see the note above)"
            return "compiled (NOT cached: the model cache could not write its blob; is the disk full? " \
                   "TSTITCH_OPENVINO_CACHE moves it)"
        sources = [f"{m.name} {said(s, w, k)}" for m, s, w, k in
                   zip(self.manifest.models, self.compile_sources, self._written, self._not_written, strict=False) if s]
        return [f"openvino precision: {self.precision_reason}", *notes,
                *([f"openvino models: {', '.join(sources)}"] if sources else [])]

    def close(self) -> None:
        self._requests = []
        self._cached_requests = []
        self.cached_compiled = []
        self._cached_compiled = []
        self._rows = []
        self.compiled = []
        self._compiled = []
        self._shape_key = None
        self._compiled_for = None
