"""`tstitch-trt check --precision bf16`: the per-model bf16 verdict, its quality gate and --record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.bundle.manifest import artifact_path, read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.demo import DEMO_DIR  # noqa: E402
from tstitch_trt.export import bf16_gate  # noqa: E402
from tstitch_trt.export.bf16_gate import quality_gate, verdicts  # noqa: E402
from tstitch_trt.export.check import Comparison  # noqa: E402
from tstitch_trt.runtime.openvino_backend import cpu_has_bf16, resolve_precisions  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(ov.Core()), reason="this CPU has no native bf16 (AVX512_BF16 / AMX)")


def _artifacts_intact(bundle: Path) -> None:
    m = read_manifest(bundle)
    for model in m.models:
        for entry in model.engines.values():
            artifact_path(bundle, entry)  # raises on a checksum mismatch


@needs_bf16
def test_random_pair_verdict_is_recorded_with_its_isa(tiny_pair, tmp_path, capsys, monkeypatch):
    """With the sensitive ops in fp32 even random weights are within the step bound (x_next 0.7%, it was 6.8%
    with the timestep embedding in bf16): safe, recorded with this CPU's ISA; a failing check replaces it."""
    from tstitch_trt.export import check as check_mod
    from tstitch_trt.runtime.cpu_isa import bf16_isa

    bundle = tmp_path / "pair"
    shutil.copytree(tiny_pair, bundle)
    report = tmp_path / "check.json"
    code = main(["check", "--bundle", str(bundle), "--precision", "bf16", "--record", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"bf16 DiT-S/2: safe: on {bf16_isa()}: " in out
    assert f"recorded the bf16 verdict in {bundle / 'manifest.json'}" in out
    r = json.loads(report.read_text())
    rows = {(c["model"], c["backend"], c["precision"], c["output"]): c for c in r["comparisons"]}
    assert rows[("DiT-S/2", "openvino", "fp32", "x_next")]["status"] == "ok"  # OpenVINO fp32 checked by default
    assert rows[("DiT-S/2", "openvino", "bf16", "x_next")]["status"] == "ok"
    for m in json.loads((bundle / "manifest.json").read_text())["models"]:
        v = m["bf16"]
        assert v["safe"] is True and 1e-3 < v["step_max_rel"] < 0.02 and v["checked_with"].startswith("openvino ")
        assert v["isa"] == [bf16_isa()]
    _artifacts_intact(bundle)
    manifest = read_manifest(bundle)
    assert resolve_precisions(manifest, "auto", True, bf16_isa())[0] == ["bf16", "bf16"]
    assert main(["info", "--bundle", str(bundle)]) == 0
    assert f"bf16     safe on CPU backends, measured on {bf16_isa()} (openvino " in capsys.readouterr().out
    other = "avx512_bf16" if bf16_isa() == "amx_bf16" else "amx_bf16"
    assert resolve_precisions(manifest, "auto", True, other)[0] == ["fp32", "fp32"]

    # a bound bf16 cannot meet: NOT safe, exit 1, and that verdict replaces the safe one
    monkeypatch.setitem(check_mod.BF16_STEP_TOLERANCE, "x_next", {"max_rel": 1e-5, "min_cos": 0.9999999})
    assert main(["check", "--bundle", str(bundle), "--precision", "bf16", "--record"]) == 1
    assert "bf16 DiT-S/2: NOT safe" in capsys.readouterr().out
    assert all(m["bf16"]["safe"] is False for m in json.loads((bundle / "manifest.json").read_text())["models"])
    assert resolve_precisions(read_manifest(bundle), "auto", True, bf16_isa())[0] == ["fp32", "fp32"]
    _artifacts_intact(bundle)


def test_verdict_needs_every_check():
    ok = [Comparison("S", "openvino", o, "bf16", "ok", 0.1, 0.01, 0.99999, tolerance={"max_rel": 0.02, "min_cos": 0.9})
          for o in ("x_next", "x0")]
    manifest = type("M", (), {"models": [type("E", (), {"name": "S"})()]})()
    good = {"pass": True, "summary": "ratio 0.4: ..."}
    assert verdicts(manifest, ok, good, "openvino x")["S"]["safe"] is True  # type: ignore[arg-type]
    v = verdicts(manifest, ok, good, "openvino x", "amx_bf16")["S"]  # type: ignore[arg-type]
    assert v["isa"] == ["amx_bf16"] and v["reason"].startswith("on amx_bf16: one step vs torch fp32")
    assert verdicts(manifest, ok, None, "openvino x")["S"]["safe"] is True  # type: ignore[arg-type]
    assert verdicts(manifest, ok, {**good, "pass": False}, "x")["S"]["safe"] is False  # type: ignore[arg-type]
    bad = [ok[0], Comparison("S", "openvino", "x0", "bf16", "FAIL", 9.0, 0.9, 0.5, tolerance=ok[0].tolerance)]
    v = verdicts(manifest, bad, good, "x")["S"]  # type: ignore[arg-type]
    assert v["safe"] is False and "x0 max rel 0.9" in v["reason"] and "OUTSIDE" in v["reason"]


def test_a_verdict_names_its_isas():
    """Safe on one ISA then safe on another: one verdict listing both (worst figures); anything else replaces."""
    amx = {"safe": True, "reason": "on amx_bf16: a", "step_max_rel": 0.01, "step_min_cosine": 0.9999,
           "checked_with": "x", "isa": ["amx_bf16"]}
    avx = {**amx, "reason": "on avx512_bf16: b", "step_max_rel": 0.005, "step_min_cosine": 0.9998,
           "isa": ["avx512_bf16"]}
    both = bf16_gate.merge_verdict(amx, avx)
    assert both["isa"] == ["amx_bf16", "avx512_bf16"] and both["safe"] is True
    assert both["step_max_rel"] == 0.01 and both["step_min_cosine"] == 0.9998
    assert "on avx512_bf16: b" in both["reason"] and "on amx_bf16: a" in both["reason"]
    assert bf16_gate.merge_verdict(amx, {**avx, "safe": False}) == {**avx, "safe": False}  # not safe here: replaced
    assert bf16_gate.merge_verdict({"safe": True}, avx) == avx  # an old verdict without isa is replaced
    assert bf16_gate.merge_verdict(both, avx) == avx  # re-measured on one ISA only: that measurement


def test_record_needs_bf16_and_a_writable_bundle(tiny_pair, tmp_path, capsys, monkeypatch):
    assert main(["check", "--bundle", str(tiny_pair), "--record"]) == 2
    assert capsys.readouterr().err == "error: --record writes the bf16 verdict; give --precision bf16 with it\n"
    if not cpu_has_bf16(ov.Core()):
        return
    bundle = tmp_path / "ro"
    shutil.copytree(tiny_pair, bundle)
    before = (bundle / "manifest.json").read_text()

    def read_only(src, dst):  # what a read-only bundle (e.g. inside site-packages) does; chmod cannot stop root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bf16_gate.os, "replace", read_only)
    assert main(["check", "--bundle", str(bundle), "--precision", "bf16", "--record"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot record the bf16 verdict in {bundle / 'manifest.json'} (Permission denied)")
    assert err.count("\n") == 1
    assert (bundle / "manifest.json").read_text() == before and sorted(p.name for p in bundle.iterdir()) == sorted(
        p.name for p in tiny_pair.iterdir())  # no temporary file left behind


@needs_bf16
def test_quality_gate_on_the_demo_pair():
    """The evaluator's FID / accuracy in fp32 and bf16 (40 images: structure and sanity, not the 500-image verdict)."""
    q = quality_gate(DEMO_DIR, 40, seed=0)
    assert [p["ratio"] for p in q["points"]] == [0.0, 0.4] and q["images_per_point"] == 40
    for p in q["points"]:
        assert p["fid_change"] == pytest.approx((p["fid_bf16"] - p["fid_fp32"]) / p["fid_fp32"])
        assert abs(p["accuracy_change"]) <= 0.1  # bf16 must not break the trained pair
        assert p["fid_bf16"] != p["fid_fp32"]  # bf16 really ran
    assert q["pass"] == all(p["pass"] for p in q["points"])


def test_demo_pair_records_its_bf16_verdict():
    """The shipped pair carries the verdict of `check --precision bf16 --record` (500 images), checksums intact."""
    manifest = read_manifest(DEMO_DIR)
    _artifacts_intact(DEMO_DIR)
    for m in manifest.models:
        assert m.bf16 is not None and m.bf16["safe"] is True, m.name
        assert "ratio 0.4: FID" in m.bf16["reason"] and "(500 images)" in m.bf16["reason"]
        assert "avx512_bf16" in m.bf16["isa"]  # measured on an AMD EPYC (AVX512-BF16, no AMX): docs/cpu.md
    assert resolve_precisions(manifest, "auto", True, "avx512_bf16")[0] == ["bf16", "bf16"]
    if "amx_bf16" not in manifest.models[0].bf16["isa"]:  # nobody has measured it on AMX yet: fp32 there
        precisions, why = resolve_precisions(manifest, "auto", True, "amx_bf16")
        assert precisions == ["fp32", "fp32"] and "measured on avx512_bf16, this CPU is amx_bf16" in why
    assert resolve_precisions(manifest, "auto", False, "avx512_bf16")[0] == ["fp32", "fp32"]
