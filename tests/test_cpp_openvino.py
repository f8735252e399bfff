"""The C++ runtime's OpenVINO engine (libtstitch through its C API) against Python's OpenVINO backend, on real graphs.

The C side is the C11 driver cpp/tests/sample_dump.c (one request into raw files) and the example
cpp/examples/sample_service.c, from the C++ build that scripts/test_cpp.sh makes (build/, or TSTITCH_CPP_BUILD: the
sanitizer build runs this file too). Same bundle, seed, sampler and precision: latents within 1e-5 relative in
fp32, images within 1.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.pipeline.dit import StitchedPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("TSTITCH_CPP_BUILD", ROOT / "build"))
DUMP = BUILD / "cpp" / "tests" / "tstitch_sample_dump"
EXAMPLE = BUILD / "cpp" / "tstitch_sample"
DEMO = ROOT / "python" / "tstitch_trt" / "demo" / "pair"
FP32_REL = 1e-5

pytestmark = pytest.mark.skipif(not DUMP.exists(), reason=f"no C++ build at {BUILD} (scripts/test_cpp.sh builds it; "
                                                          "TSTITCH_CPP_BUILD points elsewhere)")


@pytest.fixture(scope="module", autouse=True)
def _ov_cache(tmp_path_factory):
    # both sides keep OpenVINO's compiled-model cache in one fresh place (Python's key, model_cache_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TSTITCH_OPENVINO_CACHE", str(tmp_path_factory.mktemp("ov-cache")))
        yield


def run_c(tmp_path: Path, **kw) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, rgb = tmp_path / "latents.f32", tmp_path / "rgb.u8"
    args = [str(DUMP), f"out={out}", f"rgb={rgb}"] + [f"{k}={v}" for k, v in kw.items() if v is not None]
    return subprocess.run(args, capture_output=True, text=True, timeout=600), out, rgb


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref)))
    assert scale > 0.1, "reference is near zero"
    return float(np.max(np.abs(got - ref))) / scale


@pytest.fixture(scope="module")
def python_demo():
    return {p: StitchedPipeline.from_bundle(DEMO, backend="openvino", precision=p) for p in ("fp32",)}


@pytest.mark.parametrize(("sampler", "steps", "ratio", "seed"), [("ddim", 12, 0.4, 0), ("ddpm", 20, 0.5, 7),
                                                                  ("dpm-solver++", 10, 0.0, 123)])
def test_demo_equals_python_openvino_fp32(tmp_path, python_demo, sampler, steps, ratio, seed):
    labels = [1, 4, 7]
    proc, out, rgb = run_c(tmp_path, bundle=DEMO, engine="openvino", precision="fp32", steps=steps, ratio=ratio,
                           sampler=sampler, cfg=1.5, seed=seed, batch=len(labels), labels=",".join(map(str, labels)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("engine openvino; fp32 (requested)"), proc.stdout
    ref = python_demo["fp32"](labels, ratio=ratio, steps=steps, sampler=sampler, cfg_scale=1.5, seed=seed)
    got = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got, ref.latents) <= FP32_REL
    images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
    assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1


def test_demo_bf16_equals_python_openvino_bf16(tmp_path, python_demo):
    """bf16 with the sensitive ops kept fp32 as Python keeps them (openvino_bf16.cpp): equal to Python's bf16."""
    _needs_bf16()
    labels, kw = [1, 4, 7], {"ratio": 0.4, "steps": 12, "sampler": "ddim", "seed": 0}
    proc, out, rgb = run_c(tmp_path, bundle=DEMO, engine="openvino", precision="bf16", cfg=1.5, batch=len(labels),
                           labels=",".join(map(str, labels)), **kw)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("engine openvino; bf16 (requested)"), proc.stdout
    pipe = StitchedPipeline.from_bundle(DEMO, backend="openvino", precision="bf16")
    ref = pipe(labels, cfg_scale=1.5, **kw)
    got = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got, ref.latents) <= BF16_SAME_REL
    images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
    assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1
    assert _rel(python_demo["fp32"](labels, cfg_scale=1.5, **kw).latents, got) > 1e-4  # bf16 really ran


def test_auto_engine_and_precision_follow_python(tmp_path):
    # NULL engine on a CPU-only build/host is openvino; NULL precision is Python's auto rule on this CPU
    import openvino as ov

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.runtime.cpu_isa import bf16_isa
    from tstitch_trt.runtime.openvino_backend import cpu_has_bf16, resolve_precisions

    proc, out, _ = run_c(tmp_path, bundle=DEMO, steps=4, batch=1, labels="3")
    assert proc.returncode == 0, proc.stderr
    _, why = resolve_precisions(read_manifest(DEMO), "auto", cpu_has_bf16(ov.Core()), bf16_isa())
    assert proc.stdout.splitlines()[0] == f"engine openvino; {why}"


def test_verified_checksums_are_shared_with_python(tmp_path, monkeypatch):
    """One memo of verified file versions, one format (cpp/src/verified.cpp, bundle/files.py): each runtime
    believes what the other remembered. Shown by a memo claiming another digest, which only a runtime that
    reads it can refuse the intact bundle over."""
    import shutil

    from tstitch_trt.bundle import files
    from tstitch_trt.errors import BundleError

    bundle, memo = tmp_path / "pair", tmp_path / "memo"
    shutil.copytree(DEMO, bundle)  # new file versions: nothing remembered for them yet
    monkeypatch.setenv(files.MEMO_ENV, str(memo))
    kw = {"bundle": bundle, "engine": "openvino", "precision": "fp32", "steps": 2, "batch": 1, "labels": "1"}

    def claim_another_digest() -> list[str]:
        names = sorted(p.name for p in memo.iterdir())
        for name in names:
            (memo / name).write_text("0" * 64)
        return names

    proc, _, _ = run_c(tmp_path, **kw)
    assert proc.returncode == 0, proc.stderr
    by_c = claim_another_digest()
    assert by_c, "C++ remembered nothing it verified"
    with pytest.raises(BundleError, match="checksum mismatch"):
        StitchedPipeline.from_bundle(bundle, backend="openvino")  # Python read C++'s memo
    shutil.rmtree(memo)
    StitchedPipeline.from_bundle(bundle, backend="openvino").close()
    assert set(by_c) <= set(claim_another_digest())  # the same keys for the same files
    proc, _, _ = run_c(tmp_path, **kw)
    assert proc.returncode != 0 and "checksum mismatch" in proc.stderr, proc.stderr  # C++ read Python's


@pytest.mark.parametrize(("kw", "message"), [
    ({"engine": "onnx"}, "error: unknown engine 'onnx'; choose openvino or trt (NULL: auto)"),
    ({"engine": "openvino", "precision": "fp16"},
     "error: unknown precision 'fp16'; choose from auto, fp32, bf16 (NULL: auto)"),
    ({"engine": "openvino", "labels": "10"},
     "error: class label 10 is outside [0, 10); this bundle's models know 10 classes"),
])
def test_bad_input_is_one_line_and_status(tmp_path, kw, message):
    proc, out, _ = run_c(tmp_path, **{"bundle": DEMO, "steps": 2, "batch": 1, "labels": "1", **kw})
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert not out.exists()


def test_example_writes_the_demo_digits_as_a_png(tmp_path):
    """cpp/examples' C service on this CPU: 4 images of one digit, as Python's pipeline makes them (fp32)."""
    from PIL import Image

    png = tmp_path / "digits.png"
    proc = subprocess.run([str(EXAMPLE), str(DEMO), str(png), "7", "20", "0.4", "fp32"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "engine openvino; fp32 (requested)" in proc.stdout, proc.stdout
    got = np.asarray(Image.open(png))
    ref = StitchedPipeline.from_bundle(DEMO, backend="openvino", precision="fp32")(
        [7] * 4, ratio=0.4, steps=20, sampler="ddpm", cfg_scale=1.5, seed=0)
    want = np.concatenate(list(ref.images[..., 0]), axis=1)  # side by side, gray
    assert got.shape == want.shape == (32, 128)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert got.std() > 20  # digits on a background, not a flat image


# --- SD: the text encoder, the U-Net step graphs and the VAE through OpenVINO, token ids from the caller ---------

@pytest.fixture(scope="module")
def sd_ov(sd_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    return StitchedSDPipeline.from_bundle(sd_bundle, backend="openvino")


def _tokens(pipe, texts: list[str]) -> np.ndarray:
    from tstitch_trt.pipeline.text import PromptTokenizer

    ids, _ = PromptTokenizer(pipe.bundle_dir, pipe.manifest.tokenizer)(texts)
    return ids


@pytest.mark.parametrize(("sampler", "steps", "seed", "eta"), [(None, 6, 0, 0.0), ("ddim", 5, 11, 0.5),
                                                                ("euler", 4, 5, 0.0)])
def test_sd_equals_python_openvino(tmp_path, sd_bundle, sd_ov, sampler, steps, seed, eta):
    prompts, negatives = ["a red fox in the snow", "an astronaut, oil painting"], ["", "blurry"]
    ref = sd_ov(prompts, negative_prompt=negatives, steps=steps, sampler=sampler, cfg_scale=7.5, seed=seed, eta=eta,
                ratio=0.5)
    prompt, negative = tmp_path / "prompt.i64", tmp_path / "negative.i64"
    _tokens(sd_ov, prompts).tofile(prompt)
    _tokens(sd_ov, negatives).tofile(negative)
    proc, out, rgb = run_c(tmp_path, bundle=sd_bundle, engine="openvino", steps=steps, sampler=sampler, cfg=7.5,
                           seed=seed, eta=eta, ratio=0.5, batch=2, prompt=prompt, negative=negative,
                           tokens=sd_ov.manifest.tokenizer["max_length"])
    assert proc.returncode == 0, proc.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got, ref.latents) <= FP32_REL
    images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
    assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1
    assert ref.images.std() > 5  # random weights still draw something, not a flat image


def _prompt_file(path: Path, texts: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((t.encode() if isinstance(t, str) else t) + b"\0" for t in texts))
    return path


def test_sd_prompts_as_text_equal_python(tmp_path, sd_bundle, sd_ov):
    """Prompts as UTF-8 text: tokenized in C++ as the Python pipeline tokenizes them, then the same trajectory; a prompt
    cut to the tokenizer's length is said (sample_info.truncated_prompts / notes), as Python's report says it."""
    prompts = ["Ein Fuchs im Schnee, café-Stil 🦊", "a very long prompt " + "with many words " * 30]
    ref = sd_ov(prompts, steps=4, cfg_scale=6.0, seed=21, ratio=0.5)  # no negative prompt: "" under cfg
    proc, out, rgb = run_c(tmp_path, bundle=sd_bundle, engine="openvino", steps=4, cfg=6.0, seed=21, ratio=0.5, batch=2,
                           prompts=_prompt_file(tmp_path / "p.txt", prompts))
    assert proc.returncode == 0, proc.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got, ref.latents) <= FP32_REL
    images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
    assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1
    negatives = ["ugly, blurry", "ÜBER-saturated\t\tcolours"]
    ref_neg = sd_ov(prompts, negative_prompt=negatives, steps=4, cfg_scale=6.0, seed=21, ratio=0.5)
    proc, out, _ = run_c(tmp_path, bundle=sd_bundle, engine="openvino", steps=4, cfg=6.0, seed=21, ratio=0.5, batch=2,
                         prompts=_prompt_file(tmp_path / "p.txt", prompts),
                         negative_prompts=_prompt_file(tmp_path / "n.txt", negatives))
    assert proc.returncode == 0, proc.stderr
    got_neg = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got_neg, ref_neg.latents) <= FP32_REL
    assert _rel(got_neg, ref.latents) > 1e-3  # the negative prompts reached the trajectory
    # the long prompt was cut to 77 tokens, and both sides say so in the same words (API 6: sample_info.notes)
    notes = [n for n in ref.report["notes"] if "truncated" in n]
    assert len(notes) == 1 and notes[0].startswith("prompt 'a very long prompt with many words with many words")
    assert "truncated prompts 1" in proc.stdout.splitlines()
    assert proc.stdout.split("notes:\n", 1)[1].splitlines() == notes


def test_short_prompts_have_no_truncation_note(tmp_path, sd_bundle):
    proc, _, _ = run_c(tmp_path, bundle=sd_bundle, engine="openvino", steps=1, batch=1,
                       prompts=_prompt_file(tmp_path / "p.txt", ["a cat " * 37]),  # 74 words + BOS + EOS: 76 ids
                       negative_prompts=_prompt_file(tmp_path / "n.txt", ["ugly " * 80]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "truncated prompts 1" in lines  # the negative prompt only
    from tstitch_trt.pipeline.values import shown

    assert lines[lines.index("notes:") + 1:] == [f"prompt {shown('ugly ' * 80)} is longer than 77 tokens and was "
                                                 "truncated (as diffusers does)"]


# --- precision per part: U-Nets, text encoder and VAE each in bf16 exactly where Python runs them in bf16 ----------

def _needs_bf16():
    import openvino as ov

    from tstitch_trt.runtime.openvino_backend import cpu_has_bf16

    if not cpu_has_bf16(ov.Core()):
        pytest.skip("this CPU has no native bf16 (AVX512_BF16 / AMX)")


# C++ and Python compile the same marked graph (openvino_bf16.cpp = runtime/openvino_precision.py) with the same
# OpenVINO: measured here (AMD EPYC, AVX512-BF16) bit-equal latents; the bound is the fp32 one. bf16 against fp32 is
# ~1e-2..1e-1 (tests/test_sd_precision.py), so either side ignoring the request fails by orders of magnitude.
BF16_SAME_REL = FP32_REL


def _sd_run(tmp_path: Path, bundle: Path, precision: str | None, name: str, sampler: str = "pndm", cfg: float = 7.5):
    prompts = ["a red fox in the snow", "an astronaut, oil painting"]
    sub = tmp_path / name
    sub.mkdir()
    proc, out, rgb = run_c(sub, bundle=bundle, engine="openvino", precision=precision, steps=4, sampler=sampler,
                           cfg=cfg, seed=3, ratio=0.5, batch=2, prompts=_prompt_file(sub / "p.txt", prompts))
    assert proc.returncode == 0, proc.stderr
    return proc, prompts, np.fromfile(out, dtype=np.float32), np.fromfile(rgb, dtype=np.uint8).astype(int)


def _python_line(pipe) -> str:
    return f"engine openvino; {pipe.backend.precision_reason}; text encoders, VAE: {pipe.aux_precision_reason}"


def test_sd_bf16_every_part_equals_python(tmp_path, sd_bundle):
    """precision "bf16": the U-Nets, the text encoder and the VAE all in bf16 on both sides, equal; fp32 differs."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    _needs_bf16()
    pipe = StitchedSDPipeline.from_bundle(sd_bundle, backend="openvino", precision="bf16")
    assert set(pipe.precisions.values()) == {"bf16"} and len(pipe.precisions) == 4
    proc, prompts, got, rgb = _sd_run(tmp_path, sd_bundle, "bf16", "bf16")
    assert proc.stdout.splitlines()[0] == _python_line(pipe) == \
        "engine openvino; bf16 (requested); text encoders, VAE: bf16 (requested)"
    ref = pipe(prompts, steps=4, sampler="pndm", cfg_scale=7.5, seed=3, ratio=0.5)
    pipe.close()
    assert _rel(got.reshape(ref.latents.shape), ref.latents) <= BF16_SAME_REL
    assert np.abs(rgb.reshape(ref.images.shape) - ref.images.astype(int)).max() <= 1
    _, _, got32, _ = _sd_run(tmp_path, sd_bundle, "fp32", "fp32")
    assert _rel(got32.reshape(ref.latents.shape), ref.latents) > 1e-3  # bf16 really ran


def _with_verdict(tmp_path: Path, bundle: Path, part: str) -> Path:
    """A copy of `bundle` whose manifest records bf16 as safe on this CPU for `part` only."""
    import json
    import shutil

    from tstitch_trt.runtime.cpu_isa import bf16_isa

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw[part]["bf16"] = {"safe": True, "reason": "test", "isa": [bf16_isa()]}
    (copy / "manifest.json").write_text(json.dumps(raw))
    return copy


def test_sdxl_auto_runs_text_encoder_2_by_its_verdict(tmp_path, sdxl_bundle):
    """SDXL: the second text encoder has its own verdict; bf16 there only, on both sides, equal; fp32 differs."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    _needs_bf16()
    bundle = _with_verdict(tmp_path, sdxl_bundle, "text_encoder_2")
    pipe = StitchedSDPipeline.from_bundle(bundle, backend="openvino", precision="auto")
    assert {k for k, v in pipe.precisions.items() if v == "bf16"} == {"text encoder 2"}
    proc, prompts, got, rgb = _sd_run(tmp_path, bundle, None, "auto", sampler="euler", cfg=5.0)
    assert proc.stdout.splitlines()[0] == _python_line(pipe)
    ref = pipe(prompts, steps=4, sampler="euler", cfg_scale=5.0, seed=3, ratio=0.5)
    pipe.close()
    assert _rel(got.reshape(ref.latents.shape), ref.latents) <= BF16_SAME_REL
    assert np.abs(rgb.reshape(ref.images.shape) - ref.images.astype(int)).max() <= 1
    _, _, got32, _ = _sd_run(tmp_path, bundle, "fp32", "fp32", sampler="euler", cfg=5.0)
    assert _rel(got32.reshape(ref.latents.shape), ref.latents) > 1e-4


@pytest.mark.parametrize("safe_part", ["text_encoder", "vae"])
def test_sd_auto_runs_each_part_by_its_own_verdict(tmp_path, sd_bundle, safe_part):
    """auto with a bf16 verdict recorded for one part only (as `check --precision bf16 --record` writes it): that part
    alone runs in bf16, on both sides; C++ ignoring it (fp32 there) or applying it elsewhere fails."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    _needs_bf16()
    bundle = _with_verdict(tmp_path, sd_bundle, safe_part)
    pipe = StitchedSDPipeline.from_bundle(bundle, backend="openvino", precision="auto")
    label = {"text_encoder": "text encoder", "vae": "VAE decoder"}[safe_part]
    assert {k for k, v in pipe.precisions.items() if v == "bf16"} == {label}
    proc, prompts, got, rgb = _sd_run(tmp_path, bundle, None, "auto")
    assert proc.stdout.splitlines()[0] == _python_line(pipe)
    assert f"text encoders, VAE: bf16 on {label}, fp32 elsewhere: " in proc.stdout.splitlines()[0]
    ref = pipe(prompts, steps=4, sampler="pndm", cfg_scale=7.5, seed=3, ratio=0.5)
    pipe.close()
    assert _rel(got.reshape(ref.latents.shape), ref.latents) <= BF16_SAME_REL
    assert np.abs(rgb.reshape(ref.images.shape) - ref.images.astype(int)).max() <= 1
    _, _, got32, rgb32 = _sd_run(tmp_path, bundle, "fp32", "fp32")
    if safe_part == "text_encoder":  # a bf16 text context moves the whole trajectory
        assert _rel(got32.reshape(ref.latents.shape), ref.latents) > 1e-4
    else:  # the same latents, decoded by a bf16 VAE
        assert _rel(got32.reshape(ref.latents.shape), ref.latents) <= FP32_REL
        assert np.abs(rgb32.reshape(ref.images.shape) - ref.images.astype(int)).max() > 1


@pytest.mark.parametrize(("prompts", "negatives", "message"), [
    ([b"\xff\xfe a cat", "a dog"], None,
     "error: prompt 0 is not valid UTF-8 (bad byte 0xff at byte 0); pass prompts as UTF-8 text"),
    (["a cat", b"caf\xc3"], None,
     "error: prompt 1 is not valid UTF-8 (bad byte 0xc3 at byte 3); pass prompts as UTF-8 text"),
    (["a cat", b"\xed\xa0\x80"], None, "error: prompt 1 is not valid UTF-8 (bad byte 0xed at byte 0); pass prompts as "
                                       "UTF-8 text"),
    (["a cat"], None, "error: give one prompt per image: batch 2, 1 prompts"),
    (["a cat", "a dog", "a cow"], None, "error: give one prompt per image: batch 2, 3 prompts"),
    (["a cat", "a dog"], ["x"], "error: 1 negative prompts for 2 prompts; give one per prompt (or NULL: none)"),
    (["a cat", "a dog"], [b"ok", b"\xc0\xaf"],
     "error: negative prompt 1 is not valid UTF-8 (bad byte 0xc0 at byte 0); pass prompts as UTF-8 text"),
])
def test_bad_prompts_are_one_line(tmp_path, sd_bundle, prompts, negatives, message):
    kw = {"prompts": _prompt_file(tmp_path / "p.txt", prompts)}
    if negatives is not None:
        kw["negative_prompts"] = _prompt_file(tmp_path / "n.txt", negatives)
    proc, out, _ = run_c(tmp_path, bundle=sd_bundle, engine="openvino", steps=2, batch=2, **kw)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert not out.exists()


def test_tampered_tokenizer_is_refused_at_open(tmp_path, sd_bundle):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(sd_bundle, copy)
    with open(copy / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    proc, out, _ = run_c(tmp_path, bundle=copy, engine="openvino", steps=2, batch=1,
                         prompts=_prompt_file(tmp_path / "p.txt", ["a cat"]))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "checksum mismatch for" in proc.stderr
    assert "tokenizer/tokenizer.json" in proc.stderr
    assert not out.exists()


# --- SDXL: prompts as text through both tokenizers and text encoders (context + pooled text_embeds), time ids -----

@pytest.fixture(scope="module")
def sdxl_ov(sdxl_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    return StitchedSDPipeline.from_bundle(sdxl_bundle, backend="openvino", precision="fp32")


def _check_equal(proc, out: Path, rgb: Path | None, ref) -> np.ndarray:
    assert proc.returncode == 0, proc.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(ref.latents.shape)
    assert _rel(got, ref.latents) <= FP32_REL
    if rgb is not None:
        images = np.fromfile(rgb, dtype=np.uint8).reshape(ref.images.shape)
        assert np.abs(images.astype(int) - ref.images.astype(int)).max() <= 1
        assert ref.images.std() > 5  # random weights still draw something, not a flat image
    return got


SDXL_PROMPTS = ["a photo of a cat sitting on a red chair", "Ein Fuchs im Schnee, café-Stil 🦊 " + "sehr " * 90]


@pytest.mark.parametrize(("negatives", "sampler", "seed"),
                         [(None, None, 3), (["", "blurry, low quality"], "dpm-solver++", 8)])
def test_sdxl_prompts_as_text_equal_python(tmp_path, sdxl_bundle, sdxl_ov, negatives, sampler, seed):
    """Both encoders' penultimate states concatenated, text_embeds from text_encoder_2, diffusers' default time ids; no
    negative prompt: zero uncond rows (force_zeros_for_empty_prompt), as Python's SDXL pipeline builds them."""
    ref = sdxl_ov(SDXL_PROMPTS, negative_prompt=negatives, steps=4, sampler=sampler, cfg_scale=5.0, seed=seed,
                  ratio=0.5)
    kw = {"negative_prompts": _prompt_file(tmp_path / "n.txt", negatives)} if negatives is not None else {}
    proc, out, rgb = run_c(tmp_path, bundle=sdxl_bundle, engine="openvino", precision="fp32", steps=4, sampler=sampler,
                           cfg=5.0, seed=seed, ratio=0.5, batch=2,
                           prompts=_prompt_file(tmp_path / "p.txt", SDXL_PROMPTS), **kw)
    _check_equal(proc, out, rgb, ref)


def test_sdxl_empty_negative_is_encoded_not_zeroed(tmp_path, sdxl_bundle, sdxl_ov):
    """negative_prompts NULL (zeros) and "" each (the encoded empty prompt) are different requests, each Python's."""
    none = sdxl_ov(SDXL_PROMPTS, steps=3, cfg_scale=5.0, seed=5, ratio=0.5, decode=False)
    empty = sdxl_ov(SDXL_PROMPTS, negative_prompt=["", ""], steps=3, cfg_scale=5.0, seed=5, ratio=0.5, decode=False)
    common = {"bundle": sdxl_bundle, "engine": "openvino", "precision": "fp32", "steps": 3, "cfg": 5.0, "seed": 5,
              "ratio": 0.5, "batch": 2, "prompts": _prompt_file(tmp_path / "p.txt", SDXL_PROMPTS)}
    proc, out, _ = run_c(tmp_path, **common)
    got_none = _check_equal(proc, out, None, none)
    proc, out, _ = run_c(tmp_path, **common, negative_prompts=_prompt_file(tmp_path / "n.txt", ["", ""]))
    got_empty = _check_equal(proc, out, None, empty)
    assert _rel(got_empty, got_none) > 1e-3  # zeros and the encoded "" differ, so the check above can fail


def test_sdxl_time_ids_follow_the_size_or_the_caller(tmp_path, sdxl_bundle, sdxl_ov):
    """Default time ids from the requested height/width (diffusers: (h, w), (0, 0), (h, w)); explicit ones (original
    size, crop, target, a different negative row) passed as the time_ids input, rows negative first."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    prompts = SDXL_PROMPTS
    ref = sdxl_ov(prompts, steps=3, cfg_scale=5.0, seed=9, ratio=0.5, height=48, width=32)
    proc, out, rgb = run_c(tmp_path, bundle=sdxl_bundle, engine="openvino", precision="fp32", steps=3, cfg=5.0, seed=9,
                           ratio=0.5, batch=2, height=48, width=32, prompts=_prompt_file(tmp_path / "p.txt", prompts))
    _check_equal(proc, out, rgb, ref)
    sizes = {"original_size": (64, 48), "crop_coords": (4, 2), "target_size": (32, 32),
             "negative_original_size": (16, 16), "negative_target_size": (32, 32)}
    ref_ids = sdxl_ov(prompts, steps=3, cfg_scale=5.0, seed=9, ratio=0.5, decode=False, **sizes)
    rows = np.repeat(StitchedSDPipeline.sdxl_time_ids(64, 64, **sizes), len(prompts), axis=0)  # negative rows first
    rows.astype(np.float32).tofile(tmp_path / "time_ids.f32")
    proc, out, _ = run_c(tmp_path, bundle=sdxl_bundle, engine="openvino", precision="fp32", steps=3, cfg=5.0, seed=9,
                         ratio=0.5, batch=2, prompts=_prompt_file(tmp_path / "p.txt", prompts),
                         inputs=f"time_ids:{tmp_path / 'time_ids.f32'}")
    got = _check_equal(proc, out, None, ref_ids)
    default = sdxl_ov(prompts, steps=3, cfg_scale=5.0, seed=9, ratio=0.5, decode=False)
    assert _rel(got, default.latents) > 1e-4  # the time ids reached the U-Nets


def test_sdxl_bad_text_requests_are_one_line(tmp_path, sdxl_bundle):
    pooled = tmp_path / "pooled.f32"
    np.zeros((4, 32), np.float32).tofile(pooled)
    cases = [
        ({"inputs": f"text_embeds:{pooled}"},
         "error: text_embeds comes from the prompts (text_encoder_2's pooled output) when prompts are given as text; "
         "leave it out of request.inputs, or pass text_context and text_embeds instead of prompts"),
        ({"negative_prompts": _prompt_file(tmp_path / "n.txt", ["x"])},
         "error: 1 negative prompts for 2 prompts; give one per prompt (or NULL: none)"),
        ({"negative_prompts": _prompt_file(tmp_path / "n2.txt", ["ok", b"\xc0\xaf"])},
         "error: negative prompt 1 is not valid UTF-8 (bad byte 0xc0 at byte 0); pass prompts as UTF-8 text"),
    ]
    for kw, message in cases:
        proc, out, _ = run_c(tmp_path, bundle=sdxl_bundle, engine="openvino", steps=2, batch=2,
                             prompts=_prompt_file(tmp_path / "p.txt", ["a cat", "a dog"]), **kw)
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.strip() == message
        assert not out.exists()


# --- ControlNet and LCM bundles with prompts as text ----------------------------------------------------------------

@pytest.mark.parametrize(("scale", "start", "end", "guess"), [(1.0, 0.0, 1.0, 0), (0.7, 0.2, 0.8, 1)])
def test_controlnet_equals_python_openvino(tmp_path, control_bundle, scale, start, end, guess):
    from tstitch_trt.pipeline.control import ControlRequest
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(control_bundle, backend="openvino", precision="fp32")
    size = pipe.manifest.image_size
    image = np.random.default_rng(4).random((3, size, size), dtype=np.float32)
    prompts = ["a red fox in the snow", "an astronaut, oil painting"]
    ref = pipe(prompts, negative_prompt=["", "blurry"], steps=4, cfg_scale=7.5, seed=2, ratio=0.5,
               control=ControlRequest(image, scale=scale, guess_mode=bool(guess), start=start, end=end))
    np.repeat(image[None], len(prompts), axis=0).astype(np.float32).tofile(tmp_path / "control.f32")
    proc, out, rgb = run_c(tmp_path, bundle=control_bundle, engine="openvino", precision="fp32", steps=4, cfg=7.5,
                           seed=2, ratio=0.5, batch=2, prompts=_prompt_file(tmp_path / "p.txt", prompts),
                           negative_prompts=_prompt_file(tmp_path / "n.txt", ["", "blurry"]),
                           inputs=f"control_image:{tmp_path / 'control.f32'}", controlnet_scale=scale,
                           control_start=start, control_end=end, guess_mode=guess)
    got = _check_equal(proc, out, rgb, ref)
    plain = pipe(prompts, negative_prompt=["", "blurry"], steps=4, cfg_scale=7.5, seed=2, ratio=0.5, decode=False,
                 control=ControlRequest(image, scale=0.0))
    assert _rel(got, plain.latents) > 1e-4  # the ControlNet's residuals reached the U-Nets


@pytest.mark.parametrize(("g", "seed"), [(1.0, 4), (0.0, 6)])
def test_lcm_equals_python_openvino(tmp_path, lcm_bundle, g, seed):
    """The bundle's LCM sampler and guidance embedding (no negative prompts, batch-row context), per-step noise from
    the seed; g itself reaches the graphs (g - 1 embedded), also below 1."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(lcm_bundle, backend="openvino", precision="fp32")
    assert pipe.manifest.guidance_mode == "embedding" and pipe.default_sampler == "lcm"
    prompts = ["a red fox in the snow", "an astronaut, oil painting"]
    ref = pipe(prompts, steps=4, cfg_scale=g, seed=seed, ratio=0.5)
    proc, out, rgb = run_c(tmp_path, bundle=lcm_bundle, engine="openvino", precision="fp32", steps=4, cfg=g, seed=seed,
                           ratio=0.5, batch=2, prompts=_prompt_file(tmp_path / "p.txt", prompts))
    _check_equal(proc, out, rgb, ref)


def test_lcm_and_guidance_refusals_are_pythons(tmp_path, lcm_bundle, sd_bundle):
    from tstitch_trt.bundle.manifest import read_manifest

    small = read_manifest(lcm_bundle).models[0].name
    cases = [
        (lcm_bundle, {"cfg": 8.5}, "error: cfg scale 8.5 > 1 with the lcm sampler needs the guidance embedding "
                                   f"(time_cond_proj_dim), which U-Net {small} lacks; give cfg_scale 1 or less "
                                   "(no guidance)"),
        (lcm_bundle, {"cfg": 1.0, "negative_prompts": _prompt_file(tmp_path / "n.txt", ["x", "y"])},
         "error: a negative prompt needs classifier-free guidance, but this bundle guides through LCM's guidance "
         "embedding (no uncond batch): leave negative_prompts NULL, or rebuild with --guidance cfg"),
        (sd_bundle, {"cfg": 2.0, "sampler": "lcm"},
         f"error: cfg scale 2 > 1 with the lcm sampler needs the guidance embedding (time_cond_proj_dim), which U-Net "
         f"{read_manifest(sd_bundle).models[0].name} lacks; give cfg_scale 1 or less (no guidance)"),
    ]
    for bundle, kw, message in cases:
        proc, out, _ = run_c(tmp_path, bundle=bundle, engine="openvino", steps=2, batch=2,
                             prompts=_prompt_file(tmp_path / "p.txt", ["a cat", "a dog"]), **kw)
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.strip() == message
        assert not out.exists()


def test_sdxl_controlnet_equals_python_openvino(tmp_path, sdxl_control_bundle):
    """SDXL's conditioning from prompt text and a ControlNet inside the step graphs together."""
    from tstitch_trt.pipeline.control import ControlRequest
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(sdxl_control_bundle, backend="openvino", precision="fp32")
    size = pipe.manifest.image_size
    image = np.random.default_rng(5).random((3, size, size), dtype=np.float32)
    ref = pipe(SDXL_PROMPTS, steps=3, cfg_scale=5.0, seed=12, ratio=0.5,
               control=ControlRequest(image, scale=0.8, start=0.0, end=0.7))
    np.repeat(image[None], 2, axis=0).astype(np.float32).tofile(tmp_path / "control.f32")
    proc, out, rgb = run_c(tmp_path, bundle=sdxl_control_bundle, engine="openvino", precision="fp32", steps=3, cfg=5.0,
                           seed=12, ratio=0.5, batch=2, prompts=_prompt_file(tmp_path / "p.txt", SDXL_PROMPTS),
                           inputs=f"control_image:{tmp_path / 'control.f32'}", controlnet_scale=0.8, control_end=0.7)
    _check_equal(proc, out, rgb, ref)


@pytest.fixture(scope="module")
def sdxl_lcm_bundle(sdxl_pair, tmp_path_factory) -> Path:
    """The tiny SDXL pair whose large U-Net gains LCM's guidance embedding: an "embedding"-guided SDXL bundle (ort)."""
    from diffusers import StableDiffusionXLPipeline

    from conftest import build_sd
    from tstitch_trt.models.sd_random import with_guidance_embedding

    small, large = sdxl_pair
    root = tmp_path_factory.mktemp("cpp-sdxl-lcm")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(large))
    pipe.unet = with_guidance_embedding(pipe.unet, 21)
    pipe.save_pretrained(str(root / "lcm-sdxl-pipeline"))
    return build_sd(root / "bundle", [small, root / "lcm-sdxl-pipeline"], backends="ort")


@pytest.mark.parametrize("g", [1.0, 0.5])
def test_sdxl_lcm_equals_python_openvino(tmp_path, sdxl_lcm_bundle, g):
    """SDXL under "embedding" guidance: the prompts' rows only (no negative half, nothing zeroed), lcm sampler."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(sdxl_lcm_bundle, backend="openvino", precision="fp32")
    assert pipe.manifest.guidance_mode == "embedding"
    ref = pipe(SDXL_PROMPTS, steps=4, sampler="lcm", cfg_scale=g, seed=13, ratio=0.5)
    proc, out, rgb = run_c(tmp_path, bundle=sdxl_lcm_bundle, engine="openvino", precision="fp32", steps=4,
                           sampler="lcm", cfg=g, seed=13, ratio=0.5, batch=2,
                           prompts=_prompt_file(tmp_path / "p.txt", SDXL_PROMPTS))
    _check_equal(proc, out, rgb, ref)
