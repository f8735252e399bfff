"""OpenVINO compiled models of a bundle's ONNX graphs, cached as exported blobs: a cached run reads no ONNX.

OpenVINO's own model cache (CACHE_DIR) keys a compile_model(ov.Model) by hashing the model, so a run
had to read the fp32 ONNX (SD 1.5's U-Net: 3.4 GB), reshape and hash it before the cache could answer,
and kept that ov.Model (a second copy of every weight) for the rest of the process. Here the blob is
keyed by what decides the compiled model, all known without the graph:

- the graph's files' sha256 from the manifest (verified when the bundle was opened),
- the static input shapes, the precision and the thread count,
- the bf16 marking's attribute (name, version, value) for a bf16 compile,
- OpenVINO's version, and the compile recipe: the source of the runtime/openvino_*.py modules (a
  change to how graphs are marked or compiled must not reuse an old blob).

A hit imports the blob memory-mapped (no read into a bytes copy); a miss reads
the graph, compiles it with the caller's function while OpenVINO's own cache points at a fresh temporary
directory (so OpenVINO streams the blob to disk), renames that blob into place (a reader never sees half
a blob) and drops the ov.Model. A blob that fails to import (damaged, a
different CPU plugin build) is compiled again and replaced.

A blob is about as large as the graph's weights (SD 1.5's U-Net: 3.4 GB), so a miss writes one over
SMALL_BLOB_BYTES only where it leaves the cache's file system at least FREE_RESERVE_FRACTION of its size (or
FREE_RESERVE_MIN_BYTES, the larger) free: a run never fills a disk with its cache. Otherwise it compiles without
writing and says so (Compiled.note, the run's notes). Smaller blobs are written as before (a failed write runs
uncached).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tstitch_trt.runtime.openvino_precision import ATTRIBUTE

SMALL_BLOB_BYTES = 64 * 2**20
FREE_RESERVE_FRACTION = 0.05
FREE_RESERVE_MIN_BYTES = 2 * 2**30
_RECIPE_FILES = ("openvino_backend.py", "openvino_compile.py", "openvino_graph.py", "openvino_precision.py")


def recipe_digest() -> str:
    """sha256 of the modules that decide how a graph is compiled (those present in this install)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _RECIPE_FILES:
        p = here / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def blob_key(graph_sha256: Sequence[str], shapes: Mapping[str, Sequence[int]], precision: str, threads: int,
             ov_version: str) -> str:
    """The cache key of one compiled model (module docstring)."""
    what = {"graph": list(graph_sha256), "shapes": {k: [int(d) for d in v] for k, v in sorted(shapes.items())},
            "precision": precision, "threads": int(threads), "openvino": ov_version, "recipe": recipe_digest(),
            "bf16_marking": list(ATTRIBUTE) if precision == "bf16" else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def blob_path(cache_dir: Path, graph_sha256: Sequence[str], key: str) -> Path:
    """<cache>/<graph sha prefix>-<key prefix>.blob: a graph's blobs are found by its prefix."""
    return cache_dir / f"{graph_sha256[0][:16]}-{key[:32]}.blob"


def has_blob(cache_dir: Path | None, graph_sha256: Sequence[str]) -> bool:
    """Some blob of this graph exists (any shape or precision): its ONNX was read by this cache before."""
    return cache_dir is not None and any(cache_dir.glob(f"{graph_sha256[0][:16]}-*.blob"))


@dataclass
class Compiled:
    model: Any  # ov.CompiledModel
    source: str  # "cache" (blob imported) or "compiled"
    written: bool = False  # compiled and its blob written to the cache (False where the write failed: a full disk)
    mapped: Any = None  # the blob's memory map, alive as long as the compiled model that may read from it
    note: str | None = None  # why a compiled model was not cached (the disk), for the run's notes


def compile_cached(core: Any, read: Callable[[], Any], compile_fn: Callable[[Any], Any],
                   graph_sha256: Sequence[str], shapes: Mapping[str, Sequence[int]], precision: str,
                   threads: int, cache_dir: Path | None, config: Mapping[str, Any]) -> Compiled:
    """The compiled model of a graph, from the cache or compiled. read(): the ov.Model (called only on a miss);
    compile_fn(model): the compiled model; config: the properties compile_fn compiles with (an import needs
    them again: without them the CPU plugin runs a blob in its defaults, bf16 on a bf16 CPU). cache_dir None:
    no cache (a read-only location)."""
    import openvino as ov

    path = None
    if cache_dir is not None:
        key = blob_key(graph_sha256, shapes, precision, threads, ov.get_version())
        path = blob_path(cache_dir, graph_sha256, key)
        if path.is_file():
            try:
                return _import_blob(core, path, config)
            except Exception:  # damaged or from another plugin build: compile again, replace it
                pass
    model = read()
    note = None
    if path is not None:
        note = blob_does_not_fit(path.parent, weight_bytes(model))
        if note is not None:
            path = None
    if path is None:
        compiled = compile_fn(model)
    else:
        compiled = _compile_writing_blob(core, model, compile_fn, path)
    del model  # the compiled model holds its own weights: no second copy kept
    return Compiled(compiled, "compiled", written=path is not None and path.is_file(), note=note)


def weight_bytes(model: Any) -> int:
    """The bytes of an ov.Model's constants: about the size of its compiled blob."""
    return sum(int(op.get_byte_size()) for op in model.get_ops() if op.get_type_name() == "Constant")


def blob_does_not_fit(cache_dir: Path, blob_bytes: int) -> str | None:
    """Why a blob of blob_bytes is not written into cache_dir (it would leave under the reserve free), or None."""
    if blob_bytes <= SMALL_BLOB_BYTES:
        return None
    try:
        usage = shutil.disk_usage(cache_dir)
    except OSError:
        return None  # the write itself will tell (_compile_writing_blob runs uncached where it cannot write)
    reserve = max(FREE_RESERVE_MIN_BYTES, int(FREE_RESERVE_FRACTION * usage.total))
    if usage.free - blob_bytes >= reserve:
        return None
    return (f"OpenVINO model cache: not written for this graph ({blob_bytes / 2**30:.1f} GiB blob, "
            f"{usage.free / 2**30:.1f} GiB free in {cache_dir}, {reserve / 2**30:.1f} GiB kept free); "
            "the next run compiles it again")


def _import_blob(core: Any, path: Path, config: Mapping[str, Any]) -> Compiled:
    """Import a blob written by OpenVINO's cache: its one-line XML header (what the cache checks, done here by
    the key) is skipped and the plugin's part imported from a copy-on-write memory map (no read into memory)."""
    import numpy as np
    import openvino as ov

    with open(path, "rb") as f:
        head = f.read(4096)
    offset = head.index(b"\n") + 1 if head.startswith(b"<?xml") else 0
    mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=offset)
    compiled = core.import_model(ov.Tensor(mapped, shared_memory=True), "CPU", dict(config))
    _release_pages(mapped)
    return Compiled(compiled, "cache", mapped=mapped)


def _release_pages(mapped: Any) -> None:
    """Drop the blob's pages from this process's memory once imported: the CPU plugin has repacked every
    weight into its own buffers by then (convolution / matmul layouts), yet the touched file pages stayed
    resident, a second copy of every weight in RSS. The mapping is private and never written, so a page
    read again later comes back from the file unchanged (tests/test_openvino_cache.py checks the numbers)."""
    import mmap

    handle = getattr(mapped, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def _compile_writing_blob(core: Any, model: Any, compile_fn: Callable[[Any], Any], path: Path) -> Any:
    """compile_fn(model) with OpenVINO's own cache pointed at a fresh temporary directory, whose one blob
    (streamed to disk by OpenVINO, never held as a bytes copy of the weights) is renamed to `path`. OpenVINO
    does not raise when it cannot write the blob (a full disk): then no blob is renamed, and the caller sees
    `path` missing."""
    try:
        tmp = tempfile.mkdtemp(prefix=".compile-", dir=path.parent)
    except OSError:
        return compile_fn(model)  # not writable: run without caching
    try:
        core.set_property({"CACHE_DIR": tmp})
        try:
            compiled = compile_fn(model)
        finally:
            core.set_property({"CACHE_DIR": ""})
        blobs = sorted(Path(tmp).glob("*.blob"))
        if len(blobs) == 1:
            os.replace(blobs[0], path)
        return compiled
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
