"""SDXL ControlNet conformance: `tstitch-trt run --control-image` on an sdxl bundle equals diffusers'
StableDiffusionXLControlNetPipeline.

Tiny random parts: diffusers' dummy SDXL components and ControlNet (its config is the dummy SDXL U-Net's +
conditioning_embedding_out_channels (16, 32)), every parameter random; the small U-Net is reduced the way
SSD-1B reduces SDXL, so it keeps SDXL's residual layout and the one ControlNet feeds both (T-Stitch's SDXL
ControlNet pairing). The reference is diffusers' SDXL ControlNet pipeline on the large directory's
components, started on the small U-Net and switched by callback_on_step_end; same latent, same PNG, same
(default) time ids; final latents agree to 1e-4 of the largest magnitude.
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

CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}
PROMPT = "a photo of a cat sitting on a red chair"
NEGATIVE = "blurry, low quality"
STEPS, SIZE = 6, 32  # the dummy SDXL VAE has factor 2: latent 4x16x16, control image 32x32
DEFAULT = {"scale": 1.0, "guess": False, "start": 0.0, "end": 1.0}
CASES = [  # (sampler, ratio, negative prompt, ControlNet settings)
    ("euler", 0.4, None, DEFAULT),
    ("ddim", 0.4, NEGATIVE, {**DEFAULT, "guess": True, "scale": 0.7}),
    ("dpm-solver++", 0.4, None, {**DEFAULT, "scale": 1.3, "start": 0.2, "end": 0.7}),
]


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("sdxl-control") / "control.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def reference(sdxl_control_set, control_png):
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image

    small, large, net_dir = sdxl_control_set
    base = StableDiffusionXLPipeline.from_pretrained(str(large))
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(
        **parts, controlnet=ControlNetModel.from_pretrained(str(net_dir)).eval(),
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small)).eval()
    large_unet = pipe.unet
    default_scheduler = pipe.scheduler.config
    image = Image.open(control_png)

    def run(sampler: str, ratio: float, negative: str | None, control: dict, latents: np.ndarray) -> np.ndarray:
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(default_scheduler)
        n_calls = len(sd_table(sampler, dict(default_scheduler), STEPS).timesteps)
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio)

        b = latents.shape[0]
        with torch.no_grad():
            out = pipe([PROMPT] * b, negative_prompt=None if negative is None else [negative] * b, image=image,
                       height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                       output_type="latent", controlnet_conditioning_scale=control["scale"],
                       guess_mode=control["guess"], control_guidance_start=control["start"],
                       control_guidance_end=control["end"], callback_on_step_end=switch)
        pipe.unet = large_unet
        return np.asarray(out.images)

    return run


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# every case on ORT; the torch backend on the richest one (guess mode, a negative prompt): on a loaded 2-core
# machine a tiny torch CPU run can take ~50 s (its OpenMP threads contend), against ~1 s on ORT
RUNS = [("ort", *c) for c in CASES] + [("torch", *CASES[1])]


@pytest.mark.parametrize("backend,sampler,ratio,negative,control", RUNS, ids=[f"{r[0]}-{r[1]}" for r in RUNS])
def test_sdxl_controlnet_run_equals_diffusers(sdxl_control_bundle, reference, control_png, tmp_path, backend,
                                              sampler, ratio, negative, control) -> None:
    init = np.random.default_rng(0).standard_normal((2, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    np.save(tmp_path / "init.npy", init)
    args = ["run", "--bundle", str(sdxl_control_bundle), "--backend", backend, "--prompt", PROMPT, "--sampler",
            sampler, "--steps", str(STEPS), "--ratio", str(ratio), "--init-noise", str(tmp_path / "init.npy"),
            "--control-image", str(control_png), "--controlnet-scale", str(control["scale"]),
            "--control-guidance-start", str(control["start"]), "--control-guidance-end", str(control["end"]),
            "--save-latents", str(tmp_path / "out.npy"), "--report", str(tmp_path / "r.json"),
            "--out", str(tmp_path / "o.png")]
    args += (["--guess-mode"] if control["guess"] else []) + (["--negative-prompt", negative] if negative else [])
    assert main(args) == 0
    got, report = np.load(tmp_path / "out.npy"), json.loads((tmp_path / "r.json").read_text())
    ref = reference(sampler, ratio, negative, control, init)
    assert report["pipeline"] == "sdxl" and got.shape == ref.shape == init.shape
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros against zeros
    print(f"SDXL controlnet {backend} {sampler} r={ratio} negative={negative is not None} {control}: "
          f"max abs diff / max |ref| = {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend} {sampler}: {rel_diff(got, ref):.2e}"


def test_sdxl_controlnet_moves_the_result(sdxl_control_bundle, reference, tmp_path) -> None:
    """The comparison can fail: the same run with the ControlNet at scale 0 differs."""
    init = np.random.default_rng(0).standard_normal((2, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    on = reference("euler", 0.4, None, DEFAULT, init)
    off = reference("euler", 0.4, None, {**DEFAULT, "scale": 0.0}, init)
    assert rel_diff(off, on) > 1e-3


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_controlnet_of_the_other_family_is_refused(sdxl_control_set, control_set, tmp_path, capsys) -> None:
    """An SD 1.x ControlNet on the SDXL pair, and an SDXL ControlNet on the SD pair: one line naming both."""
    sdxl_small, sdxl_large, sdxl_net = sdxl_control_set
    sd_small, sd_large, sd_net = control_set
    for small, large, net, needles in (
            (sdxl_small, sdxl_large, sd_net, ["is an SD ControlNet (addition_embed_type None)",
                                              "small-sdxl-unet is an SDXL U-Net (addition_embed_type text_time)"]),
            (sd_small, sd_large, sdxl_net, ["is an SDXL ControlNet (addition_embed_type text_time)",
                                            "small-unet is an SD U-Net (addition_embed_type None)"])):
        out = tmp_path / "b"
        code = main(["build", "--model", str(small), "--model", str(large), "--controlnet", str(net),
                     "--backend", "ort", "--out", str(out)])
        one_line_error(code, capsys.readouterr().err, *needles)
        assert not out.exists()
