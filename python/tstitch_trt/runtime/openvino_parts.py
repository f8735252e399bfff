"""A bundle's other ONNX graphs (VAE decoder, text encoders) on OpenVINO, for the openvino backend's pipelines.

Before this, an openvino run decoded with ONNX Runtime (the "ort" artifact): at 512 px the SD VAE decode
took ~5x OpenVINO's time on the same graph. Each graph is compiled for the static shape of its input
(a decode is one shape per request; static shapes run faster than the dynamic graph) through the same
blob cache as the step graphs (runtime/openvino_compile.py): a cached run reads no ONNX. One compiled
shape is kept at a time (a new shape replaces it), and no ov.Model after compiling.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import EngineEntry, artifact_path
from tstitch_trt.runtime.openvino_backend import (
    _writable_dir,
    cache_root,
    compile_config,
    compile_static,
    import_openvino,
    read_onnx,
)
from tstitch_trt.runtime.openvino_compile import Compiled, compile_cached


class OpenVinoGraph:
    """inputs by name -> outputs by name (fp32 / int64 arrays), one ONNX artifact on OpenVINO's CPU plugin."""

    def __init__(self, bundle_dir: str | Path, entry: EngineEntry, precision: str = "fp32",
                 threads: int | None = None, cache_dir: Path | None = None):
        ov = import_openvino()
        self.core = ov.Core()
        self.path = artifact_path(bundle_dir, entry)  # checksummed when the bundle was opened
        self.sha = [sha for _, sha in entry.files()]
        self.precision = precision
        self.threads = threads or int(os.environ.get("TSTITCH_OPENVINO_THREADS", "0"))  # as the step graphs
        # blobs are named by their graph's sha: one directory serves every bundle's parts
        cache = cache_dir if cache_dir is not None else cache_root() / "parts"
        self.cache_dir = cache if _writable_dir(cache) else None
        self._compiled: Compiled | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.compiles = 0

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(a.shape) for n, a in inputs.items()}
        if shapes != self._shapes:
            self._compiled = None  # the old shape's model goes first
            self._compiled = compile_cached(
                self.core, lambda: read_onnx(self.core, self.path),
                lambda model: compile_static(self.core, model, shapes, self.precision, self.threads),
                self.sha, shapes, self.precision, self.threads, self.cache_dir,
                compile_config(self.precision, self.threads))
            self._shapes = shapes
            self.compiles += 1
        assert self._compiled is not None
        request = self._compiled.model.create_infer_request()
        request.infer({n: np.ascontiguousarray(a) for n, a in inputs.items()})
        outs = {}
        for out in self._compiled.model.outputs:  # by every name the tensor has (the ONNX output's among them)
            data = request.get_tensor(out).data.copy()
            outs.update({n: data for n in out.get_names()})
        return outs

    @property
    def source(self) -> str | None:
        """"cache" or "compiled" for the shape compiled last; None before a call."""
        return None if self._compiled is None else self._compiled.source

    def close(self) -> None:
        self._compiled = None
        self._shapes = None

