"""A bundle's ONNX graphs may only read external weights the manifest lists (checksummed), inside the bundle.

bundle/onnx_refs.py reads the external-data locations from the protobuf header itself (no onnx import,
weights skipped): checked here against onnx's own reading, and against hostile locations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tstitch_trt.bundle.manifest import EngineEntry, artifact_path, onnx_entry  # noqa: E402
from tstitch_trt.bundle.onnx_refs import external_locations  # noqa: E402
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
    with pytest.raises(BundleError, match="does not list"):
        artifact_path(tmp_path, bare)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "sub/../../outside.data"])
def test_a_data_file_outside_the_bundle_is_refused(tmp_path, location):
    bundle = tmp_path / "bundle"
    path = _graph(bundle / "g.onnx", external=True, location="g.onnx.data")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:  # a hostile graph: its weights point out of the bundle
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(path))
    from tstitch_trt.bundle.manifest import sha256_file

    entry = EngineEntry(file="g.onnx", sha256=sha256_file(path))
    with pytest.raises(BundleError, match="outside the bundle"):
        artifact_path(bundle, entry)


def test_a_symlinked_data_file_leaving_the_bundle_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    _graph(bundle / "g.onnx", external=True)
    entry = onnx_entry(bundle, "g.onnx")
    (tmp_path / "elsewhere.data").write_bytes((bundle / "g.onnx.data").read_bytes())
    (bundle / "g.onnx.data").unlink()
    (bundle / "g.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(BundleError, match="outside the bundle"):
        artifact_path(bundle, entry)


def test_a_truncated_graph_is_one_bundle_error(tmp_path):
    path = _graph(tmp_path / "g.onnx", external=True)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(BundleError, match="not a well-formed ONNX graph"):
        external_locations(path)
