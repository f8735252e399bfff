"""The engine's promises under attack: tampered manifests and files, path escapes, hostile CLI values,
unwritable outputs, kills mid-build, huge batches. Every case must end in ONE line on stderr, exit 2
(1 for internal errors, with a log), nothing half-written, nothing of the user's touched."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tstitch_trt.bundle.manifest import sha256_file
from tstitch_trt.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *fragments: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"


@pytest.fixture
def bundle(tiny_pair: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny DiT pair (torch + ort, no VAE) to tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_pair, dst)
    return dst


def edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def reseal(bundle: Path, model: int, backend: str) -> None:
    """Record a replaced file's checksum, as an attacker who edits both would."""
    def fix(m: dict) -> None:
        e = m["models"][model]["engines"][backend]
        e["sha256"] = sha256_file(bundle / e["file"])
    edit_manifest(bundle, fix)


def run_bundle(bundle: Path, capsys, *extra: str, backend: str = "auto") -> tuple[int, str, str]:
    return run_cli(["run", "--bundle", bundle, "--backend", backend, "--steps", "3", "--class-labels", "1,2",
                    "--save-latents", bundle.parent / "z.npy", *extra], capsys)


# --- 1. manifest tampering ---------------------------------------------------------------------------------
def _set(path: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[last]
    return edit


MANIFEST_CASES = [
    ("newer format version", _set("format_version", 2), "format version 2, newer than this tstitch-trt reads"),
    ("format version as text", _set("format_version", "1"), "format_version must be an integer"),
    ("foreign format", _set("format", "other"), "is not a tstitch bundle manifest"),
    ("unknown pipeline kind", _set("pipeline", "video-diffusion"), "pipeline is 'video-diffusion'"),
    ("cosine schedule", _set("schedule.kind", "cosine"), "schedule.kind is 'cosine'"),
    ("timesteps as text", _set("schedule.num_timesteps", "1000"), "schedule.num_timesteps must be of type integer"),
    ("negative batch range", _set("models.0.engines.ort.batch_range", [-4, 8]),
     "models[0].engines.ort.batch_range[0] is -4, must be >= 1"),
    ("empty batch range", _set("models.1.engines.ort.batch_range", [8, 2]), "batch_range [8, 2] is empty"),
    ("unknown top-level field", _set("sampler_override", "euler"), "sampler_override is a field this tstitch-trt"),
    ("unknown backend key", _set("models.0.engines.cuda", {"file": "x", "sha256": "0" * 64}),
     "models[0].engines has the key 'cuda'; this tstitch-trt knows only"),
    ("malformed checksum", _set("models.0.engines.ort.sha256", "abc"), "models[0].engines.ort.sha256 is 'abc'"),
    ("missing arch field", _drop("models.0.arch.depth"), "models[0].arch lacks the required field 'depth'"),
    ("arch field as text", _set("models.1.arch.depth", "3"), "models[1].arch.depth must be of type integer"),
    ("bool as depth", _set("models.1.arch.depth", True), "models[1].arch.depth must be of type integer"),
    ("latent shapes differ", _set("models.1.arch.input_size", 16), "latent shapes differ"),
    ("class counts differ", _set("num_classes", 12), "class counts"),
    ("guidance beyond channels", _set("guidance_channels", 99), "guidance_channels 99 exceeds"),
    ("image size off", _set("image_size", 70), "image_size 70 does not fit"),
    ("one model", lambda m: m["models"].pop(), "models has the wrong size"),
    ("models not a list", _set("models", {"a": 1}), "models must be of type array"),
    ("huge depth", _set("models.0.arch.depth", 10**9), "models[0].arch.depth is 1000000000, must be <= 256"),
    ("unknown precision", _set("models.0.engines.ort.precision", "int4"), "precision is 'int4'"),
    ("vae of another kind", _set("vae", {"kind": "VQModel", "engines": {}}), "vae"),
]


@pytest.mark.parametrize("case, edit, message", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_tampered_manifest_is_refused_naming_the_field(bundle, capsys, case, edit, message):
    edit_manifest(bundle, edit)
    for cmd in (["run", "--bundle", bundle, "--steps", "2", "--class-labels", "1",
                 "--save-latents", bundle.parent / "z.npy"], ["info", "--bundle", bundle]):
        code, _, err = run_cli(cmd, capsys)
        assert_one_line(code, err, message)
    assert not (bundle.parent / "z.npy").exists()


RAW_MANIFESTS = [
    ("not JSON", b"{ this is not json", "is not valid JSON"),
    ("JSON array", b"[1, 2, 3]", "holds a JSON list, not a manifest object"),
    ("empty", b"", "is not valid JSON"),
    ("NaN constant", None, "is not valid JSON"),
    ("binary", bytes(range(256)), "is not valid JSON"),
    ("deeply nested", b"[" * 200_000, "nests deeper than any manifest does"),
]


@pytest.mark.parametrize("case, content, message", RAW_MANIFESTS, ids=[c[0] for c in RAW_MANIFESTS])
def test_unreadable_manifest(bundle, capsys, case, content, message):
    path = bundle / "manifest.json"
    if content is None:
        content = path.read_text().replace('"latent_scale_factor": 1.0', '"latent_scale_factor": NaN').encode()
        content = content if b"NaN" in content else path.read_bytes().replace(b"0.18215", b"NaN")
    path.write_bytes(content)
    code, _, err = run_bundle(bundle, capsys)
    assert_one_line(code, err, message)


# --- 2. paths that leave the bundle ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../../elsewhere/x.onnx", "/etc/passwd", "onnx/../../x.onnx", "onnx\\..\\x.onnx",
                                    "~/x.onnx", "./onnx/x.onnx"])
def test_manifest_paths_may_not_leave_the_bundle(bundle, capsys, target):
    edit_manifest(bundle, _set("models.0.engines.ort.file", target))
    code, _, err = run_bundle(bundle, capsys, backend="ort")
    assert_one_line(code, err, "models[0].engines.ort.file", "not a relative path inside the bundle")


def test_external_data_path_may_not_leave_the_bundle(bundle, capsys):
    edit_manifest(bundle, _set("models.0.engines.ort.extra", {"external_data": [{"file": "../x.data",
                                                                                  "sha256": "0" * 64}]}))
    code, _, err = run_bundle(bundle, capsys)
    assert_one_line(code, err, "external_data[0].file", "not a relative path inside the bundle")


def test_symlink_leaving_the_bundle_is_refused_even_with_the_right_checksum(bundle, tmp_path, capsys):
    entry = json.loads((bundle / "manifest.json").read_text())["models"][0]["engines"]["ort"]
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / entry["file"], outside)  # same bytes, same sha256: only the path gives it away
    (bundle / entry["file"]).symlink_to(outside)
    code, _, err = run_bundle(bundle, capsys, backend="ort")
    assert_one_line(code, err, "leads outside the bundle directory")
    code, _, err = run_cli(["info", "--bundle", bundle], capsys)
    assert_one_line(code, err, "leads outside the bundle directory")


def test_symlinked_manifest_leaving_the_bundle(bundle, tmp_path, capsys):
    shutil.move(bundle / "manifest.json", tmp_path / "m.json")
    (bundle / "manifest.json").symlink_to(tmp_path / "m.json")
    code, _, err = run_bundle(bundle, capsys)
    assert_one_line(code, err, "leads outside the bundle directory")


def test_symlink_inside_the_bundle_is_fine(bundle, capsys):
    entry = json.loads((bundle / "manifest.json").read_text())["models"][0]["engines"]["ort"]
    real = bundle / "onnx" / "real.onnx"
    shutil.move(bundle / entry["file"], real)
    (bundle / entry["file"]).symlink_to(real)
    code, _, err = run_bundle(bundle, capsys, backend="ort")
    assert code == 0, err


# --- 3. file tampering -----------------------------------------------------------------------------------------
def _onnx(bundle: Path, model: int = 0) -> Path:
    return bundle / json.loads((bundle / "manifest.json").read_text())["models"][model]["engines"]["ort"]["file"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["auto", "ort", "torch"])
def test_flipped_byte_is_an_error_under_every_backend(bundle, capsys, backend):
    _flip_byte(_onnx(bundle, 1))
    code, _, err = run_bundle(bundle, capsys, backend=backend)
    assert_one_line(code, err, "checksum mismatch", "onnx")
    assert not (bundle.parent / "z.npy").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "directory", "unreadable"])
def test_damaged_files(bundle, capsys, damage):
    path = _onnx(bundle)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete":
        path.unlink()
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        path.chmod(0)
    code, _, err = run_bundle(bundle, capsys)
    message = {"truncate": "checksum mismatch", "delete": "is missing", "directory": "not a regular file",
               "unreadable": "cannot read bundle file"}[damage]
    assert_one_line(code, err, message)


def test_graph_with_other_io_is_refused_even_when_resealed(bundle, capsys):
    import onnx

    path = _onnx(bundle)
    model = onnx.load(str(path))
    for node in model.graph.node:  # rename input y -> label everywhere
        node.input[:] = ["label" if i == "y" else i for i in node.input]
    next(i for i in model.graph.input if i.name == "y").name = "label"
    onnx.save(model, str(path))
    reseal(bundle, 0, "ort")
    code, _, err = run_bundle(bundle, capsys, backend="ort")
    assert_one_line(code, err, "does not belong to this bundle")


def test_int32_safetensors_weights(bundle, capsys):
    from safetensors.numpy import load_file, save_file

    m = json.loads((bundle / "manifest.json").read_text())
    path = bundle / m["models"][0]["engines"]["torch"]["file"]
    tensors = {k: v.astype(np.int32) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    reseal(bundle, 0, "torch")
    code, _, err = run_bundle(bundle, capsys, backend="torch")
    assert_one_line(code, err, "int32")


def test_malicious_pickle_is_never_executed(tmp_path, capsys):
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(pickle.dumps({"model": Evil()}))
    code, _, err = run_cli(["build", "--model", f"DiT-S/2={ckpt}", "--model", "DiT-B/2=random:1", "--image-size",
                            "64", "--num-classes", "10", "--backend", "torch", "--out", tmp_path / "b"], capsys)
    assert_one_line(code, err, "evil.pt")
    assert not marker.exists() and not (tmp_path / "b").exists()


# --- 4. hostile CLI values ---------------------------------------------------------------------------------
BAD_VALUES = [
    (["--ratio", "nan"], "--ratio: expected a finite number"),
    (["--ratio", "inf"], "--ratio: expected a finite number"),
    (["--ratio", "1e308"], "--ratio: must be in [0, 1]"),
    (["--cfg-scale", "nan"], "--cfg-scale: expected a finite number"),
    (["--cfg-scale=-inf"], "--cfg-scale: expected a finite number"),
    (["--cfg-scale", "1e30"], "--cfg-scale must be a finite number of reasonable size"),
    (["--eta", "-1"], "--eta: must be >= 0"),
    (["--seed", "-1"], "--seed: must be between 0 and"),
    (["--seed", str(2**70)], "--seed: must be between 0 and"),
    (["--seed", "1.5"], "--seed: expected an integer"),
    (["--steps", "-5"], "--steps: must be between 1 and"),
    (["--steps", "99999"], "--steps must be an integer between 1 and 1000"),
    (["--steps", "1e3"], "--steps: expected an integer"),
    (["--class-labels", str(2**64)], "class label 18446744073709551616 is outside"),
    (["--class-labels", ","], "give at least one class label"),
    (["--fractions", "nan,1"], "--fractions: expected a finite number"),
    (["--fractions", "0.5,0.5,0"], "3 fractions for 2 models"),
    (["--sampler", "plms"], "invalid choice"),
    (["--backend", "cuda"], "unknown backend 'cuda'"),
    (["--backend", "trt"], "the bundle has no trt artifacts"),
    (["--bundle", "/nonexistent/bundle"], "does not exist"),
]


@pytest.mark.parametrize("extra, message", BAD_VALUES, ids=[" ".join(v[0])[:40] for v in BAD_VALUES])
def test_hostile_run_values(bundle, capsys, extra, message):
    code, _, err = run_cli(["run", "--bundle", bundle, "--steps", "3", "--class-labels", "1",
                            "--save-latents", bundle.parent / "z.npy", *extra], capsys)
    assert_one_line(code, err, message)
    assert not (bundle.parent / "z.npy").exists()


def test_huge_batch_is_refused_up_front(bundle, capsys):
    labels = ",".join(["1"] * 65000)
    code, _, err = run_cli(["run", "--bundle", bundle, "--class-labels", labels, "--steps", "3",
                            "--save-latents", bundle.parent / "z.npy"], capsys)
    assert_one_line(code, err, "batch 65000 is outside the range this bundle was built for", "[1, 16]")


def test_request_beyond_memory_is_refused_with_the_estimate(bundle, capsys, monkeypatch):
    monkeypatch.setattr("tstitch_trt.pipeline.dit.available_memory_bytes", lambda: 1 << 20)
    code, _, err = run_bundle(bundle, capsys)
    assert_one_line(code, err, "this request needs about", "GiB of memory", "use a smaller batch")


@pytest.mark.parametrize("kind", ["npz", "int", "nan", "object", "missing", "text", "3d"])
def test_hostile_init_noise(bundle, tmp_path, capsys, kind):
    path = tmp_path / f"noise.{'npz' if kind == 'npz' else 'npy'}"
    lat = (2, 4, 8, 8)
    if kind == "npz":
        np.savez(path, z=np.zeros(lat, np.float32))
    elif kind == "int":
        np.save(path, np.zeros(lat, np.int32))
    elif kind == "nan":
        z = np.zeros(lat, np.float32)
        z[0, 0, 0, 0] = np.nan
        np.save(path, z)
    elif kind == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("not an array")
    elif kind == "3d":
        np.save(path, np.zeros((4, 8, 8), np.float32))
    code, _, err = run_cli(["run", "--bundle", bundle, "--steps", "2", "--init-noise", path], capsys)
    message = {"npz": "is an .npz archive", "int": "holds int32 values", "nan": "contains NaN or Inf",
               "object": "cannot read --init-noise", "missing": "does not exist", "text": "cannot read --init-noise",
               "3d": "expected (B, C, H, W)"}[kind]
    assert_one_line(code, err, message)


def test_bad_build_values(tmp_path, capsys):
    base = ["build", "--model", "DiT-S/2=random:0", "--model", "DiT-B/2=random:1", "--backend", "torch"]
    cases = [
        (["--image-size", "30"], "is not a multiple of the VAE factor 8"),
        (["--image-size", "40"], "not a multiple of the patch size 2"),
        (["--num-classes", "0"], "--num-classes: must be between 1 and"),
        (["--image-size", "-8"], "--image-size: must be between 1 and"),
        (["--batch-sizes", "0-4"], "1 <= MIN <= MAX"),
        (["--model", "DiT-Q/2=random:3"], "unknown DiT architecture 'DiT-Q/2'"),
        (["--backend", "torch,cuda"], "unknown backend 'cuda'"),
        (["--recipe", tmp_path / "missing.toml"], "does not exist"),
    ]
    if not _has("torch"):
        pytest.skip("build needs torch (its absence is tested in test_commands_without_torch)")
    for extra, message in cases:
        code, _, err = run_cli([*base, *extra, "--out", tmp_path / "b"], capsys)
        assert_one_line(code, err, message)
        assert not (tmp_path / "b").exists()


# --- 5. outputs ------------------------------------------------------------------------------------------------
def test_outputs_are_checked_before_any_work(tiny_pair, tmp_path, capsys, monkeypatch):
    ran = []
    import tstitch_trt.pipeline.dit as dit

    monkeypatch.setattr(dit.StitchedPipeline, "from_bundle", classmethod(lambda *a, **k: ran.append(1)))
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("user data")
    cases = [
        (["--save-latents", "/proc/z.npy"], "cannot write in /proc"),
        (["--save-latents", tmp_path / "adir"], "is a directory"),
        (["--save-latents", tmp_path / "missing" / "z.npy"], "does not exist; create it first"),
        (["--save-latents", tmp_path / "afile" / "z.npy"], "is not a folder"),
        (["--save-latents", tmp_path / "lat"], "must end in .npy"),
        (["--report", tmp_path / "adir"], "is a directory"),
        (["--report", "/proc/r.json"], "cannot write in /proc"),
        (["--save-latents", tmp_path / "x.npy", "--report", tmp_path / "x.npy"], "name the same file"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["run", "--bundle", tiny_pair, "--steps", "2", *extra], capsys)
        assert_one_line(code, err, message)
    assert not ran, "work started before the outputs were checked"
    assert (tmp_path / "afile").read_text() == "user data"


def test_image_formats_follow_the_extension(tmp_path, capsys):
    magic = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".webp": b"RIFF"}
    for ext, head in magic.items():
        out = tmp_path / f"grid{ext}"
        code, _, err = run_cli(["run", "--steps", "2", "--class-labels", "3", "--out", out], capsys)
        assert code == 0, err
        assert out.read_bytes()[:len(head)] == head, ext
    code, _, err = run_cli(["run", "--steps", "2", "--out", tmp_path / "grid.gif"], capsys)
    assert_one_line(code, err, "must end in .png or .jpg or .jpeg or .webp")
    assert not list(tmp_path.glob(".*tmp*"))


def test_failed_run_leaves_no_outputs_and_keeps_the_users_files(bundle, tmp_path, capsys):
    report, latents = tmp_path / "r.json", tmp_path / "z.npy"
    latents.write_bytes(b"the user's old file")
    bad_noise = tmp_path / "noise.npy"
    np.save(bad_noise, np.zeros((1, 4, 16, 16), np.float32))
    code, _, err = run_cli(["run", "--bundle", bundle, "--steps", "2", "--init-noise", bad_noise,
                            "--report", report, "--save-latents", latents], capsys)
    assert_one_line(code, err, "--init-noise has shape")
    assert not report.exists() and latents.read_bytes() == b"the user's old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "noise.npy", "z.npy"]


def test_partial_write_failure_leaves_nothing(bundle, tmp_path, capsys, monkeypatch):
    """The second output fails while being written: the first must not appear either."""
    import tstitch_trt.outputs as outputs

    real = outputs.OutputPlan.write

    def failing_write(self, writers):
        def boom(p):
            raise OSError(28, "No space left on device")
        return real(self, {**writers, "--report": boom})

    monkeypatch.setattr(outputs.OutputPlan, "write", failing_write)
    code, _, err = run_cli(["run", "--bundle", bundle, "--steps", "2", "--class-labels", "1",
                            "--save-latents", tmp_path / "z.npy", "--report", tmp_path / "r.json"], capsys)
    assert_one_line(code, err, "No space left on device", "nothing was written")
    assert not (tmp_path / "z.npy").exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 6. build outputs and kills ------------------------------------------------------------------------------
BUILD = ["build", "--model", "DiT-S/2=random:0", "--model", "DiT-B/2=random:1", "--image-size", "64",
         "--num-classes", "10", "--backend", "torch"]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_build_never_replaces_what_it_did_not_create(tmp_path, capsys):
    if not _has("torch"):
        pytest.skip("build needs torch")
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "cat.jpg").write_bytes(b"precious")
    code, _, err = run_cli([*BUILD, "--out", user_dir], capsys)
    assert_one_line(code, err, "is a folder that is not a tstitch bundle and not empty")
    assert (user_dir / "cat.jpg").read_bytes() == b"precious" and len(list(user_dir.iterdir())) == 1
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    code, _, err = run_cli([*BUILD, "--out", user_file], capsys)
    assert_one_line(code, err, "is a file, not a bundle directory")
    assert user_file.read_text() == "mine"
    # a real bundle may be rebuilt in place, but not one holding a file no build wrote
    out = tmp_path / "b"
    assert run_cli([*BUILD, "--out", out], capsys)[0] == 0
    assert run_cli([*BUILD, "--out", out], capsys)[0] == 0
    (out / "my-notes.txt").write_text("mine")
    code, _, err = run_cli([*BUILD, "--out", out], capsys)
    assert_one_line(code, err, "also holds my-notes.txt, which no build wrote")
    assert (out / "my-notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _start_build(out: Path) -> subprocess.Popen:
    # DiT-B/2 at 128 px exports for several seconds: time to be killed mid-stage
    cmd = [sys.executable, "-m", "tstitch_trt.cli", "build", "--model", "DiT-S/2=random:0", "--model",
           "DiT-B/2=random:1", "--image-size", "128", "--num-classes", "10", "--backend", "torch,ort", "--out",
           str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        staged = [p for p in out.parent.glob(f".{out.name}.tmp-*") if p.is_dir() and any(p.rglob("*.safetensors"))]
        if staged:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the build never reached its export stage")


@pytest.mark.slow
def test_kills_mid_build_leave_nothing_behind(tmp_path):
    if not _has("torch"):
        pytest.skip("build needs torch")
    out = tmp_path / "b"
    # SIGTERM: the build unwinds, removes its staging directory, exits 143, writes nothing
    proc = _start_build(out)
    _wait_for_staging(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # SIGKILL: the staging directory stays, named after the dead process; the next build removes it
    proc = _start_build(out)
    _wait_for_staging(out, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    from tstitch_trt.bundle.files import clean_stale_staging

    removed = clean_stale_staging(out.absolute())
    assert removed and sorted(p.name for p in tmp_path.iterdir()) == []


# --- 7. internal errors, help, version ---------------------------------------------------------------------------
def test_internal_error_is_one_line_with_a_log(bundle, capsys, monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("tstitch_trt.pipeline.dit.run_stitched", broken)
    code, _, err = run_bundle(bundle, capsys)
    assert_one_line(code, err, "internal error (ZeroDivisionError: a bug)", "the full traceback is in",
                    exit_code=1)
    log = Path(err.split("the full traceback is in ")[1].strip())
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    log.unlink()


def test_every_flag_has_help_and_shows_its_default(capsys):
    from tstitch_trt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
        assert main([name, "--help"]) == 0
        options = capsys.readouterr().out.split("options:", 1)[1]
        for action in p._actions:
            if action.default not in (None, False, "==SUPPRESS==") and action.option_strings:
                flag = action.option_strings[-1]
                m = re.search(rf"^  (?:-\w, )?{re.escape(flag)}\b(.*?)(?=^  -|\Z)", options, re.S | re.M)
                assert m, f"{name} {flag} not in --help"
                entry = m.group(1)
                assert "default" in entry, f"{name} {flag}: no default shown in {entry!r}"


def test_version(capsys):
    from tstitch_trt import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tstitch-trt {__version__}"


# --- 8. first use without torch -------------------------------------------------------------------------------
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"


def _no_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_commands_without_torch(tmp_path):
    cli = "from tstitch_trt.cli import main; sys.exit(main({args!r}))"
    expect = {
        ("build", "--model", "DiT-S/2=random:0", "--model", "DiT-B/2=random:1"):
            (2, "pip install \"tstitch-trt[build]\""),
        ("check",): (2, "error: numeric check not run: the reference (the torch StepModule) needs PyTorch "
                        "(pip install \"tstitch-trt[build]\")"),
        ("info",): (0, "torch    cannot run: torch and safetensors not installed"),
        ("bench", "--workload", "dit-s-xl"): (2, "pip install \"tstitch-trt[build]\""),
        ("run", "--steps", "2", "--backend", "torch"): (2, "the torch backend needs PyTorch"),
    }
    for args, (code, text) in expect.items():
        proc = _no_torch(cli.format(args=list(args)), tmp_path)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert text in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = _no_torch("from tstitch_trt.cli import main; sys.exit(main(['check']))", tmp_path)
    assert "files match their sha256" in proc.stdout and "I/O as the manifest says" in proc.stdout
    # the file checks first (stdout), then exactly one line saying what to install (stderr), exit 2
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: numeric check not run: the reference (the torch StepModule) needs PyTorch "
        "(pip install \"tstitch-trt[build]\")"]


def test_python_api_opens_the_demo_by_name_without_torch(tmp_path):
    proc = _no_torch("from tstitch_trt.pipeline.dit import StitchedPipeline\n"
                     "pipe = StitchedPipeline.from_bundle('demo')\n"
                     "res = pipe(class_labels=[1, 7], steps=5, seed=0)\n"
                     "print(res.images.shape, res.report['backend'])\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] in ("ort", "openvino") and "(2, 32, 32, 1)" in proc.stdout


def test_model_directory_configs_are_sealed_too(sd_bundle, tmp_path, capsys):
    """A diffusers directory's config.json is read with its weights: editing it is tampering as well."""
    bundle = tmp_path / "sd"
    shutil.copytree(sd_bundle, bundle)
    config = next((bundle / "unet").glob("*/config.json"))
    cfg = json.loads(config.read_text())
    cfg["cross_attention_dim"] = 64
    config.write_text(json.dumps(cfg))
    code, _, err = run_cli(["run", "--bundle", bundle, "--prompt", "a cat", "--steps", "2", "--backend", "torch",
                            "--out", tmp_path / "x.png"], capsys)
    assert_one_line(code, err, "checksum mismatch", "config.json")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--num-images", "99"], "batch 99 (prompts x --num-images) is outside the range this bundle was built for"),
    (["--height", "1024"], "--height 1024 is outside the sizes this bundle was built for"),
    (["--height", "35"], "is not a positive multiple of the VAE factor"),
    (["--class-labels", "3"], "--class-labels applies to class-conditional (DiT) bundles"),
    (["--cfg-scale", "nan"], "--cfg-scale: expected a finite number"),
])
def test_hostile_sd_requests(sd_bundle, tmp_path, capsys, extra, message):
    code, _, err = run_cli(["run", "--bundle", sd_bundle, "--prompt", "a cat", "--steps", "2",
                            "--out", tmp_path / "x.png", *extra], capsys)
    assert_one_line(code, err, message)
    assert not (tmp_path / "x.png").exists()
