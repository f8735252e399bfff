"""ONNX step graphs (fp32 / fp16), external data, the VAE decoder, bundles, recipes and `check`.

Tiny random DiTs (every parameter random: a fresh DiT outputs zeros) keep this fast on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tstitch_trt.bundle.manifest import (
    EngineEntry,
    Manifest,
    ModelEntry,
    artifact_path,
    read_manifest,
    sha256_file,
)
from tstitch_trt.errors import UserError
from tstitch_trt.export import onnx_export
from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle
from tstitch_trt.export.check import TOLERANCES, compare, run_check, step_inputs
from tstitch_trt.export.onnx_export import check_step_graph_typing, export_step_graph, external_data_files
from tstitch_trt.export.step_module import STEP_INPUTS, STEP_OUTPUTS, StepModule
from tstitch_trt.models.dit import dit_config, randomized_dit

TINY = {"DiT-S/2": {"depth": 2, "hidden_size": 64, "num_heads": 2},
        "DiT-B/2": {"depth": 3, "hidden_size": 96, "num_heads": 2}}
NUM_CLASSES = 10


def tiny_step(arch: str = "DiT-S/2", seed: int = 1) -> StepModule:
    cfg = dataclasses.replace(dit_config(arch, input_size=8, num_classes=NUM_CLASSES), **TINY[arch])
    return StepModule(randomized_dit(cfg, seed=seed)).eval()


def feeds_for(step: StepModule, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = step.denoiser.config
    m = Manifest("dit-class-conditional", [ModelEntry("m", "dit", cfg.to_dict())], NUM_CLASSES, 64, 0.18215, 3)
    return step_inputs(m, batch, seed)


def torch_step(step: StepModule, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = step(*(torch.from_numpy(feeds[n]) for n in STEP_INPUTS))
    return {n: o.numpy() for n, o in zip(STEP_OUTPUTS, out, strict=True)}


def ort_step(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(STEP_OUTPUTS, sess.run(list(STEP_OUTPUTS), feeds), strict=True))


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.fixture(scope="module")
def step() -> StepModule:
    return tiny_step()


@pytest.fixture(scope="module")
def graphs(step, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("graphs")
    return {p: export_step_graph(step, d / f"s-{p}.onnx", p) for p in ("fp32", "fp16")}


# --- step graphs ---------------------------------------------------------------------------------
def test_fp32_graph_is_valid_and_matches_torch(step, graphs):
    onnx.checker.check_model(str(graphs["fp32"]), full_check=True)
    feeds = feeds_for(step, batch=3)  # exported at batch 2: the batch axis is dynamic
    ref, out = torch_step(step, feeds), ort_step(graphs["fp32"], feeds)
    for name in STEP_OUTPUTS:
        scale = np.abs(ref[name]).max()
        assert scale > 0.1, "the reference must not be trivially small"
        assert np.abs(out[name] - ref[name]).max() < 1e-4 * scale


def test_fp16_graph_typing(graphs):
    model = onnx.load(str(graphs["fp16"]))
    onnx.checker.check_model(model, full_check=True)
    types = elem_types(model)
    F32, F16, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64
    assert {i.name: types[i.name] for i in model.graph.input} == {
        "x": F32, "t": I64, "y": I64, "guidance": F32, "coef": F32, "prev_x0": F32, "noise": F32}
    assert {o.name: types[o.name] for o in model.graph.output} == {"x_next": F32, "x0": F32}
    seen: dict[str, set[int]] = {}
    for node in model.graph.node:
        float_inputs = {types[i] for i in node.input if i and types.get(i) in (F32, F16)}
        seen.setdefault(node.op_type, set()).update(float_inputs)
    # the network's weights and matmuls are fp16; statistics and the variance exp stay fp32
    assert seen["MatMul"] == seen["Gemm"] == seen["Conv"] == {F16}
    assert seen["LayerNormalization"] == seen["Softmax"] == seen["Exp"] == {F32}
    big_weights = [i for i in model.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 64]
    assert big_weights and all(i.data_type == F16 for i in big_weights)
    assert check_step_graph_typing(model, "fp16")["MatMul"] == {"FLOAT16": 13}


def test_typing_check_rejects_the_wrong_precision(graphs):
    with pytest.raises(RuntimeError, match="not typed as designed"):
        check_step_graph_typing(onnx.load(str(graphs["fp16"])), "fp32")


def test_fp16_step_error_is_small_but_real(step, graphs):
    feeds = feeds_for(step, batch=2)
    ref = torch_step(step, feeds)
    out = ort_step(graphs["fp16"], feeds)
    for name in STEP_OUTPUTS:
        m = compare(ref[name], out[name])
        assert m["max_rel"] > 1e-6, "an fp16 network must differ from fp32 somewhat"
        assert m["max_rel"] < TOLERANCES["fp16"]["max_rel"] and m["cosine"] > TOLERANCES["fp16"]["min_cos"]


def test_export_does_not_touch_the_callers_module(step, tmp_path):
    before = {k: v.clone() for k, v in step.state_dict().items()}
    export_step_graph(step, tmp_path / "g.onnx", "fp16")
    assert step.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in step.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no raw export left behind


def test_large_graph_uses_external_data_and_checksums_cover_it(step, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TWO_GB", 100_000)  # treat the tiny graph as "over 2 GB"
    path = export_step_graph(step, tmp_path / "onnx" / "g-fp32.onnx", "fp32")
    data = external_data_files(path)
    assert [p.name for p in data] == ["g-fp32.onnx.data"] and data[0].stat().st_size > path.stat().st_size
    assert data[0].stat().st_mode & 0o044 == 0o044  # readable by others, like the rest of the bundle
    onnx.checker.check_model(str(path))
    feeds = feeds_for(step)
    ref, out = torch_step(step, feeds), ort_step(path, feeds)
    assert np.abs(out["x_next"] - ref["x_next"]).max() < 1e-4 * np.abs(ref["x_next"]).max()

    from tstitch_trt.export.build import _entry

    cfg = BuildConfig(models=[], out=tmp_path)
    entry = _entry(tmp_path, "onnx/g-fp32.onnx", "fp32", cfg)
    assert entry.extra["external_data"] == [{"file": "onnx/g-fp32.onnx.data", "sha256": sha256_file(data[0])}]
    artifact_path(tmp_path, EngineEntry.from_dict(json.loads(json.dumps(dataclasses.asdict(entry)))))
    with open(data[0], "r+b") as f:  # flip one weight byte: the graph file itself is unchanged
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UserError, match="checksum mismatch .*g-fp32.onnx.data"):
        artifact_path(tmp_path, entry)
    data[0].unlink()
    with pytest.raises(UserError, match="missing"):
        artifact_path(tmp_path, entry)


# --- VAE decoder ---------------------------------------------------------------------------------
def test_vae_decoder_fp16_graph_psnr(tmp_path):
    from tstitch_trt.export.vae_export import export_vae_decoder, fp16_decode_psnr, randomized_vae

    vae = randomized_vae((32, 64), seed=0)
    lat = (4, 8, 8)
    p32 = export_vae_decoder(vae, tmp_path / "d32.onnx", lat, "fp32")
    p16 = export_vae_decoder(vae, tmp_path / "d16.onnx", lat, "fp16")
    z = np.random.default_rng(0).standard_normal((2, *lat), dtype=np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z)).sample.numpy()
    out32 = ort.InferenceSession(str(p32), providers=["CPUExecutionProvider"]).run(None, {"latent": z})[0]
    assert out32.shape == (2, 3, 16, 16) and np.abs(out32 - ref).max() < 1e-4 * np.abs(ref).max()
    model = onnx.load(str(p16))
    types = elem_types(model)
    convs = {types[n.input[0]] for n in model.graph.node if n.op_type == "Conv"}
    ops = {n.op_type for n in model.graph.node}
    assert "InstanceNormalization" not in ops  # GroupNorm's statistics are the two-level ReduceMeans
    norms = {types[n.input[0]] for n in model.graph.node if n.op_type in ("ReduceMean", "Softmax")}
    assert convs == {onnx.TensorProto.FLOAT16} and norms == {onnx.TensorProto.FLOAT}
    assert types["latent"] == types["image"] == onnx.TensorProto.FLOAT
    psnr = fp16_decode_psnr(p32, p16, lat)
    assert 40 < psnr < 200  # measured ~72 dB on this model; finite: fp16 really differs


def test_vae_group_norm_statistics_in_two_levels_are_exact_where_one_sum_is_not(tmp_path):
    """A 1M-element group (the SD VAE decoder's last level at 512 px): torch's export (one InstanceNormalization)
    is off float64 on ONNX Runtime by its fp32 lanes; the two-level form the VAE export uses is not."""
    from tstitch_trt.export.vae_export import _GroupNormTwoLevel

    norm = torch.nn.GroupNorm(2, 8, eps=1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(1, 8, 512, 512, generator=torch.Generator().manual_seed(0)) + 2.0).numpy()
    x64 = torch.from_numpy(x).double()
    ref = torch.nn.functional.group_norm(x64, 2, norm.weight.double(), norm.bias.double(), 1e-6).numpy()
    errors = {}
    for name, module in (("one sum", norm), ("two levels", _GroupNormTwoLevel(norm))):
        path = tmp_path / f"{name.replace(' ', '_')}.onnx"
        torch.onnx.export(module, (torch.from_numpy(x[:, :, :16, :16]),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}},
                          opset_version=onnx_export.OPSET, dynamo=False)
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
    assert errors["two levels"] < 2e-6, errors  # measured 1.8e-7 (fp32 rounding of the output)
    assert errors["one sum"] > 3 * errors["two levels"], errors  # measured 9.3e-6: the error this form removes


def test_vae_decoder_graph_is_dynamic_in_batch_and_size(tmp_path):
    from tstitch_trt.export.vae_export import export_vae_decoder, randomized_vae

    vae = randomized_vae((32, 64), seed=1)
    path = export_vae_decoder(vae, tmp_path / "d.onnx", (4, 8, 8), "fp32", dynamic_hw=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 4, 8, 8), (2, 4, 12, 6), (3, 4, 5, 9)):
        z = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        with torch.no_grad():
            ref = vae.decode(torch.from_numpy(z)).sample.numpy()
        out = sess.run(None, {"latent": z})[0]
        assert out.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


# --- bundles, check, interrupted builds, recipes --------------------------------------------------
def tiny_config(out: Path, backends: list[str], **kw) -> BuildConfig:
    return BuildConfig(models=[ModelSpec("DiT-S/2", "random:1"), ModelSpec("DiT-B/2", "random:2")], out=out,
                       backends=backends, image_size=64, num_classes=NUM_CLASSES, batch_range=(1, 4),
                       arch_overrides=TINY, **kw)


def check_args(bundle: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(bundle=str(bundle), backend=kw.get("backend"), batch=kw.get("batch", 2),
                              seed=0, report=kw.get("report"))


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(tiny_config(out, ["torch", "ort"]))
    return out


def test_ort_bundle_passes_check(ort_bundle, tmp_path, capsys):
    report = tmp_path / "check.json"
    assert run_check(check_args(ort_bundle, report=str(report))) == 0
    text = capsys.readouterr().out
    assert "DiT-S/2" in text and "DiT-B/2" in text and "x_next" in text and "x0" in text
    rows = json.loads(report.read_text())
    onnx_backends = ("ort", "openvino") if importlib.util.find_spec("openvino") else ("ort",)  # same ONNX graphs
    assert {(r["model"], r["backend"], r["output"]) for r in rows} == {
        (m, b, o) for m in ("DiT-S/2", "DiT-B/2") for b in onnx_backends for o in ("x_next", "x0")}
    assert all(r["status"] == "ok" and r["max_rel"] < 1e-4 and r["cosine"] > 0.999999 for r in rows)


def test_tampered_bundle_fails_check(ort_bundle, tmp_path):
    bundle = tmp_path / "tampered"
    shutil.copytree(ort_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["models"][1]["engines"]["ort"]
    path = bundle / entry["file"]
    model = onnx.load(str(path))
    w = max(model.graph.initializer, key=lambda i: len(i.raw_data))  # the largest weight
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[: arr.size // 2] *= 1.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(path))
    # bytes changed, checksum not: the bundle is refused before any comparison
    with pytest.raises(UserError, match="checksum mismatch"):
        run_check(check_args(bundle))
    # a re-signed manifest: the numbers themselves must catch it
    entry["sha256"] = sha256_file(path)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert run_check(check_args(bundle)) == 1


def test_check_needs_torch_reference_and_known_backends(tmp_path, ort_bundle):
    no_torch = tmp_path / "nt"
    build_bundle(tiny_config(no_torch, ["ort"]))
    with pytest.raises(UserError, match="no torch weights"):
        run_check(check_args(no_torch))
    with pytest.raises(UserError, match="no trt-rtx artifacts"):
        run_check(check_args(ort_bundle, backend="trt-rtx"))
    with pytest.raises(UserError, match="cannot be checked"):
        run_check(check_args(ort_bundle, backend="onnx"))


def test_interrupted_build_leaves_previous_bundle_untouched(tmp_path, monkeypatch):
    from tstitch_trt.export import trt_build

    out = tmp_path / "engines" / "pair"
    build_bundle(tiny_config(out, ["ort"]))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    class FailsOnSecondModel:
        calls = 0

        def build(self, onnx_path, plan_path, batch_range, io_spec):
            FailsOnSecondModel.calls += 1
            if FailsOnSecondModel.calls == 2:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
            Path(plan_path).parent.mkdir(parents=True, exist_ok=True)
            Path(plan_path).write_bytes(b"plan")
            return {"module": "fake"}

    monkeypatch.setattr(trt_build, "make_engine_builder", lambda *a, **k: FailsOnSecondModel())
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny_config(out, ["torch", "ort", "trt-rtx"]))
    assert FailsOnSecondModel.calls == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pair"]  # no .tmp / .old directories left
    assert read_manifest(out).backends() == ["ort"]


def test_cli_build_from_recipe(tmp_path, capsys):
    from tstitch_trt.cli import main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
name = "tiny"
image_size = 64
num_classes = {NUM_CLASSES}
backend = "ort"
batch_sizes = "2-3"
out = "{tmp_path / 'out'}"

[arch_overrides."DiT-S/2"]
depth = 2
hidden_size = 64
num_heads = 2

[arch_overrides."DiT-B/2"]
depth = 3
hidden_size = 96
num_heads = 2

[[models]]
arch = "DiT-S/2"
checkpoint = "random:1"

[[models]]
arch = "DiT-B/2"
checkpoint = "random:2"
""")
    assert main(["build", "--recipe", str(recipe), "--batch-sizes", "1-2"]) == 0  # flags override the recipe
    m = read_manifest(tmp_path / "out")
    assert [x.name for x in m.models] == ["DiT-S/2", "DiT-B/2"] and m.backends() == ["ort"]
    assert m.models[0].arch["depth"] == 2 and m.models[0].engines["ort"].batch_range == (1, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text() + "precision = 'fp16'\n")  # lands inside the last [[models]]
    assert main(["build", "--recipe", str(bad)]) == 2
    assert "unknown setting 'precision' in a [[models]] entry" in capsys.readouterr().err


@pytest.mark.parametrize("name, models", [("dit-s2-xl2-256", ["DiT-S/2", "DiT-XL/2"]),
                                          ("dit-s2-b2-xl2-256", ["DiT-S/2", "DiT-B/2", "DiT-XL/2"])])
def test_shipped_recipes(name, models):
    from tstitch_trt.cli import build_parser
    from tstitch_trt.recipes import build_config_from_args

    path = Path(__file__).resolve().parents[1] / "export" / f"{name}.toml"
    cfg = build_config_from_args(build_parser().parse_args(["build", "--recipe", str(path)]))
    assert [m.arch for m in cfg.models] == models
    assert cfg.precision == "fp16" and "trt" in cfg.backends and cfg.image_size == 256
    assert cfg.batch_range == (1, 16) and cfg.num_classes == 1000
    assert all(m.checkpoint.startswith("pretrained_models/") for m in cfg.models)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_streamed_export_equals_the_in_memory_one(step, tmp_path, monkeypatch, precision):
    """The path real sizes take (weights moved out of the protos, the graph cleaned and type-checked weightless,
    written with one external .data file) gives the same graph as the in-memory path, fp16 typing included."""
    whole = export_step_graph(step, tmp_path / "a" / "g.onnx", precision)
    monkeypatch.setattr(onnx_export, "STREAM_ABOVE", 0)
    streamed = export_step_graph(step, tmp_path / "b" / "g.onnx", precision)
    assert external_data_files(whole) == []
    assert [p.name for p in external_data_files(streamed)] == ["g.onnx.data"]
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["g.onnx", "g.onnx.data"]  # no raw files left
    check_step_graph_typing(onnx.load(str(streamed), load_external_data=False), precision)
    feeds = feeds_for(step)
    a, b = ort_step(whole, feeds), ort_step(streamed, feeds)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1e-6 * max(1.0, float(np.abs(a[name]).max())), name


def test_streaming_per_weight_files_removes_each_once_copied(tmp_path):
    """Over 2 GB torch writes one raw file per weight: streamed into the .data, each raw file is deleted once its
    bytes are copied (an SDXL U-Net's 10.3 GB are never on disk twice), and the graph computes the same."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((64, 64), dtype=np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    raw = tmp_path / "raw"
    raw.mkdir()
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0)
    onnx.save_model(model, str(raw / "raw.onnx"))
    assert len(list(raw.iterdir())) == 4  # the graph and one file per weight
    header = onnx.load(str(raw / "raw.onnx"), load_external_data=False)
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    onnx_export.stream_external_data(header, raw, out)
    assert sorted(p.name for p in raw.iterdir()) == ["raw.onnx"]  # every weight file removed (or moved)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ ws[0] @ ws[1] @ ws[2], rtol=1e-5, atol=1e-4)


def test_finish_export_inlines_external_constant_attributes(tmp_path):
    """Over 2 GB torch also writes Constant nodes' tensors to their own files (DiT-XL/2's FORA graph); the export
    puts them back inline, so the bundle's graph checks and runs without the raw files (it failed the checker)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((64, 64), dtype=np.float32), rng.standard_normal((2, 64), dtype=np.float32)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c_value")),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    raw = tmp_path / "raw"
    raw.mkdir()
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    onnx.save_model(model, str(raw / "raw.onnx"))
    assert len(list(raw.iterdir())) == 3  # the graph, the weight and the Constant's tensor
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    onnx_export.finish_export(raw / "raw.onnx", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.onnx", "g.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in header.graph.initializer if i.data_location == TensorProto.EXTERNAL] == ["w"]
    for name in [p.name for p in raw.iterdir() if p.name != "raw.onnx"]:
        (raw / name).unlink()  # the bundle's graph must not need anything left in the raw export's folder
    x = rng.standard_normal((2, 64), dtype=np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w + c, rtol=1e-5, atol=1e-4)
