"""Stand-ins for runtime/cuda.py and a TensorRT module, so TrtBackend's logic runs where there is no GPU.

FakeCuda keeps "device memory" in host arrays at synthetic addresses and queues work on streams;
a capture records the queued work and a graph replays it, reading the buffers at replay time
(like a real graph, whose nodes hold addresses, not values). FakeTrt mirrors the TensorRT calls
TrtBackend makes (names and signatures as in tensorrt / tensorrt_rtx); its engines run a step
function over the bound addresses: the fp32 ONNX step graph on ONNX Runtime (CPU), or `toy_step`
(numpy here, cupy on a GPU with the real runtime/cuda.py).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from tstitch_trt.errors import UserError

STEP_INPUTS = ("x", "t", "y", "guidance", "coef", "prev_x0", "noise")
STEP_OUTPUTS = ("x_next", "x0")


# -- a fake runtime/cuda.py -------------------------------------------------------------------------------
class FakeCuda:
    def __init__(self, cc: tuple[int, int] = (8, 9), memory_limit: int | None = None, fail_capture: bool = False,
                 devices: int = 1, unreadable_graph_events: bool = False):
        """`unreadable_graph_events`: elapsed_ms between events recorded inside a graph fails (as
        cudaEventElapsedTime may on event nodes), so the backend's fallback for that runs."""
        self.cc = cc
        self.memory_limit = memory_limit
        self.fail_capture = fail_capture
        self.devices = devices
        self.unreadable_graph_events = unreadable_graph_events
        self.events: list[FakeEvent] = []
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self.next_ptr = 1 << 32
        self.streams: dict[int, FakeStream] = {}
        self.captures = 0
        cu = self

        class Stream(FakeStream):
            def __init__(self) -> None:
                super().__init__(cu)

        class Event(FakeEvent):
            def __init__(self) -> None:
                super().__init__(cu)

        class DeviceAllocator(FakeAllocator):
            def __init__(self) -> None:
                super().__init__(cu)

        self.Stream, self.Event, self.DeviceAllocator = Stream, Event, DeviceAllocator

    # device
    def require_device(self, index: int = 0) -> None:
        if self.devices == 0:
            raise UserError("no NVIDIA GPU is visible")

    def compute_capability(self, index: int = 0) -> tuple[int, int]:
        return self.cc

    # memory
    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, mem in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + mem.nbytes:
                return mem[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"access to unallocated fake device memory at {ptr:#x} (+{nbytes})")

    def array(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.view(ptr, n).view(dtype).reshape(shape)

    def copy_device(self, dst: int, src: int, nbytes: int, stream: FakeStream) -> None:
        stream.enqueue(lambda: self.view(dst, nbytes).__setitem__(slice(None), self.view(src, nbytes)))

    def capture_graph(self, stream: FakeStream, body: Callable[[], None]) -> FakeGraph:
        stream.captured = []
        try:
            body()
            if self.fail_capture:
                raise RuntimeError("cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated (fake)")
        finally:
            ops, stream.captured = stream.captured, None
        self.captures += 1
        return FakeGraph(ops)


class FakeStream:
    def __init__(self, cu: FakeCuda):
        self.cu = cu
        self.handle = 0x1000 + len(cu.streams)
        self.captured: list[Callable[[], None]] | None = None
        cu.streams[self.handle] = self

    def enqueue(self, fn: Callable[[], None]) -> None:
        if self.captured is not None:
            self.captured.append(fn)
        else:
            fn()  # the fake "GPU" runs work as soon as it is queued

    def synchronize(self) -> None:
        assert self.captured is None, "synchronize() during a capture"

    def close(self) -> None:
        self.cu.streams.pop(self.handle, None)


class FakeEvent:
    def __init__(self, cu: FakeCuda | None = None) -> None:
        self.cu = cu
        self.t: float | None = None
        self.external = False
        self.closed = False
        if cu is not None:
            cu.events.append(self)

    def record(self, stream: FakeStream, external: bool = False) -> None:
        assert not self.closed, "record of a destroyed event"
        stream.enqueue(lambda: self._stamp(external))

    def _stamp(self, external: bool) -> None:
        # runs when the stream (or a graph launch) reaches the record: a graph's event node holds the event
        assert not self.closed, "a launch recorded a destroyed event (a graph kept after its events were closed)"
        self.t = time.perf_counter()
        self.external = external

    def synchronize(self) -> None:
        assert not self.closed, "synchronize on a destroyed event"

    def elapsed_ms(self, end: FakeEvent) -> float:
        assert not self.closed and not end.closed, "elapsed time of a destroyed event"
        assert self.t is not None and end.t is not None, "elapsed time of an unrecorded event"
        if self.cu is not None and self.cu.unreadable_graph_events and (self.external or end.external):
            raise RuntimeError("cudaEventElapsedTime failed: cudaErrorInvalidResourceHandle (fake)")
        return (end.t - self.t) * 1e3

    def close(self) -> None:
        self.closed = True


class FakeGraph:
    def __init__(self, ops: list[Callable[[], None]]):
        self.ops = ops
        self.closed = False

    def launch(self, stream: FakeStream) -> None:
        assert not self.closed, "replay of a destroyed graph"
        for op in self.ops:
            stream.enqueue(op)

    def close(self) -> None:
        self.closed = True


class FakeBuffer:
    def __init__(self, cu: FakeCuda, ptr: int, nbytes: int, what: str):
        self.cu, self.ptr, self.nbytes, self.what = cu, ptr, nbytes, what

    def upload(self, host: np.ndarray, stream: FakeStream, offset: int = 0) -> None:
        data = np.ascontiguousarray(host).view(np.uint8).reshape(-1).copy()
        assert offset + data.nbytes <= self.nbytes, f"upload overruns {self.what}"
        stream.enqueue(lambda: self.cu.view(self.ptr + offset, data.nbytes).__setitem__(slice(None), data))

    def download(self, out: np.ndarray, stream: FakeStream, offset: int = 0) -> np.ndarray:
        out.reshape(-1).view(np.uint8)[:] = self.cu.view(self.ptr + offset, out.nbytes)
        return out

    def zero(self, stream: FakeStream) -> None:
        stream.enqueue(lambda: self.cu.view(self.ptr, self.nbytes).__setitem__(slice(None), 0))


class FakeAllocator:
    def __init__(self, cu: FakeCuda):
        self.cu = cu
        self.buffers: list[FakeBuffer] = []
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def alloc(self, nbytes: int, what: str) -> FakeBuffer:
        used = sum(m.nbytes for m in self.cu.memory.values())
        if self.cu.memory_limit is not None and used + nbytes > self.cu.memory_limit:
            self.free_all()
            raise UserError(f"out of GPU memory allocating {nbytes} B for {what} (fake)")
        ptr = self.cu.next_ptr
        self.cu.next_ptr += (max(nbytes, 1) + 511) // 256 * 256  # 256-aligned, with a gap
        self.cu.memory[ptr] = np.full(max(nbytes, 1), 0xAB, np.uint8)  # garbage, like cudaMalloc
        buf = FakeBuffer(self.cu, ptr, nbytes, what)
        self.buffers.append(buf)
        self.count += 1
        return buf

    def free(self, buf: FakeBuffer | None) -> None:
        if buf is not None and buf in self.buffers:
            self.buffers.remove(buf)
            del self.cu.memory[buf.ptr]

    def free_all(self) -> None:
        for b in list(self.buffers):
            self.free(b)


# -- step functions ----------------------------------------------------------------------------------------
def toy_step(xp: Any, inputs: dict[str, Any], scale: float) -> tuple[Any, Any]:
    """A cheap stand-in denoiser (eps from x, t, y, guidance) plus the real coefficient-table update."""
    x, t, y, g, coef = inputs["x"], inputs["t"], inputs["y"], inputs["guidance"], inputs["coef"]
    shape = (-1,) + (1,) * (x.ndim - 1)
    t_term, y_term = (t.astype(xp.float32) * 1e-3).reshape(shape), (y.astype(xp.float32) * 1e-2).reshape(shape)
    cond = xp.tanh(scale * x + t_term) + y_term
    uncond = xp.tanh(scale * x)
    eps = (uncond + g * (cond - uncond)).astype(xp.float32)
    c = [coef[i] for i in range(coef.shape[0])]
    x0 = c[0] * x - c[1] * eps
    d = c[2] * x0 + c[3] * inputs["prev_x0"]
    logvar = c[10] + (xp.float32(-1.0) + 1) * 0.5 * (c[9] - c[10])  # v = -1: the posterior variance
    std = c[7] + c[8] * xp.exp(0.5 * logvar)
    x_next = c[4] * x + c[5] * d + c[6] * eps + std * inputs["noise"]
    return x_next.astype(xp.float32), x0.astype(xp.float32)


def ort_step(onnx_bytes: bytes) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, ...]]:
    """The step graph's outputs (in graph order) from feeds by input name: any step graph (DiT, U-Net)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    return lambda feeds: tuple(sess.run(outputs, {k: feeds[k] for k in inputs}))


# -- a fake TensorRT module ----------------------------------------------------------------------------------
class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


class DataType(enum.Enum):  # the members the runtime meets, with TensorRT's names
    FLOAT = 0
    HALF = 1
    BF16 = 2
    INT32 = 3
    INT64 = 4


# TensorRT's nptype(): bf16 has no numpy type (TensorRT raises TypeError for it, as here)
_NPTYPE = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}
_DATATYPE = {np.dtype(v): k for k, v in _NPTYPE.items()}


def _nptype(dt: DataType) -> Any:
    if dt not in _NPTYPE:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return _NPTYPE[dt]


class ComputeCapability(enum.Enum):  # tensorrt_rtx 1.7's targets (plain TensorRT has no such enum)
    NONE = 0
    CURRENT = 1
    SM75 = 75
    SM80 = 80
    SM86 = 86
    SM89 = 89
    SM120 = 120
    SM121 = 121


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class DynamicShapesKernelSpecializationStrategy(enum.Enum):
    LAZY = 0
    EAGER = 1
    NONE = 2


# What differs between the TensorRT modules the runtime supports (checked against NVIDIA/TensorRT's Python
# bindings, python/src/infer/pyCore.cpp, at v10.8.0 .. v10.10.0, v10.11 .. v11.1, and tensorrt_rtx 1.7):
#   trt-10.8   tensorrt 10.8-10.10: create_execution_context(strategy) only (no IRuntimeConfig), no
#              is_stream_capturable, no ComputeCapability, no kernel specialization strategy
#   trt-10.13  tensorrt 10.11+ / 11: + ICudaEngine.create_runtime_config (IRuntimeConfig with the allocation
#              strategy only) and create_execution_context(runtime_config)
#   rtx        tensorrt_rtx: + IRuntimeConfig.dynamic_shapes_kernel_specialization_strategy,
#              IExecutionContext.is_stream_capturable(stream), ComputeCapability
FLAVOURS = {
    "rtx": {"name": "tensorrt_rtx", "version": "1.7.1.116", "runtime_config": True, "specialization": True,
            "capturable_query": True, "compute_capability": True},
    "trt-10.13": {"name": "tensorrt", "version": "10.13.0.35", "runtime_config": True, "specialization": False,
                  "capturable_query": False, "compute_capability": False},
    "trt-10.8": {"name": "tensorrt", "version": "10.9.0.34", "runtime_config": False, "specialization": False,
                 "capturable_query": False, "compute_capability": False},
}
KIND_OF = {"rtx": "trt-rtx", "trt-10.13": "trt", "trt-10.8": "trt"}


def make_fake_trt(cu: FakeCuda, step_for: Callable[[bytes], Callable], name: str | None = None,
                  version: str | None = None, scratch_for: Callable[[bytes], int] | None = None,
                  memory: Callable[[int, tuple, Any], Any] | None = None,
                  executor: Callable[[Any, dict, int], None] | None = None, flavour: str = "rtx",
                  capturable: bool = True, dtypes: dict[str, Any] | None = None) -> SimpleNamespace:
    """A module-like namespace. `step_for(plan_bytes)` -> step function; plans that are not ONNX fail to load.

    `flavour` picks the module's API (FLAVOURS); `name` / `version` default to the flavour's. `dtypes` gives
    engine tensors another type than the step graph's (a plan with int32 ids, fp16 outputs): the engine casts
    its inputs to the graph's types and its results to the declared ones, as a plan's reformat layers do.
    By default the engines run on FakeCuda memory; `executor(ctx, shapes, stream_handle)` replaces
    that (the cupy executor runs on real device pointers).
    """
    api = FLAVOURS[flavour]
    trt = SimpleNamespace(__name__=name or api["name"], __version__=version or api["version"], ILogger=_ILogger,
                          TensorIOMode=TensorIOMode, TensorLocation=TensorLocation, DataType=DataType,
                          ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy)
    if api["specialization"]:
        trt.DynamicShapesKernelSpecializationStrategy = DynamicShapesKernelSpecializationStrategy
    if api["compute_capability"]:
        trt.ComputeCapability = ComputeCapability
    trt.flavour = flavour
    trt.nptype = _nptype
    trt.contexts = []

    class RuntimeConfig:
        def __init__(self) -> None:
            self.strategy = ExecutionContextAllocationStrategy.STATIC
            if api["specialization"]:
                self.dynamic_shapes_kernel_specialization_strategy = DynamicShapesKernelSpecializationStrategy.LAZY

        def set_execution_context_allocation_strategy(self, s: Any) -> None:
            self.strategy = s

    class Context:
        def __init__(self, engine: Engine, strategy: Any):
            assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED, "the runtime must manage scratch"
            self.engine = engine
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}
            self.device_memory: tuple[int, int] | None = None
            self.enqueues = 0
            trt.contexts.append(self)

        def set_input_shape(self, n: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            if self.engine.static[n] and -1 in self.engine.static[n]:  # a dynamic input: batch within the profile
                lo, hi = self.engine.batch_range
                scale = 2 if n == "context" else 1
                if not scale * lo <= shape[0] <= scale * hi:
                    return False
            self.shapes[n] = shape
            return True

        def set_tensor_address(self, n: str, ptr: int) -> bool:
            self.addresses[n] = int(ptr)
            return True

        def get_tensor_shape(self, n: str) -> tuple:
            """Inputs: as set; outputs: inferred by running the engine's step on zeros of the input shapes."""
            if n in self.shapes:
                return self.shapes[n]
            feeds = {i: np.zeros(self.shapes[i], self.engine.graph_dtypes[i]) for i in self.engine.inputs}
            outs = dict(zip(self.engine.outputs, self.engine.step(feeds), strict=True))
            return tuple(outs[n].shape)

        def set_device_memory(self, ptr: int, size: int) -> None:
            assert size >= self.engine.device_memory_size_v2, "scratch smaller than the engine needs"
            self.device_memory = (int(ptr), int(size))

        def update_device_memory_size_for_shapes(self) -> int:
            return self.engine.device_memory_size_v2

        if api["capturable_query"]:
            def is_stream_capturable(self, stream: int) -> bool:
                return capturable

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert self.device_memory is not None, "enqueue without device memory (USER_MANAGED)"
            eng = self.engine
            assert set(self.addresses) == set(eng.inputs + eng.outputs), "unbound I/O tensor"
            shapes = {n: self.shapes[n] for n in eng.inputs}
            shapes.update({o: self.shapes[i] for i, o in eng.state_pairs})  # a state output has its input's shape
            shapes.update({o: self.get_tensor_shape(o) for o in eng.outputs if o not in shapes})
            self.enqueues += 1
            if executor is not None:
                executor(self, shapes, stream_handle)
                return True
            cu.view(*self.device_memory)  # the scratch must be live device memory
            fn = self.engine.step

            def run() -> None:
                feeds = {n: cu.array(self.addresses[n], shapes[n], eng.dtypes[n]).astype(eng.graph_dtypes[n])
                         for n in eng.inputs}
                for name, value in zip(eng.outputs, fn(feeds), strict=True):
                    cu.array(self.addresses[name], shapes[name], eng.dtypes[name])[...] = value

            cu.streams[stream_handle].enqueue(run)
            return True

    class Engine:
        def __init__(self, data: bytes, step: Callable, io: dict):
            self.step = step
            self.inputs, self.outputs = io["inputs"], io["outputs"]
            self.static = io["static"]  # dims (-1 = dynamic) by name
            self.graph_dtypes = io["dtypes"]  # what the step function takes and gives
            self.dtypes = {n: np.dtype((dtypes or {}).get(n, dt)) for n, dt in io["dtypes"].items()}  # the plan's I/O
            self.state_pairs = io["state_pairs"]
            # step engines: latent and coefficient count (other engines, e.g. a text encoder or VAE, have neither)
            self.latent = tuple(self.static["x"][1:]) if "x" in self.static else ()
            self.k = self.static["coef"][0] if "coef" in self.static else 0
            self.batch_range = (1, 16)
            self.device_memory_size_v2 = scratch_for(data) if scratch_for else 1 << 20
            self.names = list(self.inputs + self.outputs)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, n: str) -> TensorIOMode:
            return TensorIOMode.INPUT if n in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_location(self, n: str) -> TensorLocation:
            return TensorLocation.DEVICE

        def get_tensor_dtype(self, n: str) -> DataType:
            return _DATATYPE[np.dtype(self.dtypes[n])]

        def get_tensor_shape(self, n: str) -> tuple:
            return tuple(self.static[n])

        def get_tensor_profile_shape(self, n: str, profile: int) -> list[tuple]:
            lo, hi = self.batch_range
            # dynamic spatial dims (U-Nets): 1 .. 4096 in the fake profile
            rest_lo = tuple(1 if d < 0 else d for d in self.latent)
            rest_hi = tuple(4096 if d < 0 else d for d in self.latent)
            return [(lo, *rest_lo), (hi, *rest_hi), (hi, *rest_hi)]

        def create_execution_context(self, arg: Any = ExecutionContextAllocationStrategy.STATIC) -> Context:
            if isinstance(arg, RuntimeConfig):
                assert api["runtime_config"], f"{flavour}: create_execution_context takes no IRuntimeConfig"
                return Context(self, arg.strategy)
            return Context(self, arg)

        if api["runtime_config"]:
            def create_runtime_config(self) -> RuntimeConfig:
                return RuntimeConfig()

    class Runtime:
        def __init__(self, logger: Any):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            try:
                step = step_for(data)
                io = _onnx_io(data)
            except Exception as e:
                self.logger.log(_Severity.ERROR, f"IRuntime::deserializeCudaEngine: not a plan ({type(e).__name__})")
                return None
            return Engine(data, step, io)

    trt.Runtime = Runtime
    return trt


STATE_PAIRS = (("x", "x_next"), ("prev_x0", "x0"), ("eps_hist", "eps_hist_next"), ("saved", "saved_next"))


def _onnx_io(data: bytes) -> dict:
    """The engine's I/O (names, static dims with -1 for dynamic, dtypes) from a step graph; toy plans
    are DiT step engines whose latent and coefficient count are in a header."""
    if data.startswith(b"TOY"):
        c, h, w, k = (int(v) for v in data[3:].split(b",")[:4])
        lat = (-1, c, h, w)
        static = {"x": lat, "prev_x0": lat, "noise": lat, "x_next": lat, "x0": lat, "t": (-1,), "y": (-1,),
                  "guidance": (), "coef": (k,)}
        dtypes = {n: (np.int64 if n in ("t", "y") else np.float32) for n in static}
        return {"inputs": list(STEP_INPUTS), "outputs": ["x_next", "x0"], "static": static, "dtypes": dtypes,
                "state_pairs": STATE_PAIRS[:2]}
    import onnx

    model = onnx.load_from_string(data)
    elem = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
    static, dtypes = {}, {}
    for v in [*model.graph.input, *model.graph.output]:
        static[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
        dtypes[v.name] = elem[v.type.tensor_type.elem_type]
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    return {"inputs": inputs, "outputs": outputs, "static": static, "dtypes": dtypes,
            "state_pairs": tuple(p for p in STATE_PAIRS if p[0] in inputs)}


def toy_plan(latent: tuple[int, int, int], k: int, scale: float) -> bytes:
    """Bytes of a fake "plan" whose engine runs toy_step with `scale`."""
    return b"TOY" + ",".join(str(v) for v in (*latent, k, scale)).encode() + b","


def toy_step_for(xp: Any = np) -> Callable[[bytes], Callable]:
    def step_for(data: bytes) -> Callable:
        if not data.startswith(b"TOY"):
            raise ValueError("not a toy plan")
        scale = float(data[3:].split(b",")[4])
        return lambda feeds: toy_step(xp, feeds, scale)
    return step_for
