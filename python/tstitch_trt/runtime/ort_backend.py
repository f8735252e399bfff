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
from tstitch_trt.runtime.backend import x_slots
from tstitch_trt.sampling.trajectory import TrajectoryPlan


def ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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


class OrtBackend:
    name = "ort"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
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
        self.sessions = []
        for m in manifest.models:
            if "ort" not in m.engines:
                raise UserError(f"the bundle has no ONNX graph for {m.name}; rebuild with --backend ort")
            path = artifact_path(bundle_dir, m.engines["ort"])
            try:
                sess = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as e:  # the checksum matched: this ONNX Runtime cannot run what the build wrote
                raise BackendUnavailable(f"ONNX Runtime {ort.__version__} cannot load {path.name}: "
                                         f"{str(e).splitlines()[0][:200]}; upgrade onnxruntime or rebuild the "
                                         "bundle") from None
            check_graph_io(sess, manifest.io, f"the ONNX graph of {m.name} ({path.name})")
            self.sessions.append(sess)
        self.allocations = 0
        self._shape_key: tuple | None = None
        self._bindings: list = []

    # buffers ----------------------------------------------------------------------------------
    def _allocate(self, plan: TrajectoryPlan, batch: int) -> None:
        c, h, w = self.manifest.latent_shape
        key = (batch, plan.steps, plan.noise is not None)
        if key == self._shape_key:
            return
        lat = (batch, c, h, w)
        self.x = [np.zeros(lat, np.float32), np.zeros(lat, np.float32)]
        self.x0 = [np.zeros(lat, np.float32), np.zeros(lat, np.float32)]
        self.y = np.zeros((batch,), np.int64)
        self.guidance = np.zeros((), np.float32)
        self.t_table = np.zeros((plan.steps, batch), np.int64)
        self.coef_table = np.zeros_like(plan.coef)
        self.noise_table = np.zeros((plan.steps, *lat), np.float32) if plan.noise is not None else None
        self.zero_noise = np.zeros(lat, np.float32)
        self.allocations += 10
        self._shape_key = key
        self._bind_all(plan.steps)

    def _bind_all(self, steps: int) -> None:
        """One IOBinding per (model, step): binding is done once per shape, launching is just run."""
        import onnxruntime as ort

        def val(a: np.ndarray) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(a)

        xv = [val(a) for a in self.x]
        x0v = [val(a) for a in self.x0]
        fixed = {"y": val(self.y), "guidance": val(self.guidance)}
        self._keep = [xv, x0v, fixed]
        self._bindings = []
        for sess in self.sessions:
            per_step = []
            for i in range(steps):
                src, dst = x_slots(i)
                b = sess.io_binding()
                b.bind_ortvalue_input("x", xv[src])
                b.bind_ortvalue_input("prev_x0", x0v[dst])
                b.bind_ortvalue_input("y", fixed["y"])
                b.bind_ortvalue_input("guidance", fixed["guidance"])
                t, coef = val(self.t_table[i]), val(self.coef_table[i])
                noise = val(self.noise_table[i] if self.noise_table is not None else self.zero_noise)
                self._keep.append((t, coef, noise))
                b.bind_ortvalue_input("t", t)
                b.bind_ortvalue_input("coef", coef)
                b.bind_ortvalue_input("noise", noise)
                b.bind_ortvalue_output("x_next", xv[dst])
                b.bind_ortvalue_output("x0", x0v[src])
                per_step.append(b)
            self._bindings.append(per_step)

    # Backend protocol ---------------------------------------------------------------------------
    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: np.ndarray, guidance: float) -> None:
        batch = x_init.shape[0]
        self._allocate(plan, batch)
        self.x[0][...] = x_init
        self.x0[1][...] = 0.0
        self.y[...] = labels
        self.guidance[...] = guidance
        self.t_table[...] = plan.timesteps[:, None]
        self.coef_table[...] = plan.coef
        if self.noise_table is not None:
            self.noise_table[...] = plan.noise

    def launch(self, step: int, model: int) -> float | None:
        t0 = time.perf_counter()
        self.sessions[model].run_with_iobinding(self._bindings[model][step])
        return (time.perf_counter() - t0) * 1e3

    def synchronize(self) -> None:
        pass

    def read_x(self, slot: int) -> np.ndarray:
        return self.x[slot].copy()

    def read_x0(self, slot: int) -> np.ndarray:
        return self.x0[slot].copy()

    def close(self) -> None:
        self._bindings = []
        self.sessions = []
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

    def _allocate(self, plan: TrajectoryPlan, batch: int) -> None:
        c, h, w = self.manifest.latent_shape
        key = (batch, plan.steps, plan.noise is not None, int(plan.coef.shape[1]))
        if key == self._shape_key:
            return
        self._bindings = []  # bindings hold the old values' addresses: drop them first
        lat = (batch, c, h, w)
        self.xv = [self._value(lat, np.float32) for _ in range(2)]
        self.x0v = [self._value(lat, np.float32) for _ in range(2)]
        self.yv = self._value((batch,), np.int64)
        self.gv = self._value((), np.float32)
        self.t_tab = self._value((plan.steps, batch), np.int64)
        self.coef_tab = self._value(tuple(plan.coef.shape), np.float32)
        self.noise_tab = self._value((plan.steps, *lat), np.float32) if plan.noise is not None else None
        self.zero_noise_v = self._value(lat, np.float32)
        self.zero_noise_v.update_inplace(np.zeros(lat, np.float32))
        self.allocations += 10
        self._shape_key = key
        self._bind_device(plan.steps, batch, lat, int(plan.coef.shape[1]))

    def _bind_device(self, steps: int, batch: int, lat: tuple[int, ...], k: int) -> None:
        dev, dev_id = self.device_type, self.device_id
        t_row, coef_row, noise_row = batch * 8, k * 4, int(np.prod(lat)) * 4
        self._bindings = []
        for sess in self.sessions:
            per_step = []
            for i in range(steps):
                src, dst = x_slots(i)
                b = sess.io_binding()
                b.bind_ortvalue_input("x", self.xv[src])
                b.bind_ortvalue_input("prev_x0", self.x0v[dst])
                b.bind_ortvalue_input("y", self.yv)
                b.bind_ortvalue_input("guidance", self.gv)
                b.bind_input("t", dev, dev_id, np.int64, [batch], self.t_tab.data_ptr() + i * t_row)
                b.bind_input("coef", dev, dev_id, np.float32, [k], self.coef_tab.data_ptr() + i * coef_row)
                if self.noise_tab is not None:
                    b.bind_input("noise", dev, dev_id, np.float32, list(lat), self.noise_tab.data_ptr() + i * noise_row)
                else:
                    b.bind_ortvalue_input("noise", self.zero_noise_v)
                b.bind_ortvalue_output("x_next", self.xv[dst])
                b.bind_ortvalue_output("x0", self.x0v[src])
                per_step.append(b)
            self._bindings.append(per_step)

    def prepare(self, plan: TrajectoryPlan, x_init: np.ndarray, labels: np.ndarray, guidance: float) -> None:
        batch = x_init.shape[0]
        self._allocate(plan, batch)
        self.xv[0].update_inplace(np.ascontiguousarray(x_init, dtype=np.float32))
        self.x0v[1].update_inplace(np.zeros(x_init.shape, np.float32))
        self.yv.update_inplace(np.asarray(labels, dtype=np.int64))
        self.gv.update_inplace(np.asarray(guidance, dtype=np.float32))
        self.t_tab.update_inplace(np.ascontiguousarray(np.repeat(plan.timesteps.astype(np.int64)[:, None], batch, 1)))
        self.coef_tab.update_inplace(np.ascontiguousarray(plan.coef, dtype=np.float32))
        if self.noise_tab is not None:
            self.noise_tab.update_inplace(np.ascontiguousarray(plan.noise, dtype=np.float32))

    def read_x(self, slot: int) -> np.ndarray:
        return np.array(self.xv[slot].numpy(), copy=True)  # numpy() copies device tensors to the host

    def read_x0(self, slot: int) -> np.ndarray:
        return np.array(self.x0v[slot].numpy(), copy=True)


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
