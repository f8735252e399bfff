"""The external-data files an ONNX graph names, read from its protobuf header without the onnx package.

Graphs over protobuf's 2 GB keep their weights in files beside the graph (`<graph>.onnx.data`), named
by each tensor's external_data "location". ONNX Runtime, OpenVINO and TensorRT open those names
themselves, so a bundle is only sealed if every name is (a) inside the bundle and (b) one of the
files its manifest checksums. `external_locations` lists the names by walking the protobuf wire
format over a memory map: weights are skipped by length, never read, so a 10 GB graph costs only
its header. `check_external_data` is the one place the rule is enforced (bundle/files.py uses it).

Walked: ModelProto.graph (7), .functions (25), .training_info (20); GraphProto.node (1),
.initializer (5), .sparse_initializer (15); NodeProto.attribute (5); AttributeProto.t (5), .g (6),
.tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23); FunctionProto.node (7);
SparseTensorProto.values (1) / .indices (2); TensorProto.external_data (13) key/value pairs.
"""

from __future__ import annotations

import mmap
import posixpath
from pathlib import Path

from tstitch_trt.errors import BundleError

_LEN = 2
_MAX_DEPTH = 64  # subgraphs nest (If / Loop bodies); far deeper than any real graph


class _Malformed(Exception):
    pass


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, payload start, payload end) of each field in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i, end)
            yield field, wire, i, j
        elif wire == 1:
            j = i + 8
            yield field, wire, i, j
        elif wire == _LEN:
            n, i = _varint(buf, i, end)
            j = i + n
            yield field, wire, i, j
        elif wire == 5:
            j = i + 4
            yield field, wire, i, j
        else:  # groups (3, 4) are not used by onnx.proto3
            raise _Malformed
        if j > end:
            raise _Malformed
        i = j


# message kind -> {field number: message kind of that field} (only the fields that can lead to a tensor)
_WALK = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _walk(buf, start: int, end: int, kind: str, depth: int, out: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    if kind == "tensor":
        for field, wire, a, b in _fields(buf, start, end):
            if field == 13 and wire == _LEN:  # external_data: StringStringEntryProto {key 1, value 2}
                entry = {f: bytes(buf[x:y]) for f, w, x, y in _fields(buf, a, b) if w == _LEN}
                if entry.get(1) == b"location":
                    out.add(entry.get(2, b"").decode("utf-8", "replace"))
        return
    children = _WALK[kind]
    for field, wire, a, b in _fields(buf, start, end):
        if wire == _LEN and field in children:
            _walk(buf, a, b, children[field], depth + 1, out)


def external_locations(onnx_path: str | Path) -> list[str]:
    """The external_data locations the graph's tensors name (relative to the graph's folder), sorted."""
    path = Path(onnx_path)
    out: set[str] = set()
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                _walk(buf, 0, size, "model", 0, out)
            except _Malformed:
                raise BundleError(f"{path.name} is not a well-formed ONNX graph; rebuild the bundle") from None
    return sorted(out)


def check_external_data(bundle_dir: str | Path, graph_rel: str, listed: list[str]) -> list[Path]:
    """Every external-data file the bundle graph `graph_rel` names: inside the bundle and in `listed` (the
    manifest's checksummed files for that artifact). Returns their paths; BundleError otherwise."""
    from tstitch_trt.bundle.files import inside

    graph = inside(bundle_dir, graph_rel)
    paths = []
    for loc in external_locations(graph):
        rel_to_graph = Path(graph_rel).parent / loc
        if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise BundleError(f"the graph {graph_rel} reads weights from {loc!r}, outside the bundle; a bundle may "
                              "only use its own files: rebuild it")
        rel = posixpath.normpath(rel_to_graph.as_posix())
        path = inside(bundle_dir, rel)
        if rel not in listed:
            raise BundleError(f"the graph {graph_rel} reads weights from {rel}, which the manifest does not list "
                              "(nor checksum); rebuild the bundle")
        paths.append(path)
    return paths
