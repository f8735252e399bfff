"""One ONNX graph (a text encoder, the VAE decoder) on OpenVINO's CPU plugin, in fp32 or bf16.

The step graphs have OpenVinoBackend (shared buffers, ping-pong requests); the graphs run once per
request have this: compiled for the input shapes of the call (static shapes, as compile_static does
for the step graphs, with the same fp32 marking of sensitive ops in bf16), the last compile kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.runtime.openvino_backend import compile_static, import_openvino


class OpenVinoGraph:
    def __init__(self, path: str | Path, precision: str, threads: int = 0):
        ov = import_openvino()
        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.precision = precision
        self.threads = threads
        self._key: tuple | None = None
        self.compiled: Any = None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(sorted((n, a.shape) for n, a in feeds.items()))
        if key != self._key:  # a new shape: recompile (the previous compiled model is released)
            self.compiled = None
            self.compiled = compile_static(self.core, self.model, {n: a.shape for n, a in feeds.items()},
                                           self.precision, self.threads)
            self._key = key
        res = self.compiled(feeds)
        # every tensor name of each output (OpenVINO may list the ONNX output name among others)
        return {name: np.array(res[out]) for out in self.compiled.outputs for name in out.get_names()}
