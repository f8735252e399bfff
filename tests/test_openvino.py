"""The OpenVINO backend: the fp32 ONNX step graphs against the torch StepModule and ONNX Runtime, bf16, contract.

Tiny pairs/trios with every parameter randomized (conftest), so nothing compares zeros with zeros.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.bundle.manifest import read_manifest, sha256_file  # noqa: E402
from tstitch_trt.errors import UserError  # noqa: E402
from tstitch_trt.export.torch_backend import TorchBackend  # noqa: E402
from tstitch_trt.pipeline.dit import StitchedPipeline  # noqa: E402
from tstitch_trt.runtime.loop import NonFiniteError, run_stitched  # noqa: E402
from tstitch_trt.runtime.openvino_backend import OpenVinoBackend, cpu_has_bf16, resolve_precisions  # noqa: E402
from tstitch_trt.runtime.ort_backend import OrtBackend  # noqa: E402
from tstitch_trt.sampling.trajectory import plan_trajectory  # noqa: E402

CASES = [("ddim", 20), ("ddpm", 20), ("dpm-solver++", 10)]
NATIVE_BF16 = cpu_has_bf16(ov.Core())
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX512_BF16 / AMX)")
# bf16 trajectories on the tiny random pair, measured (OpenVINO 2026.4.1, AMD EPYC Zen 4, AVX512-BF16, no AMX):
# max rel 0.0039-0.0054 against torch fp32 over the 9 cases below, with the sensitive ops kept fp32
# (runtime/openvino_precision.py). Without that marking it was 0.051-0.089, almost all of it from the
# timestep embedding's t * freqs in bf16 (t=999 rounds to 1000); on an AMX Xeon it was NaN at t=999.
# The bound leaves ~3.7x for another ISA's kernels; the lower bound catches bf16 silently becoming fp32.
BF16_MAX_REL = 0.02


def _inputs(manifest, batch, sampler, steps, seed=0, ratio=None, fractions=None):
    rng = np.random.default_rng(seed)
    shape = (batch, *manifest.latent_shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    plan = plan_trajectory(sampler, steps, len(manifest.models), shape, rng, ratio=ratio, fractions=fractions)
    labels = (np.arange(batch, dtype=np.int64) * 3) % manifest.num_classes
    return plan, x, labels


def _rel(got, ref) -> float:
    scale = float(np.max(np.abs(ref)))
    assert scale > 0.1, "reference is near zero"
    return float(np.max(np.abs(got - ref))) / scale


@pytest.fixture(scope="module")
def pair(tiny_pair, tmp_path_factory):
    manifest = read_manifest(tiny_pair)
    cache = tmp_path_factory.mktemp("ov-cache")
    return (manifest, TorchBackend(tiny_pair, manifest, device="cpu"), OrtBackend(tiny_pair, manifest, threads=1),
            OpenVinoBackend(tiny_pair, manifest, precision="fp32", threads=1, cache_dir=cache),
            OpenVinoBackend(tiny_pair, manifest, precision="bf16", threads=1, cache_dir=cache) if NATIVE_BF16
            else None)


@pytest.mark.parametrize("sampler,steps", CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_openvino_equals_torch_and_ort(pair, sampler, steps, ratio):
    manifest, torch_b, ort_b, ov_b, _ = pair
    plan, x, labels = _inputs(manifest, 2, sampler, steps, ratio=ratio)
    ref = run_stitched(torch_b, plan, x, labels, 1.5, progress=False)
    got = run_stitched(ov_b, plan, x, labels, 1.5, progress=False)
    assert _rel(got.x, ref.x) < 1e-4, f"{sampler} ratio {ratio}: openvino vs torch"
    assert _rel(got.x, run_stitched(ort_b, plan, x, labels, 1.5, progress=False).x) < 1e-4
    assert len(got.step_ms) == steps and got.mode == "steps" and got.engine_ms is not None


@needs_bf16
@pytest.mark.parametrize("sampler,steps", CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_bf16_within_measured_tolerance(pair, sampler, steps, ratio):
    manifest, torch_b, _, ov_b, bf16_b = pair
    plan, x, labels = _inputs(manifest, 2, sampler, steps, ratio=ratio)
    ref = run_stitched(torch_b, plan, x, labels, 1.5, progress=False)
    got = run_stitched(bf16_b, plan, x, labels, 1.5, progress=False)
    assert bf16_b.precisions == ["bf16", "bf16"]
    err = _rel(got.x, ref.x)
    assert err < BF16_MAX_REL, f"{sampler} ratio {ratio}: bf16 max rel {err:.3g}"
    assert err > 1e-3, "bf16 gave fp32 results: the precision hint did not reach the network"


def test_trio_fractions(tiny_trio, tmp_path):
    manifest = read_manifest(tiny_trio)
    plan, x, labels = _inputs(manifest, 2, "dpm-solver++", 10, fractions=(0.3, 0.3, 0.4))
    assert set(plan.step_model.tolist()) == {0, 1, 2}
    ref = run_stitched(TorchBackend(tiny_trio, manifest, device="cpu"), plan, x, labels, 1.5, progress=False)
    got = run_stitched(OpenVinoBackend(tiny_trio, manifest, precision="fp32", threads=1, cache_dir=tmp_path),
                       plan, x, labels, 1.5, progress=False)
    assert _rel(got.x, ref.x) < 1e-4


def test_zero_copy_and_reuse_without_allocations(pair):
    manifest, _, _, ov_b, _ = pair
    plan, x, labels = _inputs(manifest, 3, "ddim", 4, ratio=0.5)
    run_stitched(ov_b, plan, x, labels, 1.5, progress=False)
    allocs, compiles = ov_b.allocations, ov_b.compiles
    # the requests' outputs are views of the backend's numpy buffers: a step writes x_next into x[1]
    req = ov_b._requests[0][0]
    x_pair, x0_pair = ov_b.state["x"], ov_b.state["prev_x0"]
    assert np.shares_memory(req.get_tensor("x_next").data, x_pair[1])
    assert np.shares_memory(req.get_tensor("x0").data, x0_pair[1])  # every state pair: read i % 2, write (i+1) % 2
    assert np.shares_memory(ov_b._requests[1][1].get_tensor("x").data, x_pair[1])
    ov_b.prepare(plan, x, labels, 1.5)
    x_pair[1][...] = np.nan
    ov_b.launch(0, 0)
    assert np.isfinite(x_pair[1]).all()  # written in place by OpenVINO, no copy back
    a = run_stitched(ov_b, plan, x, labels, 1.5, progress=False).x
    b = run_stitched(ov_b, plan, x, labels, 1.5, progress=False).x
    assert np.array_equal(a, b)
    assert (ov_b.allocations, ov_b.compiles) == (allocs, compiles)  # a reused backend allocates nothing


def test_nan_is_located(tiny_pair, tmp_path):
    import onnx
    from onnx import numpy_helper

    bundle = tmp_path / "nan"
    shutil.copytree(tiny_pair, bundle)
    manifest = read_manifest(bundle)
    entry = manifest.models[1].engines["ort"]
    model = onnx.load(str(bundle / entry.file))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(bundle / entry.file))
    entry.sha256 = sha256_file(bundle / entry.file)
    (bundle / "manifest.json").write_text(manifest.to_json())
    manifest = read_manifest(bundle)
    plan, x, labels = _inputs(manifest, 2, "ddim", 10, ratio=0.4)
    first_large = int(np.argmax(plan.step_model == 1))
    assert first_large > 0
    backend = OpenVinoBackend(bundle, manifest, precision="fp32", threads=1, cache_dir=tmp_path / "cache")
    with pytest.raises(NonFiniteError, match=rf"first at step {first_large} \(t={plan.timesteps[first_large]}\) "
                                             r"on DiT-B/2"):
        run_stitched(backend, plan, x, labels, 1.5, progress=False, model_names=[m.name for m in manifest.models])


def test_read_only_bundle_caches_outside_it(tiny_pair, tmp_path, monkeypatch):
    bundle = tmp_path / "ro"
    shutil.copytree(tiny_pair, bundle)
    before = sorted(p.name for p in bundle.rglob("*"))
    for p in [bundle, *bundle.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        pipe = StitchedPipeline.from_bundle(bundle, backend="openvino", precision="fp32")
        res = pipe([1, 2], ratio=0.4, steps=4, seed=0, progress=False, decode=False)
        pipe.close()
    finally:
        for p in [bundle, *bundle.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert sorted(p.name for p in bundle.rglob("*")) == before  # nothing written into the bundle
    cache = tmp_path / "xdg" / "tstitch-trt" / "openvino"
    assert any(cache.rglob("*.blob")), "OpenVINO's model cache went elsewhere"
    r = res.report
    assert r["backend"] == "openvino" and r["device"] == "cpu" and r["precision"] == ["fp32", "fp32"]
    assert r["steps_per_model"] == [2, 2] and len(r["step_ms"]) == 4 and len(r["engine_ms"]) == 4
    assert r["host_overhead_ms_per_step"] >= 0
    assert "openvino precision: fp32 (requested)" in r["notes"]


def test_precision_choice(tiny_pair):
    manifest = read_manifest(tiny_pair)
    assert resolve_precisions(manifest, "fp32", True, "avx512_bf16")[0] == ["fp32", "fp32"]
    precisions, why = resolve_precisions(manifest, "auto", True, "avx512_bf16")
    assert precisions == ["fp32", "fp32"] and "does not record bf16 as safe" in why
    manifest.models[0].bf16 = {"safe": True, "isa": ["avx512_bf16"]}
    precisions, why = resolve_precisions(manifest, "auto", True, "avx512_bf16")
    assert precisions == ["bf16", "fp32"] and "bf16 on DiT-S/2, fp32 elsewhere" in why
    manifest.models[1].bf16 = {"safe": True, "isa": ["avx512_bf16"]}
    assert resolve_precisions(manifest, "auto", True, "avx512_bf16") == (
        ["bf16", "bf16"], "bf16: the bundle records bf16 as safe on avx512_bf16 for every part")
    # a verdict covers only the ISAs it was measured on: AMX runs other kernels than AVX512-BF16
    precisions, why = resolve_precisions(manifest, "auto", True, "amx_bf16")
    assert precisions == ["fp32", "fp32"] and why == "fp32: bf16 verdict measured on avx512_bf16, this CPU is amx_bf16"
    manifest.models[1].bf16 = {"safe": True, "isa": ["amx_bf16", "avx512_bf16"]}
    precisions, why = resolve_precisions(manifest, "auto", True, "amx_bf16")
    assert precisions == ["fp32", "bf16"] and why.startswith("bf16 on DiT-B/2, fp32 elsewhere: bf16 verdict measured")
    manifest.models[0].bf16 = {"safe": True}  # recorded before verdicts named the ISA: covers no CPU
    precisions, why = resolve_precisions(manifest, "auto", True, "avx512_bf16")
    assert precisions == ["fp32", "bf16"] and "does not name the CPU ISA it was measured on" in why
    assert resolve_precisions(manifest, "auto", True, None)[0] == ["fp32", "fp32"]  # ISA unknown
    precisions, why = resolve_precisions(manifest, "auto", False, "avx512_bf16")
    assert precisions == ["fp32", "fp32"] and why == "fp32: this CPU has no native bf16"
    with pytest.raises(UserError, match="needs a CPU with native bf16"):
        resolve_precisions(manifest, "bf16", False, "avx512_bf16")


def test_bf16_is_only_for_openvino(tiny_pair, capsys):
    from tstitch_trt.cli import main

    assert main(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision bf16 is for --backend openvino") and err.count("\n") == 1


def test_auto_prefers_openvino_on_the_cpu(tiny_pair):
    pipe = StitchedPipeline.from_bundle(tiny_pair, backend="auto")
    assert pipe.backend.name == "openvino" and "using OpenVINO (CPU)" in pipe.backend_reason
    pipe.close()


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tstitch_trt.runtime.openvino_backend, tstitch_trt.pipeline.backends\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_openvino_missing_is_one_line(tiny_pair, tmp_path):
    """openvino made unimportable: --backend openvino is one line, exit 2; auto falls back to ONNX Runtime."""
    block = "import sys; sys.modules['openvino'] = None\nfrom tstitch_trt.cli import main\n"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    run = [sys.executable, "-c", block + "sys.exit(main(sys.argv[1:]))", "run", "--bundle", str(tiny_pair),
           "--steps", "2", "--no-progress", "--report", str(tmp_path / "r.json"),
           "--save-latents", str(tmp_path / "z.npy")]
    proc = subprocess.run([*run, "--backend", "openvino"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == 'error: the openvino backend needs OpenVINO: pip install "tstitch-trt[openvino]" ' \
                          "(or use --backend ort)\n"
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "ort" and "OpenVINO is not installed" in report["backend_reason"]
