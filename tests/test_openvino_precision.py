"""bf16 only inside the matmul/conv body: the compiled runtime model says which nodes ran in which precision.

runtime/openvino_precision.py marks the numerically sensitive nodes to stay fp32; these tests read the
CPU plugin's runtime model back (each node's runtimePrecision and originalLayersNames), so they fail
if the marking stops reaching the plugin or if bf16 silently becomes fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.bundle.manifest import artifact_path, read_manifest  # noqa: E402
from tstitch_trt.runtime.io_roles import StepIO  # noqa: E402
from tstitch_trt.runtime.openvino_backend import compile_static, cpu_has_bf16  # noqa: E402
from tstitch_trt.runtime.openvino_precision import keep_f32_nodes, runtime_precisions  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(ov.Core()), reason="this CPU has no native bf16 (AVX512_BF16 / AMX)")


def _step_graph(bundle, index=1):
    manifest = read_manifest(bundle)
    core = ov.Core()
    model = core.read_model(str(artifact_path(bundle, manifest.models[index].engines["ort"])))
    io = StepIO.from_io(manifest.io)
    return core, model, {n: io.shape(n, {"B": 2}) for n in io.inputs}


def test_the_sensitive_nodes_are_found(tiny_pair):
    _, model, _ = _step_graph(tiny_pair)
    keep = keep_f32_nodes(model)
    by_type = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    kinds = {by_type[n] for n in keep}
    assert {"Sin", "Cos", "Softmax", "MVN", "Exp"} <= kinds
    assert "/denoiser/t_embedder/Mul" in keep, "t * freqs of the timestep embedding"
    assert {"x_next", "x0"} & keep or any("/Add" in n for n in keep)  # the sampler update
    assert not {"MatMul", "Convolution"} & kinds, "the body's matmuls / convs are bf16's to run"


@needs_bf16
def test_bf16_runs_the_body_only(tiny_pair):
    core, model, shapes = _step_graph(tiny_pair)
    keep = keep_f32_nodes(model)
    rows = runtime_precisions(compile_static(core, model, shapes, "bf16"))
    body = [(kind, prec) for kind, prec, _ in rows if kind in ("FullyConnected", "Convolution", "MatMul")]
    assert body and all(prec == "bf16" for _, prec in body), f"the body is not bf16: {body}"
    checked = set()
    for kind, prec, names in rows:
        marked = keep & set(names)
        if not marked or prec != "bf16":  # f32, or integer (shape math)
            checked |= marked
            continue
        # snippets' fused attention (MatMul-Softmax-MatMul in one Subgraph): bf16 is only at its brgemm
        # inputs (snippets' EnforcePrecision converts Brgemm inputs only); its softmax runs in fp32
        mha = kind == "Subgraph" and any("Softmax" in n for n in names) and sum("MatMul" in n for n in names) == 2
        assert mha and all("Softmax" in n for n in marked), f"{kind} ran {prec} with fp32-marked {sorted(marked)}"
        checked |= marked
    runtime = {kind: prec for kind, prec, names in rows for n in names if n == "/denoiser/t_embedder/Mul"}
    assert runtime and set(runtime.values()) == {"f32"}, "the timestep embedding's t * freqs is not fp32"
    assert {prec for kind, prec, _ in rows if kind == "MVN"} == {"f32"}, "a LayerNorm ran in bf16"
    tail = [prec for _, prec, names in rows if any(n in ("x_next", "x0") or n.endswith("/Exp") for n in names)]
    assert tail and set(tail) == {"f32"}, "the sampler update / learned-sigma math is not fp32"
    assert {"/denoiser/t_embedder/Mul"} <= checked


@needs_bf16
def test_fp32_is_all_fp32(tiny_pair):
    core, model, shapes = _step_graph(tiny_pair)
    precs = {prec for kind, prec, _ in runtime_precisions(compile_static(core, model, shapes, "fp32"))
             if kind in ("FullyConnected", "Convolution", "MVN", "Subgraph")}
    assert precs == {"f32"}


def test_marking_round_trips_the_topology_not_the_weights(tiny_pair, monkeypatch):
    """The IR written to mark nodes holds no weights (an SDXL U-Net's 10 GB copy filled the disk), the marked
    model computes what the unmarked one does (fp32: the marks change nothing there), and the caller's model
    is left with its own inputs and weights."""
    import numpy as np

    from tstitch_trt.runtime import openvino_precision

    core, model, shapes = _step_graph(tiny_pair)
    weights = sum(op.get_byte_size() for op in model.get_ordered_ops() if op.get_type_name() == "Constant")
    params_before = [p.get_friendly_name() for p in model.get_parameters()]
    written: list[int] = []
    real_save = ov.save_model

    def save_and_measure(m, path, **kw):
        real_save(m, path, **kw)
        written.append(Path(path).with_suffix(".bin").stat().st_size)

    monkeypatch.setattr(ov, "save_model", save_and_measure)
    marked = openvino_precision.mark_keep_f32(core, model, keep_f32_nodes(model))
    assert written and written[0] < weights / 100, f"the round trip wrote {written[0]} of {weights} weight bytes"
    assert [p.get_friendly_name() for p in model.get_parameters()] == params_before
    assert [p.get_friendly_name() for p in marked.get_parameters()] == params_before
    marks = {op.get_friendly_name() for op in marked.get_ordered_ops()
             if any(k.startswith("DisablePrecisionConversion") for k in op.get_rt_info().keys())}
    assert marks == keep_f32_nodes(model) & {op.get_friendly_name() for op in marked.get_ordered_ops()}
    rng = np.random.default_rng(0)
    feeds = {}
    for p in model.get_parameters():
        shape = shapes[p.get_friendly_name()]
        dtype = p.get_element_type().to_dtype()
        feeds[p.get_friendly_name()] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                                        else np.full(shape, 500, dtype=dtype))
    ref = compile_static(core, model, shapes, "fp32")(feeds)
    got = compile_static(core, marked, shapes, "fp32")(feeds)
    for a, b in zip(ref.values(), got.values(), strict=True):
        np.testing.assert_array_equal(a, b)
