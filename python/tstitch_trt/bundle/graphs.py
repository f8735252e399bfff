"""What an ONNX graph in a bundle makes its runtime read besides itself: external-data locations, read from
the protobuf wire format (no onnx package, no torch; a 2 GB graph is memory-mapped and its weights skipped,
never copied), and the seal's rule for them: each resolves inside the bundle and is a file the manifest
checksums.

ONNX Runtime and OpenVINO open `location` relative to the graph's own directory, whatever the manifest says;
so a re-sealed graph (its sha256 updated by whoever edited it) could make them read `../../secret` or
`/etc/passwd` as weights. The manifest's paths are sealed in files.py; this seals the graph's own.

    external_data_locations(path)          every location the graph names (its initializers, sparse ones,
                                           and those inside subgraphs and functions)
    check_graph_references(bundle, rel, sealed)   one line (BundleError) naming the graph and the path
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path

from tstitch_trt.errors import BundleError

# field numbers of onnx.proto (ONNX IR v3 .. v10) on the way to a TensorProto's external_data
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64  # subgraph nesting; deeper is not a graph any exporter writes


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]; other wire types skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a field runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise _Malformed(f"wire type {wire}")
    if pos != end:
        raise _Malformed("a field runs past its message")


def _tensor(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA:
            key = value = None
            for n, fs, fe in _fields(buf, s, e):
                if n == _ENTRY_KEY:
                    key = bytes(buf[fs:fe])
                elif n == _ENTRY_VALUE:
                    value = bytes(buf[fs:fe])
            if key == b"location" and value is not None:
                out.append(value.decode("utf-8", "replace"))


def _sparse(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, s, e, out)


def _node(buf, start: int, end: int, out: list[str], depth: int) -> None:
    for number, s, e in _fields(buf, start, end):
        if number != _NODE_ATTRIBUTE:
            continue
        for n, as_, ae in _fields(buf, s, e):
            if n in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, as_, ae, out)
            elif n in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, as_, ae, out)
            elif n in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, as_, ae, out, depth + 1)


def _graph(buf, start: int, end: int, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed("subgraphs nested too deeply")
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER:
            _tensor(buf, s, e, out)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _sparse(buf, s, e, out)
        elif number == _GRAPH_NODE:
            _node(buf, s, e, out, depth)


_read: dict[tuple, list[str]] = {}  # by file identity and change time, as files.py memoizes checksums


def external_data_locations(path: str | Path) -> list[str]:
    """Every external-data location the ONNX graph at `path` names, in order, duplicates removed.
    Raises ValueError for a file that is not an ONNX protobuf."""
    st = Path(path).stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _read:
        _read[key] = _locations(path)
    return list(_read[key])


def _locations(path: str | Path) -> list[str]:
    out: list[str] = []
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                for number, s, e in _fields(buf, 0, size):
                    if number == _MODEL_GRAPH:
                        _graph(buf, s, e, out, 0)
                    elif number == _MODEL_FUNCTIONS:
                        for n, fs, fe in _fields(buf, s, e):
                            if n == _FUNCTION_NODE:
                                _node(buf, fs, fe, out, 0)
            except _Malformed as err:
                raise ValueError(f"not an ONNX graph ({err})") from None
    return list(dict.fromkeys(out))


def check_graph_references(bundle_dir: str | Path, rel: str, sealed: Iterable[str]) -> None:
    """The graph `rel` (already inside the bundle and checksummed) may name as external data only files inside
    the bundle that the manifest checksums (`sealed`: bundle-relative paths of this artifact's files).
    BundleError, one line naming the graph and the path, otherwise."""
    root = Path(bundle_dir).resolve()
    graph = (root / rel).resolve()
    try:
        locations = external_data_locations(graph)
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle file {rel} is not an ONNX graph that can be read ({e}); rebuild the bundle"
                          ) from None
    allowed = {(root / s).resolve() for s in sealed}
    for loc in locations:
        shown = loc if len(loc) <= 120 else loc[:120] + "..."
        target = (graph.parent / loc).resolve()  # as the runtimes open it (an absolute loc replaces the base)
        if Path(loc).is_absolute() or ".." in Path(loc).parts or "\\" in loc or not target.is_relative_to(root):
            raise BundleError(f"bundle file {rel} names external data {shown!r}, which leads outside the bundle "
                              f"(to {target}); a bundle may only use its own files: rebuild it")
        if target not in allowed:
            raise BundleError(f"bundle file {rel} names external data {shown!r}, which the manifest does not "
                              "checksum; rebuild the bundle")
