"""FORA composed with T-Stitch on DiTs (issue 25, point 2): `build --cache-scheme fora` writes each DiT's full step
graph (+ every block's attention and MLP outputs) and cached step graph (+ them as input); `run --cache-interval N`
follows sampling/cache_plan.py's plan (each model restarts its count at its first call after a switch).

The oracle is fora_reference below: FORA written afresh over the torch DiT, as FORA's own code does it (each
DiTBlock's forward swapped for one that stores attention / MLP outputs on a full step and reuses them with this
step's adaLN gates otherwise), with its own step counter per model; it shares no code with export/fora.py or the
runtime. Final latents to 1e-5 of their largest magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny  # noqa: E402
from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.errors import UserError  # noqa: E402

STEPS, LABELS = 10, [1, 7]  # ratio 0.4 of 10 DDIM steps: the switch at call 4, off interval 3's grid from 0


@pytest.fixture(scope="module")
def fora_pair(tmp_path_factory) -> Path:
    """The conftest tiny pair's models (same seeds), built with FORA's cached graphs."""
    return build_tiny(tmp_path_factory.mktemp("fora") / "pair", ["DiT-S/2", "DiT-B/2"], ["torch", "ort"],
                      cache_scheme="fora")


@pytest.fixture(scope="module")
def fora_twins(tmp_path_factory) -> Path:
    """Two DiT-S/2 of one shape (different weights): a shared cache would fit, so only the rule keeps them apart."""
    return build_tiny(tmp_path_factory.mktemp("fora") / "twins", ["DiT-S/2", "DiT-S/2"], ["torch", "ort"],
                      cache_scheme="fora")


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- the independent oracle ----------------------------------------------------------------------------------
def fora_reference(bundle: Path, labels: list[int], ratio: float, steps: int, interval: int, sampler: str = "ddim",
                   seed: int = 0, cfg: float = 1.5, shared_cache: bool = False, restart: bool = True) -> np.ndarray:
    """FORA over the torch DiTs of `bundle`, stitched; the trajectory tables (timesteps, coefficients, which model)
    are the pipeline's own. shared_cache / restart=False: one cache for both models and one count over the whole
    trajectory (what rule 3 forbids), to show the tests can tell."""
    from tstitch_trt.export.torch_backend import load_step_modules
    from tstitch_trt.models.dit import layer_norm_fp32, modulate
    from tstitch_trt.pipeline.dit import request_noise
    from tstitch_trt.sampling.trajectory import plan_trajectory

    manifest = read_manifest(bundle)
    modules = load_step_modules(bundle, manifest)
    b = len(labels)
    x_init, noise = request_noise(seed, b, manifest.latent_shape, steps, sampler, 0.0)
    plan = plan_trajectory(sampler, steps, 2, (b, *manifest.latent_shape), np.random.default_rng(seed), ratio=ratio,
                           noise=noise)
    caches: list[dict] = [{}, {}]

    def block_forward(block, j: int, cache: dict, full: bool):
        def forward(x, c):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            if full:
                cache[j, "attn"] = block.attn(modulate(layer_norm_fp32(x, block.hidden_size), shift_msa, scale_msa))
            x = x + gate_msa.unsqueeze(1) * cache[j, "attn"]
            if full:
                cache[j, "mlp"] = block.mlp(modulate(layer_norm_fp32(x, block.hidden_size), shift_mlp, scale_mlp))
            return x + gate_mlp.unsqueeze(1) * cache[j, "mlp"]
        return forward

    x = torch.from_numpy(x_init)
    prev_x0 = torch.zeros_like(x)
    y = torch.tensor(labels, dtype=torch.int64)
    count = 0
    with torch.no_grad():
        for i in range(plan.steps):
            m = int(plan.step_model[i])
            if restart and i > 0 and m != int(plan.step_model[i - 1]):
                count = 0  # the new model's first call: a new count, so a full step
            full = count % interval == 0
            count += 1
            cache = caches[0] if shared_cache else caches[m]
            blocks = modules[m].denoiser.blocks
            for j, block in enumerate(blocks):
                block.forward = block_forward(block, j, cache, full)
            try:
                t = torch.full((b,), int(plan.timesteps[i]), dtype=torch.int64)
                nz = torch.zeros_like(x) if plan.noise is None else torch.from_numpy(plan.noise[i])
                x, prev_x0 = modules[m](x, t, y, torch.tensor(cfg), torch.from_numpy(plan.coef[i]), prev_x0, nz)
            finally:
                for block in blocks:
                    del block.forward
    return x.numpy()


def run_api(bundle: Path, backend: str, ratio: float, interval: int, sampler: str = "ddim") -> tuple[np.ndarray, dict]:
    from tstitch_trt.pipeline.dit import StitchedPipeline

    pipe = StitchedPipeline.from_bundle(bundle, backend=backend)
    try:
        res = pipe(class_labels=LABELS, ratio=ratio, steps=STEPS, sampler=sampler, seed=0, cache_interval=interval,
                   decode=False)
    finally:
        pipe.close()
    return res.latents, res.report


# --- (a) interval 1 is the uncached run ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_interval_one_is_the_plain_run(fora_pair, tiny_pair, backend) -> None:
    """The FORA bundle at interval 1 runs its full graphs (which also write the kept features) on every call: the
    same latents, bit for bit, as the bundle built without --cache-scheme (same weights)."""
    got, report = run_api(fora_pair, backend, 0.4, 1)
    plain, _ = run_api(tiny_pair, backend, 0.4, 1)
    assert report["cache"] is None
    assert np.array_equal(got, plain)
    cached, _ = run_api(fora_pair, backend, 0.4, 2)
    assert rel_diff(cached, plain) > 1e-3  # caching does change the trajectory: the comparison above can tell


# --- (b) the cached trajectory equals the torch reference -------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("ratio,interval,sampler", [
    (0.0, 2, "ddim"), (0.0, 3, "ddim"), (0.4, 2, "ddim"), (0.4, 3, "ddim"), (0.4, 3, "dpm-solver++"),
    (0.4, 2, "ddpm"),
])
def test_equals_the_torch_fora_reference(fora_pair, backend, ratio, interval, sampler) -> None:
    got, report = run_api(fora_pair, backend, ratio, interval, sampler)
    ref = fora_reference(fora_pair, LABELS, ratio, STEPS, interval, sampler)
    assert report["cache"]["cached_calls"]
    assert rel_diff(got, ref) < 1e-5, rel_diff(got, ref)
    uncached = fora_reference(fora_pair, LABELS, ratio, STEPS, 1, sampler)
    assert rel_diff(ref, uncached) > 1e-3  # the reference's cached steps matter


# --- (c) a cache belongs to the model that made it -------------------------------------------------------------
def test_first_call_after_the_switch_is_full(fora_pair) -> None:
    _, report = run_api(fora_pair, "ort", 0.4, 3)
    assert report["step_model"] == [0] * 4 + [1] * 6
    # the small model counts 0, 3; the large one restarts at its first call (4): 4, 7 (not 6, 9)
    assert report["cache"]["full_calls"] == [0, 3, 4, 7]
    assert report["cache"]["cached_calls"] == [1, 2, 5, 6, 8, 9]


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_the_large_model_never_reads_the_small_ones_features(fora_twins, backend) -> None:
    """Twin shapes: the runtime equals the per-model reference, and not the forbidden composition (one cache, one
    count over the whole trajectory: full calls 0, 3, 6, 9, so the large model's first call, 2, would reuse the small
    model's call-0 features; with twins that needs no shape change, so only the rule keeps them apart)."""
    got, report = run_api(fora_twins, backend, 0.2, 3)
    assert report["step_model"][:3] == [0, 0, 1] and report["cache"]["full_calls"] == [0, 2, 5, 8]
    own = fora_reference(fora_twins, LABELS, 0.2, STEPS, 3)
    assert rel_diff(got, own) < 1e-5
    shared = fora_reference(fora_twins, LABELS, 0.2, STEPS, 3, shared_cache=True, restart=False)
    assert rel_diff(got, shared) > 5e-4 and rel_diff(got, shared) > 50 * rel_diff(got, own)


# --- other backends ------------------------------------------------------------------------------------------
def test_openvino_equals_ort(fora_pair) -> None:
    pytest.importorskip("openvino")
    ov, _ = run_api(fora_pair, "openvino", 0.4, 3)
    ort, _ = run_api(fora_pair, "ort", 0.4, 3)
    assert rel_diff(ov, ort) < 1e-4


# --- command line, API, serve ------------------------------------------------------------------------------------
def test_run_lists_the_full_calls(fora_pair, tmp_path, capsys) -> None:
    report = tmp_path / "r.json"
    assert main(["run", "--bundle", str(fora_pair), "--backend", "ort", "--class-labels", "1,7", "--steps", "10",
                 "--ratio", "0.4", "--cache-interval", "3", "--save-latents", str(tmp_path / "x.npy"),
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "FORA interval 3: full calls [0, 3, 4, 7]" in out
    rep = json.loads(report.read_text())
    assert rep["cache"] == {"scheme": "fora", "interval": 3, "full_calls": [0, 3, 4, 7],
                            "cached_calls": [1, 2, 5, 6, 8, 9]}
    got, _ = run_api(fora_pair, "ort", 0.4, 3)
    assert np.array_equal(np.load(tmp_path / "x.npy"), got)


def one_line_exit_2(capsys, args: list[str], *words: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("flags,words", [
    (["--cache-interval", "0"], ["--cache-interval"]),
    (["--cache-interval", "1001"], ["--cache-interval"]),
    (["--cache-interval", "2", "--cache-branch", "0"], ["--cache-branch 0", "FORA", "no branch"]),
])
def test_bad_run_input(fora_pair, tmp_path, capsys, flags, words) -> None:
    out = tmp_path / "x.npy"
    one_line_exit_2(capsys, ["run", "--bundle", str(fora_pair), "--backend", "ort", "--steps", "2",
                             "--save-latents", str(out), *flags], *words)
    assert not out.exists()


def test_caching_needs_the_cached_graphs(tiny_pair, tmp_path, capsys) -> None:
    one_line_exit_2(capsys, ["run", "--bundle", str(tiny_pair), "--backend", "ort", "--steps", "2", "--save-latents",
                             str(tmp_path / "x.npy"), "--cache-interval", "2"], "--cache-scheme fora")


@pytest.fixture(scope="module")
def fora_demo(tmp_path_factory) -> Path:
    """The shipped demo pair rebuilt with FORA's cached graphs (ort), with its evaluator: what bench --quality
    scores."""
    from tstitch_trt.demo.rebuild import rebuild_demo

    return rebuild_demo(tmp_path_factory.mktemp("fora-demo") / "bundle", backends=["ort"])


def test_bench_quality_sweeps_the_cache_interval(fora_demo, tmp_path) -> None:
    """`bench --quality --cache-interval 1,2`: every ratio at every interval, the same labels and noise, so the
    cached points differ from the uncached ones only by the caching; the table and the JSON say which is which."""
    out = tmp_path / "q"
    assert main(["bench", "--quality", "--bundle", str(fora_demo), "--quality-images", "10", "--steps", "10",
                 "--ratios", "0,0.4", "--cache-interval", "1,2", "--out", str(out)]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert res["cache_intervals"] == [1, 2]
    pts = {(p["ratio"], p["cache_interval"]): p for p in res["points"]}
    assert set(pts) == {(0.0, 1), (0.4, 1), (0.0, 2), (0.4, 2)}
    assert pts[(0.4, 1)]["full_calls_per_model"] == [4, 6] and pts[(0.4, 2)]["full_calls_per_model"] == [2, 3]
    assert pts[(0.0, 2)]["full_calls_per_model"] == [0, 5]
    for ratio in (0.0, 0.4):
        plain, cached = pts[(ratio, 1)], pts[(ratio, 2)]
        assert cached["steps_per_model"] == plain["steps_per_model"]
        assert abs(cached["fid"] - plain["fid"]) > 1e-3, (ratio, cached["fid"], plain["fid"])
    table = (out / "quality.md").read_text()
    assert "| FORA interval | full calls |" in table and "| 40% | 2 | 2 / 3 | 4 / 6 |" in table


def test_bench_quality_cache_interval_needs_the_cached_graphs(tmp_path, capsys) -> None:
    """The shipped demo pair has no FORA graphs; bench's speed figures take no interval (never ignored)."""
    one_line_exit_2(capsys, ["bench", "--quality", "--quality-images", "10", "--cache-interval", "2",
                             "--out", str(tmp_path / "q")], "--cache-scheme fora")
    assert not (tmp_path / "q").exists()
    one_line_exit_2(capsys, ["bench", "--cache-interval", "2", "--out", str(tmp_path / "b")], "--quality")
    assert not (tmp_path / "b").exists()


def test_build_flags_by_kind(tmp_path, capsys) -> None:
    """DiTs take --cache-scheme fora, not DeepCache's --cache-branch (and the reverse for SD: cli/cache.py)."""
    out = tmp_path / "b"
    one_line_exit_2(capsys, ["build", "--model", "DiT-S/2=random:1", "--model", "DiT-B/2=random:2", "--out", str(out),
                             "--cache-branch", "0"], "--cache-scheme fora")
    assert main(["build", "--model", "DiT-S/2=random:1", "--model", "DiT-B/2=random:2", "--out", str(out),
                 "--cache-scheme", "deepcache"]) == 2
    assert not out.exists()


def test_serve_takes_the_same_fields(fora_pair, tiny_pair) -> None:
    from tstitch_trt.pipeline.dit import StitchedPipeline
    from tstitch_trt.serve.requests import KINDS, parse_generate

    manifest = read_manifest(fora_pair)

    def parse(m, **fields):
        body = {"class_labels": LABELS, "steps": STEPS, "ratio": 0.4, **fields}
        return parse_generate(json.dumps(body).encode(), m, False, 4)

    req = parse(manifest, cache_interval=3, return_latents=True)
    assert req.extras == {"cache_interval": 3}
    assert req.batch_key != parse(manifest, cache_interval=2).batch_key != parse(manifest).batch_key
    for fields, match in (({"cache_interval": 0}, "--cache-interval"), ({"cache_interval": 2.5}, "cache_interval"),
                          ({"cache_interval": 2, "cache_branch": 0}, "no branch")):
        with pytest.raises(UserError, match=match):
            parse(manifest, **fields)
    with pytest.raises(UserError, match="--cache-scheme fora"):
        parse(read_manifest(tiny_pair), cache_interval=2)
    pipe = StitchedPipeline.from_bundle(fora_pair, backend="ort")
    try:
        KINDS["dit-class-conditional"].validate(pipe, req)
        served = KINDS["dit-class-conditional"].run_batch(pipe, [req])[0]
        direct = pipe(class_labels=LABELS, steps=STEPS, ratio=0.4, seed=req.seed, cache_interval=3, decode=False)
    finally:
        pipe.close()
    assert served.report["cache"] == direct.report["cache"] and served.report["cache"]["cached_calls"]
    assert np.array_equal(served.latents, direct.latents)


def test_check_compares_both_graphs(fora_pair, capsys) -> None:
    """`tstitch-trt check`: every model's full graph (+ the kept features) and cached graph against torch."""
    assert main(["check", "--bundle", str(fora_pair), "--backend", "ort"]) == 0
    out = capsys.readouterr().out
    # per model: x_next, x0 and fora_next of the full graph, x_next and x0 of the cached one
    assert "(cached)" in out and "fora_next" in out and "10 compared, 10 within tolerance" in out


def test_manifest_scheme_fits_the_kind(fora_pair, tmp_path) -> None:
    import shutil

    from tstitch_trt.errors import BundleError

    bad = tmp_path / "bad"
    shutil.copytree(fora_pair, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["cache"] = {"scheme": "deepcache", "branch": 0}
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="FORA"):
        read_manifest(bad)


# --- TensorRT: the runtime on fake TensorRT / CUDA, and real TensorRT-RTX builds ------------------------------
def test_trt_backend_runs_fora_engines_like_ort(fora_pair, tmp_path) -> None:
    """TrtBackend on fake TensorRT (tests/fake_gpu.py: engines that run the ONNX graphs, fake CUDA): each model's
    kept features bound to its own buffer, the cached engines opened on demand; plain launches and one CUDA graph
    per trajectory equal ORT."""
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from fake_gpu import FakeCuda, make_fake_trt, ort_step
    from tstitch_trt.bundle.manifest import EngineEntry
    from tstitch_trt.pipeline.dit import request_noise
    from tstitch_trt.runtime.engine_compat import builder_info
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.runtime.ort_backend import OrtBackend
    from tstitch_trt.runtime.trt_backend import TrtBackend
    from tstitch_trt.sampling.cache_plan import cached_calls
    from tstitch_trt.sampling.trajectory import plan_trajectory

    bundle = tmp_path / "fake-trt"
    shutil.copytree(fora_pair, bundle)
    manifest = read_manifest(bundle)
    info = builder_info(SimpleNamespace(__name__="tensorrt_rtx", __version__="1.7.1.116"), ["8.9"])
    for m in manifest.models:
        for part in (m.engines, m.cached["engines"]):
            e = part["ort"]
            part["trt-rtx"] = EngineEntry(file=e.file, sha256=e.sha256, precision="fp32", batch_range=(1, 16),
                                          builder=info)
    (bundle / "manifest.json").write_text(manifest.to_json())
    manifest = read_manifest(bundle)
    x, _ = request_noise(0, 2, manifest.latent_shape, STEPS, "ddim", 0.0)
    plan = plan_trajectory("ddim", STEPS, 2, x.shape, np.random.default_rng(0), ratio=0.4)
    plan = dataclasses.replace(plan, cached=cached_calls(plan.timesteps, plan.step_model, 3))
    labels = np.array(LABELS)
    ref = run_stitched(OrtBackend(bundle, manifest), plan, x, labels, 1.5, progress=False)

    def fake(**kw):
        cu = FakeCuda()
        trt = make_fake_trt(cu, ort_step, scratch_for=lambda data: len(data) // 8)
        return TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=trt, cuda=cu, **kw), cu, trt

    plain, _, trt = fake(cuda_graph=False)
    got = run_stitched(plain, plan, x, labels, 1.5, progress=False)
    assert got.mode == "steps" and rel_diff(got.x, ref.x) < 1e-5
    assert sum(c.enqueues for c in trt.contexts if "fora" in c.engine.inputs) == int(plan.cached.sum())
    graph, cu, _ = fake()
    first = run_stitched(graph, plan, x, labels, 1.5, progress=False)
    assert first.mode == "graph" and cu.captures == 1 and np.array_equal(first.x, got.x)
    again = run_stitched(graph, dataclasses.replace(plan, cached=None), x, labels, 1.5, progress=False)
    assert cu.captures == 2 and rel_diff(again.x, got.x) > 1e-3


def _has_rtx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.mark.skipif(not _has_rtx(), reason="tensorrt_rtx is not installed (pip install tensorrt-rtx)")
def test_trt_rtx_builds_the_fora_step_graphs_on_cpu(tmp_path) -> None:
    """Real TensorRT-RTX fp16 plans of both step graphs per DiT; the cached engine's profile covers the kept
    features at twice the batch range."""
    from tstitch_trt.bundle.manifest import artifact_path

    out = build_tiny(tmp_path / "rtx", ["DiT-S/2", "DiT-B/2"], ["trt-rtx"], cache_scheme="fora", batch_range=(1, 2))
    m = read_manifest(out)
    assert m.cache == {"scheme": "fora"} and m.io["roles"]["cache"] == [["fora", "fora_next"]]
    for model in m.models:
        depth, d = model.arch["depth"], model.arch["hidden_size"]
        assert model.cached["feature"] == {"shape": ["2B", depth, 2, 16, d], "dtype": "float32"}
        full, cached = model.engines["trt-rtx"], model.cached["engines"]["trt-rtx"]
        for e in (full, cached):
            assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        assert "fora" not in full.builder["options"]["profile"]
        # min / opt / max: 2B over batch 1-2 (opt: the largest)
        assert cached.builder["options"]["profile"]["fora"] == [[2, depth, 2, 16, d], [4, depth, 2, 16, d],
                                                                [4, depth, 2, 16, d]]
    assert not any(out.glob("**/*.onnx"))


def test_recipe_key_and_sd_refusal(tmp_path) -> None:
    """`cache_scheme = "fora"` in a recipe is the flag's equivalent; an SD build refuses --cache-scheme (U-Nets take
    DeepCache's --cache-branch), and a DiT build a scheme it does not have."""
    import argparse

    from tstitch_trt.cli.cache import refuse_sd_build
    from tstitch_trt.export.build import build_bundle
    from tstitch_trt.recipes import build_config_from_args

    recipe = tmp_path / "r.toml"
    recipe.write_text('cache_scheme = "fora"\n[[models]]\narch = "DiT-S/2"\ncheckpoint = "random:1"\n'
                      '[[models]]\narch = "DiT-B/2"\ncheckpoint = "random:2"\n')
    args = argparse.Namespace(recipe=str(recipe), model=None, backend=None, batch_sizes=None, out=str(tmp_path / "o"))
    assert build_config_from_args(args).cache_scheme == "fora"
    recipe.write_text(recipe.read_text().replace('"fora"', '"deepcache"'))
    with pytest.raises(UserError, match="--cache-scheme deepcache: DiT bundles cache with fora"):
        build_bundle(build_config_from_args(args))
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--cache-branch K"):
        refuse_sd_build(argparse.Namespace(cache_scheme="fora"))
