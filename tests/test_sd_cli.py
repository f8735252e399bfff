"""SD bundles through the CLI: bad input is one line and exit 2, tokenization without torch, info."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.pipeline.text import PromptTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_tokenizer_is_real_clip(sd_bundle):
    tok = PromptTokenizer(sd_bundle, read_manifest(sd_bundle).tokenizer)
    ids, cut = tok(["a photo of a cat", "word " * 100])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all() and ids.shape == (2, 77)
    assert cut == [False, True] and ids[1, 0] == 49406 and ids[1, -1] == 49407


def test_tokenizer_equals_transformers(sd_pair, sd_bundle):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(sd_pair[1] / "tokenizer"))
    prompts = ["A  Photo, of a CAT!!", "", "naïve café — 東京 at night, 8k", "word " * 90]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    got, _ = PromptTokenizer(sd_bundle, read_manifest(sd_bundle).tokenizer)(prompts)
    assert got.tolist() == want


def test_long_prompt_is_truncated_and_reported(sd_bundle, tmp_path, capsys):
    code, out, err = run_cli(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "cat " * 90,
                              "--steps", "2", "--height", "32", "--width", "32", "--report", str(tmp_path / "r.json"),
                              "--out", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    assert "truncated" in out
    assert any("truncated" in n for n in json.loads((tmp_path / "r.json").read_text())["notes"])


def test_info_describes_sd_bundle(sd_bundle, capsys):
    code, out, _ = run_cli(["info", "--bundle", str(sd_bundle)], capsys)
    assert code == 0
    assert "text-to-image (sd)" in out and "PNDMScheduler (default sampler pndm)" in out
    assert "small-unet" in out and "large-pipeline" in out


@pytest.mark.parametrize("extra,needles", [
    (["--height", "33"], ["--height 33", "VAE factor 2"]),
    (["--class-labels", "1,2"], ["--class-labels", "--prompt"]),
    (["--sampler", "ddpm"], ["ddpm", "pndm"]),
    (["--ratio", "1.5"], ["--ratio"]),
])
def test_bad_run_input_is_one_line(sd_bundle, tmp_path, capsys, extra, needles):
    out_png = tmp_path / "o.png"
    code, _, err = run_cli(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "a cat", "--steps",
                            "2", "--out", str(out_png), *extra], capsys)
    one_line_error(code, err, *needles)
    assert not out_png.exists()


def test_sd_bundle_needs_a_prompt(sd_bundle, capsys):
    code, _, err = run_cli(["run", "--bundle", str(sd_bundle), "--backend", "ort"], capsys)
    one_line_error(code, err, "--prompt")


def test_negative_prompt_with_dit_bundle_is_refused(tiny_pair, capsys):
    code, _, err = run_cli(["run", "--bundle", str(tiny_pair), "--negative-prompt", "blurry"], capsys)
    one_line_error(code, err, "--negative-prompt", "class-conditional")


def test_missing_tokenizer_file(sd_bundle, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sd_bundle, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    code, _, err = run_cli(["run", "--bundle", str(broken), "--backend", "ort", "--prompt", "a cat", "--steps", "2",
                            "--out", str(tmp_path / "o.png")], capsys)
    one_line_error(code, err, "tokenizer.json", "missing")
    assert not (tmp_path / "o.png").exists()


def test_incompatible_pair_is_refused_at_build(sd_pair, tmp_path, capsys):
    """T-Stitch issue #2: a U-Net with another text width cannot share the large model's trajectory."""
    small, large = sd_pair
    cfg = json.loads((small / "config.json").read_text())
    shutil.copytree(small, tmp_path / "wide")
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 64}))
    code, _, err = run_cli(["build", "--model", str(tmp_path / "wide"), "--model", str(large), "--out",
                            str(tmp_path / "b")], capsys)
    one_line_error(code, err, "cross-attention width 64 vs 32")
    assert not (tmp_path / "b").exists()


def test_last_model_must_be_a_pipeline(sd_pair, tmp_path, capsys):
    small, large = sd_pair
    code, _, err = run_cli(["build", "--model", str(large), "--model", str(small), "--out", str(tmp_path / "b")],
                           capsys)
    one_line_error(code, err, "must be a full pipeline")


def test_sd_run_without_torch(sd_bundle, tmp_path):
    """Tokenizer, text encoder, U-Net steps and VAE on ORT with torch unimportable."""
    np.save(tmp_path / "init.npy", np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from tstitch_trt.cli import main\n"
            f"rc = main(['run', '--bundle', {str(sd_bundle)!r}, '--prompt', 'a cat', '--steps', '3', '--sampler', "
            f"'euler', '--init-noise', {str(tmp_path / 'init.npy')!r}, '--out', {str(tmp_path / 'o.png')!r}])\n"
            "assert sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert ("on ort [cpu]" in proc.stdout or "on openvino [cpu]" in proc.stdout) and (tmp_path / "o.png").is_file()


def test_check_covers_sd_bundles(sd_bundle, tmp_path, capsys):
    """check: each U-Net step graph (every output, the history included), the text encoder and the VAE vs torch."""
    code, out, err = run_cli(["check", "--bundle", str(sd_bundle), "--report", str(tmp_path / "c.json")], capsys)
    assert code == 0, out + err
    rows = json.loads((tmp_path / "c.json").read_text())
    compared = {(r["model"], r["output"]) for r in rows if r["status"] == "ok"}
    for model in ("small-unet", "large-pipeline"):
        for output in ("x_next", "x0", "eps_hist_next", "saved_next"):
            assert (model, output) in compared
    assert ("text encoder", "text_embeddings") in compared and ("VAE decoder", "image") in compared
    assert all(r["max_rel"] < 1e-4 for r in rows if r["status"] == "ok")


def test_dit_pipeline_refuses_sd_bundle(sd_bundle):
    from tstitch_trt.errors import UserError
    from tstitch_trt.pipeline.dit import StitchedPipeline

    with pytest.raises(UserError, match="text-to-image .*StitchedSDPipeline"):
        StitchedPipeline.from_bundle(sd_bundle)


def test_bare_dit_arch_keeps_the_dit_error(capsys, tmp_path):
    code, _, err = run_cli(["build", "--model", "DiT-S/2", "--model", "DiT-B/2", "--out", str(tmp_path / "b")], capsys)
    one_line_error(code, err, "ARCH=CHECKPOINT")


def test_num_images_repeats_the_prompt(sd_bundle, tmp_path, capsys):
    code, out, err = run_cli(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "a cat",
                              "--num-images", "2", "--steps", "3", "--height", "32", "--width", "48",
                              "--save-latents", str(tmp_path / "z.npy"), "--report", str(tmp_path / "r.json"),
                              "--out", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    z = np.load(tmp_path / "z.npy")
    assert rep["batch"] == 2 and rep["prompts"] == ["a cat", "a cat"] and rep["negative_prompts"] == ["", ""]
    assert z.shape == (2, 4, 16, 24) and not np.allclose(z[0], z[1])  # own noise per image, any W/8
