"""ONNX Runtime backend: the fp32 step graphs on the CPU (or CUDA with onnxruntime-gpu).

All sessions bind the same host buffers through IOBinding, so the outputs of one step are
written straight into the inputs of the next, with no copies and no per-step allocation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest, artifact_path
from tstitch_trt.errors import BackendUnavailable, BundleError, UserError
from tstitch_trt.runtime.host_buffers import HostStepBuffers, check_cached
from tstitch_trt.runtime.host_memory import graphs_over_half_memory, ort_graph_bytes
from tstitch_trt.runtime.io_roles import graph_io, state_slots, step_io
from tstitch_trt.sampling.trajectory import TrajectoryPlan


def ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


ORT_SPIN_DEFAULT = "1"
MAP_WEIGHTS_ENV = "TSTITCH_ORT_MAP_WEIGHTS"  # 1 / 0 force the mapped / packed mode; unset: maps_weights decides


def maps_weights(bundle_dir: str | Path, manifest: Manifest) -> bool:
    """Whether ORT sessions of this bundle keep their weights memory-mapped from the bundle's files instead of
    packing a copy of every matmul weight into anonymous memory (ORT's default, a little faster).

    Packed, the weights of every open session are resident and unevictable: an SDXL pair's 19.5 GB of fp32 graphs
    does not fit next to its activations in 24 GB. Mapped, they are the page cache's: a U-Net call needs its own
    model's pages (10.3 GB for SDXL), the kernel pages the idle model out when memory is short. Chosen when the
    graphs are over half the machine's memory (runtime/host_memory.py); $TSTITCH_ORT_MAP_WEIGHTS=1/0 forces it."""
    return graphs_over_half_memory(bundle_dir, manifest, MAP_WEIGHTS_ENV)


def weight_options(opts: Any, mapped: bool) -> Any:
    """`opts` (ort.SessionOptions) set for mapped weights: no prepacking (a matmul reads its weight from the
    mapped file; ORT packs it per call) and no CPU arena (freed activations go back to the system instead of
    staying reserved for a later, larger request)."""
    if mapped:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    return opts


def aux_session(path: str | Path, mapped: bool) -> Any:
    """A CPU session for a text encoder or VAE decoder graph, in the bundle's weights mode (maps_weights)."""
    import onnxruntime as ort

    opts = weight_options(ort.SessionOptions(), mapped)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def check_graph_io(sess: Any, io: dict, what: str) -> None:
    """The session's inputs and outputs are exactly the manifest's: names, dtypes and static dims."""
    if not io:
        return
    for kind, have in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want = io.get(kind, {})
        names = [a.name for a in have]
        if sorted(names) != sorted(want):
            raise BundleError(f"{what} has {kind} {sorted(names)}, the manifest says {sorted(want)}; "
                              "the graph does not belong to this bundle: rebuild it")
        for arg in have:
            spec = want[arg.name]
            dtype = _ORT_TYPES.get(arg.type, arg.type)
            dims = list(arg.shape)
            static_ok = len(dims) == len(spec["shape"]) and all(
                not isinstance(w, int) or not isinstance(d, int) or d == w
                for d, w in zip(dims, spec["shape"], strict=True))
            if dtype != spec["dtype"] or not static_ok:
                raise BundleError(f"{what}: {arg.name} is {dtype}{dims}, the manifest says {spec['dtype']}"
                                  f"{spec['shape']}; the graph does not belong to this bundle: rebuild it")


class OrtBackend(HostStepBuffers):
    name = "ort"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.io = step_io(manifest)
        self.providers = providers or ["CPUExecutionProvider"]
        if self.providers[0] != "CPUExecutionProvider":
            # Host buffers + IOBinding would copy every step over PCIe; the CUDA EP path binds
            # device OrtValues instead, which needs onnxruntime-gpu (not present on these machines).
            self.device = "cuda:0"
        else:
            self.device = "cpu"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or int(os.environ.get("TSTITCH_ORT_THREADS", "0"))
        opts.log_severity_level = 3
        # One session (and intra-op pool) per model: by default a pool's threads keep spinning after
        # its run and steal the cores from the next session's. On the demo pair that cost ~65 ms at
        # the stitch switch (21% over the ideal line at ratio 0.9); stopping the spin removes it and
        # does not slow single-model runs (benchmarks/RESULTS.md).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        # Between ops the pool's idle threads spin-wait for the next one (TSTITCH_ORT_SPIN=1, ORT's
        # default) or sleep (0): see ORT_SPIN_DEFAULT for the measured trade-off.
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      os.environ.get("TSTITCH_ORT_SPIN", ORT_SPIN_DEFAULT))
        self.mapped_weights = self.device == "cpu" and maps_weights(bundle_dir, manifest)
        self._opts = weight_options(opts, self.mapped_weights)
        size = ort_graph_bytes(bundle_dir, manifest) / 2**30 if self.mapped_weights else 0.0
        self._notes = [f"ort weights memory-mapped from the bundle, not packed ({size:.1f} GiB of graphs; "
                       "runtime/ort_backend.maps_weights)"] if self.mapped_weights else []
        self.sessions = []
        for i, m in enumerate(manifest.models):
            if "ort" not in m.engines:
                raise UserError(f"the bundle has no ONNX graph for {m.name}; rebuild with --backend ort")
            self.sessions.append(self._session(m.engines["ort"], i, cached=False))
        # DeepCache's cached graphs: opened at the first trajectory with cached calls (they double the weights held)
        self.cached_sessions: list = []
        self._cached: list[bool] = []
        self.allocations = 0
        self._shape_key: tuple | None = None
        self._bindings: list = []

    def _session(self, entry: Any, model: int, cached: bool) -> Any:
        import onnxruntime as ort

        path = artifact_path(self.bundle_dir, entry)
        try:
            sess = ort.InferenceSession(str(path), self._opts, providers=self.providers)
        except Exception as e:  # the checksum matched: this ONNX Runtime cannot run what the build wrote
            raise BackendUnavailable(f"ONNX Runtime {ort.__version__} cannot load {path.name}: "
                                     f"{str(e).splitlines()[0][:200]}; upgrade onnxruntime or rebuild the "
                                     "bundle") from None
        check_graph_io(sess, graph_io(self.manifest.io, self.io, model, cached),
                       f"the ONNX graph of {self.manifest.models[model].name} ({path.name})")
        return sess

    def _open_cached(self) -> None:
        """The cached step graph of every model (the bundle has them: check_cached refused otherwise)."""
        for i, m in enumerate(self.manifest.models):
            entry = (m.cached or {}).get("engines", {}).get("ort")
            if entry is None:
                raise UserError(f"the bundle has no cached ONNX graph for {m.name}; rebuild it with --backend ort "
                                "--cache-branch K")
            self.cached_sessions.append(self._session(entry, i, cached=True))
        self._shape_key = None  # bind them too

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, cond: Any, guidance: float) -> None:
        if any(check_cached(plan, self.io)) and not self.cached_sessions:
            self._open_cached()
        super().prepare(plan, x_init, cond, guidance)

    # buffers: runtime/host_buffers.py; bound here --------------------------------------------------
    def _bind_all(self, steps: int) -> None:
        """One IOBinding per (model, step), by role: binding is done once per shape, launching is just run."""
        import onnxruntime as ort

        def val(a: np.ndarray) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(a)

        io = self.io
        state = {n: [val(a) for a in pair] for n, pair in self.state.items()}
        request = {n: val(a) for n, a in self.request.items()}
        # t[i, ...]: a 0-d view for scalar rows (control_scale); t[i] would be a detached numpy scalar
        rows = {n: [val(t[i, ...]) for i in range(steps)] for n, t in self.tables.items()}
        rows.update({n: [val(z)] * steps for n, z in self.zero_rows.items()})
        kept = [val(a) for a in self.kept]
        self._keep = [state, request, rows, kept]

        def bindings(sess: Any, model: int, cached: bool) -> list:
            per_step = []
            for i in range(steps):
                src, dst = state_slots(i)
                b = sess.io_binding()
                for inp, out in io.state:
                    b.bind_ortvalue_input(inp, state[inp][src])
                    b.bind_ortvalue_output(out, state[inp][dst])
                for n in io.request:
                    b.bind_ortvalue_input(n, request[n])
                for n in io.step:
                    b.bind_ortvalue_input(n, rows[n][i])
                if io.cache is not None:  # the model's kept feature: the full graph writes it, the cached reads it
                    if cached:
                        b.bind_ortvalue_input(io.cache[0], kept[model])
                    else:
                        b.bind_ortvalue_output(io.cache[1], kept[model])
                per_step.append(b)
            return per_step

        self._bindings = [bindings(sess, m, False) for m, sess in enumerate(self.sessions)]
        self._cached_bindings = [bindings(sess, m, True) for m, sess in enumerate(self.cached_sessions)]

    # Backend protocol (prepare, read_x, read_x0: HostStepBuffers) ---------------------------------
    def launch(self, step: int, model: int) -> float | None:
        t0 = time.perf_counter()
        if self._cached[step]:
            self.cached_sessions[model].run_with_iobinding(self._cached_bindings[model][step])
        else:
            self.sessions[model].run_with_iobinding(self._bindings[model][step])
        return (time.perf_counter() - t0) * 1e3

    def synchronize(self) -> None:
        pass

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    def close(self) -> None:
        self._bindings = []
        self._cached_bindings = []
        self.sessions = []
        self.cached_sessions = []
        self._shape_key = None


class OrtDeviceBackend(OrtBackend):
    """ONNX Runtime with every step bound to buffers in the execution provider's memory.

    With the CUDA execution provider (onnxruntime-gpu) the x / x0 ping-pong pairs, y, guidance and
    the per-trajectory t / coef / noise tables live on the GPU; each (model, step) binding points
    at its table row by address, so a step moves no data over PCIe. `device_type="cpu"` runs the
    same binding code on host OrtValues (how it is tested where there is no GPU).
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None, device_type: str | None = None, device_id: int = 0):
        providers = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        super().__init__(bundle_dir, manifest, providers=providers, threads=threads)
        self.device_type = device_type or ("cuda" if providers[0] == "CUDAExecutionProvider" else "cpu")
        self.device_id = device_id
        self.device = f"cuda:{device_id}" if self.device_type == "cuda" else "cpu"
        if self.device_type == "cuda":
            used = self.sessions[0].get_providers()[0] if self.sessions else ""
            if used != "CUDAExecutionProvider":  # ORT falls back to the CPU silently when CUDA fails
                raise UserError(f"ONNX Runtime could not start its CUDA execution provider (got {used}); "
                                "check the CUDA / cuDNN install of onnxruntime-gpu or use --device cpu")

    def _value(self, shape: tuple[int, ...], dtype: type) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, self.device_id)

    def _allocate(self, plan: TrajectoryPlan, latent_shape: tuple[int, ...]) -> None:
        key = (tuple(latent_shape), plan.steps, plan.noise is not None, int(plan.coef.shape[1]))
        if key == self._shape_key:
            return
        self._bindings = []  # bindings hold the old values' addresses: drop them first
        io = self.io
        dims = io.dims(latent_shape)
        self.state_v = {n: [self._value(io.shape(n, dims), io.dtype(n)) for _ in range(2)] for n, _ in io.state}
        self.request_v = {n: self._value(io.shape(n, dims), io.dtype(n)) for n in io.request}
        self.table_v = {n: self._value((plan.steps, *io.shape(n, dims)), io.dtype(n)) for n in io.step
                        if n != "noise" or plan.noise is not None}
        self.zero_v = {}
        for n in io.step:
            if n not in self.table_v:
                self.zero_v[n] = self._value(io.shape(n, dims), io.dtype(n))
                self.zero_v[n].update_inplace(np.zeros(io.shape(n, dims), io.dtype(n)))
        self.allocations += 2 * len(self.state_v) + len(self.request_v) + len(self.table_v) + len(self.zero_v)
        self._shape_key = key
        self._bind_device(plan.steps, dims)

    def _bind_device(self, steps: int, dims: dict[str, int]) -> None:
        dev, dev_id, io = self.device_type, self.device_id, self.io
        self._bindings = []
        for sess in self.sessions:
            per_step = []
            for i in range(steps):
                src, dst = state_slots(i)
                b = sess.io_binding()
                for inp, out in io.state:
                    b.bind_ortvalue_input(inp, self.state_v[inp][src])
                    b.bind_ortvalue_output(out, self.state_v[inp][dst])
                for n in io.request:
                    b.bind_ortvalue_input(n, self.request_v[n])
                for n in io.step:
                    if n in self.table_v:  # the step's row of the table, by address
                        shape = io.shape(n, dims)
                        row = int(np.prod(shape)) * io.dtype(n).itemsize
                        b.bind_input(n, dev, dev_id, io.dtype(n), list(shape), self.table_v[n].data_ptr() + i * row)
                    else:
                        b.bind_ortvalue_input(n, self.zero_v[n])
                per_step.append(b)
            self._bindings.append(per_step)

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, cond: Any, guidance: float) -> None:
        if any(check_cached(plan, self.io)):
            raise UserError("cached calls (DeepCache, FORA) are not supported on ONNX Runtime's CUDA execution "
                            "provider yet; use --device cpu, or the trt / torch backend")
        self._cached = [False] * plan.steps
        self._allocate(plan, x_init.shape)
        dims = self.io.dims(x_init.shape)
        for n, pair in self.state_v.items():
            start = x_init if n == self.io.latent else np.zeros(self.io.shape(n, dims))
            pair[0].update_inplace(np.ascontiguousarray(start, dtype=self.io.dtype(n)))
        for n, a in self.io.request_arrays(cond, guidance).items():
            self.request_v[n].update_inplace(a)
        for n, t in self.io.step_tables(plan, dims).items():
            if t is not None:
                self.table_v[n].update_inplace(t)

    def read_state(self, name: str, slot: int) -> np.ndarray:
        return np.array(self.state_v[name][slot].numpy(), copy=True)  # numpy() copies device tensors to the host


def open_ort_backend(bundle_dir: str | Path, manifest: Manifest, device: str | None = None,
                     threads: int | None = None) -> OrtBackend:
    """CUDA execution provider on device buffers where onnxruntime-gpu and a GPU are present, else the CPU."""
    if device != "cpu" and "CUDAExecutionProvider" in ort_providers():
        try:
            return OrtDeviceBackend(bundle_dir, manifest, threads=threads)
        except UserError:
            if device is not None and device.startswith("cuda"):
                raise
    return OrtBackend(bundle_dir, manifest, providers=["CPUExecutionProvider"], threads=threads)
