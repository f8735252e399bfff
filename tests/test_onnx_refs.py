"""Builds record a graph's external weights in the manifest (bundle/manifest.onnx_entry), so the seal
(bundle/graphs.py, tested with hostile graphs in test_hostile_inputs) accepts what a build wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tstitch_trt.bundle.graphs import external_data_locations as external_locations  # noqa: E402
from tstitch_trt.bundle.manifest import EngineEntry, artifact_path, onnx_entry  # noqa: E402
from tstitch_trt.errors import BundleError  # noqa: E402


def _graph(path: Path, external: bool, location: str | None = None) -> Path:
    """y = x @ W + Constant(b): one initializer and one Constant-node tensor, both external when asked."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "W")
    b = helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.ones(8, np.float32), "bv"))
    mm = helper.make_node("MatMul", ["x", "W"], ["xw"])
    add = helper.make_node("Add", ["xw", "b"], ["y"])
    g = helper.make_graph([b, mm, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location or path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _onnx_locations(path: Path) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors

    m = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"})


def test_locations_agree_with_onnx(tmp_path):
    inline = _graph(tmp_path / "a" / "g.onnx", external=False)
    assert external_locations(inline) == _onnx_locations(inline) == []
    ext = _graph(tmp_path / "b" / "g.onnx", external=True)
    assert external_locations(ext) == _onnx_locations(ext) == ["g.onnx.data"]


def test_entry_lists_and_checksums_the_data_file(tmp_path):
    _graph(tmp_path / "onnx" / "g.onnx", external=True)
    entry = onnx_entry(tmp_path, "onnx/g.onnx")
    assert [d["file"] for d in entry.extra["external_data"]] == ["onnx/g.onnx.data"]
    assert artifact_path(tmp_path, entry) == (tmp_path / "onnx" / "g.onnx").resolve()
    (tmp_path / "onnx" / "g.onnx.data").write_bytes(b"\0" * 300)  # the weights changed after the build
    with pytest.raises(BundleError, match="checksum mismatch"):
        artifact_path(tmp_path, entry)


def test_an_unlisted_data_file_is_refused(tmp_path):
    _graph(tmp_path / "onnx" / "g.onnx", external=True)
    entry = onnx_entry(tmp_path, "onnx/g.onnx")
    bare = EngineEntry(file=entry.file, sha256=entry.sha256)  # a manifest that does not name the .data file
    with pytest.raises(BundleError):
        artifact_path(tmp_path, bare)
