"""The CLI contract: commands, reports, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tstitch_trt.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_latents_and_report(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--sampler", "ddim",
                              "--steps", "10", "--ratio", "0.4", "--cfg-scale", "1.5", "--class-labels", "1,2,3",
                              "--seed", "7", "--save-latents", str(tmp_path / "z.npy"),
                              "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("backend", "steps", "step_model", "steps_per_model", "step_ms", "total_seconds"):
        assert key in rep
    assert rep["backend"] == "ort" and rep["steps"] == 10 and rep["steps_per_model"] == [4, 6]
    assert len(rep["step_ms"]) == 10 and all(v > 0 for v in rep["step_ms"])
    assert np.load(tmp_path / "z.npy").shape == (3, 4, 8, 8)
    # no VAE in this bundle: it makes latents, and says where they went
    assert "no VAE" in out and str((tmp_path / "z.npy").resolve()) in out


def test_run_without_vae_writes_latents_not_nothing(tiny_pair: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--bundle", str(tiny_pair), "--steps", "3", "--class-labels", "1"], capsys)
    assert code == 0, err
    written = tmp_path / f"tstitch-{tiny_pair.name}-latents.npy"
    assert np.load(written).shape == (1, 4, 8, 8) and str(written) in out
    # an image was asked for, and this bundle cannot make one: refused before any work, nothing written
    code, out, err = run_cli(["run", "--bundle", str(tiny_pair), "--steps", "3", "--out", "g.png"], capsys)
    assert code == 2 and "no VAE" in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_info_describes_bundle(tiny_pair: Path, capsys) -> None:
    code, out, _ = run_cli(["info", "--bundle", str(tiny_pair)], capsys)
    assert code == 0
    assert "DiT-S/2" in out and "DiT-B/2" in out and "latent 4x8x8" in out and "10 classes" in out


def test_three_model_fractions(tiny_trio: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the VAE-less bundle writes its latents to the working directory
    code, _, err = run_cli(["run", "--bundle", str(tiny_trio), "--backend", "torch", "--steps", "10",
                            "--fractions", "0.3,0.3,0.4", "--class-labels", "0", "--report",
                            str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["steps_per_model"] == [3, 3, 4]


BAD_RUNS = [
    (["--ratio", "1.5"], "--ratio: must be in [0, 1]"),
    (["--ratio", "-0.2"], "--ratio: must be in [0, 1]"),
    (["--fractions", "0.5,0.6"], "sum to 1"),
    (["--fractions", "0.2,0.3,0.5"], "3 fractions for 2 models"),
    (["--steps", "0"], "--steps: must be between 1 and"),
    (["--class-labels", "3,10"], "class label 10 is outside [0, 10)"),
    (["--class-labels", "-1"], "class label -1"),
    (["--sampler", "heun"], "invalid choice"),
    (["--sampler", "euler"], "--sampler euler is for text-to-image (sd) bundles"),
]


@pytest.mark.parametrize("extra, msg", BAD_RUNS)
def test_bad_run_input_is_one_line_exit_2(tiny_pair: Path, extra: list[str], msg: str, capsys) -> None:
    code, _, err = run_cli(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--steps", "4", *extra], capsys)
    assert code == 2
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_argparse_errors_exit_2(capsys) -> None:
    code, _, err = run_cli(["run", "--ratio", "abc"], capsys)
    assert code == 2 and "expected a number, got 'abc'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["build", "--batch-sizes", "8-2"], capsys)
    assert code == 2 and "1 <= MIN <= MAX" in err


def test_init_noise_wrong_shape(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 16, 16), np.float32))
    code, _, err = run_cli(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--steps", "2",
                            "--init-noise", str(tmp_path / "bad.npy")], capsys)
    assert code == 2 and "--init-noise has shape (2, 4, 16, 16), expected (B, 4, 8, 8)" in err
    np.save(tmp_path / "good.npy", np.zeros((3, 4, 8, 8), np.float32))
    code, _, err = run_cli(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--steps", "2",
                            "--init-noise", str(tmp_path / "good.npy"), "--class-labels", "1,2"], capsys)
    assert code == 2 and "batch 3 but 2 class labels" in err


def test_init_noise_sets_batch_with_one_label(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32))
    code, _, err = run_cli(["run", "--bundle", str(tiny_pair), "--backend", "ort", "--steps", "2", "--class-labels",
                            "5", "--init-noise", str(tmp_path / "z.npy"), "--save-latents",
                            str(tmp_path / "o.npy")], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "o.npy").shape == (3, 4, 8, 8)


def test_missing_and_corrupt_bundles(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--bundle", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pair, broken)
    (broken / "manifest.json").write_text("{ not json")
    code, _, err = run_cli(["info", "--bundle", str(broken)], capsys)
    assert code == 2 and "corrupt" in err
    # a bundle whose weights changed after the build
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_pair, tampered)
    onnx_file = next((tampered / "onnx").glob("0-*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    code, _, err = run_cli(["run", "--bundle", str(tampered), "--backend", "ort", "--steps", "2"], capsys)
    assert code == 2 and "checksum mismatch" in err
    # a missing engine file
    onnx_file.unlink()
    code, _, err = run_cli(["run", "--bundle", str(tampered), "--backend", "ort", "--steps", "2"], capsys)
    assert code == 2 and "is missing" in err


def test_models_with_different_latent_shapes_are_refused(tiny_pair: Path, tmp_path: Path, capsys) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(tiny_pair, odd)
    m = json.loads((odd / "manifest.json").read_text())
    m["models"][1]["arch"]["input_size"] = 16
    (odd / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["info", "--bundle", str(odd)], capsys)
    assert code == 2 and "latent shapes differ" in err


def test_build_refuses_mismatched_checkpoint(tmp_path: Path, capsys) -> None:
    import torch

    from tstitch_trt.models.dit import dit_config, randomized_dit

    ckpt = tmp_path / "s.pt"
    torch.save(randomized_dit(dit_config("DiT-S/2", input_size=8, num_classes=10)).state_dict(), ckpt)
    code, _, err = run_cli(["build", "--model", f"DiT-S/2={ckpt}", "--model", f"DiT-B/2={ckpt}", "--image-size",
                            "64", "--num-classes", "10", "--backend", "torch", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "pos_embed" in err and "(1, 16, 384)" in err and "(1, 16, 768)" in err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_console_script_reports_user_error_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--bundle", str(tmp_path / "x"),
                           "--ratio", "0.4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
