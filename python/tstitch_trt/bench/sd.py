"""`tstitch-trt bench --workload sd-bk-tiny-sd15`: the SD 1.x workload.

Random BK-SDM-Tiny -> SD 1.5 U-Nets (real architectures, every parameter random), a random CLIP
ViT-L/14 text encoder and SD VAE, the SD 1.5 scheduler, the real CLIP tokenizer: built once as a
torch bundle into --cache. Measured in one run, on the torch backend (the U-Nets are shared with
the diffusers pipeline in memory, so both sides run the very same weights):

- per-call U-Net step time of each model (CFG batch of one image: one step graph call);
- the stitched trajectory at ratio 0, --ratio and 1, against the ideal line between the ends;
- end to end (prompt -> image) against diffusers' StableDiffusionPipeline started on the small
  U-Net and switched to the large one by callback_on_step_end after the same calls (what a user
  would otherwise write).

Min and median of --repeats; CPU sized by default (256 px, 3 PNDM steps = 4 U-Net calls).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.errors import UserError

WORKLOAD = "sd-bk-tiny-sd15"
PROMPT = "a photograph of an astronaut riding a horse"


def _stats(samples: list[float]) -> dict:
    return {"min": min(samples), "median": float(np.median(samples)), "n": len(samples), "samples": samples}


def write_parts(cache: Path, log) -> tuple[Path, Path]:
    """(small U-Net dir, large pipeline dir) with random weights, written once."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tstitch_trt.models.sd import randomize_
    from tstitch_trt.models.sd_random import SD15_SCHEDULER, random_unet, write_clip_tokenizer

    small, large = cache / "bk-sdm-tiny-random", cache / "sd15-random"
    if (small / "config.json").is_file() and (large / "model_index.json").is_file():
        return small, large
    log("writing random BK-SDM-Tiny and SD 1.5 parts (once) ...")
    random_unet("bk-sdm-tiny", 1).save_pretrained(str(small))
    with torch.no_grad():
        text = randomize_(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                       num_hidden_layers=12, vocab_size=49408, bos_token_id=49406,
                                                       eos_token_id=49407, pad_token_id=49407)), 3)
        vae = randomize_(AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512), 4)
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(cache / "clip-tokenizer")))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok,
                                   unet=random_unet("sd15", 2), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(large))
    return small, large


def run_sd_bench(args: argparse.Namespace) -> int:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle
    from tstitch_trt.export.torch_backend import TorchBackend
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.diffusers_peer import stitch_by_callback
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.runtime.io_roles import StepIO
    from tstitch_trt.runtime.loop import run_stitched

    def log(msg: str) -> None:
        print(msg, flush=True)

    if not 0.0 <= args.ratio <= 1.0:
        raise UserError(f"--ratio must be in [0, 1], got {args.ratio}")
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise UserError("--device cuda: PyTorch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (50 if device == "cuda" else 3)
    size = 512 if device == "cuda" else 256
    cache = Path(args.cache) / WORKLOAD
    small_dir, large_dir = write_parts(cache, log)
    bundle = cache / "bundle-torch"
    if not (bundle / "manifest.json").is_file():
        log("building the torch bundle (once) ...")
        build_sd_bundle(SdBuildConfig(models=[str(small_dir), str(large_dir)], out=bundle, backends=["torch"]))
    manifest = read_manifest(bundle)
    log(f"loading the diffusers pipeline and the U-Nets on {device} ...")
    pipe = StableDiffusionPipeline.from_pretrained(str(large_dir), safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    small_unet = UNet2DConditionModel.from_pretrained(str(small_dir)).eval().to(device)
    large_unet = pipe.unet
    io = StepIO.from_io(manifest.io)
    mods = [UNetStepModule(small_unet).eval(), UNetStepModule(large_unet).eval()]
    backend = TorchBackend.from_modules(mods, device=device, io=io, cuda_graph=device == "cuda")
    ours = StitchedSDPipeline(bundle, manifest, backend, f"torch ({device}), U-Nets shared with diffusers")
    latent = (1, 4, size // 8, size // 8)
    z = np.random.default_rng(args.seed).standard_normal(latent, dtype=np.float32)
    context, _ = ours.encode_prompts([PROMPT], [""])

    def timed(fn, warmup: int = args.warmup) -> tuple[list[float], Any]:
        out = None
        for _ in range(warmup):
            out = fn()
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return samples, out

    result: dict[str, Any] = {"workload": WORKLOAD, "device": device, "size": size, "steps": steps, "batch": 1,
                              "ratio": args.ratio, "sampler": "pndm", "repeats": args.repeats, "models":
                              [m.name for m in manifest.models]}
    # per-call U-Net step times: one call of each model
    per_call = {}
    for m, name in enumerate(result["models"]):
        plan, sigma = ours.plan("pndm", steps, latent, np.random.default_rng(0), None, [1.0 * (m == 0),
                                                                                         1.0 * (m == 1)], 0.0)
        one = type(plan)(plan.sampler, plan.timesteps[:1], plan.coef[:1], plan.step_model[:1], None)
        samples, _ = timed(lambda one=one, sigma=sigma: run_stitched(backend, one, z * np.float32(sigma), context, 7.5,
                                                         progress=False))
        per_call[name] = _stats([s * 1e3 for s in samples])
        log(f"  {name}: {per_call[name]['min']:.1f} ms per U-Net call (min of {args.repeats})")
    result["unet_call_ms"] = per_call
    # the stitched trajectory against the ideal line
    traj: dict[str, dict] = {}
    n_calls = None
    for r in sorted({0.0, args.ratio, 1.0}):
        plan, sigma = ours.plan("pndm", steps, latent, np.random.default_rng(0), r, None, 0.0)
        n_calls = plan.steps
        # both U-Nets are warm from the per-call figures: no warm-up trajectory (on a CPU one costs minutes)
        samples, _ = timed(lambda plan=plan, sigma=sigma: run_stitched(backend, plan, z * np.float32(sigma), context,
                                                                       7.5, progress=False), warmup=0)
        traj[str(r)] = {**_stats(samples), "small_calls": int((plan.step_model == 0).sum())}
        log(f"  ratio {r}: {traj[str(r)]['min']:.2f} s per trajectory ({traj[str(r)]['small_calls']} small calls)")
    t_large, t_small = traj["0.0"]["min"], traj["1.0"]["min"]
    share = traj[str(args.ratio)]["small_calls"] / n_calls
    ideal = (1 - share) * t_large + share * t_small
    result["trajectory_seconds"] = traj
    result["ideal_seconds"] = ideal
    result["over_ideal"] = traj[str(args.ratio)]["min"] / ideal - 1
    # end to end: ours (tokenize, encode, stitched loop, decode) vs diffusers with the callback switch
    def diffusers_run() -> Any:
        switch = stitch_by_callback(pipe, small_unet, large_unet, n_calls, args.ratio)
        with torch.no_grad():
            out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                       latents=torch.from_numpy(z).to(device), output_type="np", callback_on_step_end=switch)
        pipe.unet = large_unet
        return out.images

    def ours_run() -> Any:
        return ours(PROMPT, ratio=args.ratio, steps=steps, sampler="pndm", height=size, width=size, init_noise=z,
                    progress=False)

    # interleaved (diffusers, ours, diffusers, ours, ...) so that a shared machine's load drifts on both alike
    for _ in range(args.warmup):
        ref_img, ours_res = diffusers_run(), ours_run()
    ref_s, ours_s, parts = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref_img = diffusers_run()
        ref_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours_res = ours_run()
        ours_s.append(time.perf_counter() - t0)
        rep = ours_res.report
        parts.append({k: rep[k] for k in ("text_encoder_seconds", "loop_seconds", "decode_seconds")})
    result["tstitch_trt_parts_seconds"] = parts
    log("  ours, last run: " + ", ".join(f"{k.replace('_seconds', '')} {v:.2f} s" for k, v in parts[-1].items()))
    want = (ref_img[0] * 255).round().astype(np.int32)
    result["end_to_end_seconds"] = {"tstitch_trt": _stats(ours_s), "diffusers": _stats(ref_s)}
    result["speedup_vs_diffusers"] = {"min": min(ref_s) / min(ours_s),
                                      "median": float(np.median(ref_s) / np.median(ours_s))}
    result["max_pixel_diff_vs_diffusers"] = int(np.abs(ours_res.images[0].astype(np.int32) - want).max())
    log(f"  end to end: {min(ours_s):.2f} s vs diffusers {min(ref_s):.2f} s "
        f"({result['speedup_vs_diffusers']['min']:.2f}x, min of {args.repeats}); "
        f"max pixel difference {result['max_pixel_diff_vs_diffusers']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-sd.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {out / 'bench-sd.json'}")
    ours.close()
    return 0
