"""DeepCache composed with T-Stitch (issue 25): `tstitch-trt run --cache-interval N --cache-branch K` equals diffusers'
StableDiffusionPipeline wrapped by the `deepcache` package's DeepCacheSDHelper (its own code: models/diffusers_peer
start_deepcache), with the same cache_interval / cache_branch_id; stitched, equal to that peer switched by callback
with its helper started afresh on the large U-Net at the switch. Final latents to 1e-4 of the largest magnitude.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("DeepCache", reason="pip install --no-deps deepcache (scripts/test.sh installs it)")

from conftest import build_sd  # noqa: E402
from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.models.diffusers_peer import end_deepcache, stitch_by_callback  # noqa: E402
from tstitch_trt.sampling.cache_plan import cached_calls  # noqa: E402
from tstitch_trt.sampling.sd_samplers import sd_table  # noqa: E402

CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}
PROMPT = "a photo of a cat sitting on a red chair"
STEPS, SIZE = 8, 32  # latent 4x16x16 with the dummy VAE (factor 2)
BRANCHES = (0, 3)  # the shallowest layer of up block 0; up block 1 (both tiny U-Nets have them)


@pytest.fixture(scope="module")
def cache_bundles(sd_pair, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("sd-cache-bundles")
    return {k: build_sd(root / f"k{k}", list(sd_pair), "--cache-branch", str(k)) for k in BRANCHES}


@pytest.fixture(scope="module")
def peer(sd_pair):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    small, large = sd_pair
    pipe = StableDiffusionPipeline.from_pretrained(str(large), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small)).eval()
    large_unet = pipe.unet
    default_scheduler = pipe.scheduler.config

    def run(sampler: str, ratio: float, latents: np.ndarray, cache: tuple[int, int] | None) -> np.ndarray:
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(default_scheduler)
        n_calls = len(sd_table(sampler, dict(default_scheduler), STEPS).timesteps)
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio, cache=cache)
        try:
            with torch.no_grad():
                out = pipe([PROMPT] * latents.shape[0], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                           guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="latent",
                           callback_on_step_end=switch)
        finally:
            end_deepcache(small_unet)
            end_deepcache(large_unet)
            pipe.unet = large_unet
        return np.asarray(out.images)

    return run


def unit_latents(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def run_cli(bundle: Path, tmp: Path, backend: str, sampler: str, ratio: float, init: np.ndarray,
            *flags: str) -> tuple[np.ndarray, dict]:
    np.save(tmp / "init.npy", init)
    args = ["run", "--bundle", str(bundle), "--backend", backend, "--prompt", PROMPT, "--sampler", sampler,
            "--steps", str(STEPS), "--ratio", str(ratio), "--init-noise", str(tmp / "init.npy"),
            "--save-latents", str(tmp / "out.npy"), "--report", str(tmp / "report.json"), "--out", str(tmp / "o.png"),
            *flags]
    assert main(args) == 0
    return np.load(tmp / "out.npy"), json.loads((tmp / "report.json").read_text())


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# every (branch, interval) on ORT; the torch StepModule on two of them (CI time: each case runs both pipelines)
ONE_MODEL = [("ort", k, n) for k in BRANCHES for n in (2, 3)] + [("torch", 0, 3), ("torch", 3, 2)]
STITCHED = [("pndm", 0.4, 2, 0), ("pndm", 0.4, 3, 3), ("pndm", 0.6, 3, 0), ("ddim", 0.4, 2, 3), ("euler", 0.5, 3, 0)]


@pytest.mark.parametrize("backend,branch,interval", ONE_MODEL)
def test_one_model_equals_deepcache(cache_bundles, peer, tmp_path, backend, branch, interval) -> None:
    init = unit_latents()
    ref = peer("pndm", 0.0, init, (interval, branch))
    got, report = run_cli(cache_bundles[branch], tmp_path, backend, "pndm", 0.0, init,
                          "--cache-interval", str(interval), "--cache-branch", str(branch))
    assert np.abs(ref).max() > 0.1
    assert rel_diff(got, ref) < 1e-4, f"{backend} K={branch} N={interval}: {rel_diff(got, ref):.2e}"
    cache = report["cache"]
    assert cache["interval"] == interval and cache["branch"] == branch
    assert cache["cached_calls"] and 0 in cache["full_calls"]
    if backend == "ort":  # the comparison can fail: caching changes the result against the peer without it
        assert rel_diff(got, peer("pndm", 0.0, init, None)) > 1e-3


@pytest.mark.parametrize("backend,sampler,ratio,interval,branch",
                         [("ort", *c) for c in STITCHED] + [("torch", *STITCHED[1]), ("torch", *STITCHED[3])])
def test_stitched_equals_deepcache_switched(cache_bundles, peer, tmp_path, backend, sampler, ratio, interval,
                                            branch) -> None:
    init = unit_latents()
    ref = peer(sampler, ratio, init, (interval, branch))
    got, report = run_cli(cache_bundles[branch], tmp_path, backend, sampler, ratio, init,
                          "--cache-interval", str(interval))
    assert rel_diff(got, ref) < 1e-4, f"{backend} {sampler} r={ratio} K={branch} N={interval}: {rel_diff(got, ref):.2e}"
    models = report["step_model"]
    switch = models.index(1)
    assert switch > 0 and switch in report["cache"]["full_calls"]  # the large model's first call is full


def test_openvino_equals_ort(cache_bundles, tmp_path, monkeypatch) -> None:
    """...and the cached step graphs go through the blob cache (runtime/openvino_compile.py) like the full ones:
    a second run reads no step graph's ONNX, cached graphs included, and gives the same latents."""
    pytest.importorskip("openvino")
    from tstitch_trt.runtime import openvino_backend

    reads: list[str] = []
    real = openvino_backend.read_onnx
    monkeypatch.setattr(openvino_backend, "read_onnx", lambda core, path: reads.append(path.name) or real(core, path))
    monkeypatch.setenv("TSTITCH_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    init = unit_latents()
    flags = ("--cache-interval", "3")
    ov, _ = run_cli(cache_bundles[0], tmp_path, "openvino", "pndm", 0.4, init, "--precision", "fp32", *flags)
    manifest = read_manifest(cache_bundles[0])
    cached_files = {Path(m.cached["engines"]["ort"].file).name for m in manifest.models}
    assert cached_files <= set(reads)  # a cold cache: the cached graphs were read and compiled
    reads.clear()
    again, _ = run_cli(cache_bundles[0], tmp_path, "openvino", "pndm", 0.4, init, "--precision", "fp32", *flags)
    assert reads == [] and np.array_equal(again, ov)
    ort, _ = run_cli(cache_bundles[0], tmp_path, "ort", "pndm", 0.4, init, *flags)
    assert rel_diff(ov, ort) < 1e-4


def test_interval_one_is_the_plain_run(cache_bundles, sd_bundle, tmp_path) -> None:
    """A bundle with cached graphs, run without caching, equals the bundle without them."""
    init = unit_latents()
    got, report = run_cli(cache_bundles[3], tmp_path, "ort", "pndm", 0.4, init)
    plain, _ = run_cli(sd_bundle, tmp_path, "ort", "pndm", 0.4, init)
    assert report["cache"] is None
    assert rel_diff(got, plain) < 1e-5


def test_plan_follows_deepcache_counting() -> None:
    """PNDM repeats its second timestep: DeepCache indexes both calls by the first occurrence; a switch restarts."""
    ts = np.array([901, 881, 881, 861, 841, 821, 801, 781])
    models = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    assert cached_calls(ts, np.zeros(8, int), 2).tolist() == [False, True, True, True, False, True, False, True]
    assert cached_calls(ts, models, 2).tolist() == [False, True, True, False, True, False, True, False]
    assert not cached_calls(ts, models, 1).any()


def one_line_exit_2(capsys, args: list[str], *words: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("flags,words", [
    (["--cache-interval", "0"], ["--cache-interval"]),
    (["--cache-interval", "1001"], ["--cache-interval"]),
    (["--cache-interval", "2", "--cache-branch", "3"], ["branch 0", "--cache-branch 0"]),
])
def test_bad_run_input(cache_bundles, tmp_path, capsys, flags, words) -> None:
    args = ["run", "--bundle", str(cache_bundles[0]), "--backend", "ort", "--prompt", "x", "--steps", "2",
            "--out", str(tmp_path / "o.png"), *flags]
    one_line_exit_2(capsys, args, *words)
    assert not (tmp_path / "o.png").exists()


def test_caching_needs_cached_graphs(sd_bundle, tmp_path, capsys) -> None:
    args = ["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "x", "--steps", "2",
            "--out", str(tmp_path / "o.png"), "--cache-interval", "2"]
    one_line_exit_2(capsys, args, "--cache-branch")


def test_build_refuses_a_branch_a_unet_lacks(sd_pair, tmp_path, capsys) -> None:
    """The small tiny U-Net has no mid block: branch 5 (keep the mid block's output) does not exist there."""
    out = tmp_path / "b"
    args = ["build", *[a for m in sd_pair for a in ("--model", str(m))], "--backend", "ort", "--out", str(out),
            "--cache-branch", "5"]
    one_line_exit_2(capsys, args, "--cache-branch 5", "small-unet")
    assert not out.exists()


def _cached_plan(manifest, interval: int, ratio: float = 0.4, batch: int = 2):
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call
    from tstitch_trt.sampling.trajectory import TrajectoryPlan

    table = sd_table("pndm", manifest.scheduler, STEPS)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 4, 16, 16), dtype=np.float32) * np.float32(table.init_noise_sigma)
    context = rng.standard_normal((2 * batch, 77, 32), dtype=np.float32)
    model = stitch_schedule_by_call(len(table.timesteps), 2, ratio=ratio)
    plan = TrajectoryPlan("pndm", table.timesteps, table.coef, model, None,
                          cached=cached_calls(table.timesteps, model, interval))
    return plan, x, context


def test_trt_backend_runs_cached_engines_like_ort(cache_bundles, tmp_path):
    """TrtBackend on fake TensorRT (tests/fake_gpu.py: engines that run the ONNX graphs, fake CUDA): the kept
    feature bound per model, the cached engines opened on demand, plain launches and one CUDA graph equal ORT."""
    import shutil
    from types import SimpleNamespace

    from fake_gpu import FakeCuda, make_fake_trt, ort_step
    from tstitch_trt.bundle.manifest import EngineEntry, read_manifest
    from tstitch_trt.runtime.engine_compat import builder_info
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.runtime.ort_backend import OrtBackend
    from tstitch_trt.runtime.trt_backend import TrtBackend

    bundle = tmp_path / "fake-trt"
    shutil.copytree(cache_bundles[3], bundle)
    manifest = read_manifest(bundle)
    info = builder_info(SimpleNamespace(__name__="tensorrt_rtx", __version__="1.7.1.116"), ["8.9"])
    for m in manifest.models:
        for part in (m.engines, m.cached["engines"]):
            e = part["ort"]
            part["trt-rtx"] = EngineEntry(file=e.file, sha256=e.sha256, precision="fp32", batch_range=(1, 16),
                                          builder=info)
    (bundle / "manifest.json").write_text(manifest.to_json())
    manifest = read_manifest(bundle)
    plan, x, context = _cached_plan(manifest, 3)
    assert plan.cached.any()
    ref = run_stitched(OrtBackend(bundle, manifest), plan, x, context, 7.5, progress=False)

    def fake(**kw):
        cu = FakeCuda()
        trt = make_fake_trt(cu, ort_step, scratch_for=lambda data: len(data) // 8)
        return TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=trt, cuda=cu, **kw), cu, trt

    plain, _, trt = fake(cuda_graph=False)
    got = run_stitched(plain, plan, x, context, 7.5, progress=False)
    assert got.mode == "steps" and rel_diff(got.x, ref.x) < 1e-5 and np.abs(ref.x).max() > 0.1
    # the cached engines ran exactly the cached calls
    assert sum(c.enqueues for c in trt.contexts if "deep" in c.engine.inputs) == int(plan.cached.sum())
    graph, cu, _ = fake()
    first = run_stitched(graph, plan, x, context, 7.5, progress=False)
    assert first.mode == "graph" and cu.captures == 1 and np.array_equal(first.x, got.x)
    no_cache = dataclasses.replace(plan, cached=None)  # another plan: a new capture, the full engines only
    again = run_stitched(graph, no_cache, x, context, 7.5, progress=False)
    assert cu.captures == 2 and rel_diff(again.x, got.x) > 1e-3


def _has_rtx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.mark.skipif(not _has_rtx(), reason="tensorrt_rtx is not installed (pip install tensorrt-rtx)")
def test_trt_rtx_builds_the_cached_step_graphs_on_cpu(sd_pair, tmp_path):
    """Real TensorRT-RTX plans of both step graphs per U-Net; the cached engine's profile covers the kept feature
    at its level (branch 3: up block 1, H/2 x W/2)."""
    from tstitch_trt.bundle.manifest import artifact_path, read_manifest
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle

    out = tmp_path / "sd-rtx-cache"
    build_sd_bundle(SdBuildConfig(models=[str(p) for p in sd_pair], out=out, backends=["trt-rtx"],
                                  precision="fp16", batch_range=(1, 2), cache_branch=3))
    m = read_manifest(out)
    assert m.cache == {"scheme": "deepcache", "branch": 3} and m.io["roles"]["cache"] == [["deep", "deep_next"]]
    for model in m.models:
        assert model.cached["feature"] == {"shape": ["2B", 8, "H/2", "W/2"], "dtype": "float32"}
        full, cached = model.engines["trt-rtx"], model.cached["engines"]["trt-rtx"]
        for e in (full, cached):
            assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        assert "deep" not in full.builder["options"]["profile"]
        assert cached.builder["options"]["profile"]["deep"] == [[2, 8, 8, 8], [4, 8, 16, 16], [4, 8, 32, 32]]
    assert not any(out.glob("**/*.onnx"))


def test_serve_takes_the_same_fields(cache_bundles, sd_bundle):
    """serve's cache_interval / cache_branch: checked by the pipeline's rule, batch-shared, and a served request
    equals the Python API's call."""
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.errors import UserError
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.serve.requests import KINDS, parse_generate

    manifest = read_manifest(cache_bundles[0])

    def parse(m, **fields):
        return parse_generate(json.dumps({"prompt": PROMPT, "steps": 6, **fields}).encode(), m, False, 4)

    req = parse(manifest, cache_interval=3, return_latents=True)
    assert req.extras == {"cache_interval": 3, "cache_branch": 0}
    assert req.batch_key != parse(manifest, cache_interval=2).batch_key != parse(manifest).batch_key
    for fields, match in (({"cache_interval": 0}, "--cache-interval"), ({"cache_interval": 2.5}, "cache_interval"),
                          ({"cache_interval": 2, "cache_branch": 3}, "branch 0")):
        with pytest.raises(UserError, match=match):
            parse(manifest, **fields)
    with pytest.raises(UserError, match="--cache-branch"):
        parse(read_manifest(sd_bundle), cache_interval=2)
    pipe = StitchedSDPipeline.from_bundle(cache_bundles[0], backend="ort")
    try:
        served = KINDS["sd"].run_batch(pipe, [req])[0]
        direct = pipe(prompt=PROMPT, steps=6, seed=req.seed, ratio=req.ratio, cache_interval=3, progress=False)
    finally:
        pipe.close()
    assert served.report["cache"]["cached_calls"] and served.report["cache"] == direct.report["cache"]
    assert np.array_equal(served.latents, direct.latents)


def test_sdxl_stitched_equals_deepcache_switched(sdxl_pair, tmp_path):
    """SDXL (text_embeds and time_ids into the same cut U-Nets): equal to StableDiffusionXLPipeline with the peer's
    helper, switched by callback."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    small, large = sdxl_pair
    bundle = build_sd(tmp_path / "sdxl-cache", [small, large], "--cache-branch", "0", backends="ort")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(large))
    pipe.set_progress_bar_config(disable=True)
    small_unet, large_unet = UNet2DConditionModel.from_pretrained(str(small)).eval(), pipe.unet
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps, init = 6, unit_latents()
    n_calls = len(sd_table("euler", dict(pipe.scheduler.config), steps).timesteps)
    switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, 0.4, cache=(2, 0))
    try:
        with torch.no_grad():
            ref = np.asarray(pipe([PROMPT] * 2, height=SIZE, width=SIZE, num_inference_steps=steps,
                                  latents=torch.from_numpy(init), output_type="latent",
                                  callback_on_step_end=switch).images)
    finally:
        end_deepcache(small_unet)
        end_deepcache(large_unet)
    np.save(tmp_path / "init.npy", init)
    assert main(["run", "--bundle", str(bundle), "--backend", "ort", "--prompt", PROMPT, "--sampler", "euler",
                 "--steps", str(steps), "--ratio", "0.4", "--init-noise", str(tmp_path / "init.npy"),
                 "--save-latents", str(tmp_path / "out.npy"), "--out", str(tmp_path / "o.png"),
                 "--cache-interval", "2"]) == 0
    got = np.load(tmp_path / "out.npy")
    assert np.abs(ref).max() > 0.1 and rel_diff(got, ref) < 1e-4, f"{rel_diff(got, ref):.2e}"


# --- ControlNet: the peer is DeepCacheSDHelper on diffusers' StableDiffusionControlNetPipeline --------------------
CONTROL_BRANCH = 3  # up block 1: four of the six skip connections live on a cached call, two (and the mid) dead


@pytest.fixture(scope="module")
def control_cache(control_set, tmp_path_factory):
    """(bundle built with --controlnet and --cache-branch 3, the control PNG, the peer)."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image

    small, large, net = control_set
    root = tmp_path_factory.mktemp("sd-control-cache")
    bundle = build_sd(root / "bundle", [small, large], "--controlnet", str(net), "--cache-branch", str(CONTROL_BRANCH))
    png = root / "control.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(png)
    base = StableDiffusionPipeline.from_pretrained(str(large), safety_checker=None, requires_safety_checker=False)
    parts = {k: v for k, v in base.components.items()
             if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    pipe = StableDiffusionControlNetPipeline(**parts, controlnet=ControlNetModel.from_pretrained(str(net)).eval(),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet, large_unet = UNet2DConditionModel.from_pretrained(str(small)).eval(), pipe.unet
    n_calls = len(sd_table("pndm", dict(pipe.scheduler.config), STEPS).timesteps)

    def peer(ratio: float, latents: np.ndarray, cache: tuple[int, int] | None, guess: bool) -> np.ndarray:
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio, cache=cache)
        try:
            with torch.no_grad():
                out = pipe([PROMPT] * latents.shape[0], image=Image.open(png), height=SIZE, width=SIZE,
                           num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents),
                           output_type="latent", guess_mode=guess, callback_on_step_end=switch)
        finally:
            end_deepcache(small_unet)
            end_deepcache(large_unet)
            pipe.unet = large_unet
        return np.asarray(out.images)

    return bundle, png, peer


@pytest.mark.parametrize("backend,ratio,interval,guess", [("ort", 0.0, 2, False), ("ort", 0.4, 3, True),
                                                          ("torch", 0.4, 2, False)])
def test_controlnet_equals_deepcache_switched(control_cache, tmp_path, backend, ratio, interval, guess) -> None:
    """The ControlNet runs on every call as in the peer; on a cached call only its residuals for the skip
    connections the shallow path reads matter (the rest land on skipped modules)."""
    bundle, png, peer = control_cache
    init = unit_latents()
    ref = peer(ratio, init, (interval, CONTROL_BRANCH), guess)
    got, report = run_cli(bundle, tmp_path, backend, "pndm", ratio, init, "--control-image", str(png),
                          "--cache-interval", str(interval), *(["--guess-mode"] if guess else []))
    assert np.abs(ref).max() > 0.1
    assert rel_diff(got, ref) < 1e-4, f"{backend} r={ratio} N={interval}: {rel_diff(got, ref):.2e}"
    assert report["cache"]["cached_calls"] and report["controlnet"]["guess_mode"] is guess
    if backend == "ort":  # the comparison can fail: caching moves the result against the peer without it
        assert rel_diff(got, peer(ratio, init, None, guess)) > 1e-3


def test_controlnet_cached_graph_keeps_only_the_shallow_controlnet(control_cache) -> None:
    """The cached ONNX graph holds the ControlNet's layers up to the live skip connections and none deeper: its
    zero convolutions 0..3 (branch 3 reads skips 0..3), not 4, 5 or the mid block's."""
    import onnx

    from tstitch_trt.bundle.manifest import artifact_path

    bundle = control_cache[0]
    manifest = read_manifest(bundle)
    for m in manifest.models:
        full = onnx.load(str(artifact_path(bundle, m.engines["ort"])), load_external_data=False)
        cached = onnx.load(str(artifact_path(bundle, m.cached["engines"]["ort"])), load_external_data=False)
        names = [{i.name for i in g.graph.initializer if ".controlnet." in i.name} for g in (full, cached)]
        zero = [{n.split("controlnet_down_blocks.")[1].split(".")[0] for n in x if "controlnet_down_blocks." in n}
                for x in names]
        assert zero[0] == {"0", "1", "2", "3", "4", "5"} and zero[1] == {"0", "1", "2", "3"}, zero
        assert any("controlnet.mid_block" in n for n in names[0])
        assert not any("controlnet.mid_block" in n or "controlnet_mid_block" in n for n in names[1])


def test_controlnet_torch_cached_call_skips_the_deep_controlnet(control_set) -> None:
    """The torch backend's cached step (export/deep_cache.CacheStep) skips the ControlNet's layers behind dead
    residuals outright, as the cached ONNX graph prunes them; the full step runs them."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from tstitch_trt.export.deep_cache import CacheStep
    from tstitch_trt.export.unet_export import example_unet_inputs
    from tstitch_trt.export.unet_step import UNetStepModule

    small, _, net_dir = control_set
    net = ControlNetModel.from_pretrained(str(net_dir)).eval()
    step = UNetStepModule(UNet2DConditionModel.from_pretrained(str(small)).eval(), net).eval()
    # the layer behind skip 3 (down block 0's downsampler) runs; down block 1 (skips 4, 5) and the mid block do not
    layers = {"downsampler 0": net.down_blocks[0].downsamplers[0], "down 1": net.down_blocks[1].resnets[0],
              "mid": net.mid_block.resnets[0]}
    calls = dict.fromkeys(layers, 0)
    for name, layer in layers.items():
        layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    inputs = example_unet_inputs(step, 77, pixel_factor=2)
    with torch.no_grad():
        kept = CacheStep(step, CONTROL_BRANCH, "full")(*inputs)[-1]
        assert calls == {"downsampler 0": 1, "down 1": 1, "mid": 1}
        CacheStep(step, CONTROL_BRANCH, "cached")(*inputs, kept)
    assert calls == {"downsampler 0": 2, "down 1": 1, "mid": 1}


def test_sdxl_controlnet_stitched_equals_deepcache_switched(sdxl_control_set, tmp_path):
    """SDXL with a ControlNet (text_embeds and time_ids into the ControlNet too): equal to
    StableDiffusionXLControlNetPipeline with the peer's helper, switched by callback."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image

    small, large, net = sdxl_control_set
    bundle = build_sd(tmp_path / "sdxl-control-cache", [small, large], "--controlnet", str(net), "--cache-branch", "0",
                      backends="ort")
    png = tmp_path / "control.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(png)
    base = StableDiffusionXLPipeline.from_pretrained(str(large))
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(
        **parts, controlnet=ControlNetModel.from_pretrained(str(net)).eval(),
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet, large_unet = UNet2DConditionModel.from_pretrained(str(small)).eval(), pipe.unet
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps, init = STEPS, unit_latents()  # run_cli's
    n_calls = len(sd_table("euler", dict(pipe.scheduler.config), steps).timesteps)
    switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, 0.4, cache=(2, 0))
    try:
        with torch.no_grad():
            ref = np.asarray(pipe([PROMPT] * 2, image=Image.open(png), height=SIZE, width=SIZE,
                                  num_inference_steps=steps, latents=torch.from_numpy(init), output_type="latent",
                                  callback_on_step_end=switch).images)
    finally:
        end_deepcache(small_unet)
        end_deepcache(large_unet)
    got, report = run_cli(bundle, tmp_path, "ort", "euler", 0.4, init, "--control-image", str(png),
                          "--cache-interval", "2")
    assert report["cache"]["cached_calls"] and np.abs(ref).max() > 0.1
    assert rel_diff(got, ref) < 1e-4, f"{rel_diff(got, ref):.2e}"
