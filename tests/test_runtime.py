"""The stitched loop on the CPU backends: ONNX Runtime (fp32 step graphs) against the torch StepModule.

Tiny pairs/trios with every parameter randomized (conftest.tiny_pair / tiny_trio, built once per
session), so the comparisons are not zeros against zeros.
"""

from __future__ import annotations

import io
import shutil
import threading

import numpy as np
import pytest

from tstitch_trt.bundle.manifest import read_manifest, sha256_file
from tstitch_trt.export.torch_backend import TorchBackend
from tstitch_trt.pipeline.dit import StitchedPipeline
from tstitch_trt.runtime.loop import Cancelled, NonFiniteError, _progress_bar, run_stitched
from tstitch_trt.runtime.ort_backend import OrtBackend
from tstitch_trt.sampling.stitch import stitch_schedule
from tstitch_trt.sampling.trajectory import plan_trajectory

CASES = [("ddim", 20), ("ddpm", 20), ("dpm-solver++", 10)]


def _inputs(manifest, batch, sampler, steps, seed=0, ratio=None, fractions=None):
    rng = np.random.default_rng(seed)
    shape = (batch, *manifest.latent_shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    plan = plan_trajectory(sampler, steps, len(manifest.models), shape, rng, ratio=ratio, fractions=fractions)
    labels = (np.arange(batch, dtype=np.int64) * 3) % manifest.num_classes
    return plan, x, labels


@pytest.fixture(scope="module")
def pair_backends(tiny_pair):
    manifest = read_manifest(tiny_pair)
    return manifest, OrtBackend(tiny_pair, manifest, threads=1), TorchBackend(tiny_pair, manifest, device="cpu")


def _assert_same(got, ref, what):
    scale = float(np.max(np.abs(ref)))
    assert scale > 0.1, f"{what}: reference is near zero"
    diff = float(np.max(np.abs(got - ref)))
    assert diff < 1e-4 * scale, f"{what}: max |ort - torch| = {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("sampler,steps", CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_ort_equals_torch_pair(pair_backends, sampler, steps, ratio):
    manifest, ort_b, torch_b = pair_backends
    plan, x, labels = _inputs(manifest, 2, sampler, steps, ratio=ratio)
    assert (plan.noise is not None) == (sampler == "ddpm")  # both backends get the same noise table
    ref = run_stitched(torch_b, plan, x, labels, 1.5, progress=False)
    got = run_stitched(ort_b, plan, x, labels, 1.5, progress=False)
    _assert_same(got.x, ref.x, f"{sampler} ratio {ratio}")
    assert len(got.step_ms) == steps and got.mode == "steps"


@pytest.mark.parametrize("sampler,steps", CASES)
def test_ort_equals_torch_trio(tiny_trio, sampler, steps):
    manifest = read_manifest(tiny_trio)
    fractions = (0.3, 0.3, 0.4)
    plan, x, labels = _inputs(manifest, 2, sampler, steps, fractions=fractions)
    assert set(plan.step_model.tolist()) == {0, 1, 2}
    ref = run_stitched(TorchBackend(tiny_trio, manifest, device="cpu"), plan, x, labels, 1.5, progress=False)
    got = run_stitched(OrtBackend(tiny_trio, manifest, threads=1), plan, x, labels, 1.5, progress=False)
    _assert_same(got.x, ref.x, f"{sampler} fractions {fractions}")


def test_models_differ(pair_backends):
    """Guards the comparisons above: the small and large model must not give the same trajectory."""
    manifest, ort_b, _ = pair_backends
    outs = []
    for ratio in (0.0, 1.0):
        plan, x, labels = _inputs(manifest, 2, "ddim", 10, ratio=ratio)
        outs.append(run_stitched(ort_b, plan, x, labels, 1.5, progress=False).x)
    assert float(np.max(np.abs(outs[0] - outs[1]))) > 1e-2


@pytest.fixture(scope="module")
def pipe(tiny_pair):
    p = StitchedPipeline.from_bundle(tiny_pair, backend="ort", device="cpu")
    yield p
    p.close()


def test_report_step_model_is_the_stitch_schedule(pipe):
    res = pipe([1, 2], ratio=0.4, steps=100, sampler="ddim", seed=0, progress=False, decode=False)
    r = res.report
    want = stitch_schedule(np.asarray(r["timesteps"]), 2, ratio=0.4)
    assert r["step_model"] == want.tolist()
    assert r["steps_per_model"] == [40, 60]  # T-Stitch: r = 0.4 of 100 DDIM steps on the small model
    assert r["step_model"][:40] == [0] * 40 and r["timesteps"][0] > r["timesteps"][-1]
    assert len(r["step_ms"]) == 100 and r["loop_mode"] == "steps"


def test_same_seed_same_result_and_no_new_allocations(pipe):
    a = pipe([3, 4], ratio=0.4, steps=12, sampler="ddpm", seed=7, progress=False, decode=False)
    allocs = pipe.backend.allocations
    b = pipe([3, 4], ratio=0.4, steps=12, sampler="ddpm", seed=7, progress=False, decode=False)
    assert pipe.backend.allocations == allocs  # a reused pipeline allocates nothing
    assert np.array_equal(a.latents, b.latents)
    c = pipe([3, 4], ratio=0.4, steps=12, sampler="ddpm", seed=8, progress=False, decode=False)
    assert not np.array_equal(a.latents, c.latents)
    assert pipe.backend.allocations == allocs


def test_nan_is_located(tiny_pair, tmp_path):
    """A NaN weight in the large model: the error names the first step the large model ran, and the model."""
    import onnx
    from onnx import numpy_helper

    bundle = tmp_path / "nan"
    shutil.copytree(tiny_pair, bundle)
    manifest = read_manifest(bundle)
    entry = manifest.models[1].engines["ort"]
    model = onnx.load(str(bundle / entry.file))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # a big weight matrix
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
    with pytest.raises(NonFiniteError, match=rf"first at step {first_large} \(t={plan.timesteps[first_large]}\) "
                                             rf"on DiT-B/2"):
        run_stitched(OrtBackend(bundle, manifest, threads=1), plan, x, labels, 1.5, progress=False,
                     model_names=[m.name for m in manifest.models])


def test_progress_bar_only_on_a_tty(monkeypatch, pipe, capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _progress_bar(100, None) is None  # not a terminal: no bar
    monkeypatch.setattr("sys.stderr", Tty())
    bar = _progress_bar(100, None)
    assert bar is not None
    bar.close()
    assert _progress_bar(100, False) is None and _progress_bar(5, None) is None  # off, or too short to matter
    monkeypatch.undo()
    pipe([1], ratio=0.4, steps=30, seed=0, decode=False)  # progress=None under pytest: stderr is no TTY
    assert "step" not in capsys.readouterr().err


def test_a_cancelled_loop_stops_between_steps(pair_backends):
    """The serve replica's cancel event: set by another thread, the loop stops before its next step."""
    manifest, ort_b, _ = pair_backends
    plan, x, labels = _inputs(manifest, 1, "ddim", 10, ratio=0.4)
    cancel = threading.Event()
    launched: list[int] = []
    launch = ort_b.launch

    def launch_then_cancel(i, model):
        launched.append(i)
        if i == 3:
            cancel.set()  # as the batcher's callback does when the last caller gives up
        return launch(i, model)

    ort_b.launch = launch_then_cancel
    try:
        with pytest.raises(Cancelled, match="before step 4"):
            run_stitched(ort_b, plan, x, labels, 1.5, progress=False, cancel=cancel)
    finally:
        del ort_b.launch
    assert launched == [0, 1, 2, 3]
    with pytest.raises(Cancelled, match="before step 0"):  # already set: nothing runs
        run_stitched(ort_b, plan, x, labels, 1.5, progress=False, cancel=cancel)
    cancel.clear()
    assert run_stitched(ort_b, plan, x, labels, 1.5, progress=False, cancel=cancel).x.shape == x.shape
