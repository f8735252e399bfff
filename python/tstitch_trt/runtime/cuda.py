"""A thin layer over cuda-python's runtime API: checked calls, device buffers, streams, events, graphs.

No torch: the runtime drives TensorRT with raw device pointers. Every call is checked and fails
with the CUDA error's name. Out of memory at allocation is a UserError, and the allocator frees
everything it handed out, so a failed setup leaves the GPU as it found it.

cuda-python >= 12.8 / 13 spells the module `cuda.bindings.runtime`; older releases `cuda.cudart`.

The bindings carry their own CUDA runtime, which needs a driver of at least its CUDA major: cuda-python
13 needs an R580+ driver, cuda-python 12 runs on R525+ (a newer driver runs an older runtime). Where they
do not match, cudaGetDeviceCount fails (cudaErrorInsufficientDriver) although TensorRT would work:
probe_devices() names the error and the extra to install (gpu-cu12 / gpu-cu13, pyproject.toml) instead
of reporting "no GPU".
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tstitch_trt.errors import BackendUnavailable, UserError

try:  # cuda-python >= 12.8 / 13
    from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older cuda-python
    try:
        from cuda import cudart  # type: ignore[import-not-found,no-redef]
    except ImportError:
        cudart = None  # type: ignore[assignment]


class CudaError(RuntimeError):
    """A CUDA runtime call failed; `name` is the error's name (e.g. cudaErrorIllegalAddress)."""

    def __init__(self, what: str, name: str, detail: str = ""):
        self.name = name
        super().__init__(f"{what} failed: {name}" + (f" ({detail})" if detail else ""))


NO_BINDINGS = ("the GPU runtime needs cuda-python, which is not installed: pip install 'tstitch-trt[gpu]' (the "
               "CUDA 12 bindings, any driver >= R525; 'tstitch-trt[gpu-cu13]' for CUDA 13 on R580+)")


def _require() -> Any:
    if cudart is None:
        raise BackendUnavailable(NO_BINDINGS)
    return cudart


def _error_name(err: Any) -> tuple[str, str]:
    rt = _require()
    try:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        return (name.decode() if isinstance(name, bytes) else str(name),
                text.decode() if isinstance(text, bytes) else str(text))
    except Exception:  # pragma: no cover - very old bindings
        return str(err), ""


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result tuple (err, *values); raise CudaError naming the error."""
    rt = _require()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name, text = _error_name(err)
        raise CudaError(what, name, text)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# device -------------------------------------------------------------------------------------------
NO_GPU = ("no NVIDIA GPU is visible (no driver, no device, or CUDA_VISIBLE_DEVICES hides it); "
          "use --backend ort for the CPU")
# the pyproject extra that installs the bindings of each CUDA major (their runtime needs a driver of that major)
EXTRA_FOR_MAJOR = {12: "gpu-cu12", 13: "gpu-cu13"}


@dataclass(frozen=True)
class DeviceProbe:
    """What cudaGetDeviceCount said: the count, and where it is 0, why (one line: what is wrong, what to do)."""

    count: int
    error: str | None = None  # the CUDA error's name (cudaErrorInsufficientDriver ...); None where the call answered
    message: str = ""


def _raw_count() -> tuple[int, Any]:
    """(devices, error or None); (0, None) without cuda-python."""
    if cudart is None:
        return 0, None
    try:
        err, n = cudart.cudaGetDeviceCount()
    except Exception as e:  # bindings that cannot even load their runtime
        return 0, e
    return (int(n), None) if err == cudart.cudaError_t.cudaSuccess else (0, err)


def device_count() -> int:
    """Visible CUDA devices; 0 without cuda-python, a driver or a GPU (probe_devices() says which)."""
    return _raw_count()[0]


def probe_devices() -> DeviceProbe:
    """The device count, or why there is none: the CUDA error's name and what to do about it."""
    if cudart is None:
        return DeviceProbe(0, None, NO_BINDINGS)
    n, err = _raw_count()
    if n > 0:
        return DeviceProbe(n)
    if err is None:
        return DeviceProbe(0, None, NO_GPU)
    if isinstance(err, Exception):
        name, text = type(err).__name__, str(err).splitlines()[0] if str(err) else ""
    else:
        name, text = _error_name(err)
    if name == "cudaErrorNoDevice":
        return DeviceProbe(0, name, f"{NO_GPU} (cudaGetDeviceCount: {name})")
    return DeviceProbe(0, name, _driver_advice(name, text))


def _cuda_version(code: int) -> tuple[int, int]:
    """CUDA's integer version (12040) as (12, 4)."""
    return code // 1000, (code % 1000) // 10


def bindings_runtime_version() -> tuple[int, int] | None:
    """The CUDA runtime the installed cuda-python carries (cudaRuntimeGetVersion), or None."""
    try:
        err, v = cudart.cudaRuntimeGetVersion()
        return _cuda_version(int(v)) if err == cudart.cudaError_t.cudaSuccess and int(v) > 0 else None
    except Exception:
        return None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA the installed driver supports: cudaDriverGetVersion, else nvidia-smi's "CUDA Version";
    None where no driver answers (cudaDriverGetVersion gives 0 when none is installed)."""
    try:
        err, v = cudart.cudaDriverGetVersion()
        if err == cudart.cudaError_t.cudaSuccess and int(v) > 0:
            return _cuda_version(int(v))
    except Exception:
        pass
    return _nvidia_smi_cuda_version()


def _nvidia_smi_cuda_version() -> tuple[int, int] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def install_hint(major: int) -> str:
    extra = EXTRA_FOR_MAJOR.get(major)
    if extra:
        return f"pip install 'tstitch-trt[{extra}]'"
    return f"pip install 'cuda-python>={major}.0,<{major + 1}'"


def _driver_advice(name: str, text: str) -> str:
    """One line for a failed cudaGetDeviceCount: the error's name, the versions that clash, what to install."""
    failed = f"cudaGetDeviceCount failed: {name}" + (f" ({text})" if text else "")
    runtime = bindings_runtime_version()
    driver = driver_cuda_version()
    carries = (f"the installed cuda-python carries the CUDA {runtime[0]}.{runtime[1]} runtime"
               if runtime else "the installed cuda-python's CUDA runtime")
    if driver is None:
        if name == "cudaErrorInsufficientDriver":  # what the runtime says when libcuda is missing altogether
            return (f"{failed}: no NVIDIA driver answers (cudaDriverGetVersion gives none, no nvidia-smi); "
                    f"install the NVIDIA driver, or use --backend ort for the CPU")
        return f"{failed}; the GPU is not usable from this process (check nvidia-smi); use --backend ort for the CPU"
    where = f"this machine's driver supports CUDA {driver[0]}.{driver[1]} (cudaDriverGetVersion / nvidia-smi)"
    if name == "cudaErrorInsufficientDriver" or (runtime is not None and runtime[0] > driver[0]):
        return (f"{failed}: {carries}, {where}; install the bindings matching the driver's CUDA major: "
                f"{install_hint(driver[0])} (or upgrade the NVIDIA driver)")
    return f"{failed}; {carries}, {where}; the GPU is not usable from this process (check nvidia-smi)"


def require_device(index: int = 0) -> None:
    """Select device `index` (creating its primary context, which TensorRT shares) or raise UserError."""
    _require()
    probe = probe_devices()
    if probe.count == 0:
        raise BackendUnavailable(probe.message)
    n = probe.count
    if not 0 <= index < n:
        raise UserError(f"GPU {index} does not exist ({n} visible)")
    check(cudart.cudaSetDevice(index), "cudaSetDevice")
    check(cudart.cudaFree(0), "creating the CUDA context")  # cudaFree(0): the usual context warm-up


def compute_capability(index: int = 0) -> tuple[int, int]:
    rt = _require()
    major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, index),
                  "cudaDeviceGetAttribute")
    minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, index),
                  "cudaDeviceGetAttribute")
    return int(major), int(minor)


def device_name(index: int = 0) -> str:
    rt = _require()
    try:
        props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        name = props.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:
        return f"cuda:{index}"


def mem_info() -> tuple[int, int]:
    """(free, total) bytes on the current device."""
    free, total = check(_require().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


# streams and events ----------------------------------------------------------------------------------
class Stream:
    """A non-blocking stream (TensorRT warns about the legacy default stream, and graphs cannot capture it)."""

    def __init__(self) -> None:
        rt = _require()
        self.raw = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = int(self.raw)  # what TensorRT's execute_async_v3 takes

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.raw is not None:
            check(cudart.cudaStreamDestroy(self.raw), "cudaStreamDestroy")
            self.raw = None


class Event:
    """A timing event. record(external=True) inside a stream capture becomes an event node of the graph."""

    def __init__(self) -> None:
        rt = _require()
        self.raw = check(rt.cudaEventCreateWithFlags(rt.cudaEventDefault), "cudaEventCreateWithFlags")

    def record(self, stream: Stream, external: bool = False) -> None:
        if external:
            check(cudart.cudaEventRecordWithFlags(self.raw, stream.raw, cudart.cudaEventRecordExternal),
                  "cudaEventRecordWithFlags")
        else:
            check(cudart.cudaEventRecord(self.raw, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart.cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to `end` (both recorded and complete)."""
        return float(check(cudart.cudaEventElapsedTime(self.raw, end.raw), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.raw is not None:
            check(cudart.cudaEventDestroy(self.raw), "cudaEventDestroy")
            self.raw = None


# memory ----------------------------------------------------------------------------------------------
class DeviceBuffer:
    """One cudaMalloc allocation (256-byte aligned). Copies are asynchronous on the given stream."""

    def __init__(self, ptr: int, nbytes: int, what: str):
        self.ptr = ptr
        self.nbytes = nbytes
        self.what = what

    def _span(self, offset: int, nbytes: int) -> int:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"copy of {nbytes} B at offset {offset} overruns {self.what} ({self.nbytes} B)")
        return self.ptr + offset

    def upload(self, host: np.ndarray, stream: Stream, offset: int = 0) -> None:
        """Host -> device. Pageable sources are staged before the call returns, so `host` may be freed."""
        host = np.ascontiguousarray(host)
        dst = self._span(offset, host.nbytes)
        check(cudart.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw), "cudaMemcpyAsync H2D")

    def download(self, out: np.ndarray, stream: Stream, offset: int = 0) -> np.ndarray:
        """Device -> host into the C-contiguous array `out`; waits for the stream."""
        if not out.flags.c_contiguous:
            raise ValueError("download target must be C-contiguous")
        src = self._span(offset, out.nbytes)
        check(cudart.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw), "cudaMemcpyAsync D2H")
        stream.synchronize()
        return out

    def zero(self, stream: Stream) -> None:
        check(cudart.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream.raw), "cudaMemsetAsync")


def copy_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Device -> device between raw pointers (captured as a memcpy node inside a stream capture)."""
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.raw),
          "cudaMemcpyAsync D2D")


class DeviceAllocator:
    """Owns every device allocation of one backend; `count` only grows (a reused pipeline must not)."""

    def __init__(self) -> None:
        self.buffers: list[DeviceBuffer] = []
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def alloc(self, nbytes: int, what: str) -> DeviceBuffer:
        rt = _require()
        err, ptr = rt.cudaMalloc(max(int(nbytes), 1))
        if err == rt.cudaError_t.cudaErrorMemoryAllocation:
            rt.cudaGetLastError()  # clear it: an allocation failure is not sticky
            held = self.nbytes
            self.free_all()
            try:
                free, total = mem_info()
                where = f"{free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB"
            except CudaError:
                where = "free memory unknown"
            raise UserError(
                f"out of GPU memory allocating {nbytes / 2**20:.1f} MiB for {what} "
                f"({held / 2**20:.1f} MiB already held by this runtime, now released; {where}); "
                "lower the batch, use smaller models, or stop other GPU programs"
            )
        check((err,), f"cudaMalloc({nbytes}) for {what}")
        buf = DeviceBuffer(int(ptr), int(nbytes), what)
        self.buffers.append(buf)
        self.count += 1
        return buf

    def free(self, buf: DeviceBuffer | None) -> None:
        if buf is None or buf not in self.buffers:
            return
        self.buffers.remove(buf)
        check(cudart.cudaFree(buf.ptr), f"cudaFree ({buf.what})")

    def free_all(self) -> None:
        errors = []
        for buf in self.buffers:
            err = cudart.cudaFree(buf.ptr)[0]
            if err != cudart.cudaError_t.cudaSuccess:
                errors.append(f"{buf.what}: {_error_name(err)[0]}")
        self.buffers = []
        if errors:
            raise CudaError("cudaFree", errors[0])


# CUDA graphs -----------------------------------------------------------------------------------------
class CudaGraph:
    """An instantiated graph: launch() replays everything captured, with the captured addresses."""

    def __init__(self, graph: Any, exec_: Any, nodes: int | None = None):
        self.graph = graph
        self.exec = exec_
        self.nodes = nodes

    def launch(self, stream: Stream) -> None:
        check(cudart.cudaGraphLaunch(self.exec, stream.raw), "cudaGraphLaunch")

    def close(self) -> None:
        if self.exec is not None:
            cudart.cudaGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph is not None:
            cudart.cudaGraphDestroy(self.graph)
            self.graph = None


def capture_graph(stream: Stream, body: Callable[[], None]) -> CudaGraph:
    """Capture what `body` enqueues on `stream` into one instantiated graph.

    Thread-local capture mode: CUDA calls that other threads make meanwhile (a JIT compiler, another
    library) do not invalidate this capture. On any failure the capture is ended and cleaned up, so
    the stream is usable for plain launches afterwards, and the error is raised.
    """
    rt = _require()
    check(rt.cudaStreamBeginCapture(stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
          "cudaStreamBeginCapture")
    try:
        body()
    except BaseException:
        _abort_capture(stream)
        raise
    err, graph = rt.cudaStreamEndCapture(stream.raw)
    if err != rt.cudaError_t.cudaSuccess:
        _destroy_graph(graph)
        rt.cudaGetLastError()
        check((err,), "cudaStreamEndCapture")
    try:
        exec_ = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
    except CudaError:
        _destroy_graph(graph)
        raise
    nodes = None
    try:
        nodes = int(check(rt.cudaGraphGetNodes(graph, 0), "cudaGraphGetNodes")[1])
    except Exception:  # only informative
        pass
    return CudaGraph(graph, exec_, nodes)


def _abort_capture(stream: Stream) -> None:
    rt = cudart
    try:
        _, graph = rt.cudaStreamEndCapture(stream.raw)
        _destroy_graph(graph)
    finally:
        rt.cudaGetLastError()


def _destroy_graph(graph: Any) -> None:
    try:
        if graph is not None and int(graph) != 0:
            cudart.cudaGraphDestroy(graph)
    except Exception:
        pass
