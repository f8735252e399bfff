"""One ONNX graph (a text encoder, the VAE decoder) on OpenVINO's CPU plugin, in fp32 or bf16.

The step graphs have OpenVinoBackend (shared buffers, ping-pong requests); the graphs run once per
request have this: compiled for the input shapes of the call (static shapes, as compile_static does
for the step graphs, with the same fp32 marking of sensitive ops in bf16), the last compile kept.
Compiles go through the same blob cache as the step graphs (runtime/openvino_compile.py; the key
holds the precision and the marking recipe): given the graph's checksums, a cached run reads no ONNX,
and no ov.Model is kept once compiled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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
    """inputs by name -> outputs by every tensor name (fp32 / int64 arrays), one ONNX graph on OpenVINO's CPU."""

    def __init__(self, path: str | Path, precision: str, threads: int = 0, *,
                 graph_sha256: Sequence[str] | None = None, cache_dir: Path | None = None):
        ov = import_openvino()
        self.core = ov.Core()
        self.path = Path(path)  # checksummed when the bundle was opened
        self.precision = precision
        self.threads = threads or int(os.environ.get("TSTITCH_OPENVINO_THREADS", "0"))  # as the step graphs
        self.sha = list(graph_sha256 or [])
        # blobs are named by their graph's sha: one directory serves every bundle's parts; without the
        # graph's checksums there is no key that avoids reading it, so no cache
        cache = cache_dir if cache_dir is not None else cache_root() / "parts"
        self.cache_dir = cache if self.sha and _writable_dir(cache) else None
        self._compiled: Compiled | None = None
        self._key: tuple | None = None
        self.compiles = 0

    @property
    def compiled(self) -> object:
        """The ov.CompiledModel of the shape compiled last (None before a call)."""
        return None if self._compiled is None else self._compiled.model

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(sorted((n, tuple(a.shape)) for n, a in feeds.items()))
        if key != self._key:  # a new shape: recompile (the previous compiled model is released first)
            self._compiled = None
            shapes = {n: tuple(a.shape) for n, a in feeds.items()}
            self._compiled = compile_cached(
                self.core, lambda: read_onnx(self.core, self.path),
                lambda model: compile_static(self.core, model, shapes, self.precision, self.threads),
                self.sha, shapes, self.precision, self.threads, self.cache_dir,
                compile_config(self.precision, self.threads))
            self._key = key
            self.compiles += 1
        compiled = self._compiled.model
        res = compiled({n: np.ascontiguousarray(a) for n, a in feeds.items()})
        # every tensor name of each output (OpenVINO may list the ONNX output name among others)
        return {name: np.array(res[out]) for out in compiled.outputs for name in out.get_names()}

    @property
    def source(self) -> str | None:
        """"cache" or "compiled" for the shape compiled last; None before a call."""
        return None if self._compiled is None else self._compiled.source

    def close(self) -> None:
        self._compiled = None
        self._key = None
