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


# --- 5. serve requests (issue 22): every class refused with the pipeline's own checks, before any batch ---------
_DEEP = "[" * 100_000 + "]" * 100_000
SERVE_POISON = [  # (case, JSON fields after the bundle's base fields, the line's words)
    ("seed -1", '"seed": -1', "--seed must be an integer in [0, 2^64), got -1"),
    ("seed 5000 digits", '"seed": ' + "7" * 5000, "more than 4300 digits"),
    ("seed 2^64", f'"seed": {2**64}', "--seed must be an integer in [0, 2^64)"),
    ("lone surrogate prompt", '"prompt": "a \\udcff"', "prompt is not valid UTF-8 text"),
    ("cfg NaN", '"cfg_scale": NaN', "--cfg-scale must be a finite number"),
    ("cfg Infinity", '"cfg_scale": Infinity', "--cfg-scale must be a finite number"),
    ("cfg 1e308", '"cfg_scale": 1e308', "--cfg-scale must be a finite number"),
    ("fractions NaN", '"fractions": [NaN, 1.0]', "--fractions must be finite numbers"),
    ("eta NaN", '"sampler": "ddim", "eta": NaN', "--eta must be between 0 and 100"),
    ("eta negative", '"sampler": "ddim", "eta": -1.0', "--eta must be between 0 and 100"),
    ("eta with pndm", '"sampler": "pndm", "eta": 0.5', "--eta applies to ddim only, not pndm"),
    ("steps 1000 pndm", '"sampler": "pndm", "steps": 1000', "give at most 999"),
    ("steps 1000 ddim", '"sampler": "ddim", "steps": 1000', "give at most 999"),
    ("dpm-solver++ 999", '"sampler": "dpm-solver++", "steps": 999', "give at most 998"),
    ("nested field", '"negative_prompt": ' + _DEEP, "nests JSON arrays or objects too deeply"),
    ("10 MB prompt", '"prompt": "' + "x" * (10 << 20) + '"', "this service takes at most 16384"),
    ("1 MB field name", '"' + "y" * (1 << 20) + '": 1', "unknown field 'yyyy"),
]
SERVE_KINDS = ["sd_bundle", "sdxl_bundle", "control_bundle", "lcm_bundle"]


@pytest.fixture(scope="module", params=SERVE_KINDS)
def served(request):
    """(bundle, manifest, pipeline on ort, the base fields of a good request) for each text-to-image kind."""
    import base64
    import io

    from PIL import Image

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    bundle = request.getfixturevalue(request.param)
    manifest = read_manifest(bundle)
    base = {"prompt": "a cat", "steps": 2}
    if manifest.controlnet:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((manifest.image_size,) * 2 + (3,), np.uint8)).save(buf, format="PNG")
        base["control_image"] = base64.b64encode(buf.getvalue()).decode()
    pipe = StitchedSDPipeline.from_bundle(bundle, backend="ort")
    yield bundle, manifest, pipe, base
    pipe.close()


def _serve_check(manifest, pipe, body: bytes):
    """What the service does with a body before the request may join a batch: parse (ingress) and validate
    (replica); returns the request or raises UserError (the service's 400)."""
    from tstitch_trt.serve.requests import KINDS, parse_generate

    req = parse_generate(body, manifest, False, 4)
    KINDS[manifest.pipeline].validate(pipe, req)
    return req


@pytest.mark.parametrize("case, fields, message", SERVE_POISON, ids=[c[0] for c in SERVE_POISON])
def test_serve_refuses_each_hostile_class_before_a_batch(served, case, fields, message):
    from tstitch_trt.errors import UserError

    _, manifest, pipe, base = served
    head = json.dumps(base)[:-1]
    body = f"{head}, {fields}}}".encode("utf-8", "surrogatepass")
    with pytest.raises(UserError) as e:
        _serve_check(manifest, pipe, body)
    line = str(e.value)
    assert message in line and "\n" not in line and len(line) < 400, line
    # and the same values with good ones are accepted: the base request is served
    _serve_check(manifest, pipe, json.dumps(base).encode())


def test_a_failing_batch_is_retried_per_request_so_only_the_cause_fails(sd_bundle):
    """Whatever slips past validation and fails inside an engine batch fails only the request that causes it."""
    from dataclasses import replace

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.serve.requests import KINDS, parse_generate, run_isolated

    manifest = read_manifest(sd_bundle)
    real = KINDS["sd"]
    poison_seed = 666

    def run_batch(pipe, reqs, cancel=None):
        if any(r.seed == poison_seed for r in reqs):
            raise RuntimeError("TextEncodeInput must be Union[TextInputSequence, ...]")  # what a bad row raised
        return real.run_batch(pipe, reqs, cancel)

    kind = replace(real, run_batch=run_batch)
    reqs = [parse_generate(json.dumps({"prompt": p, "seed": s, "steps": 2, "return_latents": True}).encode(),
                           manifest, False, 4) for p, s in (("a cat", 1), ("bad", poison_seed), ("a dog", 2))]
    pipe = StitchedSDPipeline.from_bundle(sd_bundle, backend="ort")
    try:
        results = run_isolated(kind, pipe, reqs)
        assert isinstance(results[1], RuntimeError)
        for r, res in zip((reqs[0], reqs[2]), (results[0], results[2]), strict=True):
            lone = pipe(prompt=r.conditioning["prompt"][0], seed=r.seed, steps=2, decode=False).latents
            np.testing.assert_allclose(res.latents, lone, rtol=1e-5, atol=1e-6)
            assert len(res.images) == 1
    finally:
        pipe.close()


def _png_declaring(path: Path, height: int, width: int) -> Path:
    """A small PNG whose header declares height x width RGB pixels (its data: one compressed block of zero rows,
    about 20 KB for 10000x10000, which decoding would turn into gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    data = b"".join(comp.compress(row) for _ in range(min(height, 64))) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("bundle_kind", ["control_bundle", "sdxl_control_bundle"])
def test_control_image_is_checked_by_its_declared_size_before_decoding(request, bundle_kind, tmp_path, capsys,
                                                                        monkeypatch):
    from PIL import Image

    bundle = request.getfixturevalue(bundle_kind)
    capsys.readouterr()  # the fixture's build output
    decoded = []
    real_convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(self.size)
                        or real_convert(self, *a, **k))
    bomb = _png_declaring(tmp_path / "bomb.png", 10000, 10000)
    assert bomb.stat().st_size < 64 << 10
    code, _, err = run_cli(["run", "--bundle", bundle, "--prompt", "a cat", "--steps", "2", "--backend", "ort",
                            "--control-image", bomb, "--out", tmp_path / "x.png"], capsys)
    assert_one_line(code, err, "declares 10000x10000 (HxW) pixels", "at most")
    assert "DecompressionBomb" not in err and not decoded and not (tmp_path / "x.png").exists()
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (20000, 8)).save(wide)
    code, _, err = run_cli(["run", "--bundle", bundle, "--prompt", "a cat", "--steps", "2", "--backend", "ort",
                            "--control-image", wide, "--out", tmp_path / "x.png"], capsys)
    assert_one_line(code, err, "declares 8x20000 (HxW) pixels")
    # the service's upload: the same check, the same words, before decoding
    import base64

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.errors import UserError
    from tstitch_trt.serve.requests import parse_generate

    body = json.dumps({"prompt": "a", "control_image": base64.b64encode(bomb.read_bytes()).decode()}).encode()
    with pytest.raises(UserError, match=r"control_image declares 10000x10000 \(HxW\) pixels"):
        parse_generate(body, read_manifest(bundle), False, 4)
    assert not decoded


# --- 6. the seal covers what a graph names (issue 22): external data outside the bundle, or not checksummed ------
def _externalize(graph: Path, location: str, data_path: Path) -> None:
    """Move the graph's initializers to `data_path` and make the graph name it as `location` (what an attacker
    who re-seals the graph would write)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(graph))
    offset = 0
    with open(data_path, "wb") as f:
        for init in model.graph.initializer:
            raw = numpy_helper.to_array(init).tobytes()
            f.write(raw)
            for name in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(name)
            init.raw_data = raw
            set_external_data(init, location=location, offset=offset, length=len(raw))
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            offset += len(raw)
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("part", ["text_encoder", "unet", "vae"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "unsealed"])
@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_graph_external_data_must_stay_in_the_bundle_and_be_sealed(sd_bundle, tmp_path, capsys, part, how, backend):
    bundle = tmp_path / "sd"
    shutil.copytree(sd_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    entry = {"text_encoder": m.get("text_encoder"), "unet": m["models"][0], "vae": m.get("vae")}[part]["engines"]["ort"]
    graph = bundle / entry["file"]
    outside = tmp_path / "secret.data"
    location = {"dotdot": os.path.relpath(outside, graph.parent), "absolute": str(outside), "symlink": "w.data",
                "unsealed": "w.data"}[how]
    _externalize(graph, location, outside if how != "unsealed" else graph.parent / "w.data")
    if how == "symlink":
        (graph.parent / "w.data").symlink_to(outside)
    entry["sha256"] = sha256_file(graph)  # re-sealed: only the graph's own path gives it away
    (bundle / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", "--bundle", bundle, "--prompt", "a cat", "--steps", "2", "--backend", backend,
                            "--out", tmp_path / "x.png"], capsys)
    why = "which the manifest does not checksum" if how == "unsealed" else "which leads outside the bundle"
    assert_one_line(code, err, f"bundle file {entry['file']} names external data", why)
    assert not (tmp_path / "x.png").exists()
    code, _, err = run_cli(["info", "--bundle", bundle], capsys)
    assert_one_line(code, err, f"bundle file {entry['file']} names external data")


def test_a_sealed_graph_with_external_data_in_the_bundle_runs(sd_bundle, tmp_path, capsys):
    """The >2 GB layout (weights in a .data file beside the graph, checksummed in the manifest) is accepted."""
    bundle = tmp_path / "sd"
    shutil.copytree(sd_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["text_encoder"]["engines"]["ort"]
    graph = bundle / entry["file"]
    data = graph.parent / (graph.name + ".data")
    import onnx

    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)  # as export/onnx_export.py writes a graph over 2 GB
    assert data.stat().st_size > graph.stat().st_size  # the weights really moved out
    entry["sha256"] = sha256_file(graph)
    entry.setdefault("extra", {})["external_data"] = [{"file": data.relative_to(bundle).as_posix(),
                                                       "sha256": sha256_file(data)}]
    (bundle / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", "--bundle", bundle, "--prompt", "a cat", "--steps", "2", "--backend", "ort",
                            "--out", tmp_path / "x.png"], capsys)
    assert code == 0, err


# --- 7. `run` on text-to-image bundles (issue 22) -----------------------------------------------------------------
RUN_SD_CASES = [
    # a prompt that is not UTF-8 reaches Python as lone surrogates (os.fsdecode's surrogateescape)
    (["--prompt", "a \udcff cat"], "--prompt is not valid UTF-8 text"),
    (["--prompt", "a cat", "--negative-prompt", "\udcfe"], "--negative-prompt is not valid UTF-8 text"),
    (["--prompt", "a cat", "--steps", "1000", "--sampler", "pndm"], "give at most 999"),
    (["--prompt", "a cat", "--steps", "1000", "--sampler", "ddim"], "give at most 999"),
    (["--prompt", "a cat", "--steps", "999", "--sampler", "dpm-solver++"], "give at most 998"),
    (["--prompt", "a cat", "--eta", "0.5", "--sampler", "pndm"], "--eta applies to ddim only, not pndm"),
    (["--prompt", "a cat", "--cfg-scale", "1e308"], "--cfg-scale must be a finite number of reasonable size"),
    (["--prompt", "a cat", "--backend", "torch", "--device", "tpu:7"], "--device 'tpu:7' is not a device the torch"),
]


@pytest.mark.parametrize("kind", ["sd_bundle", "sdxl_bundle"])
@pytest.mark.parametrize("extra, message", RUN_SD_CASES, ids=[" ".join(c[0])[-30:] for c in RUN_SD_CASES])
def test_hostile_sd_run_values(request, kind, tmp_path, capsys, extra, message):
    bundle = request.getfixturevalue(kind)
    capsys.readouterr()
    code, _, err = run_cli(["run", "--bundle", bundle, "--steps", "2", "--out", tmp_path / "x.png", *extra], capsys)
    assert_one_line(code, err, message)
    assert "RuntimeWarning" not in err and not (tmp_path / "x.png").exists()


def test_torch_device_cuda_without_a_gpu_is_one_line(sd_bundle, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: --device cuda is valid here")
    code, _, err = run_cli(["run", "--bundle", sd_bundle, "--prompt", "a cat", "--steps", "2", "--backend", "torch",
                            "--device", "cuda", "--out", tmp_path / "x.png"], capsys)
    assert_one_line(code, err, "--device cuda: PyTorch sees no CUDA GPU here", "use --device cpu")


@pytest.mark.parametrize("dtype", ["<f2", ">f4", ">f8"])
def test_init_noise_of_any_float_layout_is_converted(sd_bundle, tmp_path, capsys, dtype):
    """float16, big-endian float32 / float64: valid latents, converted; the run equals the float32 one."""
    x = np.random.default_rng(5).standard_normal((1, 4, 32, 32)).astype(np.float16)  # exact in every dtype
    runs = {}
    for name, arr in (("ref", x.astype("<f4")), ("other", x.astype(dtype))):
        np.save(tmp_path / f"{name}.npy", arr)
        code, _, err = run_cli(["run", "--bundle", sd_bundle, "--prompt", "a cat", "--steps", "2", "--backend", "ort",
                                "--init-noise", tmp_path / f"{name}.npy", "--save-latents", tmp_path / f"{name}-z.npy",
                                "--out", tmp_path / f"{name}.png"], capsys)
        assert code == 0, err
        runs[name] = np.load(tmp_path / f"{name}-z.npy")
    np.testing.assert_array_equal(runs["other"], runs["ref"])


# --- 8. `build` from hostile diffusers directories (issue 22): one line, before anything is exported ---------------
def _damage_config(d: Path, text: str, name: str = "config.json") -> None:
    (d / name).write_text(text)


def _tiny_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _evil_bin(d: Path, marker: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "diffusion_pytorch_model.safetensors").unlink()
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))


def _corrupt_header(d: Path) -> None:
    p = d / "diffusion_pytorch_model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[:8] = (10**12).to_bytes(8, "little")
    p.write_bytes(bytes(raw))


BUILD_CASES = [  # (case, which part: small / large / controlnet, damage, the line's words)
    ("model_index.json is a list", "large", lambda d, m: _damage_config(d, "[1, 2]", "model_index.json"),
     "model_index.json holds a JSON list, not an object"),
    ("config.json is a list", "small", lambda d, m: _damage_config(d, "[]"), "config.json holds a JSON list"),
    ("config.json is not JSON", "small", lambda d, m: _damage_config(d, '{"_class_name": "UNet2D'),
     "cannot read"),
    ("evil pickle .bin", "small", _evil_bin, "are a pickle (diffusion_pytorch_model.bin)"),
    ("corrupt safetensors header", "small", lambda d, m: _corrupt_header(d), "is not a valid .safetensors file"),
    ("huge block_out_channels", "small", lambda d, m: _tiny_config(d, block_out_channels=[100000, 100000]),
     "GiB of fp32 weights"),
    ("layers_per_block 1e6", "small", lambda d, m: _tiny_config(d, layers_per_block=1000000),
     "layers_per_block 1000000 is beyond any U-Net"),
    ("ControlNet config is a list", "controlnet", lambda d, m: _damage_config(d, "[]"),
     "config.json holds a JSON list"),
    ("ControlNet evil pickle", "controlnet", _evil_bin, "are a pickle"),
]


@pytest.mark.parametrize("case, part, damage, message", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_hostile_sd_build_inputs(control_set, tmp_path, capsys, case, part, damage, message):
    small, large, net = (Path(shutil.copytree(p, tmp_path / p.name)) for p in control_set)
    target = {"small": small, "large": large, "controlnet": net}[part]
    marker = tmp_path / "PWNED"
    damage(target, marker)
    out = tmp_path / "out"
    capsys.readouterr()
    code, stdout, err = run_cli(["build", "--model", small, "--model", large, "--controlnet", net, "--backend", "ort",
                                 "--out", out], capsys)
    assert_one_line(code, err, message)
    assert "exporting" not in stdout  # refused before any export
    assert not marker.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left


def test_random_seed_must_be_an_integer(tmp_path, capsys):
    code, _, err = run_cli(["build", "--model", "DiT-S/2=random:abc", "--model", "DiT-B/2=random:1", "--image-size",
                            "64", "--num-classes", "10", "--backend", "torch", "--out", tmp_path / "b"], capsys)
    assert_one_line(code, err, "random:SEED takes a non-negative integer seed, got 'abc'")


def test_library_chatter_never_precedes_the_error_line(sd_pair, tmp_path, capsys, monkeypatch):
    """A failure after diffusers loaded weights (its progress bars) and ONNX Runtime warned: still one line."""
    import tstitch_trt.export.sd_build as sd_build

    def fail(*a, **k):
        raise sd_build.UserError("the U-Net export failed (a stand-in for any late failure)")

    monkeypatch.setattr(sd_build, "_write_unet", fail)
    capsys.readouterr()
    code, _, err = run_cli(["build", "--model", sd_pair[0], "--model", sd_pair[1], "--backend", "ort",
                            "--out", tmp_path / "out"], capsys)
    assert_one_line(code, err, "the U-Net export failed")  # the text encoder was exported (and loaded) first


def test_a_staging_cleanup_that_fails_says_so(sd_pair, tmp_path, capsys, monkeypatch):
    import tstitch_trt.bundle.staging as staging
    import tstitch_trt.export.sd_build as sd_build

    def fail(*a, **k):
        raise sd_build.UserError("out of memory exporting the U-Net")

    real_rmtree = shutil.rmtree

    def stuck(path, *a, onerror=None, **kw):  # as under memory exhaustion: the staging removal fails
        if not Path(path).name.startswith(".out.tmp-"):
            return real_rmtree(path, *a, onerror=onerror, **kw)
        if onerror is not None:
            onerror(os.rmdir, str(path), (OSError, OSError(12, "Cannot allocate memory"), None))

    monkeypatch.setattr(sd_build, "_write_unet", fail)
    monkeypatch.setattr(staging.shutil, "rmtree", stuck)
    capsys.readouterr()
    code, _, err = run_cli(["build", "--model", sd_pair[0], "--model", sd_pair[1], "--backend", "ort",
                            "--out", tmp_path / "out"], capsys)
    monkeypatch.undo()
    assert_one_line(code, err, "out of memory exporting the U-Net", "could not be removed", "Cannot allocate memory")
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and str(left[0]) in err
    real_rmtree(left[0])
