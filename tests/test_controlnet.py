"""ControlNet conformance: `tstitch-trt run --control-image` equals diffusers' StableDiffusionControlNetPipeline.

Tiny random parts (diffusers' dummy ControlNet / U-Net / VAE / CLIP configs, every parameter random,
the ControlNet's zero convolutions included). The reference is diffusers' own ControlNet pipeline on
the large directory's components, started on the small U-Net and switched to the large one by
callback_on_step_end after k calls (the T-Stitch SD rule); the ControlNet's residuals feed whichever
U-Net runs. Same unit-Gaussian latent, same PNG; final latents agree to 1e-4 of the largest magnitude.
Then the bad inputs: one line each, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.models.diffusers_peer import stitch_by_callback  # noqa: E402
from tstitch_trt.sampling.sd_samplers import sd_table  # noqa: E402

CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "dpm-solver++": "DPMSolverMultistepScheduler"}
PROMPT = "a photo of a cat sitting on a red chair"
STEPS, SIZE = 8, 32  # 32 px with the dummy VAE (factor 2): latent 4x16x16, control image 32x32
DEFAULT = {"scale": 1.0, "guess": False, "start": 0.0, "end": 1.0}
# (sampler, ratio, ControlNet settings): two samplers at the defaults, a non-default scale, guess mode, a window
CASES = [
    ("pndm", 0.4, DEFAULT),
    ("euler", 0.4, {**DEFAULT, "scale": 0.6}),
    ("ddim", 0.4, {**DEFAULT, "guess": True}),
    ("dpm-solver++", 0.4, {**DEFAULT, "scale": 1.3, "start": 0.2, "end": 0.7}),
    ("pndm", 1.0, {**DEFAULT, "guess": True, "scale": 0.8, "start": 0.1}),
]


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("control") / "control.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def reference(control_set, control_png):
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image

    small, large, net_dir = control_set
    base = StableDiffusionPipeline.from_pretrained(str(large), safety_checker=None, requires_safety_checker=False)
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor",
                                                                    "image_encoder")}
    pipe = StableDiffusionControlNetPipeline(**parts, controlnet=ControlNetModel.from_pretrained(str(net_dir)).eval(),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small)).eval()
    large_unet = pipe.unet
    default_scheduler = pipe.scheduler.config
    image = Image.open(control_png)

    def run(sampler: str, ratio: float, control: dict, latents: np.ndarray) -> np.ndarray:
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(default_scheduler)
        n_calls = len(sd_table(sampler, dict(default_scheduler), STEPS).timesteps)
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio)

        with torch.no_grad():
            out = pipe([PROMPT] * latents.shape[0], image=image, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                       guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="latent",
                       controlnet_conditioning_scale=control["scale"], guess_mode=control["guess"],
                       control_guidance_start=control["start"], control_guidance_end=control["end"],
                       callback_on_step_end=switch)
        pipe.unet = large_unet
        return np.asarray(out.images)

    return run


def unit_latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def control_flags(control: dict) -> list[str]:
    flags = ["--controlnet-scale", str(control["scale"]), "--control-guidance-start", str(control["start"]),
             "--control-guidance-end", str(control["end"])]
    return flags + (["--guess-mode"] if control["guess"] else [])


def run_cli(bundle: Path, tmp: Path, backend: str, sampler: str, ratio: float, image: Path, control: dict,
            init: np.ndarray) -> tuple[np.ndarray, dict]:
    np.save(tmp / "init.npy", init)
    args = ["run", "--bundle", str(bundle), "--backend", backend, "--prompt", PROMPT, "--sampler", sampler,
            "--steps", str(STEPS), "--ratio", str(ratio), "--init-noise", str(tmp / "init.npy"),
            "--control-image", str(image), *control_flags(control),
            "--save-latents", str(tmp / "out.npy"), "--report", str(tmp / "report.json"), "--out", str(tmp / "o.png")]
    assert main(args) == 0
    return np.load(tmp / "out.npy"), json.loads((tmp / "report.json").read_text())


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("sampler,ratio,control", CASES, ids=[f"{s}-{r}-{i}" for i, (s, r, _) in enumerate(CASES)])
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_controlnet_run_equals_diffusers(control_bundle, reference, control_png, tmp_path, backend, sampler, ratio,
                                         control) -> None:
    init = unit_latents()
    ref = reference(sampler, ratio, control, init)
    got, report = run_cli(control_bundle, tmp_path, backend, sampler, ratio, control_png, control, init)
    assert got.shape == ref.shape == init.shape
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros against zeros
    print(f"controlnet {backend} {sampler} r={ratio} {control}: max abs diff / max |ref| = {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend} {sampler} r={ratio} {control}: {rel_diff(got, ref):.2e}"
    n = report["unet_calls"]
    keep = [0.0 if i / n < control["start"] or (i + 1) / n > control["end"] else 1.0 for i in range(n)]
    assert report["controlnet"]["control_scale"] == pytest.approx([np.float32(control["scale"]) * k for k in keep])
    assert report["controlnet"]["guess_mode"] is control["guess"]


def test_openvino_runs_the_controlnet_step_graphs(control_bundle, reference, control_png, tmp_path) -> None:
    """OpenVINO (fp32) on the same ONNX step graphs: the scalar control_scale row bound as a view."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")
    sampler, ratio, control = CASES[3]
    init = unit_latents()
    got, _ = run_cli(control_bundle, tmp_path, "openvino", sampler, ratio, control_png, control, init)
    ref = reference(sampler, ratio, control, init)
    print(f"controlnet openvino {sampler} r={ratio} {control}: max abs diff / max |ref| = {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"openvino: {rel_diff(got, ref):.2e}"


def test_every_setting_changes_the_result(control_bundle, reference, control_png, tmp_path) -> None:
    """The comparisons can fail: the ControlNet's scale, guess mode and window each move the result."""
    init = unit_latents()
    got, _ = run_cli(control_bundle, tmp_path, "ort", "pndm", 0.4, control_png, DEFAULT, init)
    for variant in ({"scale": 0.6}, {"guess": True}, {"start": 0.2, "end": 0.7}):
        other = reference("pndm", 0.4, {**DEFAULT, **variant}, init)
        assert rel_diff(got, other) > 1e-3, variant
    large_only = reference("pndm", 0.0, DEFAULT, init)
    assert rel_diff(got, large_only) > 1e-3  # the small U-Net ran with the ControlNet


def test_control_image_reads_as_diffusers_processor(tmp_path) -> None:
    """RGB conversion and the [0, 1] scaling of diffusers' control image processor, on a grayscale and an RGBA PNG."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from tstitch_trt.pipeline.control import read_control_image

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    rng = np.random.default_rng(1)
    for mode, shape in (("L", (24, 40)), ("RGBA", (24, 40, 4))):
        path = tmp_path / f"img-{mode}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        want = processor.preprocess(Image.open(path), height=24, width=40).numpy()[0]
        got = read_control_image(path)
        assert got.shape == want.shape == (3, 24, 40) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_control_keep_matches_diffusers() -> None:
    from tstitch_trt.pipeline.control import control_keep

    for n, start, end in ((9, 0.0, 1.0), (9, 0.2, 0.7), (51, 0.1, 0.35), (4, 0.5, 0.6)):
        want = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]
        assert control_keep(n, start, end).tolist() == want


def test_the_control_image_sets_the_size(control_bundle, reference, tmp_path) -> None:
    """No --height/--width: a 40x48 image makes a 40x48 run (latent 20x24, control image 2H x 2W)."""
    from PIL import Image

    png = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(png)
    args = ["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT, "--steps", "4",
            "--control-image", str(png), "--save-latents", str(tmp_path / "out.npy"),
            "--report", str(tmp_path / "r.json"), "--out", str(tmp_path / "o.png")]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["height"], report["width"]) == (40, 48)
    assert np.load(tmp_path / "out.npy").shape == (1, 4, 20, 24)


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------------------------

def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def controlnet_config_dir(control_set, tmp_path: Path, **changes) -> Path:
    """A ControlNet directory whose config.json differs from the tiny one by `changes` (refused before loading)."""
    config = json.loads((control_set[2] / "config.json").read_text())
    config.update(changes)
    out = tmp_path / "net"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes,needles", [
    ({"addition_embed_type": "text_time", "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816,
      "addition_time_embed_dim": 256}, ["SDXL ControlNet", "addition_embed_type text_time", "SD U-Net",
                                        "addition_embed_type None"]),
    ({"cross_attention_dim": 64}, ["cross-attention width", "64 vs 32"]),
    ({"in_channels": 9}, ["latent channels", "9 vs 4"]),
    ({"layers_per_block": 1}, ["does not fit small-unet: its residuals (channels/downsampling) 4/1 4/1 4/2 8/2 8/2 "
                               "vs the U-Net's skips 4/1 4/1 4/1 4/2 8/2 8/2 8/2;"]),
    ({"global_pool_conditions": True}, ["global_pool_conditions", "not supported"]),
    ({"conditioning_embedding_out_channels": [16, 32, 96]}, ["downsamples its image 4x", "VAE's factor is 2"]),
    ({"conditioning_channels": 1}, ["1-channel", "RGB"]),
    ({"_class_name": "UNet2DConditionModel"}, ["not a diffusers ControlNetModel"]),
])
def test_unfit_controlnet_is_refused_at_build(control_set, tmp_path, capsys, changes, needles) -> None:
    small, large, _ = control_set
    net = controlnet_config_dir(control_set, tmp_path, **changes)
    out = tmp_path / "b"
    code = main(["build", "--model", str(small), "--model", str(large), "--controlnet", str(net), "--backend", "ort",
                 "--out", str(out)])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_controlnet_must_fit_every_unet(sd_pair, control_set, tmp_path, capsys) -> None:
    """The SD pair's small U-Net has one layer per block: the large U-Net's ControlNet cannot feed it."""
    small, large = sd_pair
    out = tmp_path / "b"
    code = main(["build", "--model", str(small), "--model", str(large), "--controlnet", str(control_set[2]),
                 "--backend", "ort", "--out", str(out)])
    one_line_error(code, capsys.readouterr().err, "does not fit small-unet", "vs the U-Net's skips 4/1 4/1 4/2 8/2 8/2")
    assert not out.exists()


def test_dit_build_takes_no_controlnet(control_set, tmp_path, capsys) -> None:
    code = main(["build", "--model", "DiT-S/2=random:1", "--model", "DiT-B/2=random:2", "--controlnet",
                 str(control_set[2]), "--out", str(tmp_path / "b")])
    one_line_error(code, capsys.readouterr().err, "--controlnet applies to SD builds")
    assert not (tmp_path / "b").exists()


@pytest.fixture()
def png_32(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "c.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("extra,needles", [
    (["--height", "48", "--width", "48"], ["control image is 32x32", "request is 48x48"]),
    (["--control-guidance-start", "0.7", "--control-guidance-end", "0.3"], ["0 <= start < end <= 1"]),
    (["--control-guidance-start", "1.5"], ["--control-guidance-start"]),
    (["--controlnet-scale", "nan"], ["--controlnet-scale"]),
])
def test_bad_control_settings_are_one_line(control_bundle, png_32, tmp_path, capsys, extra, needles) -> None:
    out = tmp_path / "o.png"
    code = main(["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT, "--steps", "2",
                 "--control-image", str(png_32), "--out", str(out), *extra])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_control_image_setting_an_unusable_size(control_bundle, tmp_path, capsys) -> None:
    from PIL import Image

    png = tmp_path / "odd.png"
    Image.fromarray(np.zeros((34, 32, 3), np.uint8)).save(png)
    code = main(["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT,
                 "--control-image", str(png), "--out", str(tmp_path / "o.png")])
    one_line_error(code, capsys.readouterr().err, "control image is 34x32 (HxW) and sets the output size",
                   "multiple of 4")
    assert not (tmp_path / "o.png").exists()


def test_control_image_must_be_an_image(control_bundle, tmp_path, capsys) -> None:
    bad = tmp_path / "c.png"
    bad.write_text("not a png")
    for image, needle in ((bad, "is not an image PIL can read"), (tmp_path / "none.png", "does not exist")):
        code = main(["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT,
                     "--control-image", str(image), "--out", str(tmp_path / "o.png")])
        one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "o.png").exists()


def test_controlnet_bundle_needs_an_image(control_bundle, tmp_path, capsys) -> None:
    code = main(["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT,
                 "--out", str(tmp_path / "o.png")])
    one_line_error(code, capsys.readouterr().err, "built with a ControlNet", "--control-image FILE")
    code = main(["run", "--bundle", str(control_bundle), "--backend", "ort", "--prompt", PROMPT, "--guess-mode",
                 "--out", str(tmp_path / "o.png")])
    one_line_error(code, capsys.readouterr().err, "--guess-mode sets up a ControlNet", "--control-image FILE")
    assert not (tmp_path / "o.png").exists()


def test_control_image_needs_a_controlnet_bundle(sd_bundle, tiny_pair, png_32, tmp_path, capsys) -> None:
    code = main(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", PROMPT,
                 "--control-image", str(png_32), "--out", str(tmp_path / "o.png")])
    one_line_error(code, capsys.readouterr().err, "--control-image needs a bundle built with --controlnet")
    code = main(["run", "--bundle", str(tiny_pair), "--control-image", str(png_32), "--out", str(tmp_path / "o.png")])
    one_line_error(code, capsys.readouterr().err, "--control-image applies to text-to-image")
    assert not (tmp_path / "o.png").exists()


def test_manifest_controlnet_and_step_graph_inputs_come_together(control_bundle, sd_bundle, tmp_path) -> None:
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.errors import BundleError

    with_net = json.loads((control_bundle / "manifest.json").read_text())
    without = json.loads((sd_bundle / "manifest.json").read_text())
    for name, raw in (("dropped", {**with_net, "conditioning": {"guidance": "cfg"}}),
                      ("added", {**without, "conditioning": with_net["conditioning"]})):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match="control_image input come together"):
            read_manifest(d)
    assert read_manifest(control_bundle).controlnet["family"] == "sd"


def test_check_compares_the_controlnet_step_graphs(control_bundle, capsys) -> None:
    """`check`: each ONNX step graph (ControlNet inside, guess mode on) against the torch step module."""
    assert main(["check", "--bundle", str(control_bundle), "--backend", "ort"]) == 0
    out = capsys.readouterr().out
    for model in ("small-unet", "large-pipeline"):
        assert any(line.split()[:3] == [model, "ort", "x_next"] and "ok" in line for line in out.splitlines()), out
    assert "0 outside" in out


def test_residual_layout_is_what_the_controlnet_makes() -> None:
    """models.controlnet.residual_layout against the residuals a diffusers ControlNet really returns."""
    from diffusers import ControlNetModel

    from tstitch_trt.models.controlnet import residual_layout

    for blocks, layers in (((4, 8), 2), ((4, 8, 8), 1)):
        net = ControlNetModel(block_out_channels=blocks, layers_per_block=layers, in_channels=4,
                              down_block_types=("DownBlock2D",) * (len(blocks) - 1) + ("CrossAttnDownBlock2D",),
                              cross_attention_dim=32, conditioning_embedding_out_channels=(16, 32),
                              norm_num_groups=1).eval()
        with torch.no_grad():
            down, mid = net(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 7, 32),
                            controlnet_cond=torch.zeros(1, 3, 32, 32), return_dict=False)
        made = [f"{r.shape[1]}/{16 // r.shape[2]}" for r in [*down, mid]]
        assert residual_layout(dict(net.config)) == made


def test_controlnet_run_without_torch(control_bundle, control_png, tmp_path) -> None:
    """The control image, the per-call scale and the ControlNet step graphs on ORT with torch unimportable."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from tstitch_trt.cli import main\n"
            f"rc = main(['run', '--bundle', {str(control_bundle)!r}, '--backend', 'ort', '--prompt', 'a cat', "
            f"'--steps', '3', '--control-image', {str(control_png)!r}, '--guess-mode', '--control-guidance-end', "
            f"'0.5', '--out', {str(tmp_path / 'o.png')!r}])\n"
            "assert sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "on ort [cpu]" in proc.stdout and (tmp_path / "o.png").is_file()
