"""`tstitch-trt bench` smoke: the report's schema and sanity, never speed (targets live in the benchmark)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tstitch_trt.bench import IdleGate, Trajectory, evaluate_targets, measure_sweep, stats, sweep_ratios
from tstitch_trt.cli import main


def _finite_pos(s: dict) -> bool:
    return all(math.isfinite(s[k]) and s[k] > 0 for k in ("min", "median")) and s["min"] <= s["median"]


def test_bench_smoke_schema(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--bundle", str(tiny_pair), "--steps", "4", "--batch", "2", "--step-batches", "1,2",
                 "--repeats", "2", "--warmup", "1", "--ratios", "0.5", "--out", str(out), "--backends", "ort,torch",
                 "--no-reference-bf16"])
    _, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads((out / "bench.json").read_text())
    assert r["schema"] == "tstitch-bench/1"
    assert r["workload"]["models"] == ["DiT-S/2", "DiT-B/2"] and r["workload"]["steps"] == 4
    assert r["host"]["threads"] >= 1 and len(r["load_average"]["start"]) == 3
    assert set(r["backends"]) == {"ort", "torch"}
    for name, e in r["backends"].items():
        assert e["status"] == "ok", name
        for model in ("DiT-S/2", "DiT-B/2"):
            for b in ("1", "2"):
                s = e["step_ms"][model][b]
                assert _finite_pos(s["wall_ms"]) and s["wall_ms"]["n"] == 2 and _finite_pos(s["engine_ms"])
                assert s["gflops_at_min"] > 0
        e2e = e["e2e"]
        assert _finite_pos(e2e["seconds"]) and e2e["seconds"]["n"] == 2
        assert e2e["steps_per_model"] == [2, 2]  # ratio 0.4 of 4 steps: t in {999, 666} on the small model
        assert all(math.isfinite(v) and v > 0 for v in e2e["speedup_vs_reference"].values())
        assert e2e["host_overhead_ms_per_step"]["min"] >= 0 and math.isfinite(e2e["host_overhead_pct"]["median"])
        # the whole trajectory's non-engine time includes the loop's, so it is at least as large
        assert e2e["trajectory_overhead_ms_per_step"]["min"] >= e2e["host_overhead_ms_per_step"]["min"] > 0
        # the baseline computes the same trajectory as our backends
        assert e2e["max_rel_diff_vs_reference"] < 1e-3
        sweep = e["ratio_sweep"]
        assert [p["ratio"] for p in sweep["points"]] == [0.0, 0.5, 1.0]
        assert [p["small_steps"] for p in sweep["points"]] == [0, 2, 4]
        for p in sweep["points"]:
            assert _finite_pos(p["seconds"]) and _finite_pos(p["ideal_seconds"])
            assert all(math.isfinite(v) for v in p["gap_pct"].values())
        host = e["memory"]["host"]
        assert host["peak_rss_mb"] > 0 and host["peak_rss_mb"] >= host["rss_before_mb"]
    ref = r["reference"]
    assert ref["status"] == "ok" and _finite_pos(ref["e2e"]["seconds"]) and ref["e2e"]["steps_per_model"] == [2, 2]
    assert all(isinstance(t["pass"], bool) for t in r["targets"])
    assert {t["backend"] for t in r["targets"]} == {"ort", "torch"}
    md = (out / "bench.md").read_text()
    assert "| reference loop (eager PyTorch) |" in md and "## ort: time against the ratio" in md


def test_gpu_backends_are_skipped_without_gpu(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    from tstitch_trt.runtime.cuda import device_count as cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a GPU is present: the trt backend would run, not be skipped")
    bundle = tmp_path / "with-trt"
    shutil.copytree(tiny_pair, bundle)
    man = json.loads((bundle / "manifest.json").read_text())
    for m in man["models"]:  # engines the runtime must not even open without a GPU
        m["engines"]["trt"] = {**m["engines"]["ort"], "file": "trt/none.plan", "precision": "fp16"}
    (bundle / "manifest.json").write_text(json.dumps(man))
    code = main(["bench", "--bundle", str(bundle), "--backends", "trt,ort", "--parts", "steps", "--steps", "2",
                 "--step-batches", "1", "--repeats", "1", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert r["backends"]["trt"] == {"status": "skipped", "reason": "needs an NVIDIA GPU"}
    assert r["backends"]["ort"]["status"] == "ok" and "e2e" not in r["backends"]["ort"]
    assert r["reference"] is None  # --parts steps: no end-to-end figure, no baseline run


def test_quality_needs_a_bundle_with_the_evaluator(tiny_pair: Path, capsys) -> None:
    assert main(["bench", "--quality", "--bundle", str(tiny_pair)]) == 2  # a DiT bundle: no digit classifier
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no eval/eval.json" in err and err.count("\n") == 1
    assert main(["bench", "--quality", "--workload", "dit-s-xl"]) == 2
    err = capsys.readouterr().err
    assert "does not apply to --workload dit-s-xl" in err and err.count("\n") == 1


def test_bad_arguments_are_user_errors(capsys) -> None:
    assert main(["bench", "--bundle", "/nonexistent/bundle", "--no-reference"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--ratios", "0.5,2"]) == 2
    assert "ratios must be in [0, 1]" in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_user_error(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "--bundle", str(tiny_pair), "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


class _LinearRunner:
    """Seconds = large steps x T_L + small steps x T_S + a fixed cost + a per-switch cost."""

    name = "fake"

    def __init__(self, switch_cost: float):
        self.switch_cost = switch_cost

    def trajectory(self, z, labels, steps, ratio, cfg):  # noqa: ARG002
        small = round(ratio * steps)
        secs = 0.01 + small * 0.1 + (steps - small) * 1.0 + (self.switch_cost if 0 < small < steps else 0.0)
        return Trajectory(secs, np.zeros(1), [small, steps - small])


def test_ratio_sweep_ideal_line_math() -> None:
    args = type("A", (), {"ratios": [0.3], "repeats": 2, "cfg_scale": 1.5})()
    sw = measure_sweep(_LinearRunner(0.0), None, None, 10, args, 2, lambda m: None)  # type: ignore[arg-type]
    assert [p["ratio"] for p in sw["points"]] == [0.0, 0.3, 1.0]
    assert sw["max_abs_gap_pct"]["min"] < 1e-9  # time linear in the small share: on the ideal line
    mid = sw["points"][1]
    assert mid["ideal_seconds"]["min"] == pytest.approx(0.01 + 3 * 0.1 + 7 * 1.0)
    sw = measure_sweep(_LinearRunner(0.5), None, None, 10, args, 2, lambda m: None)  # type: ignore[arg-type]
    assert sw["points"][1]["gap_pct"]["min"] == pytest.approx(100 * 0.5 / 7.31)
    result = {"backends": {"fake": {"ratio_sweep": sw}}}
    (target,) = evaluate_targets(result)
    assert target["backend"] == "fake" and target["pass"] is False


def test_helpers() -> None:
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.5, 10.0, 4)
    assert sweep_ratios(None, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert sweep_ratios(None, 50) == [round(i / 10, 4) for i in range(11)]
    assert sweep_ratios([0.4], 100) == [0.0, 0.4, 1.0]


def test_bench_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tstitch_trt.bench, tstitch_trt.cli\n"
            "tstitch_trt.cli.build_parser().parse_args(['bench', '--workload', 'dit-s-xl', '--plot'])\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_idle_gate() -> None:
    off = IdleGate(0.0)
    off.wait()
    assert off.waits == 0  # off by default: no sampling, no delay
    gate = IdleGate(0.5, busy_cores=1e9, window=0.05)  # any load counts as idle: returns after one sample
    gate.wait()
    assert gate.report()["waits"] == 1 and gate.timeouts == 0
    if sys.platform.startswith("linux"):
        busy = gate.others_busy_cores()
        assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 0.5
    strict = IdleGate(0.2, busy_cores=-1.0, window=0.05)  # never idle enough: gives up after max_wait_s
    strict.wait()
    assert strict.timeouts == (1 if sys.platform.startswith("linux") else 0)


def test_bench_openvino_beside_ort_and_both_baselines(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    """Default backends: OpenVINO fp32 / bf16 join ort where installed; the bf16-autocast reference is timed too."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from tstitch_trt.bench.host import native_bf16

    out = tmp_path / "bench"
    code = main(["bench", "--bundle", str(tiny_pair), "--steps", "4", "--batch", "2", "--step-batches", "2",
                 "--repeats", "2", "--warmup", "1", "--parts", "steps,e2e", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads((out / "bench.json").read_text())
    ov_runners = ["openvino", "openvino-bf16"] if native_bf16() else ["openvino"]
    assert list(r["backends"]) == ["ort", *ov_runners, "torch"]
    assert r["host"]["openvino"] and isinstance(r["host"]["native_bf16"], bool)
    for name in ov_runners:
        e = r["backends"][name]
        assert e["status"] == "ok" and e["device"] == "cpu"
        assert _finite_pos(e["step_ms"]["DiT-S/2"]["2"]["wall_ms"]) and _finite_pos(e["e2e"]["seconds"])
        sv = e["e2e"]["speedup_vs"]
        assert {"reference", "ort", "torch"} <= set(sv) and name not in sv
        # the ratio is the same round robin's: ort's seconds over this runner's
        ort_s, own_s = r["backends"]["ort"]["e2e"]["seconds"], e["e2e"]["seconds"]
        assert sv["ort"]["min"] == pytest.approx(ort_s["min"] / own_s["min"])
    assert r["backends"]["openvino"]["e2e"]["max_rel_diff_vs_reference"] < 1e-3  # fp32: the same trajectory
    if native_bf16():
        ref16 = r["reference_bf16"]
        assert ref16["status"] == "ok" and _finite_pos(ref16["e2e"]["seconds"])
        assert "reference-bf16" in r["backends"]["openvino-bf16"]["e2e"]["speedup_vs"]
        assert "| reference loop under torch.autocast(bf16) |" in (out / "bench.md").read_text()
    assert "speedup, end to end, measured in the same round robin" in (out / "bench.md").read_text()


def test_openvino_speed_targets_per_workload() -> None:
    def e2e(**sv):
        return {"e2e": {"speedup_vs": {k.replace("_", "-"): {"min": v, "median": v} for k, v in sv.items()}}}

    result = {"workload": {"name": "demo"},
              "backends": {"openvino": e2e(ort=1.3), "openvino-bf16": e2e(ort=1.7, reference=9.0)}}
    got = {(t["backend"], t["pass"]) for t in evaluate_targets(result)}
    assert got == {("openvino", True), ("openvino-bf16", False)}
    result = {"workload": {"name": "dit-s-xl"},
              "backends": {"openvino-bf16": e2e(ort=1.9, reference=2.6, reference_bf16=1.2)}}
    targets = evaluate_targets(result)
    assert [t["pass"] for t in targets] == [True, True, False]
    assert "faster than the reference loop under bf16 autocast" in targets[2]["target"]
