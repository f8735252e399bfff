"""One TensorRT / TensorRT-RTX engine called synchronously: the SD text encoder (once per request)
and the VAE decoder. No torch: device memory and the stream come from runtime/cuda.py.

Buffers are kept between calls and reallocated only when a shape changes; the engine has its own
scratch (it never runs inside the stitched loop, whose engines share theirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import EngineEntry, artifact_path
from tstitch_trt.errors import UserError
from tstitch_trt.runtime import cuda as cuda_rt
from tstitch_trt.runtime.engine_compat import check_engine_compat
from tstitch_trt.runtime.trt_backend import _dims, _make_logger, import_tensorrt


class TrtEngineRunner:
    def __init__(self, bundle_dir: str | Path, entry: EngineEntry, kind: str, what: str, trt_module: Any = None,
                 cuda: Any = None, device_index: int = 0):
        self.trt = trt_module if trt_module is not None else import_tensorrt(kind)
        self.cu = cuda if cuda is not None else cuda_rt
        self.what = what
        self.cu.require_device(device_index)
        path = artifact_path(bundle_dir, entry)
        check_engine_compat(entry.builder, self.trt, tuple(self.cu.compute_capability(device_index)),
                            what=f"the {kind} engine of the {what} ({path.name})", kind=kind)
        self.logger = _make_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.trt.__name__} could not load the {what} engine {path}: "
                            f"{self.logger.last_error()}; rebuild the bundle on this machine")
        trt = self.trt
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise UserError(f"{trt.__name__} could not create a context for the {what}: {self.logger.last_error()}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self.cu.Stream()
        self.alloc = self.cu.DeviceAllocator()
        self.scratch = self.alloc.alloc(max(int(self.engine.device_memory_size_v2), 1), f"{what} scratch")
        self.context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)
        self._bufs: dict[str, tuple[tuple[int, ...], Any]] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> Any:
        old = self._bufs.get(name)
        if old is not None and old[0] == shape:
            return old[1]
        if old is not None:
            self.alloc.free(old[1])
        size = max(int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize, 1)
        buf = self.alloc.alloc(size, f"{self.what} {name} {list(shape)}")
        self._bufs[name] = (shape, buf)
        if not self.context.set_tensor_address(name, buf.ptr):
            raise RuntimeError(f"set_tensor_address({name}) failed: {self.logger.last_error()}")
        return buf

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"the {self.what} engine needs {', '.join(missing)}")
        for n in self.inputs:
            value = np.ascontiguousarray(np.asarray(feeds[n]).astype(self.dtypes[n]))
            if not self.context.set_input_shape(n, value.shape):
                raise UserError(f"the {self.what} engine refused {n} of shape {list(value.shape)} (outside its "
                                f"profile): {self.logger.last_error()}")
            self._buffer(n, tuple(value.shape)).upload(value, self.stream)
        out_shapes = {n: _dims(self.context.get_tensor_shape(n)) for n in self.outputs}
        for n, shape in out_shapes.items():
            self._buffer(n, shape)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"{self.trt.__name__} failed to run the {self.what}: {self.logger.last_error()}")
        result = {n: self._bufs[n][1].download(np.empty(s, self.dtypes[n]), self.stream) for n, s in out_shapes.items()}
        self.stream.synchronize()
        return result

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.alloc.free_all()
        self._bufs = {}
        self.stream.close()
