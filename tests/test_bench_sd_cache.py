"""The SD CPU benchmark's DeepCache runner (benchmarks/sd_ours_warm.py --cache-interval N --cache-branch K, which
benchmarks/sd_cpu_vs_genai.py --cache-intervals drives): on a tiny bundle built with --cache-branch, its timed
images follow DeepCache's plan (the full calls the sampling plan says), the per-call figures split into full and
cached calls of each model, both cached graphs are compiled (and read back) by the untimed image, and an untimed
image too short to use every cached graph is refused rather than timed with a cached graph's first load inside.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino")
pytest.importorskip("diffusers")

from conftest import build_sd  # noqa: E402
from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.sampling.cache_plan import cached_calls  # noqa: E402
from tstitch_trt.sampling.sd_samplers import default_sampler, sd_table  # noqa: E402
from tstitch_trt.sampling.stitch import stitch_schedule_by_call  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "sd_ours_warm.py"
STEPS = 8


@pytest.fixture(scope="module")
def cache_bundle(sd_pair, tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("bench-cache") / "k0", list(sd_pair), "--cache-branch", "0",
                    backends="ort")


def warm(bundle: Path, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(bundle), "--precision", "fp32", "--size", "32",
                           "--steps", str(STEPS), "--ratios", "0,0.4", "--out", str(tmp / "out.json"), *flags],
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin",
                               "TSTITCH_OPENVINO_CACHE": str(tmp / "ov-cache")})


def test_warm_runner_times_deepcache_plan(cache_bundle, tmp_path) -> None:
    proc = warm(cache_bundle, tmp_path, "--cache-interval", "3", "--cache-branch", "0", "--warm-steps", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    manifest = read_manifest(cache_bundle)
    table = sd_table(default_sampler(manifest.scheduler), manifest.scheduler, STEPS, 0.0)
    for ratio in (0.0, 0.4):
        step_model = stitch_schedule_by_call(len(table.timesteps), 2, ratio=ratio)
        cached = cached_calls(table.timesteps, step_model, 3)
        (run,) = out["runs"][f"r{ratio:g}"]
        assert run["full_calls"] == [i for i in range(len(cached)) if not cached[i]]
        calls = run["unet_call_ms"]
        for m, model in enumerate(("small", "large")):
            mine = step_model == m
            assert len(calls[f"{model}_full"]) == int((mine & ~cached).sum())
            assert len(calls[f"{model}_cached"]) == int((mine & cached).sum())
            assert sorted(calls[f"{model}_full"] + calls[f"{model}_cached"]) == sorted(calls[model])
        assert cached.any()
    cached_parts = [k for k in out["runtime_precisions"] if k.endswith("(DeepCache cached graph)")]
    assert len(cached_parts) == 2 and all(out["runtime_precisions"][k] for k in cached_parts)


def test_warm_runner_refuses_an_untimed_image_that_skips_a_cached_graph(cache_bundle, tmp_path) -> None:
    # 2 PNDM steps at ratio 0.4: 1 small call, 2 large, all full (each model's count restarts at its first call)
    proc = warm(cache_bundle, tmp_path, "--cache-interval", "3", "--cache-branch", "0", "--warm-steps", "2")
    assert proc.returncode != 0 and "raise --warm-steps" in proc.stderr
    assert not (tmp_path / "out.json").exists()
