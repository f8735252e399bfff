"""The C++ runtime's golden files (cpp/tests/golden, cpp/tests/data/toy_pair, toy_sd) are what the Python package
produces today: regenerated here and compared, so a change to the RNG use, the schedules, the sampler tables, the
stitch rules or the loop cannot leave the C++ tests checking stale numbers.

Everything is compared exactly (bit patterns, integers, strings, checksums, every toy-bundle file) except the float
values that CPU float math computes: torch's vectorised kernels (tanh, cumprod, ...) pick code paths by ISA, so the
toy trajectories and LCM's float32 alphas differ across CPUs in their last bits (measured: up to 4.1e-5 relative on
an AMX Xeon against the AVX512-BF16 EPYC that wrote them; 7e-8 with torch's default kernels instead of AVX-512
here). Those are compared to FLOAT_RTOL of the largest magnitude in their list: float32 rounding (2^-24) amplified
by up to 8 sampler steps whose coefficients reach ~1e3 is ~1e-4 at most; a changed table or rule moves them by
far more (tested below). Decoded RGB may differ by 1 where a float lands on a rounding edge.
Refresh after an intended change with: python tests/cpp_goldens.py --write
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cpp_goldens

FLOAT_RTOL = 1e-4  # of the largest magnitude in the list (see the module docstring)
RGB_ATOL = 1


def _numbers(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(e, int | float) and not isinstance(e, bool) for e in v)


def json_drift(fresh: object, committed: object, path: str = "") -> list[str]:
    """Where `committed` differs from `fresh` beyond the stated tolerance: exact for everything but floats (and RGB)."""
    if isinstance(fresh, dict) and isinstance(committed, dict):
        if sorted(fresh) != sorted(committed):
            return [f"{path}: keys {sorted(committed)} != {sorted(fresh)}"]
        return [d for k in fresh for d in json_drift(fresh[k], committed[k], f"{path}/{k}")]
    if _numbers(fresh) and _numbers(committed) and len(fresh) == len(committed):
        want, have = np.asarray(fresh, dtype=np.float64), np.asarray(committed, dtype=np.float64)
        if path.endswith("/rgb"):
            off = np.abs(want - have) > RGB_ATOL
            return [f"{path}: RGB differs by more than {RGB_ATOL} at {int(np.argmax(off))}"] if off.any() else []
        if all(isinstance(e, int) for e in fresh + committed):  # indices, timesteps, bit patterns: exact
            i = next((i for i, (a, b) in enumerate(zip(fresh, committed, strict=True)) if a != b), None)
            return [] if i is None else [f"{path}[{i}]: {committed[i]} != {fresh[i]}"]
        scale = max(float(np.max(np.abs(want))), 1e-30)
        err = float(np.max(np.abs(want - have)))
        return [f"{path}: max difference {err:.3g} > {FLOAT_RTOL:g} x {scale:.3g}"] if err > FLOAT_RTOL * scale else []
    if isinstance(fresh, list) and isinstance(committed, list):
        if len(fresh) != len(committed):
            return [f"{path}: {len(committed)} items != {len(fresh)}"]
        pairs = enumerate(zip(fresh, committed, strict=True))
        return [d for i, (a, b) in pairs for d in json_drift(a, b, f"{path}[{i}]")]
    if isinstance(fresh, float) and isinstance(committed, float):
        ok = abs(fresh - committed) <= FLOAT_RTOL * max(abs(fresh), abs(committed))
        return [] if ok else [f"{path}: {committed!r} != {fresh!r}"]
    return [] if fresh == committed and type(fresh) is type(committed) else [f"{path}: {committed!r} != {fresh!r}"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def drift(tmp_path: Path) -> list[str]:
    """Every difference between what cpp_goldens.py writes now (into tmp_path) and the committed files."""
    golden, bundle = tmp_path / "golden", tmp_path / "toy_pair"
    cpp_goldens.generate(golden, bundle)
    dirs = [(golden, cpp_goldens.GOLDEN), (bundle, cpp_goldens.TOY_BUNDLE),
            (tmp_path / "toy_sd", cpp_goldens.TOY_SD_BUNDLE)]
    dirs += [(tmp_path / name, cpp_goldens.TOY_BUNDLE.parent / name) for name in cpp_goldens.TOY_COND_BUNDLES]
    out = []
    for fresh, committed in dirs:
        want, have = _files(fresh), _files(committed)
        if sorted(have) != sorted(want):
            out.append(f"{committed}: files differ from what cpp_goldens.py writes")
            continue
        for name in want:
            if want[name] == have[name]:
                continue
            if not (fresh == golden and name.endswith(".json")):
                out.append(f"{committed / name}: bytes differ")
                continue
            out += [f"{name}{d}" for d in json_drift(json.loads(want[name]), json.loads(have[name]))]
    return out


def test_committed_goldens_match_python(tmp_path):
    stale = drift(tmp_path)
    assert not stale, (f"{len(stale)} golden values drifted from the Python package, first: {stale[:5]}; "
                       "run `python tests/cpp_goldens.py --write` and rerun the C++ tests")


def test_goldens_hold_with_other_cpu_kernels(tmp_path):
    """The committed goldens also match what torch's generic (non-AVX-512) kernels compute: the kind of drift another
    CPU's ISA gives (AMX / AVX512-FP16 paths on a Xeon), which a byte-equal comparison failed on."""
    code = ("import sys, pathlib; sys.path.insert(0, 'tests'); import test_cpp_goldens as t; "
            "d = t.drift(pathlib.Path(sys.argv[1])); print(d[:5]); sys.exit(1 if d else 0)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                       cwd=cpp_goldens.REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


@pytest.fixture(scope="module")
def sd_cond() -> dict:
    return json.loads((cpp_goldens.GOLDEN / "sd_cond_loop.json").read_text())


def test_tolerance_absorbs_rounding_only(sd_cond):
    """Last-bit changes pass; a changed value, rule or table fails."""
    run = sd_cond["runs"][0]
    scale = max(abs(v) for v in run["x"])
    ulps = copy.deepcopy(sd_cond)
    ulps["runs"][0]["x"] = [float(np.nextafter(np.float32(v), np.float32(np.inf))) for v in run["x"]]
    assert json_drift(sd_cond, ulps) == []
    moved = copy.deepcopy(sd_cond)
    moved["runs"][0]["x"][3] += 1e-3 * scale  # what a changed coefficient or step does, at the least
    assert json_drift(sd_cond, moved) and "runs[0]/x" in json_drift(sd_cond, moved)[0]
    rule = copy.deepcopy(sd_cond)
    rule["runs"][0]["step_model"][0] = 1 - rule["runs"][0]["step_model"][0]  # a changed stitch rule
    assert json_drift(sd_cond, rule) == [f"/runs[0]/step_model[0]: {rule['runs'][0]['step_model'][0]} != "
                                         f"{run['step_model'][0]}"]
    bits = copy.deepcopy(sd_cond)
    bits["runs"][0]["context_bits"][0] ^= 1  # bit patterns stay exact
    assert json_drift(sd_cond, bits)
    scalar = {"alpha": 0.1259104162454605}
    assert json_drift(scalar, {"alpha": 0.1259104311466217}) == []  # one float32 ulp apart (seen across kernels)
    assert json_drift(scalar, {"alpha": 0.126}) != []
    rgb = {"rgb": [10, 200, 0]}
    assert json_drift(rgb, {"rgb": [11, 199, 0]}) == [] and json_drift(rgb, {"rgb": [12, 200, 0]}) != []


def test_goldens_cover_every_sampler_and_the_rng_paths():
    import json

    sampling = json.loads((cpp_goldens.GOLDEN / "sampling.json").read_text())
    assert {t["sampler"] for t in sampling["tables"]} == {"ddim", "ddpm", "dpm-solver++"}
    assert any(p["noise_bits"] for p in sampling["plans"]) and any(not p["noise_bits"] for p in sampling["plans"])
    rng = json.loads((cpp_goldens.GOLDEN / "rng.json").read_text())
    assert len(rng["seeds"]) == len(cpp_goldens.SEEDS) and max(s["seed"] for s in rng["seeds"]) == 2**64 - 1


def test_manifest_corpus_is_refused_by_python_with_a_field_path():
    import json

    corpus = json.loads((cpp_goldens.GOLDEN / "manifest_cases.json").read_text())
    assert len(corpus["cases"]) == len(cpp_goldens.MANIFEST_CASES)
    for case in corpus["cases"]:
        doc = cpp_goldens.apply_patch(corpus["bases"][case["base"]], case["patch"])
        assert cpp_goldens.python_refusal(doc) == case["message"], case["name"]
    named = [c for c in corpus["cases"] if c["field"]]
    assert len(named) >= 50 and {c["base"] for c in named} == {"dit", "sd", "sdxl", "control", "lcm"}
