"""SDXL LCM, T-Stitch's sdxl_lcm_lora setup in miniature, end to end against diffusers.

The tiny SDXL pair (models/sd_random.save_tiny_sdxl_pair) made into the LCM pair of the reference: the large
pipeline's U-Net gains LCM's guidance embedding (as LCM-SDXL is SDXL base's U-Net distilled with
time_cond_proj_dim 256; its scheduler config stays the Euler one and users pick LCMScheduler from it), the
small SSD-1B-like U-Net gets a random LoRA fused at build (`--lora small=...`, as lcm-lora-ssd-1b).

The peer is diffusers' StableDiffusionXLPipeline from the large directory with LCMScheduler.from_config of its
scheduler config, the small U-Net fused by diffusers (load_lora_weights + fuse_lora), switched small -> large
by callback_on_step_end; start latent and per-step noise from one torch.Generator in the pipeline's order, fed
to ours as init_noise / step_noise. As in tests/test_lcm.py, the peer's defect (timestep_cond computed once
from the FIRST U-Net) is corrected by presenting the small U-Net as one with the embedding (EmbeddingBlind),
so the large one gets its guidance embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.models.diffusers_peer import EmbeddingBlind, stitch_by_callback  # noqa: E402

PROMPT = "a photo of a cat sitting on a red chair"
SIZE = 32  # dummy SDXL VAE factor 2: latent 4x16x16
RATIO = 0.5
LORA_SCALE = 0.7


@pytest.fixture(scope="module")
def sdxl_lcm(sdxl_pair, tmp_path_factory):
    """(small U-Net dir, LCM large pipeline dir, LoRA file, bundle) built through the CLI (torch, ort)."""
    from diffusers import StableDiffusionXLPipeline

    from tstitch_trt.models.sd_random import save_random_lora, with_guidance_embedding

    small, large = sdxl_pair
    root = tmp_path_factory.mktemp("sdxl-lcm")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(large))
    pipe.unet = with_guidance_embedding(pipe.unet, 21)
    lcm_large = root / "lcm-sdxl-pipeline"
    pipe.save_pretrained(str(lcm_large))
    lora = save_random_lora(small, root / "lora")
    bundle = root / "bundle"
    assert main(["build", "--model", str(small), "--model", str(lcm_large), "--lora", f"small={lora}:{LORA_SCALE}",
                 "--backend", "torch,ort", "--out", str(bundle)]) == 0
    return small, lcm_large, lora, bundle


@pytest.fixture(scope="module")
def reference(sdxl_lcm):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    small_dir, large_dir, lora, _ = sdxl_lcm
    pipe = StableDiffusionXLPipeline.from_pretrained(str(large_dir))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    large = pipe.unet
    small = UNet2DConditionModel.from_pretrained(str(small_dir)).eval()
    pipe.unet = small
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["unet"], lora_scale=LORA_SCALE)
    pipe.unload_lora_weights()
    small = EmbeddingBlind(small, large.config.time_cond_proj_dim)

    def run(steps: int, g: float, seed: int, batch: int = 2) -> np.ndarray:
        switch = stitch_by_callback(pipe, small, large, steps, RATIO)

        with torch.no_grad():
            out = pipe([PROMPT] * batch, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=g,
                       generator=torch.Generator().manual_seed(seed), output_type="latent",
                       callback_on_step_end=switch)
        pipe.unet = large
        return out.images.numpy()

    return run


def same_draws(steps: int, seed: int, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 4, SIZE // 2, SIZE // 2)
    init = torch.randn(shape, generator=gen)
    noise = torch.zeros((steps, *shape))
    for i in range(steps - 1):
        noise[i] = torch.randn(shape, generator=gen)
    return init.numpy(), noise.numpy()


def run_ours(bundle: Path, backend: str, steps: int, g: float, seed: int) -> tuple[np.ndarray, dict]:
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    init, noise = same_draws(steps, seed)
    pipe = StitchedSDPipeline.from_bundle(bundle, backend=backend)
    try:
        res = pipe(PROMPT, sampler="lcm", ratio=RATIO, steps=steps, cfg_scale=g, init_noise=init, step_noise=noise,
                   decode=False)
    finally:
        pipe.close()
    return res.latents, res.report


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_sdxl_lcm_run_equals_diffusers(sdxl_lcm, reference, backend, steps) -> None:
    g = 0.0 if steps == 4 else 1.0  # the reference's LCM script runs g = 0
    ref = reference(steps, g, seed=steps)
    got, report = run_ours(sdxl_lcm[3], backend, steps, g, seed=steps)
    assert report["pipeline"] == "sdxl" and report["guidance"] == "embedding" and report["sampler"] == "lcm"
    assert np.abs(ref).max() > 0.1
    print(f"sdxl lcm {backend} {steps} steps g={g}: max abs diff / max |ref| = {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend} {steps} steps: {rel_diff(got, ref):.2e}"
    assert report["steps_per_model"] == [steps // 2, steps - steps // 2]


def test_sdxl_lcm_comparison_can_fail(sdxl_lcm, reference) -> None:
    ref = reference(4, 1.0, seed=4)
    other_g, _ = run_ours(sdxl_lcm[3], "ort", 4, 0.0, seed=4)
    assert rel_diff(other_g, ref) > 1e-3
    other_noise, _ = run_ours(sdxl_lcm[3], "ort", 4, 1.0, seed=5)
    assert rel_diff(other_noise, ref) > 1e-2


def test_sdxl_lcm_manifest_and_refusals(sdxl_lcm, tmp_path, capsys) -> None:
    from tstitch_trt.bundle.manifest import read_manifest

    m = read_manifest(sdxl_lcm[3])
    assert m.pipeline == "sdxl" and m.conditioning["guidance"] == "embedding"
    assert m.conditioning["force_zeros_for_empty_prompt"] is True and m.models[0].lora[0]["scale"] == LORA_SCALE
    assert m.io["inputs"]["text_embeds"]["shape"][0] == "B"  # no CFG batch
    capsys.readouterr()
    assert main(["run", "--bundle", str(sdxl_lcm[3]), "--prompt", "a cat", "--sampler", "lcm", "--cfg-scale", "5",
                 "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "small-sdxl-unet lacks" in err and len(err.splitlines()) == 1
