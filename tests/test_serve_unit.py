"""The serve pieces that need no running service: request parsing, the adaptive policy, per-request
noise, batch grouping on the pipeline, and `tstitch-trt serve`'s flag errors (one line, exit 2)."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.demo import demo_bundle_dir
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline.dit import StitchedPipeline, request_noise
from tstitch_trt.serve.policy import AdaptiveRatio
from tstitch_trt.serve.requests import KINDS, parse_generate, with_ratio


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(demo_bundle_dir())


@pytest.fixture(scope="module")
def pipe():
    p = StitchedPipeline.from_bundle(demo_bundle_dir(), backend="ort")
    yield p
    p.close()


def test_defaults_are_runs(manifest):
    req = parse_generate(b"{}", manifest, is_demo=True, max_images=32)
    assert req.conditioning["class_labels"] == [c for _ in range(2) for c in range(10)]
    assert (req.steps, req.sampler, req.cfg_scale, req.eta, req.seed, req.ratio) == (50, "ddim", 1.5, 0.0, 0, 0.4)
    assert not req.adaptive


def test_adaptive_leaves_the_ratio_to_the_policy_unless_given(manifest):
    assert parse_generate(b"{}", manifest, True, 32, adaptive=True).adaptive
    given = parse_generate(b'{"ratio": 0.1}', manifest, True, 32, adaptive=True)
    assert not given.adaptive and given.ratio == 0.1


@pytest.mark.parametrize("body, expect", [
    (b"\xff", "not valid JSON"),
    (b'"x"', "must be a JSON object, got str"),
    (b'{"class_labels": "1,2"}', "class_labels must be a list of integers"),
    (b'{"class_labels": [1.5]}', "class_labels must be a list of integers"),
    (b'{"class_labels": [true]}', "class_labels must be a list of integers"),
    (b'{"seed": 1.5}', "seed must be an integer"),
    (b'{"return_latents": 1}', "return_latents must be true or false"),
    (b'{"ratio": 0.1, "fractions": [0.5, 0.5]}', "give ratio or fractions, not both"),
    (b'{"negative_prompt": "x"}', "'negative_prompt' does not apply to this dit-class-conditional bundle"),
    (b'{"width": 31}', "width 31 is not this bundle's image size"),
])
def test_parse_errors_are_one_line(manifest, body, expect):
    with pytest.raises(UserError, match=None) as e:
        parse_generate(body, manifest, True, 32)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_validation_is_the_pipelines(manifest, pipe):
    kind = KINDS[manifest.pipeline]
    req = parse_generate(b'{"class_labels": [1, 99]}', manifest, True, 32)
    with pytest.raises(UserError) as served:
        kind.validate(pipe, req)
    with pytest.raises(UserError) as direct:
        pipe(class_labels=[1, 99], steps=2)
    assert str(served.value) == str(direct.value)


def test_policy_moves_one_step_per_window_between_zero_and_max():
    p = AdaptiveRatio(latency_target_ms=100, max_ratio=0.35, step=0.1, window=2)
    assert p.ratio == 0.0
    p.observe(500)
    assert p.ratio == 0.0  # a window needs `window` observations
    for want in (0.1, 0.2, 0.3, 0.35, 0.35):
        p.observe(500)
        p.observe(500)
        assert p.ratio == pytest.approx(want)
    p.observe(80)
    p.observe(80)  # between half the target and the target: hold
    assert p.ratio == pytest.approx(0.35)
    for want in (0.3, 0.2, 0.1, 0.0, 0.0):
        p.observe(10)
        p.observe(10)
        assert p.ratio == pytest.approx(want)
    with pytest.raises(ValueError):
        AdaptiveRatio(0, 0.4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_request_noise_is_what_a_run_draws(pipe, sampler):
    """A run given request_noise's draws reproduces the run that drew them itself (bit for bit)."""
    x, noise = request_noise(7, 3, pipe.manifest.latent_shape, 5, sampler, 0.0)
    assert (noise is None) == (sampler == "ddim")
    own = pipe(class_labels=[1, 2, 3], steps=5, seed=7, sampler=sampler, progress=False, decode=False).latents
    given = pipe(class_labels=[1, 2, 3], steps=5, seed=999, sampler=sampler, init_noise=x, step_noise=noise,
                 progress=False, decode=False).latents
    np.testing.assert_array_equal(own, given)


def test_run_batch_groups_and_splits(manifest, pipe):
    """The DiT batch runner: one engine batch, each request's images and report its own."""
    kind = KINDS[manifest.pipeline]
    reqs = [parse_generate(b'{"class_labels": [1, 2], "seed": 3, "steps": 4, "sampler": "ddpm", '
                           b'"return_latents": true}', manifest, True, 32),
            parse_generate(b'{"class_labels": [5], "seed": 4, "steps": 4, "sampler": "ddpm", '
                           b'"return_latents": true}', manifest, True, 32)]
    assert reqs[0].batch_key == reqs[1].batch_key
    out = kind.run_batch(pipe, reqs)
    assert [o.report["batch_size"] for o in out] == [3, 3]
    assert [o.report["class_labels"] for o in out] == [[1, 2], [5]]
    assert [len(o.images) for o in out] == [2, 1]
    for r, o in zip(reqs, out, strict=True):
        alone = pipe(class_labels=r.conditioning["class_labels"], steps=4, seed=r.seed, sampler="ddpm",
                     progress=False, decode=False).latents
        np.testing.assert_allclose(o.latents, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    assert with_ratio(reqs[0], 0.2).batch_key != reqs[0].batch_key


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, expect", [
    (["--max-batch-size", "0"], "--max-batch-size: must be between 1 and"),
    (["--max-ratio", "1.5"], "--max-ratio: must be in [0, 1]"),
    (["--latency-target-ms=-5"], "--latency-target-ms: must be > 0"),
    (["--replicas", "0"], "--replicas: must be between 1 and"),
    (["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    (["--backend", "trt"], "the bundle has no trt artifacts"),
])
def test_bad_flags_exit_2_with_one_line(args, expect):
    r = _serve(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


def test_busy_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _serve("--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and r.stderr.startswith("error: cannot listen on 127.0.0.1:"), r.stderr


def test_without_ray_serve_says_what_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from tstitch_trt.cli import main\n"
            "sys.exit(main(['serve']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: serve needs Ray Serve: pip install 'tstitch-trt[serve]'"
