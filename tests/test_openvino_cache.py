"""OpenVINO's compiled-model cache (runtime/openvino_compile.py): a cached run reads no ONNX and keeps no ov.Model,
gives the same numbers, and a blob is reused only for what compiled it (shapes, precision, graph, recipe)."""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.runtime import openvino_backend, openvino_compile  # noqa: E402
from tstitch_trt.runtime.loop import run_stitched  # noqa: E402
from tstitch_trt.runtime.openvino_backend import OpenVinoBackend  # noqa: E402
from tstitch_trt.sampling.trajectory import plan_trajectory  # noqa: E402


def _run(backend, manifest, batch=1):
    rng = np.random.default_rng(0)
    shape = (batch, *manifest.latent_shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    plan = plan_trajectory("ddim", 4, len(manifest.models), shape, rng, ratio=0.5)
    labels = np.arange(batch, dtype=np.int64) % manifest.num_classes
    return run_stitched(backend, plan, x, labels, 1.5, progress=False).x


@pytest.fixture
def reads(monkeypatch):
    """Every ONNX read by the backend, by file name."""
    seen: list[str] = []
    real = openvino_backend.read_onnx

    def counting(core, path):
        seen.append(path.name)
        return real(core, path)

    monkeypatch.setattr(openvino_backend, "read_onnx", counting)
    return seen


def test_cached_run_reads_no_onnx_and_keeps_no_model(tiny_pair, tmp_path, reads):
    manifest = read_manifest(tiny_pair)
    first = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    assert len(reads) == 2  # a cold cache: both graphs read at open (an unreadable one refuses there)
    a = _run(first, manifest)
    assert first.compile_sources == ["compiled", "compiled"]
    assert first._read == [None, None]  # handed to the compiler, not kept: no second copy of the weights
    assert len(list(tmp_path.glob("*.blob"))) == 2
    first.close()
    reads.clear()
    second = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    b = _run(second, manifest)
    assert reads == [] and second.compile_sources == ["cache", "cache"]
    assert np.array_equal(a, b)
    assert any("from the model cache" in n for n in second.take_notes())
    # a new batch is a new static shape: its graphs are read again (the ov.Models were dropped), then cached
    c = _run(second, manifest, batch=2)
    assert len(reads) == 2 and second.compile_sources == ["compiled", "compiled"]
    assert np.allclose(c[:1], a, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("*.blob"))) == 4


def test_a_blob_that_could_not_be_written_is_not_reported_as_cached(tiny_pair, tmp_path, monkeypatch):
    """OpenVINO does not raise when its cache cannot write a blob (a full disk): the report must not say
    "now cached" then. Simulated by a compile that writes no blob into the cache directory."""
    manifest = read_manifest(tiny_pair)
    backend = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    real = openvino_compile._compile_writing_blob
    monkeypatch.setattr(openvino_compile, "_compile_writing_blob",
                        lambda core, model, compile_fn, path: compile_fn(model))  # no blob lands at `path`
    _run(backend, manifest)
    notes = " ".join(backend.take_notes())
    assert "NOT cached" in notes and "now cached" not in notes and not list(tmp_path.glob("*.blob"))
    monkeypatch.setattr(openvino_compile, "_compile_writing_blob", real)
    written = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    _run(written, manifest)
    notes = " ".join(written.take_notes())
    assert "now cached" in notes and "NOT cached" not in notes


def test_blob_key_separates_what_compiles_differently():
    sha, shapes = ["a" * 64], {"x": (1, 4, 8, 8)}
    base = openvino_compile.blob_key(sha, shapes, "fp32", 1, "v1")
    assert base == openvino_compile.blob_key(sha, {"x": [1, 4, 8, 8]}, "fp32", 1, "v1")
    for other in (openvino_compile.blob_key(["b" * 64], shapes, "fp32", 1, "v1"),
                  openvino_compile.blob_key(sha, {"x": (2, 4, 8, 8)}, "fp32", 1, "v1"),
                  openvino_compile.blob_key(sha, shapes, "bf16", 1, "v1"),
                  openvino_compile.blob_key(sha, shapes, "fp32", 2, "v1"),
                  openvino_compile.blob_key(sha, shapes, "fp32", 1, "v2")):
        assert other != base


def test_recipe_change_is_a_new_key(monkeypatch):
    sha, shapes = ["a" * 64], {"x": (1,)}
    base = openvino_compile.blob_key(sha, shapes, "fp32", 1, "v1")
    monkeypatch.setattr(openvino_compile, "recipe_digest", lambda: "changed")
    assert openvino_compile.blob_key(sha, shapes, "fp32", 1, "v1") != base


def test_damaged_blob_is_compiled_again(tiny_pair, tmp_path, reads):
    manifest = read_manifest(tiny_pair)
    a = _run(OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path), manifest)
    blobs = sorted(tmp_path.glob("*.blob"))
    for b in blobs:
        b.write_bytes(b.read_bytes()[:100])  # cut short, as a full disk or a killed copy would leave it
    reads.clear()
    backend = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    assert np.array_equal(_run(backend, manifest), a)
    assert backend.compile_sources == ["compiled", "compiled"] and len(reads) == 2
    assert all(b.stat().st_size > 1000 for b in blobs)  # replaced by whole blobs
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".blob")]  # no temporary left behind


def test_bf16_key_holds_the_marking(monkeypatch):
    """A change to the bf16 marking (runtime/openvino_precision.ATTRIBUTE) is a new bf16 blob, not a new fp32 one."""
    sha, shapes = ["a" * 64], {"x": (1,)}
    fp32, bf16 = (openvino_compile.blob_key(sha, shapes, p, 1, "v1") for p in ("fp32", "bf16"))
    monkeypatch.setattr(openvino_compile, "ATTRIBUTE", ("DisablePrecisionConversion", "1", "dynamic:f16,bf16"))
    assert openvino_compile.blob_key(sha, shapes, "fp32", 1, "v1") == fp32
    assert openvino_compile.blob_key(sha, shapes, "bf16", 1, "v1") != bf16


def _small_graph(path):
    """x (1, 16) -> softmax(x @ W) as an ONNX file; returns its sha256 (what a manifest records)."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_openvino_graph_uses_the_cache_per_precision(tmp_path, monkeypatch):
    """OpenVinoGraph (text encoders, VAE) compiles through the blob cache: fp32 and bf16 are separate blobs, and a
    second graph object imports them without reading the ONNX, with the same outputs."""
    from tstitch_trt.runtime import openvino_graph
    from tstitch_trt.runtime.openvino_backend import cpu_has_bf16

    path = tmp_path / "g.onnx"
    sha = _small_graph(path)
    reads: list[str] = []
    real = openvino_graph.read_onnx
    monkeypatch.setattr(openvino_graph, "read_onnx", lambda core, p: reads.append(p.name) or real(core, p))
    precisions = ["fp32", "bf16"] if cpu_has_bf16(ov.Core()) else ["fp32"]
    x = {"x": np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)}
    first = {}
    for p in precisions:
        g = openvino_graph.OpenVinoGraph(path, p, 1, graph_sha256=[sha], cache_dir=tmp_path / "c")
        first[p] = g(x)["y"]
        assert g.source == "compiled"
    assert len(reads) == len(precisions) and len(list((tmp_path / "c").glob("*.blob"))) == len(precisions)
    reads.clear()
    for p in precisions:
        g = openvino_graph.OpenVinoGraph(path, p, 1, graph_sha256=[sha], cache_dir=tmp_path / "c")
        assert np.array_equal(g(x)["y"], first[p]) and g.source == "cache"
    assert reads == []
    # without the graph's checksums there is no key that avoids reading it: no cache, compiled each time
    g = openvino_graph.OpenVinoGraph(path, "fp32", 1, cache_dir=tmp_path / "c")
    assert np.array_equal(g(x)["y"], first["fp32"]) and g.source == "compiled" and reads == ["g.onnx"]


def test_a_blob_that_would_fill_the_disk_is_not_written(tmp_path, monkeypatch):
    """A miss writes its blob (about the graph's weights: SD 1.5's U-Net 3.4 GB) only where the disk keeps its
    reserve free; otherwise the graph is compiled uncached, with a note saying why, and runs the same."""
    import collections

    path = tmp_path / "g.onnx"
    sha = _small_graph(path)
    core = ov.Core()
    x = {"x": np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)}
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(openvino_compile, "SMALL_BLOB_BYTES", 0)  # the rule for GB blobs, on a 1 KB one
    total = 100 * 2**30
    reserve = max(openvino_compile.FREE_RESERVE_MIN_BYTES, int(openvino_compile.FREE_RESERVE_FRACTION * total))

    def compiled(free: int):
        monkeypatch.setattr(openvino_compile.shutil, "disk_usage", lambda p: Usage(total, total - free, free))
        c = openvino_compile.compile_cached(
            core, lambda: core.read_model(str(path)), lambda m: core.compile_model(m, "CPU"), [sha], {"x": [2, 16]},
            "fp32", 1, tmp_path / "cache", {})
        return c, np.array(c.model(x)[0])

    (tmp_path / "cache").mkdir()
    short, out_short = compiled(reserve)  # the 1 KB blob would take the disk under its reserve
    assert short.source == "compiled" and list((tmp_path / "cache").iterdir()) == []
    assert "not written" in short.note and "GiB free" in short.note
    roomy, out_roomy = compiled(reserve + 2**20)
    assert roomy.note is None and len(list((tmp_path / "cache").glob("*.blob"))) == 1
    assert np.array_equal(out_short, out_roomy)
    assert openvino_compile.weight_bytes(core.read_model(str(path))) == 16 * 16 * 4


def test_a_run_on_a_full_disk_says_its_models_were_not_cached(tiny_pair, tmp_path, monkeypatch):
    """The backend's notes carry the reason and no longer claim "(now cached)" for a model that wrote no blob."""
    import collections

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(openvino_compile, "SMALL_BLOB_BYTES", 0)
    monkeypatch.setattr(openvino_compile.shutil, "disk_usage", lambda p: Usage(100 * 2**30, 100 * 2**30, 0))
    manifest = read_manifest(tiny_pair)
    backend = OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *manifest.latent_shape), dtype=np.float32)
    plan = plan_trajectory("ddim", 4, len(manifest.models), x.shape, rng, ratio=0.5)
    notes = run_stitched(backend, plan, x, np.zeros(1, np.int64), 1.5, progress=False).notes
    assert list(tmp_path.glob("*.blob")) == [] and backend.compile_sources == ["compiled", "compiled"]
    assert any("not written" in n for n in notes), notes
    [models] = [n for n in notes if n.startswith("openvino models:")]
    assert "now cached" not in models and models.count("not cached: the disk's free-space reserve") == 2
