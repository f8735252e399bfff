"""SDXL conformance: `tstitch-trt run` on an sdxl bundle equals a plain diffusers StableDiffusionXLPipeline.

The reference is diffusers' own pipeline loaded from the large directory, started on the small
U-Net and switched to the large one by callback_on_step_end after k calls, where k is what the
T-Stitch SD rule gives ((i + 1) / n_calls <= ratio). Same unit-Gaussian latent (--init-noise /
latents=), same prompts, same time ids; the final latents (--save-latents / output_type="latent")
must agree to 1e-4 of the reference's largest magnitude. The parts are diffusers' dummy SDXL
components with every parameter random (models/sd_random.save_tiny_sdxl_pair).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.errors import UserError  # noqa: E402
from tstitch_trt.models.diffusers_peer import stitch_by_callback  # noqa: E402
from tstitch_trt.sampling.sd_samplers import sd_table  # noqa: E402

CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}
PROMPT = "a photo of a cat sitting on a red chair"
NEGATIVE = "blurry, low quality"
STEPS, SIZE = 6, 32  # 32 px with the dummy VAE (factor 2): latent 4x16x16
CASES = [("euler", 0.0), ("euler", 0.4), ("euler", 1.0), ("ddim", 0.4), ("dpm-solver++", 0.4)]


@pytest.fixture(scope="module")
def reference(sdxl_pair):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    small, large = sdxl_pair
    pipe = StableDiffusionXLPipeline.from_pretrained(str(large))
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small)).eval()
    large_unet = pipe.unet
    default_scheduler = pipe.scheduler.config

    def run(sampler: str, ratio: float, negative: str | None, latents: np.ndarray, **sizes) -> np.ndarray:
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(default_scheduler)
        n_calls = len(sd_table(sampler, dict(default_scheduler), STEPS).timesteps)
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, ratio)

        with torch.no_grad():
            b = latents.shape[0]  # --init-noise sets the batch, the prompt repeated
            out = pipe([PROMPT] * b, negative_prompt=None if negative is None else [negative] * b,
                       height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                       output_type="latent", callback_on_step_end=switch, **sizes)
        pipe.unet = large_unet
        return np.asarray(out.images)

    return run


def unit_latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def run_cli(bundle: Path, tmp: Path, backend: str, sampler: str | None, ratio: float, negative: str | None,
            init: np.ndarray, extra: list[str] | None = None) -> tuple[np.ndarray, dict]:
    np.save(tmp / "init.npy", init)
    args = ["run", "--bundle", str(bundle), "--backend", backend, "--prompt", PROMPT, "--steps", str(STEPS),
            "--ratio", str(ratio), "--init-noise", str(tmp / "init.npy"), "--save-latents", str(tmp / "out.npy"),
            "--report", str(tmp / "report.json"), "--out", str(tmp / "o.png")]
    if sampler is not None:
        args += ["--sampler", sampler]
    if negative is not None:
        args += ["--negative-prompt", negative]
    assert main(args + (extra or [])) == 0
    return np.load(tmp / "out.npy"), json.loads((tmp / "report.json").read_text())


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_bundle_records_the_sdxl_conditioning(sdxl_bundle) -> None:
    from tstitch_trt.bundle.manifest import read_manifest

    m = read_manifest(sdxl_bundle)
    assert m.pipeline == "sdxl"
    assert m.conditioning == {"guidance": "cfg", "force_zeros_for_empty_prompt": True, "text_embeds_dim": 32,
                              "time_ids": 6}
    assert m.text_encoder["hidden_state"] == m.text_encoder_2["hidden_state"] == "penultimate-raw"
    assert m.text_encoder_2["kind"] == "CLIPTextModelWithProjection" and m.text_encoder_2["pooled"]
    assert list(m.text_encoder_2["io"]["outputs"]) == ["text_embeddings", "text_embeds"]
    assert m.tokenizer_2["pad_id"] == 0 and m.tokenizer["pad_id"] == 49407  # "!" vs <|endoftext|>
    assert m.io["roles"]["request"] == ["context", "text_embeds", "time_ids", "guidance"]
    assert m.io["inputs"]["context"]["shape"] == ["2B", 77, 64]
    assert m.io["inputs"]["text_embeds"]["shape"] == ["2B", 32]


@pytest.mark.parametrize("negative", [None, NEGATIVE])
@pytest.mark.parametrize("sampler,ratio", CASES)
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_run_equals_diffusers(sdxl_bundle, reference, tmp_path, backend, sampler, ratio, negative) -> None:
    init = unit_latents()
    ref = reference(sampler, ratio, negative, init)
    # euler is the bundle's default sampler (EulerDiscreteScheduler) and 5.0 the default cfg: leave both out
    got, report = run_cli(sdxl_bundle, tmp_path, backend, None if sampler == "euler" else sampler, ratio, negative,
                          init)
    assert report["sampler"] == sampler and report["cfg_scale"] == 5.0
    assert got.shape == ref.shape == init.shape
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros against zeros
    print(f"\nSDXL {backend} {sampler} r={ratio} negative={negative is not None}: max abs diff / max |ref| "
          f"{rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend} {sampler} r={ratio}: {rel_diff(got, ref):.2e}"
    n_calls = report["unet_calls"]
    small = sum(1 for i in range(n_calls) if (i + 1) / n_calls <= ratio)
    assert report["steps_per_model"] == [small, n_calls - small]


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_time_ids_equal_diffusers(sdxl_bundle, reference, tmp_path, backend) -> None:
    """Non-default original size, crop and target size reach both U-Nets as diffusers builds them."""
    init = unit_latents(batch=1, seed=3)
    sizes = {"original_size": (96, 80), "crops_coords_top_left": (5, 7), "target_size": (48, 40)}
    ref = reference("euler", 0.4, NEGATIVE, init, **sizes)
    got, report = run_cli(sdxl_bundle, tmp_path, backend, None, 0.4, NEGATIVE, init,
                          ["--original-size", "96", "80", "--crop-coords", "5", "7", "--target-size", "48", "40"])
    assert report["time_ids"] == [[96, 80, 5, 7, 48, 40]] * 2
    print(f"\nSDXL time ids {backend}: {rel_diff(got, ref):.2e}")
    assert rel_diff(got, ref) < 1e-4, f"{backend}: {rel_diff(got, ref):.2e}"
    default = reference("euler", 0.4, NEGATIVE, init)
    assert rel_diff(got, default) > 1e-3  # the time ids matter: the check can fail


def test_empty_negative_prompt_is_encoded_not_zeroed(sdxl_bundle, reference, tmp_path) -> None:
    """force_zeros_for_empty_prompt zeroes only an ABSENT negative prompt; "" is encoded, as in diffusers."""
    init = unit_latents(batch=1, seed=4)
    got, _ = run_cli(sdxl_bundle, tmp_path, "ort", None, 0.4, "", init)
    assert rel_diff(got, reference("euler", 0.4, "", init)) < 1e-4
    assert rel_diff(got, reference("euler", 0.4, None, init)) > 1e-3


def test_the_switch_matters(sdxl_bundle, reference, tmp_path) -> None:
    """The comparison can fail: the stitched run differs from the large model alone."""
    init = unit_latents()
    got, _ = run_cli(sdxl_bundle, tmp_path, "ort", None, 0.4, None, init)
    assert rel_diff(got, reference("euler", 0.0, None, init)) > 1e-2


def test_force_zeros_false_encodes_the_empty_prompt(sdxl_pair, tmp_path) -> None:
    """A pipeline saved with force_zeros_for_empty_prompt false: the manifest says so and no negative prompt
    encodes "" (the same result as --negative-prompt "")."""
    small, large = sdxl_pair
    src = tmp_path / "large"
    shutil.copytree(large, src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    out = tmp_path / "bundle"
    assert main(["build", "--model", str(small), "--model", str(src), "--backend", "ort", "--out", str(out)]) == 0
    from tstitch_trt.bundle.manifest import read_manifest

    assert read_manifest(out).conditioning["force_zeros_for_empty_prompt"] is False
    init = unit_latents(batch=1, seed=5)
    none, _ = run_cli(out, tmp_path, "ort", None, 0.4, None, init)
    empty, _ = run_cli(out, tmp_path, "ort", None, 0.4, "", init)
    np.testing.assert_array_equal(none, empty)


# ------------------------------------------------------------------------------------------- bad input

def fails(capsys, args: list[str], pattern: str) -> str:
    """The CLI refuses with exit 2 and ONE line matching `pattern`."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    assert re.search(pattern, err), err
    return err


def _variant_unet(pair_small: Path, out: Path, **changes) -> Path:
    """The small SDXL U-Net directory with its config changed (weights re-made from the new config)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads((pair_small / "config.json").read_text()).items() if not k.startswith("_")}
    cfg.update(changes)
    UNet2DConditionModel(**cfg).save_pretrained(str(out))
    return out


def test_added_condition_sizes_must_agree(sdxl_pair, tmp_path, capsys) -> None:
    small, large = sdxl_pair
    other = _variant_unet(small, tmp_path / "wide-time", addition_time_embed_dim=16,
                          projection_class_embeddings_input_dim=128)
    fails(capsys, ["build", "--model", str(other), "--model", str(large), "--backend", "ort", "--out",
                   str(tmp_path / "b")], r"projection_class_embeddings_input_dim\) 128 vs 80")
    assert not (tmp_path / "b").exists()


def test_sd_unet_with_sdxl_pipeline_is_refused(sd_pair, sdxl_pair, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "b")]
    fails(capsys, ["build", "--model", str(sd_pair[0]), "--model", str(sdxl_pair[1]), *out],
          r"is an SD 1\.x U-Net, large-sdxl-pipeline an SDXL pipeline")
    fails(capsys, ["build", "--model", str(sdxl_pair[0]), "--model", str(sd_pair[1]), *out],
          r"is an SDXL U-Net, large-pipeline an SD 1\.x pipeline")
    fails(capsys, ["build", "--model", str(sdxl_pair[1]), "--model", str(sd_pair[1]), *out],
          r"is an SDXL U-Net, large-pipeline an SD 1\.x pipeline")


def test_cross_attention_must_be_both_text_widths(sdxl_pair, tmp_path, capsys) -> None:
    small, large = sdxl_pair
    src = tmp_path / "large"
    shutil.copytree(large, src)
    cfg_path = src / "text_encoder_2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "hidden_size": 48}))
    fails(capsys, ["build", "--model", str(small), "--model", str(src), "--out", str(tmp_path / "b")],
          r"text encoders \(text_encoder \+ text_encoder_2\) cannot be stitched: cross-attention width 64 vs text "
          r"width 80")


def test_refiner_is_refused(sdxl_pair, tmp_path, capsys) -> None:
    small, large = sdxl_pair
    src = tmp_path / "refiner"
    shutil.copytree(large, src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    fails(capsys, ["build", "--model", str(small), "--model", str(src), "--out", str(tmp_path / "b")],
          "requires an aesthetic score")


def test_time_id_flags_on_an_sd_bundle_are_refused(sd_bundle, tmp_path, capsys) -> None:
    fails(capsys, ["run", "--bundle", str(sd_bundle), "--prompt", "x", "--steps", "2", "--original-size", "64", "64",
                   "--out", str(tmp_path / "o.png")], "apply to SDXL bundles")
    assert not (tmp_path / "o.png").exists()


def test_bad_time_id_values_are_one_line(sdxl_bundle, capsys) -> None:
    assert main(["run", "--bundle", str(sdxl_bundle), "--prompt", "x", "--original-size", "0", "64"]) == 2
    assert "--original-size: must be between 1 and 65536, got 0" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--crop-coords must be two whole numbers"):
        from tstitch_trt.pipeline.sd import StitchedSDPipeline

        StitchedSDPipeline.sdxl_time_ids(32, 32, crop_coords=(1.5, 0))


def test_info_and_check_on_an_sdxl_bundle(sdxl_bundle, tmp_path, capsys) -> None:
    """`info` describes both encoders; `check` compares both text encoders (penultimate-raw hidden state, pooled
    text_embeds), the step graphs with text_embeds / time_ids, and the VAE against torch: all within tolerance."""
    assert main(["info", "--bundle", str(sdxl_bundle)]) == 0
    out = capsys.readouterr().out
    assert "text-to-image (sdxl)" in out and "CLIPTextModelWithProjection (penultimate-raw" in out
    assert main(["check", "--bundle", str(sdxl_bundle), "--backend", "ort", "--report",
                 str(tmp_path / "check.json")]) == 0
    rows = json.loads((tmp_path / "check.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    seen = {(r["model"], r["output"]) for r in rows if r["status"] == "ok"}
    assert ("text encoder", "text_embeddings") in seen and ("text encoder 2", "text_embeds") in seen
    assert ("large-sdxl-pipeline", "x_next") in seen and ("VAE decoder", "image") in seen
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "ort")


def test_vae_that_overflows_in_fp16_gets_fp32_engines(tmp_path) -> None:
    """SDXL's VAE overflows in fp16: the build-time probe (latents N(0,1) / scaling_factor, fp16 graph vs fp32
    graph on ONNX Runtime) sends the engine builder the fp32 graph and says why. A VAE whose first decoder
    convolution is scaled up overflows fp16 here; the same VAE unscaled stays fp16."""
    from tstitch_trt.export.vae_export import add_vae, randomized_vae

    class RecordingBuilder:  # stands in for TensorRT: records which graph it was handed
        def __init__(self):
            self.graphs: list[str] = []

        def build(self, graph: Path, out: Path, batch_range, io) -> dict:
            import onnx

            types = {i.data_type for i in onnx.load(str(graph)).graph.initializer}
            self.graphs.append("fp16" if onnx.TensorProto.FLOAT16 in types else "fp32")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"plan")
            return {"kind": "recording"}

    for scale_up, want in ((1.0, "fp16"), (3e4, "fp32")):
        vae = randomized_vae((8, 16), seed=1)
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(scale_up)
        src = tmp_path / f"vae-{scale_up:g}"
        vae.save_pretrained(str(src))
        builder = RecordingBuilder()
        bundle = tmp_path / f"bundle-{scale_up:g}"
        bundle.mkdir()
        entry = add_vae(bundle, str(src), ["trt-rtx"], (1, 1), (4, 8, 8), precision="fp16",
                        engine_builders={"trt-rtx": builder}, downsample=2, dynamic_hw=True,
                        probe_scale=1 / 0.13025)
        assert builder.graphs == [want]
        assert entry["engines"]["trt-rtx"].precision == want
        assert f"VAE engines are {want}" in entry["notes"][0]


def test_sdxl_vae_with_force_upcast_gets_fp32_engines_without_a_probe(tmp_path) -> None:
    """The real SDXL VAE's config sets force_upcast, and diffusers' SDXL pipeline decodes it in fp32: the build
    obeys the flag (random weights cannot show the trained VAE's overflow); with the flag false the probe decides."""
    from tstitch_trt.export.vae_export import add_vae, randomized_vae

    class RecordingBuilder:
        graphs: list[str] = []

        def build(self, graph: Path, out: Path, batch_range, io) -> dict:
            self.graphs.append(graph.name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"plan")
            return {"kind": "recording"}

    for upcast, want in ((True, "fp32"), (False, "fp16")):
        vae = randomized_vae((8, 16), seed=1)
        vae.register_to_config(force_upcast=upcast)
        src = tmp_path / f"vae-{upcast}"
        vae.save_pretrained(str(src))
        bundle = tmp_path / f"bundle-{upcast}"
        bundle.mkdir()
        builder = RecordingBuilder()
        builder.graphs = []
        entry = add_vae(bundle, str(src), ["trt-rtx"], (1, 1), (4, 8, 8), precision="fp16",
                        engine_builders={"trt-rtx": builder}, downsample=2, dynamic_hw=True,
                        probe_scale=1 / 0.13025, honour_force_upcast=True)
        assert builder.graphs == [f"decoder-{want}.onnx"]
        assert entry["engines"]["trt-rtx"].precision == want
        assert f"VAE engines are {want}" in entry["notes"][0]
        assert ("force_upcast" in entry["notes"][0]) is upcast and ("PSNR" in entry["notes"][0]) is not upcast


# ------------------------------------------------------------------------- benchmarks/gpu_check_sd.py --pair sdxl

def _gpu_check_sd():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_sd.py"
    spec = importlib.util.spec_from_file_location("gpu_check_sd", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sdxl_and_ssd_1b_configs_are_the_real_architectures() -> None:
    """The GPU check's random U-Nets have SDXL base's and SSD-1B's sizes (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    from tstitch_trt.models.sd_random import UNET_CONFIGS

    counts = {}
    for name in ("sdxl", "ssd-1b"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNET_CONFIGS[name])
        counts[name] = sum(p.numel() for p in unet.parameters()) / 1e6
        assert unet.config.addition_embed_type == "text_time"
        assert unet.add_embedding.linear_1.in_features == 6 * 256 + 1280
    assert round(counts["sdxl"], 1) == 2567.5  # REFERENCE.md: SDXL base 2567.5M
    assert 1300 < counts["ssd-1b"] < 1350  # segmind: SSD-1B's U-Net is 1.3B


def test_gpu_check_sdxl_dry_run_matches_diffusers(tmp_path) -> None:
    """The GPU script's SDXL path on the CPU (tiny SDXL U-Nets, fp32, 2 Euler steps): the torch backend's stitched
    trajectory equals diffusers' StableDiffusionXLPipeline with the callback switch."""
    out = tmp_path / "sdxl.json"
    assert _gpu_check_sd().main(["--cpu-dry-run", "--pair", "sdxl", "--steps", "2", "--repeats", "1",
                                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["pair"] == "sdxl" and res["sampler"] == "euler" and res["cfg"] == 5.0 and res["unet_calls"] == 2
    assert res["complete"] is True  # written after every block; complete only at the end
    assert res["all_finite"] == {"eager": True, "diffusers": True}
    assert res["max_rel_diff_vs_diffusers"]["eager"] < 1e-4


def test_negative_time_ids_equal_diffusers(sdxl_bundle, reference, tmp_path) -> None:
    """Negative time ids (diffusers' negative_original_size / negative_crops_coords_top_left /
    negative_target_size) condition the uncond half only; batch 1, where diffusers' row order is unambiguous."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    init = unit_latents(batch=1, seed=6)
    ref = reference("euler", 0.4, NEGATIVE, init, negative_original_size=(40, 36),
                    negative_crops_coords_top_left=(2, 1), negative_target_size=(24, 28))
    pipe = StitchedSDPipeline.from_bundle(sdxl_bundle, backend="ort")
    try:
        res = pipe(PROMPT, negative_prompt=NEGATIVE, ratio=0.4, steps=STEPS, init_noise=init, decode=False,
                   negative_original_size=(40, 36), negative_crop_coords=(2, 1), negative_target_size=(24, 28))
    finally:
        pipe.close()
    assert res.report["time_ids"] == [[40, 36, 2, 1, 24, 28], [32, 32, 0, 0, 32, 32]]
    assert rel_diff(res.latents, ref) < 1e-4, f"{rel_diff(res.latents, ref):.2e}"


def test_bundle_with_disagreeing_pooled_widths_is_refused(sdxl_bundle, tmp_path) -> None:
    from tstitch_trt.bundle.manifest import BundleError, read_manifest

    bad = tmp_path / "bad"
    shutil.copytree(sdxl_bundle, bad)
    doc = json.loads((bad / "manifest.json").read_text())
    doc["conditioning"]["text_embeds_dim"] = 33
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"pooled text_embeds widths disagree \(conditioning 33, step graphs 32"):
        read_manifest(bad)
