"""LCM and LoRA: `--sampler lcm` with "embedding" guidance and `build --lora`, end to end against diffusers.

Two tiny SD 1.x LCM pairs (diffusers' dummy components, every parameter random):
- "lora": T-Stitch's LCM pair in miniature: the large is a LatentConsistencyModelPipeline (LCMScheduler)
  whose U-Net takes the guidance embedding (time_cond_proj_dim); the small is a plain U-Net with a random
  LoRA fused at build (`--lora small=FILE:SCALE`) and no embedding, so guidance must stay <= 1.
- "embed": both U-Nets take the embedding; g = 8.5 must reach EVERY U-Net, not only the first.

The peer is diffusers' LatentConsistencyModelPipeline from the large directory, started on the small U-Net
(the LoRA fused by diffusers' load_lora_weights + fuse_lora) and switched to the large one by
callback_on_step_end. It draws the start latent and then one noise per step but the last from one
torch.Generator; ours gets the same draws (init_noise=, step_noise=).

The peer's own defect, corrected here: diffusers computes w_embedding once, from the pipeline's FIRST U-Net
(as T-Stitch's LCM code does), so a small U-Net without time_cond_proj_dim would leave the large one without
its guidance embedding (LatentConsistencyModelPipeline even fails on it). The peer's small U-Net is therefore
wrapped (EmbeddingBlind): its config reports the large's time_cond_proj_dim, so the pipeline computes the
embedding, and it drops timestep_cond, which the small cannot take.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import tiny_sd_parts  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.models.diffusers_peer import EmbeddingBlind, end_deepcache, stitch_by_callback  # noqa: E402

PROMPT = "a photo of a cat sitting on a red chair"
SIZE = 32  # dummy VAE factor 2: latent 4x16x16
LORA_SCALE = 0.8
RATIO = 0.5


@pytest.fixture(scope="module")
def lcm_parts(tmp_path_factory):
    from tstitch_trt.models.sd_random import lcm_tiny_unet, save_random_lora

    root = tmp_path_factory.mktemp("lcm-parts")
    small, large = tiny_sd_parts("save_tiny_pair", root, lcm=True)
    lora = save_random_lora(small, root / "lora")
    small_embed = root / "small-embed-unet"
    lcm_tiny_unet(5, small=True).save_pretrained(str(small_embed))
    return {"small": small, "large": large, "lora": lora, "small_embed": small_embed, "root": root}


def build(parts, out: Path, small: Path, *extra: str) -> Path:
    assert main(["build", "--model", str(small), "--model", str(parts["large"]), "--backend", "torch,ort",
                 "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bundles(lcm_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm-bundles")
    return {
        "lora": build(lcm_parts, root / "lora", lcm_parts["small"], "--lora",
                      f"small={lcm_parts['lora']}:{LORA_SCALE}"),
        "embed": build(lcm_parts, root / "embed", lcm_parts["small_embed"]),
    }


def peer_small_unet(parts, pair: str):
    """The small U-Net as diffusers users get it: the LoRA through the pipeline's load_lora_weights + fuse_lora."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if pair == "embed":
        return UNet2DConditionModel.from_pretrained(str(parts["small_embed"])).eval()
    unet = UNet2DConditionModel.from_pretrained(str(parts["small"])).eval()
    holder = StableDiffusionPipeline.from_pretrained(str(parts["large"]), unet=unet, safety_checker=None,
                                                     requires_safety_checker=False)
    holder.load_lora_weights(str(parts["lora"]))
    holder.fuse_lora(components=["unet"], lora_scale=LORA_SCALE)
    holder.unload_lora_weights()
    return unet


@pytest.fixture(scope="module")
def reference(lcm_parts):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(lcm_parts["large"]), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    large = pipe.unet
    smalls = {}

    def run(pair: str, steps: int, g: float, seed: int, batch: int = 2, large_blind: bool = False,
            ratio: float = RATIO, cache: tuple[int, int] | None = None):
        """large_blind: the large U-Net gets no guidance embedding (what the reference's defect would do).
        cache (interval, branch): the `deepcache` package's DeepCacheSDHelper on each U-Net, restarted at the switch
        (the helper wraps the U-Net's own blocks: the "embed" pair only, whose U-Nets need no EmbeddingBlind)."""
        if pair not in smalls:
            small = peer_small_unet(lcm_parts, pair)
            dim = large.config.time_cond_proj_dim
            smalls[pair] = small if small.config.time_cond_proj_dim else EmbeddingBlind(small, dim)
        second = EmbeddingBlind(large, large.config.time_cond_proj_dim) if large_blind else large
        switch = stitch_by_callback(pipe, smalls[pair], second, steps, ratio, cache=cache)
        try:
            with torch.no_grad():
                out = pipe([PROMPT] * batch, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=g,
                           generator=torch.Generator().manual_seed(seed), output_type="latent",
                           callback_on_step_end=switch)
        finally:
            if cache is not None:
                end_deepcache(smalls[pair])
                end_deepcache(large)
            pipe.unet = large
        return out.images.numpy()

    return run


def same_draws(steps: int, seed: int, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The start latent, then the LCM noise of every step but the last, from one generator in the
    pipeline's order (prepare_latents, then each scheduler.step); the last step's row is zeros."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 4, SIZE // 2, SIZE // 2)
    init = torch.randn(shape, generator=gen)
    noise = torch.zeros((steps, *shape))
    for i in range(steps - 1):
        noise[i] = torch.randn(shape, generator=gen)
    return init.numpy(), noise.numpy()


def run_ours(bundle: Path, backend: str, steps: int, g: float | None, seed: int, ratio: float = RATIO,
             cache_interval: int = 1) -> tuple[np.ndarray, dict]:
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    init, noise = same_draws(steps, seed)
    pipe = StitchedSDPipeline.from_bundle(bundle, backend=backend)
    try:
        res = pipe(PROMPT, ratio=ratio, steps=steps, cfg_scale=g, init_noise=init, step_noise=noise, decode=False,
                   cache_interval=cache_interval)
    finally:
        pipe.close()
    return res.latents, res.report


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("pair,g", [("lora", 1.0), ("lora", 0.0), ("embed", 8.5)])
@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_lcm_run_equals_diffusers(bundles, reference, backend, steps, pair, g) -> None:
    ref = reference(pair, steps, g, seed=steps)
    got, report = run_ours(bundles[pair], backend, steps, g, seed=steps)
    assert report["sampler"] == "lcm" and report["guidance"] == "embedding"  # the bundle's LCMScheduler
    assert np.abs(ref).max() > 0.1
    print(f"lcm {backend} {pair} {steps} steps g={g}: max abs diff / max |ref| = {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend} {pair} {steps} steps g={g}: {rel_diff(got, ref):.2e}"
    assert report["steps_per_model"] == [steps // 2, steps - steps // 2]


def test_the_comparison_can_fail(bundles, reference) -> None:
    """Other noise, another guidance value, or the reference's defect (the guidance embedding for the first
    U-Net only) each move the result far beyond the tolerance."""
    ref = reference("embed", 4, 8.5, seed=4)
    ours, _ = run_ours(bundles["embed"], "ort", 4, 8.5, seed=4)
    other_noise, _ = run_ours(bundles["embed"], "ort", 4, 8.5, seed=5)
    assert rel_diff(other_noise, ref) > 1e-2
    other_g, _ = run_ours(bundles["embed"], "ort", 4, 6.0, seed=4)
    assert rel_diff(other_g, ref) > 1e-2
    first_only = reference("embed", 4, 8.5, seed=4, large_blind=True)
    assert rel_diff(ours, first_only) > 1e-3
    lora_g0, _ = run_ours(bundles["lora"], "ort", 4, 0.0, seed=4)
    assert rel_diff(lora_g0, reference("lora", 4, 1.0, seed=4)) > 1e-3  # g reaches the large U-Net


def test_defaults_and_report(bundles) -> None:
    """No --steps / --cfg-scale: lcm's 4 steps; 8.5 where every U-Net has the embedding, 1 where one lacks it."""
    for pair, g in (("lora", 1.0), ("embed", 8.5)):
        from tstitch_trt.pipeline.sd import StitchedSDPipeline

        pipe = StitchedSDPipeline.from_bundle(bundles[pair], backend="ort")
        try:
            rep = pipe(PROMPT, decode=False).report
        finally:
            pipe.close()
        assert (rep["sampler"], rep["steps"], rep["cfg_scale"]) == ("lcm", 4, g)
        assert rep["negative_prompts"] == []


def test_manifest_records_guidance_and_lora(bundles, lcm_parts) -> None:
    from tstitch_trt.bundle.manifest import read_manifest, sha256_file

    m = read_manifest(bundles["lora"])
    assert m.conditioning == {"guidance": "embedding"}
    assert m.models[0].lora == [{"source": str(lcm_parts["lora"]), "sha256": sha256_file(lcm_parts["lora"]),
                                 "scale": LORA_SCALE}]
    assert m.models[1].lora is None
    assert m.scheduler["_class_name"] == "LCMScheduler"


def test_info_shows_guidance_and_lora(bundles, lcm_parts, capsys) -> None:
    assert main(["info", "--bundle", str(bundles["lora"])]) == 0
    out = capsys.readouterr().out
    assert "guidance embedding (LCM's" in out and "default sampler lcm" in out
    assert f"LoRA fused: {lcm_parts['lora']} (scale {LORA_SCALE:g})" in out
    assert "guidance embedding 32" in out  # the large U-Net's time_cond_proj_dim


def step_outputs(bundle: Path, model: int, unet=None):
    """(model's ORT step graph, the torch UNetStepModule of `unet`) on the same seeded step inputs."""
    import onnxruntime as ort

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.export.check import sd_step_inputs
    from tstitch_trt.export.unet_step import UNetStepModule

    m = read_manifest(bundle)
    feeds = sd_step_inputs(m, 2, seed=3)
    feeds["guidance"] = np.array(1.0, dtype=np.float32)
    sess = ort.InferenceSession(str(bundle / m.models[model].engines["ort"].file), providers=["CPUExecutionProvider"])
    got = sess.run(["x_next"], feeds)[0]
    with torch.no_grad():
        ref = UNetStepModule(unet, guidance=m.guidance_mode).eval()(**{k: torch.from_numpy(v) for k, v in
                                                                       feeds.items()})[0].numpy()
    return got, ref


def test_lora_step_graph_equals_diffusers_fused_unet(bundles, lcm_parts) -> None:
    from diffusers import UNet2DConditionModel

    got, fused = step_outputs(bundles["lora"], 0, peer_small_unet(lcm_parts, "lora"))
    print(f"LoRA step graph vs diffusers-fused U-Net: {rel_diff(got, fused):.2e}")
    assert rel_diff(got, fused) < 1e-5
    _, plain = step_outputs(bundles["lora"], 0, UNet2DConditionModel.from_pretrained(str(lcm_parts["small"])))
    assert rel_diff(got, plain) > 1e-2  # the LoRA changed the U-Net


def one_line_error(capsys, args: list[str], *needles: str) -> None:
    assert main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("extra,needles", [
    (["--cfg-scale", "2"], ["--cfg-scale 2 > 1", "U-Net small-unet lacks", "time_cond_proj_dim"]),
    (["--negative-prompt", "blurry"], ["negative prompt", "guidance embedding"]),
    (["--steps", "60"], ["original_inference_steps 50"]),
])
def test_bad_lcm_run_is_one_line(bundles, tmp_path, capsys, extra, needles) -> None:
    out = tmp_path / "o.png"
    one_line_error(capsys, ["run", "--bundle", str(bundles["lora"]), "--backend", "ort", "--prompt", "a cat",
                            "--out", str(out), *extra], *needles)
    assert not out.exists()


def test_lcm_on_a_cfg_bundle(sd_bundle, tmp_path, capsys) -> None:
    """A plain SD bundle: --sampler lcm runs with g <= 1, and g > 1 is refused (no U-Net has the embedding)."""
    base = ["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "a cat", "--sampler", "lcm",
            "--out", str(tmp_path / "o.png"), "--report", str(tmp_path / "r.json")]
    one_line_error(capsys, [*base, "--cfg-scale", "7.5"], "--sampler lcm", "U-Net small-unet lacks")
    assert main(base) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep["sampler"], rep["steps"], rep["cfg_scale"], rep["guidance"]) == ("lcm", 4, 1.0, "cfg")


def test_bad_lora_is_one_line(lcm_parts, sd_pair, tmp_path, capsys) -> None:
    from tstitch_trt.models.sd_random import save_random_lora

    parts = lcm_parts
    base = ["build", "--model", str(parts["small"]), "--model", str(parts["large"]), "--backend", "ort"]
    # a LoRA for the large U-Net (it has modules the small lacks) given to the small: the hint names large
    large_lora = save_random_lora(parts["large"] / "unet", tmp_path / "large-lora")
    one_line_error(capsys, [*base, "--lora", f"small={large_lora}", "--out", str(tmp_path / "a")],
                   "does not fit small", "it fits large")
    # a LoRA for another model's widths (a cross-attention width of 64, not 32): fits neither
    from diffusers import UNet2DConditionModel

    wide = tmp_path / "wide-unet"
    UNet2DConditionModel(**{**UNet2DConditionModel.load_config(str(parts["small"])),
                            "cross_attention_dim": 64}).save_pretrained(str(wide))
    wide_lora = save_random_lora(wide, tmp_path / "wide-lora")
    one_line_error(capsys, [*base, "--lora", f"large={wide_lora}", "--out", str(tmp_path / "b")],
                   "does not fit large", "fits neither model")
    for spec, needle in ((f"small={parts['lora']}:abc", "scale 'abc' is not a number"),
                         (f"small={parts['lora']}:1e6", "scale '1e6' must be a number in [-100, 100]"),
                         (f"small={parts['lora']}:nan", "scale 'nan' must be a number in"),
                         (f"medium={parts['lora']}", "'medium' is neither small, large"),
                         (f"small={tmp_path / 'missing.safetensors'}", "is not a file"),
                         ("small", "expected SMALL_OR_LARGE=FILE[:SCALE]")):
        one_line_error(capsys, [*base, "--lora", spec, "--out", str(tmp_path / "c")], needle)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    one_line_error(capsys, [*base, "--lora", f"small={junk}", "--out", str(tmp_path / "d")], "cannot read the LoRA")
    assert not any((tmp_path / d).exists() for d in "abcd")


def _has_rtx() -> bool:
    import importlib

    try:
        return hasattr(importlib.import_module("tensorrt_rtx"), "Builder")
    except Exception:
        return False


@pytest.mark.skipif(not _has_rtx(), reason="tensorrt_rtx is not installed (pip install tensorrt-rtx)")
@pytest.mark.parametrize("embedding", [True, False])
def test_trt_rtx_builds_the_embedding_step_graph(tmp_path, embedding) -> None:
    """The fp16 "embedding" step graph becomes a real TensorRT-RTX plan (built on the CPU), for a U-Net with
    LCM's guidance embedding and for one without (whose graph still declares the unused `guidance`)."""
    from tstitch_trt.export.trt_build import make_engine_builder
    from tstitch_trt.export.unet_export import export_unet_step, unet_io_spec
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.sd_random import LCM_EMBED_DIM, tiny_unet

    unet = tiny_unet(2, small=False, time_cond_proj_dim=LCM_EMBED_DIM if embedding else None)
    step = UNetStepModule(unet, guidance="embedding").eval()
    graph = export_unet_step(step, tmp_path / "step-fp16.onnx", "fp16", 77, pixel_factor=2)
    io = unet_io_spec(step, 77, pixel_factor=2)
    info = make_engine_builder("trt-rtx").build(graph, tmp_path / "step.plan", (1, 2), io)
    assert (tmp_path / "step.plan").stat().st_size > 10_000
    profile = info["options"]["profile"]
    assert profile["context"] == [[1, 77, 32], [2, 77, 32], [2, 77, 32]]  # B, not 2B: no CFG batch
    assert profile["x"][2][0] == 2
    assert "guidance" in io["inputs"] and io["inputs"]["guidance"]["shape"] == []


CACHE_BRANCH = 3


@pytest.fixture(scope="module")
def cache_bundle(lcm_parts, tmp_path_factory) -> Path:
    """The "embed" pair with DeepCache's cached step graphs (branch 3), embedding guidance, no CFG batch."""
    return build(lcm_parts, tmp_path_factory.mktemp("lcm-cache") / "embed", lcm_parts["small_embed"],
                 "--cache-branch", str(CACHE_BRANCH))


@pytest.mark.parametrize("backend,steps,ratio,interval", [("ort", 8, 0.0, 2), ("ort", 4, RATIO, 2),
                                                          ("ort", 8, RATIO, 3), ("torch", 8, RATIO, 2)])
def test_lcm_cache_equals_deepcache(cache_bundle, reference, backend, steps, ratio, interval) -> None:
    """LCM with DeepCache: equal to LatentConsistencyModelPipeline with DeepCacheSDHelper (same cache_interval and
    cache_branch_id), stitched by callback with the helper started afresh on the large U-Net at the switch."""
    pytest.importorskip("DeepCache", reason="pip install --no-deps deepcache (scripts/test.sh installs it)")
    ref = reference("embed", steps, 8.5, seed=steps, ratio=ratio, cache=(interval, CACHE_BRANCH))
    got, report = run_ours(cache_bundle, backend, steps, 8.5, seed=steps, ratio=ratio, cache_interval=interval)
    assert report["sampler"] == "lcm" and report["cache"]["cached_calls"] and np.abs(ref).max() > 0.1
    assert rel_diff(got, ref) < 1e-4, f"{backend} {steps} steps r={ratio} N={interval}: {rel_diff(got, ref):.2e}"
    if backend == "ort" and steps == 8:  # the comparison can fail: caching moves the result
        assert rel_diff(got, reference("embed", steps, 8.5, seed=steps, ratio=ratio)) > 1e-3


def test_request_noise_is_what_a_run_draws(bundles) -> None:
    """A served batch's per-request draws (request_noise) reproduce the run that drew them itself; lcm's
    last noise row is zeros."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(bundles["embed"], backend="ort")
    try:
        own = pipe(PROMPT, steps=4, seed=11, height=SIZE, width=SIZE, decode=False).latents
        x, noise = pipe.request_noise(11, 1, SIZE, SIZE, 4, "lcm", 0.0)
        assert noise is not None and noise.shape == (4, *x.shape) and not noise[-1].any() and noise[0].any()
        given = pipe(PROMPT, steps=4, init_noise=x, step_noise=noise, decode=False).latents
    finally:
        pipe.close()
    assert np.array_equal(own, given)


def test_guidance_cfg_override(lcm_parts, tmp_path, capsys) -> None:
    """build --guidance cfg on U-Nets that have the embedding: CFG step graphs (2B context); lcm with g > 1
    is then refused with the way out."""
    from tstitch_trt.bundle.manifest import read_manifest

    out = tmp_path / "cfg"
    assert main(["build", "--model", str(lcm_parts["small_embed"]), "--model", str(lcm_parts["large"]),
                 "--backend", "ort", "--guidance", "cfg", "--out", str(out)]) == 0
    m = read_manifest(out)
    assert m.guidance_mode == "cfg" and m.io["inputs"]["context"]["shape"][0] == "2B"
    capsys.readouterr()  # the build's own output
    one_line_error(capsys, ["run", "--bundle", str(out), "--prompt", "a cat", "--cfg-scale", "3",
                            "--out", str(tmp_path / "o.png")], "built with --guidance cfg", "--guidance embedding")
    assert main(["run", "--bundle", str(out), "--prompt", "a cat", "--sampler", "euler", "--steps", "2",
                 "--negative-prompt", "blurry", "--out", str(tmp_path / "o.png")]) == 0
