"""SD 1.x conformance: `tstitch-trt run` equals a plain diffusers StableDiffusionPipeline.

The reference is diffusers' own pipeline loaded from the large directory, started on the small
U-Net and switched to the large one by callback_on_step_end after k calls, where k is what the
T-Stitch SD rule gives ((i + 1) / n_calls <= ratio). Same unit-Gaussian latent (--init-noise /
latents=), same prompts; the final latents (--save-latents / output_type="latent") must agree to
1e-4 of the reference's largest magnitude.
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
NEGATIVE = "blurry, low quality"
STEPS, SIZE = 8, 32  # 32 px with the dummy VAE (factor 2): latent 4x16x16
CASES = [("pndm", 0.0), ("pndm", 0.4), ("pndm", 1.0), ("ddim", 0.4), ("euler", 0.4), ("dpm-solver++", 0.4)]


@pytest.fixture(scope="module")
def reference(sd_pair):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    small, large = sd_pair
    pipe = StableDiffusionPipeline.from_pretrained(str(large), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small)).eval()
    large_unet = pipe.unet
    default_scheduler = pipe.scheduler.config

    def run(sampler: str, ratio: float, negative: str | None, latents: np.ndarray, output_type: str = "latent"):
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(default_scheduler)
        n_calls = len(sd_table(sampler, dict(default_scheduler), STEPS).timesteps)
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio)

        with torch.no_grad():
            b = latents.shape[0]  # --init-noise sets the batch, the prompt repeated
            out = pipe([PROMPT] * b, negative_prompt=None if negative is None else [negative] * b,
                       height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                       latents=torch.from_numpy(latents), output_type=output_type, callback_on_step_end=switch)
        pipe.unet = large_unet
        return np.asarray(out.images)

    return run


def unit_latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def run_cli(bundle: Path, tmp: Path, backend: str, sampler: str, ratio: float, negative: str | None,
            init: np.ndarray) -> tuple[np.ndarray, dict]:
    np.save(tmp / "init.npy", init)
    args = ["run", "--bundle", str(bundle), "--backend", backend, "--prompt", PROMPT, "--sampler", sampler,
            "--steps", str(STEPS), "--ratio", str(ratio), "--init-noise", str(tmp / "init.npy"),
            "--save-latents", str(tmp / "out.npy"), "--report", str(tmp / "report.json"), "--out", str(tmp / "o.png")]
    if negative is not None:
        args += ["--negative-prompt", negative]
    assert main(args) == 0
    return np.load(tmp / "out.npy"), json.loads((tmp / "report.json").read_text())


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("negative", [None, NEGATIVE])
@pytest.mark.parametrize("sampler,ratio", CASES)
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_run_equals_diffusers(sd_bundle, reference, tmp_path, backend, sampler, ratio, negative) -> None:
    init = unit_latents()
    ref = reference(sampler, ratio, negative, init)
    got, report = run_cli(sd_bundle, tmp_path, backend, sampler, ratio, negative, init)
    assert got.shape == ref.shape == init.shape
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros against zeros
    assert rel_diff(got, ref) < 1e-4, f"{backend} {sampler} r={ratio}: {rel_diff(got, ref):.2e}"
    n_calls = report["unet_calls"]
    small = int(round(ratio * n_calls + 1e-9)) if ratio in (0.0, 1.0) else sum(
        1 for i in range(n_calls) if (i + 1) / n_calls <= ratio)
    assert report["steps_per_model"] == [small, n_calls - small]


def test_the_switch_matters(sd_bundle, reference, tmp_path) -> None:
    """The comparison can fail: the stitched run differs from the large model alone."""
    init = unit_latents()
    got, _ = run_cli(sd_bundle, tmp_path, "ort", "pndm", 0.4, None, init)
    large_only = reference("pndm", 0.0, None, init)
    assert rel_diff(got, large_only) > 1e-2


def test_decoded_image_equals_diffusers(sd_bundle, reference, tmp_path) -> None:
    from PIL import Image

    init = unit_latents(batch=1)
    ref = reference("pndm", 0.4, None, init, output_type="np")[0]  # (H, W, 3) in [0, 1]
    run_cli(sd_bundle, tmp_path, "ort", "pndm", 0.4, None, init)
    got = np.asarray(Image.open(tmp_path / "o.png")).astype(np.int32)
    want = (ref * 255).round().astype(np.int32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_openvino_text_encoder_unets_and_vae_equal_diffusers(sd_bundle, reference, tmp_path, negative) -> None:
    """--backend openvino runs every graph of the bundle on OpenVINO (text encoder, U-Nets, VAE): the latents
    and the decoded image equal diffusers' (a text encoder error would show in both)."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")
    from PIL import Image

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.runtime import openvino_graph

    made: list = []

    class Recorded(openvino_graph.OpenVinoGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    init = unit_latents(batch=1)
    ref_latent = reference("pndm", 0.4, negative, init)
    ref_image = reference("pndm", 0.4, negative, init, output_type="np")[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openvino_graph, "OpenVinoGraph", Recorded)
        mp.setenv("TSTITCH_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
        got, report = run_cli(sd_bundle, tmp_path, "openvino", "pndm", 0.4, negative, init)
    manifest = read_manifest(sd_bundle)
    assert report["backend"] == "openvino"
    assert sorted(g.path.name for g in made) == sorted(Path(e["engines"]["ort"].file).name
                                                        for e in (manifest.text_encoder, manifest.vae))
    assert all(g.compiles == 1 and g.source == "compiled" for g in made)
    assert rel_diff(got, ref_latent) < 1e-4, f"openvino: {rel_diff(got, ref_latent):.2e}"
    want = (ref_image * 255).round().astype(np.int32)
    assert np.abs(np.asarray(Image.open(tmp_path / "o.png")).astype(np.int32) - want).max() <= 1
