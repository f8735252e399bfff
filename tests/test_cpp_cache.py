"""Feature caching through the C++ runtime (issue 25, point 7): libtstitch's OpenVINO engine, through its C API
(cpp/tests/sample_dump.c), runs a DeepCache SD bundle (`build --cache-branch K`) and a FORA DiT bundle (`build
--cache-scheme fora`) with the same full / cached call plan as Python's OpenVINO backend (sampling/cache_plan.py:
tstitch_cache_plan's answer equals the report's cached calls; ctest checks the C++ plan against the goldens) and
the same kept feature per model: latents within 1e-5 relative in fp32, each also shown to differ from the uncached
run (so the comparison can fail). An interval > 1 on a bundle without cached step graphs, a wrong DeepCache branch
or a branch on a DiT bundle is one line and exit 2, as the C API refuses other requests. Run by scripts/test_cpp.sh
in the plain and the sanitizer build (TSTITCH_CPP_BUILD).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from conftest import build_sd, build_tiny  # noqa: E402
from test_cpp_openvino import DEMO, DUMP, FP32_REL, _ov_cache, _prompt_file, _rel  # noqa: E402, F401

pytestmark = pytest.mark.skipif(not DUMP.exists(), reason="no C++ build (scripts/test_cpp.sh builds it)")

PROMPTS = ["a red fox in the snow", "an astronaut, oil painting"]
BRANCH = 0  # DeepCache's shallowest branch: both tiny U-Nets have it
LABELS = [1, 7]


@pytest.fixture(scope="module")
def deepcache_bundle(sd_pair, tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("cpp-deepcache") / "sd", list(sd_pair), "--cache-branch", str(BRANCH),
                    backends="ort")


@pytest.fixture(scope="module")
def deepcache_ov(deepcache_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    return StitchedSDPipeline.from_bundle(deepcache_bundle, backend="openvino", precision="fp32")


@pytest.fixture(scope="module")
def fora_bundle(tmp_path_factory) -> Path:
    """The conftest tiny DiT pair's models (DiT-S/2 -> DiT-B/2, shrunk), built with FORA's cached graphs."""
    return build_tiny(tmp_path_factory.mktemp("cpp-fora") / "pair", ["DiT-S/2", "DiT-B/2"], ["ort"],
                      cache_scheme="fora")


@pytest.fixture(scope="module")
def fora_ov(fora_bundle):
    from tstitch_trt.pipeline.dit import StitchedPipeline

    return StitchedPipeline.from_bundle(fora_bundle, backend="openvino", precision="fp32")


def run_c(tmp_path: Path, rgb: bool = True, **kw) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The C driver on one request (test_cpp_openvino.run_c; rgb=False: latents only, for bundles without a VAE)."""
    out, image = tmp_path / "latents.f32", tmp_path / "rgb.u8"
    args = [str(DUMP), f"out={out}", *([f"rgb={image}"] if rgb else [])] + [f"{k}={v}" for k, v in kw.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=600), out, image


def _plan(proc: subprocess.CompletedProcess) -> list[int]:
    """The calls the C side runs cached (sample_dump prints tstitch_cache_plan's answer before it samples)."""
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("cached calls:"))
    return [int(i) for i in line.split(":")[1].split()]


def _latents(out: Path, like: np.ndarray) -> np.ndarray:
    return np.fromfile(out, dtype=np.float32).reshape(like.shape)


@pytest.mark.parametrize(("interval", "ratio"), [(2, 0.0), (3, 0.0), (2, 0.5), (3, 0.5)])
def test_deepcache_sd_equals_python_openvino(tmp_path, deepcache_bundle, deepcache_ov, interval, ratio):
    kw = {"steps": 6, "cfg_scale": 7.5, "seed": 3, "ratio": ratio}
    ref = deepcache_ov(PROMPTS, cache_interval=interval, cache_branch=BRANCH, **kw)
    assert ref.report["cache"]["cached_calls"], "the reference made no cached call"
    prompts = _prompt_file(tmp_path / "p.txt", PROMPTS)
    common = {"bundle": deepcache_bundle, "engine": "openvino", "precision": "fp32", "steps": 6, "cfg": 7.5,
              "seed": 3, "ratio": ratio, "batch": 2, "prompts": prompts}
    proc, out, rgb = run_c(tmp_path, **common, cache_interval=interval, cache_branch=BRANCH)
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc) == ref.report["cache"]["cached_calls"]  # tstitch_cache_plan: the calls Python ran cached
    got = _latents(out, ref.latents)
    assert _rel(got, ref.latents) <= FP32_REL
    images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
    assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1
    # the same request without caching (the full graphs only, branch left out) is another trajectory
    proc, out, _ = run_c(tmp_path, **common)
    assert proc.returncode == 0, proc.stderr
    full = _latents(out, ref.latents)
    assert _rel(full, deepcache_ov(PROMPTS, **kw).latents) <= FP32_REL
    assert _rel(got, full) > 1e-3, "the cached calls changed nothing"


@pytest.mark.parametrize(("interval", "ratio", "sampler"), [(2, 0.4, "ddim"), (3, 0.4, "ddpm"), (3, 0.0, "ddim")])
def test_fora_dit_equals_python_openvino(tmp_path, fora_bundle, fora_ov, interval, ratio, sampler):
    kw = {"ratio": ratio, "steps": 10, "sampler": sampler, "cfg_scale": 1.5, "seed": 4}
    ref = fora_ov(LABELS, cache_interval=interval, **kw)
    common = {"bundle": fora_bundle, "engine": "openvino", "precision": "fp32", "steps": 10, "ratio": ratio,
              "sampler": sampler, "cfg": 1.5, "seed": 4, "batch": 2, "labels": ",".join(map(str, LABELS))}
    proc, out, _ = run_c(tmp_path, rgb=False, **common, cache_interval=interval)
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc) == ref.report["cache"]["cached_calls"]
    got = _latents(out, ref.latents)
    assert _rel(got, ref.latents) <= FP32_REL
    proc, out, _ = run_c(tmp_path, rgb=False, **common)
    assert proc.returncode == 0, proc.stderr
    full = _latents(out, ref.latents)
    assert _rel(full, fora_ov(LABELS, **kw).latents) <= FP32_REL
    assert _rel(got, full) > 1e-3, "the cached calls changed nothing"


@pytest.mark.parametrize(("which", "kw", "message"), [
    ("sd", {"cache_interval": 2},
     "error: cache_interval 2 needs cached step graphs, which this bundle was built without; rebuild it with "
     "`tstitch-trt build ... --cache-branch K` (DeepCache's branch, e.g. 0), or give cache_interval 1"),
    ("sd", {"cache_branch": 0},
     "error: cache_branch 0: this bundle was built without cached step graphs; rebuild it with `tstitch-trt build "
     "... --cache-branch 0`"),
    ("demo", {"cache_interval": 3},
     "error: cache_interval 3 needs FORA's cached step graphs, which this bundle was built without; rebuild it with "
     "`tstitch-trt build ... --cache-scheme fora`, or give cache_interval 1"),
    ("deepcache", {"cache_interval": 2, "cache_branch": 3},
     "error: cache_branch 3: this bundle's cached step graphs keep branch 0; give cache_branch 0 (or -1), or rebuild "
     "it with --cache-branch 3"),
    ("deepcache", {"cache_interval": 0},
     "error: cache_interval must be between 1 (no caching) and 1000, got 0"),
    ("fora", {"cache_interval": 2, "cache_branch": 1},
     "error: cache_branch 1: DiT bundles cache with FORA (every block's attention and MLP outputs), which has no "
     "branch (DeepCache's, for SD U-Nets); leave cache_branch at -1"),
])
def test_bad_cache_requests_are_one_line_and_exit_2(tmp_path, request, which, kw, message):
    if which in ("sd", "deepcache"):
        bundle = request.getfixturevalue("sd_bundle" if which == "sd" else "deepcache_bundle")
        args = {"bundle": bundle, "batch": 2, "prompts": _prompt_file(tmp_path / "p.txt", PROMPTS)}
    else:
        bundle = DEMO if which == "demo" else request.getfixturevalue("fora_bundle")
        args = {"bundle": bundle, "batch": 1, "labels": "3"}
    proc, out, _ = run_c(tmp_path, rgb=False, **args, engine="openvino", steps=4, **kw)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert not out.exists()


def test_deepcache_controlnet_equals_python_openvino(tmp_path, control_set, tmp_path_factory):
    """DeepCache with a ControlNet inside the step graphs (the cached graphs run its shallow residuals only)."""
    from tstitch_trt.pipeline.control import ControlRequest
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    small, large, net = control_set
    bundle = build_sd(tmp_path_factory.mktemp("cpp-deepcache-control") / "sd", [small, large], "--controlnet",
                      str(net), "--cache-branch", str(BRANCH), backends="ort")
    pipe = StitchedSDPipeline.from_bundle(bundle, backend="openvino", precision="fp32")
    size = pipe.manifest.image_size
    image = np.random.default_rng(4).random((3, size, size), dtype=np.float32)
    kw = {"steps": 5, "cfg_scale": 7.5, "seed": 2, "ratio": 0.5}
    ref = pipe(PROMPTS, cache_interval=3, control=ControlRequest(image, scale=0.8, end=0.8), **kw)
    np.repeat(image[None], len(PROMPTS), axis=0).astype(np.float32).tofile(tmp_path / "control.f32")
    common = {"bundle": bundle, "engine": "openvino", "precision": "fp32", "steps": 5, "cfg": 7.5, "seed": 2,
              "ratio": 0.5, "batch": 2, "prompts": _prompt_file(tmp_path / "p.txt", PROMPTS),
              "inputs": f"control_image:{tmp_path / 'control.f32'}", "controlnet_scale": 0.8, "control_end": 0.8}
    proc, out, _ = run_c(tmp_path, **common, cache_interval=3)
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc) == ref.report["cache"]["cached_calls"]
    got = _latents(out, ref.latents)
    assert _rel(got, ref.latents) <= FP32_REL
    proc, out, _ = run_c(tmp_path, **common)
    assert proc.returncode == 0, proc.stderr
    assert _rel(got, _latents(out, ref.latents)) > 1e-3, "the cached calls changed nothing"
