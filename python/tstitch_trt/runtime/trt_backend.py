"""TensorRT and TensorRT-RTX backend: step engines on shared device buffers, one shared scratch, CUDA graphs.

The same code drives `tensorrt` (kind "trt") and `tensorrt_rtx` (kind "trt-rtx"): the module is
passed in. No torch: device memory, streams, events and graphs come from runtime/cuda.py.

Buffers (one set, bound by every engine, by ROLE: runtime/io_roles.py):
    <state>_slot0/1  ping-pong pair per state (DiT: x, prev_x0; SD: + eps_hist, saved)
    <request>        per trajectory (DiT: y, guidance; SD: context, guidance)
    t, coef, noise   step buffers, fed by a D2D copy of the step's row of <name>_table

Why copy the row instead of binding the row's address: every execution context then keeps ONE
set of tensor addresses for its whole life. A CUDA graph bakes in the addresses TensorRT saw at
capture, and TensorRT documents graph capture only for an enqueue whose bindings do not change
afterwards; rebinding one context to 100 different rows inside one capture would rely on
TensorRT keeping no host-side per-enqueue state. The copies are three small memcpy nodes per
step (a few microseconds against milliseconds of network). For the same reason each engine has
two contexts, one per ping-pong parity (step i reads x[i % 2] and writes x[(i + 1) % 2]); all
contexts share ONE scratch allocation, since engines never run concurrently.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, ModelEntry, artifact_path
from tstitch_trt.errors import BackendUnavailable, BundleError, UserError, first_line
from tstitch_trt.runtime import cuda as cuda_rt
from tstitch_trt.runtime.backend import x_slots
from tstitch_trt.runtime.engine_compat import check_engine_compat
from tstitch_trt.runtime.host_buffers import check_cached
from tstitch_trt.runtime.io_roles import step_io
from tstitch_trt.runtime.loop import LoopResult
from tstitch_trt.sampling.trajectory import TrajectoryPlan

if TYPE_CHECKING:  # .ci/typecheck.sh checks every TensorRT call below against tensorrt-stubs
    import tensorrt as trt_types

log = logging.getLogger("tstitch_trt.trt")

MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}
MIN_TENSORRT = (10, 8)  # strongly typed networks, execute_async_v3, device_memory_size_v2


def import_tensorrt(kind: str) -> Any:
    """The real module for `kind` ("trt" or "trt-rtx"), for building and running alike; a one-line
    UserError naming what is missing (the package, a real install rather than stubs, the version)."""
    if kind not in MODULES:
        raise UserError(f"unknown engine kind {kind!r}; choose trt or trt-rtx")
    name = MODULES[kind]
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install failing to load its libraries
        mod, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        why = "only type stubs are installed (tensorrt-stubs)"
    # tensorrt-stubs leaves an importable, empty `tensorrt` namespace package: look for the API
    if mod is None or not (hasattr(mod, "Builder") or hasattr(mod, "Runtime")):
        if kind == "trt":
            raise BackendUnavailable(f"--backend trt needs NVIDIA TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} "
                            f"(pip install tensorrt) on a machine with an NVIDIA GPU, and the tensorrt module "
                            f"is not usable here ({why}); use --backend trt-rtx (builds without a GPU) or ort")
        raise BackendUnavailable(f"--backend trt-rtx needs TensorRT-RTX (pip install tensorrt-rtx) and the "
                                 f"tensorrt_rtx module is not usable here ({why}); use --backend ort")
    version = getattr(mod, "__version__", "0")
    if kind == "trt" and _version_tuple(version) < MIN_TENSORRT:
        raise BackendUnavailable(f"--backend trt needs TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} (strongly typed "
                        f"networks), found {version}; pip install -U tensorrt, or use --backend trt-rtx")
    return mod


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _dims(d: Any) -> tuple[int, ...]:
    """A TensorRT Dims (or tuple) as a tuple of ints."""
    return tuple(int(d[i]) for i in range(len(d)))


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps the errors, so a failed load or enqueue can say why."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            # Errors end up in our exceptions (last_error); logging only at debug avoids printing them twice.
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            log.debug("%s", msg)

        def last_error(self, default: str = "no error message from TensorRT") -> str:
            return self.errors[-1].strip() if self.errors else default

    return CollectingLogger()


@dataclass
class _Graph:
    graph: Any  # cuda_rt.CudaGraph
    events: list[Any] = field(default_factory=list)  # steps + 1 events inside the graph, or empty
    closed: bool = False

    def close(self) -> None:
        """The graph and its events together: every launch of the graph records those events."""
        self.graph.close()
        for e in self.events:
            e.close()
        self.events = []
        self.closed = True


class TrtBackend:
    """Backend protocol (runtime/backend.py) over TensorRT step engines."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, kind: str = "trt", trt_module: Any = None,
                 cuda: Any = None, device_index: int = 0, cuda_graph: bool = True, graph_step_events: bool = True):
        """`trt_module` and `cuda` default to the installed TensorRT and runtime/cuda.py (tests pass fakes)."""
        self.name = kind
        self.manifest = manifest
        self.io = step_io(manifest)
        self.bundle_dir = Path(bundle_dir)
        self.trt = trt_module if trt_module is not None else import_tensorrt(kind)
        self.cu = cuda if cuda is not None else cuda_rt
        self.use_cuda_graph = cuda_graph
        self.graph_step_events = graph_step_events
        self.device = f"cuda:{device_index}"
        self._notes: list[str] = []
        self._graphs: dict[tuple, _Graph] = {}
        self._generation = 0  # bumped whenever a bound address changes: graphs of older generations die
        self._key: tuple | None = None
        self._buf: dict[str, Any] = {}
        self.engines: list[trt_types.ICudaEngine] = []
        self._contexts: list[list[trt_types.IExecutionContext]] = []
        self._configs: list[Any] = []
        self.scratch: Any = None  # cuda DeviceBuffer, shared by every context
        self.stream: Any = None
        self.cu.require_device(device_index)
        self.device_cc = tuple(self.cu.compute_capability(device_index))
        self.alloc = self.cu.DeviceAllocator()
        self.logger = _make_logger(self.trt)
        self.runtime: trt_types.Runtime = self.trt.Runtime(self.logger)
        try:
            self.stream = self.cu.Stream()
            self._ev_start, self._ev_end = self.cu.Event(), self.cu.Event()
            for m in manifest.models:
                self.engines.append(self._load_engine(bundle_dir, m))
            self.engine_io = self._check_io()
            self.engine_memory = [int(e.device_memory_size_v2) for e in self.engines]
            for e in self.engines:
                self._contexts.append([self._create_context(e) for _ in range(2)])
            # DeepCache: engine (and context pair) index = model + len(models) for the cached step graphs, loaded at
            # the first trajectory with cached calls (_open_cached); _cached[i]: call i runs one
            self._cached: list[bool] = []
            # One scratch for every context: engines never run at the same time.
            self.scratch = self.alloc.alloc(max(self.engine_memory + [1]), "TensorRT scratch (shared by all engines)")
            self._set_device_memory()
        except BaseException:
            self.close()
            raise

    # loading ------------------------------------------------------------------------------------------
    def _load_engine(self, bundle_dir: str | Path, m: ModelEntry, cached: bool = False) -> trt_types.ICudaEngine:
        entry = ((m.cached or {}).get("engines", {}) if cached else m.engines).get(self.name)
        if entry is None:
            more = " --cache-branch K" if cached else ""
            raise UserError(f"the bundle has no {self.name} {'cached ' if cached else ''}engine for {m.name}; rebuild "
                            f"it with --backend {self.name}{more}")
        path = artifact_path(bundle_dir, entry)  # missing file / checksum mismatch -> UserError
        what = f"the {self.name} engine of {m.name} ({path.name})"
        check_engine_compat(entry.builder, self.trt, self.device_cc, what=what, kind=self.name)
        data = path.read_bytes()
        self._check_validity(data, what)
        self.logger.errors.clear()
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendUnavailable(f"{self.trt.__name__} could not load {what}: {self.logger.last_error()}; "
                            f"rebuild the bundle on this machine (`tstitch-trt build --backend {self.name}`)")
        return engine

    def _check_validity(self, data: bytes, what: str) -> None:
        """TensorRT-RTX can tell why a plan will not load before trying (get_engine_validity)."""
        if not hasattr(self.runtime, "get_engine_validity"):
            return
        try:
            validity, diagnostics = self.runtime.get_engine_validity(data)
        except Exception:  # informative only: deserialize_cuda_engine still checks
            return
        if validity != self.trt.EngineValidity.INVALID:
            return
        flags = self.trt.EngineInvalidityDiagnostics.__members__.items()
        reasons = [name.lower().replace("_", " ") for name, flag in flags if int(diagnostics) & int(flag)]
        if reasons:  # without a named reason, let deserialize_cuda_engine try and report
            raise BackendUnavailable(f"{self.trt.__name__} reports {what} cannot run here ({', '.join(reasons)}); "
                            f"rebuild the bundle on this machine (`tstitch-trt build --backend {self.name}`)")

    def _graph_names(self, g: int) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]:
        """(inputs, outputs, kept-feature specs by name) of engine g: the roles', plus the kept feature's
        output (a full graph of a bundle with caching) or input (a cached graph), in its model's own shape."""
        roles, n = self.io, len(self.manifest.models)
        if roles.cache is None:
            return roles.inputs, roles.outputs, {}
        model, cached = g % n, g >= n
        name = roles.cache[0] if cached else roles.cache[1]
        extra = {name: roles.features[model]}
        if cached:
            return (*roles.inputs, name), roles.outputs, extra
        return roles.inputs, (*roles.outputs, name), extra

    def _check_io(self, first: int = 0) -> dict[str, dict]:
        """Names (the manifest's roles), modes, dtypes and static dims of the step I/O, identical across engines
        (the kept feature aside: each model's own shape). first: check engines from this index on."""
        trt, roles = self.trt, self.io
        io: dict[str, dict] = dict(getattr(self, "engine_io", {}))
        n_models = len(self.manifest.models)
        for g in range(first, len(self.engines)):
            m, engine = self.manifest.models[g % n_models], self.engines[g]
            inputs, outputs, kept = self._graph_names(g)
            specs = {**roles.specs, **kept}
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            unknown = [n for n in names if n not in inputs + outputs]
            missing = [n for n in inputs + outputs if n not in names]
            if unknown or missing:
                raise BundleError(f"the {self.name} engine of {m.name} is not a step engine (unknown I/O {unknown}, "
                                f"missing {missing}); rebuild the bundle")
            for n in names:
                want_mode = trt.TensorIOMode.INPUT if n in inputs else trt.TensorIOMode.OUTPUT
                if engine.get_tensor_mode(n) != want_mode:
                    raise BundleError(f"the {self.name} engine of {m.name}: tensor {n} has the wrong direction; "
                                      "rebuild")
                on_host = hasattr(engine, "get_tensor_location") and (
                    engine.get_tensor_location(n) != trt.TensorLocation.DEVICE)
                if on_host:
                    raise BundleError(f"the {self.name} engine of {m.name} keeps {n} on the host; rebuild the bundle")
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                want = specs[n].dtype
                ok = dtype == want or (want == np.int64 and dtype == np.int32)  # int ids may be int32 in a plan
                if not ok:
                    raise BundleError(f"the {self.name} engine of {m.name} has {n} as {dtype}, the manifest says "
                                      f"{want}; "
                                    "rebuild the bundle")
                dims = _dims(engine.get_tensor_shape(n))
                fixed = [d for d in specs[n].shape]
                if len(dims) != len(fixed) or any(isinstance(f, int) and d != f for d, f in zip(dims, fixed,
                                                                                                strict=True)):
                    raise BundleError(f"the {self.name} engine of {m.name} takes {n} as {list(dims)}, the manifest "
                                      "says "
                                    f"{fixed}; rebuild the bundle")
                if n in kept:
                    continue
                prev = io.setdefault(n, {"dtype": dtype, "dims": dims})
                if prev["dtype"] != dtype or prev["dims"] != dims:
                    raise BundleError(f"the engines disagree on tensor {n} ({prev['dtype']}{list(prev['dims'])} vs "
                                    f"{dtype}{list(dims)}); stitched engines must share one I/O; rebuild the bundle")
        return io

    def _create_context(self, engine: trt_types.ICudaEngine) -> trt_types.IExecutionContext:
        """A context without its own scratch (USER_MANAGED), shapes specialised eagerly on TensorRT-RTX."""
        trt = self.trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        config = None
        if hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            # TensorRT-RTX compiles shape-specialised kernels; EAGER does it at the first (warm-up)
            # launch, so a CUDA graph captured after it never holds the generic fallback kernels.
            if hasattr(config, "dynamic_shapes_kernel_specialization_strategy"):
                try:
                    config.dynamic_shapes_kernel_specialization_strategy = (
                        trt.DynamicShapesKernelSpecializationStrategy.EAGER)
                except Exception as e:  # pragma: no cover - informative
                    log.info("could not select eager kernel specialization: %s", e)
            self._configs.append(config)  # keep it alive as long as its contexts
        ctx = engine.create_execution_context(config if config is not None else strategy)
        if ctx is None:
            raise UserError(f"{trt.__name__} could not create an execution context: {self.logger.last_error()}")
        return ctx

    def _set_device_memory(self) -> None:
        for pair in self._contexts:
            for ctx in pair:
                ctx.set_device_memory(self.scratch.ptr, self.scratch.nbytes)

    # buffers ------------------------------------------------------------------------------------------
    @property
    def allocations(self) -> int:
        return int(self.alloc.count)

    def _allocate(self, plan: TrajectoryPlan, latent_shape: tuple[int, ...]) -> None:
        k = int(plan.coef.shape[1])
        key = (tuple(int(d) for d in latent_shape), plan.steps, plan.noise is not None, k)
        if key == self._key:
            return
        roles = self.io
        dims = roles.dims(latent_shape)
        self._check_batch(dims, k)
        self._drop_graphs()
        for buf in self._buf.values():
            self.alloc.free(buf)
        self._buf = {}
        self._key = None
        shapes = {n: roles.shape(n, dims) for n in roles.names}
        nbytes = {n: int(np.prod(shapes[n], dtype=np.int64)) * self.engine_io[n]["dtype"].itemsize for n in roles.names}
        sizes: dict[str, int] = {}
        for n, _ in roles.state:
            sizes[f"{n}_slot0"] = sizes[f"{n}_slot1"] = nbytes[n]
        for n in roles.request:
            sizes[n] = nbytes[n]
        for n in roles.step:
            sizes[n] = nbytes[n]
            if n != "noise" or plan.noise is not None:
                sizes[f"{n}_table"] = nbytes[n] * plan.steps
        for model, f in enumerate(roles.features):  # DeepCache: each model's kept feature, one buffer (fp32)
            shapes[f"kept{model}"] = f.resolve(dims)
            sizes[f"kept{model}"] = int(np.prod(shapes[f"kept{model}"], dtype=np.int64)) * f.dtype.itemsize
        what = "x".join(str(d) for d in latent_shape)
        try:
            for name, size in sizes.items():
                self._buf[name] = self.alloc.alloc(max(size, 1), f"{name} ({what})")
        except UserError:  # out of memory: the allocator freed everything, the scratch included
            self.close()
            raise
        for n in roles.step:
            if f"{n}_table" not in self._buf:
                self._buf[n].zero(self.stream)  # e.g. noise: stays zero for samplers without noise
        self._row_bytes = {n: nbytes[n] for n in roles.step}
        self._shapes = shapes
        self._bind(shapes)
        self._key = key
        self._generation += 1

    def _check_batch(self, dims: dict[str, int], k: int) -> None:
        latent = self.io.latent
        want = self.io.shape(latent, dims)
        for m, engine in zip(self.manifest.models, self.engines[:len(self.manifest.models)], strict=True):
            lo, _, hi = (_dims(s) for s in engine.get_tensor_profile_shape(latent, 0))
            if not lo[0] <= want[0] <= hi[0]:
                raise UserError(f"batch {want[0]} is outside the {self.name} engine's range [{lo[0]}, {hi[0]}] "
                                f"({m.name}); rebuild with --batch-sizes {min(lo[0], want[0])}-{max(hi[0], want[0])}")
            for axis in range(1, len(want)):
                if not lo[axis] <= want[axis] <= hi[axis]:
                    raise UserError(f"latent {list(want)} is outside the {self.name} engine's profile "
                                    f"{list(lo)}..{list(hi)} ({m.name}); pick a size inside it or rebuild")
        if self.engine_io["coef"]["dims"] != (k,):
            raise UserError(f"the engines take {list(self.engine_io['coef']['dims'])} sampler coefficients, the "
                            f"sampler tables have {k}; rebuild the bundle with this version")

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Shapes and addresses of every context, once per allocation (contexts never rebind per step)."""
        b, roles = self._buf, self.io
        need = self.scratch.nbytes
        n_models = len(self.manifest.models)
        for g, pair in enumerate(self._contexts):
            model = g % n_models
            inputs, _, kept = self._graph_names(g)
            for parity, ctx in enumerate(pair):
                src, dst = parity, 1 - parity  # = x_slots(step) for any step of this parity
                addr = {n: b[n] for n in roles.request + roles.step}
                for n, out in roles.state:
                    addr[n], addr[out] = b[f"{n}_slot{src}"], b[f"{n}_slot{dst}"]
                for n in kept:  # the model's kept feature: written by its full graph, read by its cached one
                    addr[n] = b[f"kept{model}"]
                own = {**shapes, **{n: shapes[f"kept{model}"] for n in kept}}
                engine = self.engines[g]
                for i in range(engine.num_io_tensors):
                    name = engine.get_tensor_name(i)
                    if name in inputs and not ctx.set_input_shape(name, own[name]):
                        raise UserError(f"{self.trt.__name__} refused shape {list(own[name])} for {name} of "
                                        f"{self.manifest.models[model].name}: {self.logger.last_error()}")
                    if not ctx.set_tensor_address(name, addr[name].ptr):
                        raise RuntimeError(f"set_tensor_address({name}) failed: {self.logger.last_error()}")
                if hasattr(ctx, "update_device_memory_size_for_shapes"):
                    try:
                        need = max(need, int(ctx.update_device_memory_size_for_shapes()))
                    except Exception as e:  # the engine-wide size is a safe upper bound
                        log.debug("update_device_memory_size_for_shapes: %s", e)
        if need > self.scratch.nbytes:  # shapes needing more than the engine-wide size (not expected)
            self.alloc.free(self.scratch)
            try:
                self.scratch = self.alloc.alloc(need, "TensorRT scratch (shared by all engines)")
            except UserError:  # out of memory: nothing is left allocated; never launch on freed memory
                self.scratch = None
                self.close()
                raise
        self._set_device_memory()

    # Backend protocol -----------------------------------------------------------------------------------
    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: Any, guidance: float) -> None:
        """labels: the conditioning (DiT labels (B,), SD context (2B, L, D)) or a dict by input name."""
        if self.scratch is None:
            raise UserError(f"the {self.name} backend was closed (after an error or close()); open a new pipeline")
        cached = check_cached(plan, self.io)
        if any(cached) and len(self.engines) == len(self.manifest.models):
            self._open_cached()
        self._cached = cached
        self._allocate(plan, x_init.shape)
        b, s, roles = self._buf, self.stream, self.io
        self._x_init = np.ascontiguousarray(x_init, dtype=np.float32)
        self._upload_start()
        for n, a in roles.request_arrays(labels, guidance).items():
            b[n].upload(np.ascontiguousarray(a.astype(self.engine_io[n]["dtype"])), s)
        for n, table in roles.step_tables(plan, roles.dims(x_init.shape)).items():
            if table is not None:
                b[f"{n}_table"].upload(np.ascontiguousarray(table.astype(self.engine_io[n]["dtype"])), s)
        s.synchronize()

    def _open_cached(self) -> None:
        """DeepCache's cached engines (a context pair each, on the shared scratch, grown if they need more)."""
        n = len(self.engines)
        for m in self.manifest.models:
            self.engines.append(self._load_engine(self.bundle_dir, m, cached=True))
        self.engine_io = self._check_io(first=n)
        self.engine_memory += [int(e.device_memory_size_v2) for e in self.engines[n:]]
        for e in self.engines[n:]:
            self._contexts.append([self._create_context(e) for _ in range(2)])
        if max(self.engine_memory) > self.scratch.nbytes:
            self.alloc.free(self.scratch)
            try:
                self.scratch = self.alloc.alloc(max(self.engine_memory), "TensorRT scratch (shared by all engines)")
            except UserError:
                self.scratch = None
                self.close()
                raise
        self._set_device_memory()
        self._key = None  # bind the new contexts (and every graph captured before dies with the generation)

    def _upload_start(self) -> None:
        """The trajectory's start state: the latent in its slot 0, every other state zero."""
        for n, _ in self.io.state:
            if n == self.io.latent:
                self._buf[f"{n}_slot0"].upload(self._x_init, self.stream)
            else:
                self._buf[f"{n}_slot0"].zero(self.stream)
        for model in range(len(self.io.features)):
            self._buf[f"kept{model}"].zero(self.stream)

    def _enqueue(self, step: int, model: int) -> None:
        """The step's table rows into the step buffers, then the engine: all async on the stream."""
        b, rows, s = self._buf, self._row_bytes, self.stream
        for name in self.io.step:
            if f"{name}_table" in b:
                n = rows[name]
                self.cu.copy_device(b[name].ptr, b[f"{name}_table"].ptr + step * n, n, s)
        g = model + len(self.manifest.models) if self._cached and self._cached[step] else model
        if not self._contexts[g][step % 2].execute_async_v3(s.handle):
            raise RuntimeError(f"{self.trt.__name__} enqueue failed at step {step} on "
                               f"{self.manifest.models[model].name}: {self.logger.last_error()}")

    def launch(self, step: int, model: int) -> float | None:
        return self._timed_launch(step, model)

    def _timed_launch(self, step: int, model: int) -> float:
        """Enqueue one step between two events and wait: the engine milliseconds of that step."""
        self._ev_start.record(self.stream)
        self._enqueue(step, model)
        self._ev_end.record(self.stream)
        self._ev_end.synchronize()
        return self._ev_start.elapsed_ms(self._ev_end)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def read_state(self, name: str, slot: int) -> np.ndarray:
        """A state tensor (by its input name) from ping-pong slot `slot`, copied to the host."""
        if self._key is None:
            raise UserError(f"the {self.name} backend has no buffers yet (prepare() first) or was closed")
        out = np.empty(self._shapes[name], self.engine_io[name]["dtype"])
        return self._buf[f"{name}_slot{slot}"].download(out, self.stream)

    def read_x(self, slot: int) -> np.ndarray:
        return self.read_state(self.io.latent, slot)

    def read_x0(self, slot: int) -> np.ndarray:
        return self.read_state("prev_x0", slot)

    def take_notes(self) -> list[str]:
        """Notes not yet reported (the loop adds them to its result once)."""
        notes, self._notes = self._notes, []
        return notes

    def memory_report(self) -> dict:
        """Scratch sharing: what one allocation for all contexts saves against one per engine / context."""
        per_engine = sum(self.engine_memory)
        per_context = sum(len(p) * size for p, size in zip(self._contexts, self.engine_memory, strict=True))
        shared = self.scratch.nbytes if self.scratch is not None else 0
        return {
            "engines": {(m.name if g < len(self.manifest.models) else f"{m.name} cached"): size
                        for g, (m, size) in enumerate(zip(self.manifest.models * 2, self.engine_memory,
                                                          strict=False))},
            "contexts": sum(len(p) for p in self._contexts),
            "shared_scratch_bytes": shared,
            "one_per_engine_bytes": per_engine,
            "one_per_context_bytes": per_context,
            "saved_vs_one_per_engine_bytes": per_engine - shared,
            "saved_vs_one_per_context_bytes": per_context - shared,
            "io_buffer_bytes": sum(b.nbytes for b in self._buf.values()),
            "allocations": self.allocations,
        }

    # CUDA graphs ----------------------------------------------------------------------------------------
    def run_graph(self, plan: TrajectoryPlan) -> LoopResult | None:
        """The whole trajectory (every model, every step) as one CUDA graph; None -> plain launches.

        Cached per (buffers generation, steps, step_model, batch): new buffers or another schedule
        get a new capture, never a stale replay. The first call per key warms up with a plain run
        (TensorRT must have enqueued once before capture), captures, replays, and checks the replay
        against the plain run before trusting the graph.
        """
        if not self.use_cuda_graph or self._key is None:
            return None
        key = (self._generation, plan.steps, tuple(int(m) for m in plan.step_model), self._key[0],
               tuple(self._cached))
        g = self._graphs.get(key)
        if g is not None:
            return self._replay(g, plan)
        warm = self._plain_run(plan)
        g = self._capture(plan)
        if g is None:
            return warm
        self._restore_start()
        res = self._replay(g, plan)
        if g.closed:  # its events were unreadable: dropped with them; the next call captures without events
            return res
        ref = warm.x
        if np.isfinite(ref).all():
            diff = float(np.max(np.abs(res.x - ref))) if np.isfinite(res.x).all() else float("inf")
            if diff > 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
                g.close()
                self.use_cuda_graph = False
                self._notes.append(f"the CUDA graph's result differs from plain launches (max |diff| {diff:.3g}); "
                                   "using plain launches")
                return warm
        self._graphs[key] = g
        return res

    def _plain_run(self, plan: TrajectoryPlan) -> LoopResult:
        step_ms, engine_ms = [], []
        for i in range(plan.steps):
            t0 = time.perf_counter()
            engine_ms.append(self._timed_launch(i, int(plan.step_model[i])))
            step_ms.append((time.perf_counter() - t0) * 1e3)
        x = self.read_x(x_slots(plan.steps - 1)[1])
        return LoopResult(x, step_ms, engine_ms, 0.0)

    def _restore_start(self) -> None:
        """The warm-up ran real steps on the buffers: put back the trajectory's start state."""
        self._upload_start()
        self.stream.synchronize()

    def _capture(self, plan: TrajectoryPlan) -> _Graph | None:
        n_models = len(self.manifest.models)
        used = sorted({(int(m) + (n_models if self._cached and self._cached[i] else 0), i % 2)
                       for i, m in enumerate(plan.step_model)})
        for g, parity in used:
            model = g % n_models
            ctx = self._contexts[g][parity]
            if hasattr(ctx, "is_stream_capturable") and not ctx.is_stream_capturable(self.stream.handle):
                self._graph_failed(f"{self.manifest.models[model].name}'s context is not stream-capturable")
                return None
        attempts = [True, False] if self.graph_step_events else [False]
        error = ""
        for with_events in attempts:
            events = [self.cu.Event() for _ in range(plan.steps + 1)] if with_events else []

            def body(events: list[Any] = events) -> None:
                for i in range(plan.steps):
                    if events:
                        events[i].record(self.stream, external=True)
                    self._enqueue(i, int(plan.step_model[i]))
                if events:
                    events[-1].record(self.stream, external=True)

            try:
                graph = self.cu.capture_graph(self.stream, body)
            except Exception as e:
                for ev in events:
                    ev.close()
                error = first_line(e)
                continue
            if not with_events and self.graph_step_events:
                self._notes.append(f"CUDA graph captured without per-step events ({error}); "
                                   "graph-mode step times are the trajectory's GPU time / steps")
            return _Graph(graph, events)
        self._graph_failed(f"capture failed: {error}")
        return None

    def _graph_failed(self, why: str) -> None:
        self.use_cuda_graph = False
        self._notes.append(f"CUDA graph disabled, using plain launches: {why}")
        return None

    def _replay(self, g: _Graph, plan: TrajectoryPlan) -> LoopResult:
        n = plan.steps
        t0 = time.perf_counter()
        self._ev_start.record(self.stream)
        g.graph.launch(self.stream)
        self._ev_end.record(self.stream)
        self._ev_end.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        gpu_ms = self._ev_start.elapsed_ms(self._ev_end)
        engine_ms = None
        if g.events:
            try:
                engine_ms = [g.events[i].elapsed_ms(g.events[i + 1]) for i in range(n)]
            except Exception as e:
                # This replay finished (the end event synchronized), so its result stands. But the graph's
                # event nodes record these events on every launch: closing the events and keeping the graph
                # would have later launches record destroyed events. Drop the graph WITH its events, and
                # capture later graphs without per-step events.
                self._notes.append(f"per-step CUDA events in the graph are unreadable ({first_line(e)}); "
                                   "the graph is recaptured without them and graph-mode step times are the "
                                   "trajectory's GPU time / steps")
                self._forget_graph(g)
                self.graph_step_events = False
        if engine_ms is None:
            engine_ms = [gpu_ms / n] * n
        x = self.read_x(x_slots(n - 1)[1])
        # One launch: per-step wall time is not observable, so step_ms is the honest average.
        return LoopResult(x, [wall_ms / n] * n, engine_ms, 0.0, mode="graph")

    def _forget_graph(self, g: _Graph) -> None:
        """Close `g` (graph and events) and remove it from the cache."""
        self._graphs = {k: v for k, v in self._graphs.items() if v is not g}
        g.close()

    def _drop_graphs(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()

    def close(self) -> None:
        """Graphs, contexts, engines, then memory (contexts use the scratch until they are gone)."""
        self._drop_graphs()
        self._contexts = []
        self._configs = []
        self.engines = []
        alloc = getattr(self, "alloc", None)
        if alloc is not None:
            alloc.free_all()
        self._buf = {}
        self.scratch = None
        self._key = None
        for ev in (getattr(self, "_ev_start", None), getattr(self, "_ev_end", None)):
            if ev is not None:
                ev.close()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
