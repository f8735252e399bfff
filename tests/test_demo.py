"""The built-in demo pair: shipped files, backend agreement, the evaluator and a quality smoke test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tstitch_trt.bundle.manifest import artifact_path, read_manifest
from tstitch_trt.demo import DEMO_DIR, demo_bundle_dir
from tstitch_trt.errors import UserError

DEFAULT_LABELS = [c for _ in range(2) for c in range(10)]  # what `tstitch-trt run` samples by default


def test_shipped_pair_loads_and_checksums_match():
    bundle = demo_bundle_dir()
    assert bundle == DEMO_DIR
    m = read_manifest(bundle)
    assert [x.name for x in m.models] == ["DiT-Demo-S/4", "DiT-Demo-L/4"]
    assert m.latent_shape == (1, 32, 32) and m.num_classes == 10 and m.latent_scale_factor == 1.0
    assert m.models[1].macs_per_forward >= 8 * m.models[0].macs_per_forward
    for model in m.models:
        assert model.arch["learn_sigma"] and model.arch["in_channels"] == 1
        for kind in ("torch", "ort"):
            assert artifact_path(bundle, model.engines[kind], verify=True).is_file()
    index = json.loads((bundle / "eval" / "eval.json").read_text())
    for rel in index["sha256"]:
        from tstitch_trt.bundle.manifest import sha256_file

        assert sha256_file(bundle / rel) == index["sha256"][rel], rel
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 25e6, f"the demo pair is {size / 1e6:.1f} MB"


def test_corrupted_pair_is_refused(tmp_path, capsys):
    bundle = tmp_path / "pair"
    shutil.copytree(DEMO_DIR, bundle)
    m = read_manifest(bundle)
    onnx = bundle / m.models[0].engines["ort"].file
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        artifact_path(bundle, m.models[0].engines["ort"], verify=True)
    from tstitch_trt.cli import main

    out = tmp_path / "grid.png"
    assert main(["run", "--bundle", str(bundle), "--backend", "ort", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checksum mismatch") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.png"))
    from tstitch_trt.eval.scorer import DigitScorer

    (bundle / "eval" / "heldout.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="checksum mismatch"):
        DigitScorer(bundle)


def test_default_run_ort_matches_torch():
    pytest.importorskip("torch")
    from tstitch_trt.pipeline.dit import StitchedPipeline

    out = {}
    for backend in ("ort", "torch"):
        pipe = StitchedPipeline.from_bundle(DEMO_DIR, backend=backend, device="cpu")
        try:
            out[backend] = pipe(DEFAULT_LABELS, ratio=0.4, steps=50, cfg_scale=1.5, seed=0, progress=False).latents
        finally:
            pipe.close()
    scale = float(np.abs(out["torch"]).max())
    diff = float(np.abs(out["ort"] - out["torch"]).max())
    assert scale > 0.5  # real images, not zeros
    assert diff <= 1e-3 * scale, f"ORT vs torch: max abs diff {diff:.2e} at max magnitude {scale:.2f}"


def test_cli_default_run_writes_grid(tmp_path, monkeypatch):
    from PIL import Image

    from tstitch_trt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--backend", "ort", "--no-progress"]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1
    grid = np.asarray(Image.open(pngs[0]))
    assert grid.shape == (2 * 34 + 2, 10 * 34 + 2)  # 2 rows of the digits 0-9, 32 px each + borders
    assert grid.std() > 20  # digits, not a flat image


def test_quality_smoke():
    """40 digits at ratio 0.4 and on the small model alone, through the evaluator (loose bounds: 40 samples).

    Measured when the pair was trained: ratio 0.4 scores 97.5% / FID 69, the small model alone 87.5% /
    FID 188 (FID of 40 samples is biased upwards; the README's 500-sample sweep gives 15.7 and 127.6).
    """
    from tstitch_trt.eval.quality import quality_sweep

    res = quality_sweep(DEMO_DIR, [0.4, 1.0], images_per_point=40, backend="ort", batch=40)
    stitched, small = res["points"]
    assert stitched["steps_per_model"] == [20, 30] and small["steps_per_model"] == [50, 0]
    assert stitched["accuracy"] >= 0.85, stitched
    assert 0 < stitched["fid"] < 120, stitched
    assert small["fid"] > stitched["fid"] + 30, (small, stitched)  # the trade-off shows even at 40 samples
    assert res["reference"]["heldout_accuracy"] > 0.95
    assert stitched["seconds_per_image"] > 0

def test_default_run_without_torch(tmp_path):
    """`tstitch-trt run` with no arguments, torch unimportable: auto picks OpenVINO (or ORT), writes the grid."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tstitch_trt.demo, tstitch_trt.eval.quality, tstitch_trt.eval.scorer\n"
            "from tstitch_trt.cli import main\n"
            "sys.exit(main(['run', '--no-progress']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import importlib.util

    auto = "openvino" if importlib.util.find_spec("openvino") else "ort"  # auto prefers OpenVINO on the CPU
    assert f"(20 DiT-Demo-S/4, 30 DiT-Demo-L/4) on {auto} [cpu], batch 20" in proc.stdout, proc.stdout
    assert f"wrote {tmp_path / 'tstitch-demo.png'}" in proc.stdout
    assert "torch" not in proc.stderr.lower(), proc.stderr
