"""SD timings for benchmarks/gpu_check.sh: the torch-CUDA backend on U-Net step modules, with and without
the whole-trajectory CUDA graph, against diffusers' StableDiffusionPipeline on the same GPU.

Random BK-SDM-Tiny -> SD 1.5 U-Nets (the real architectures, every parameter random, fp16), 512 px
(latent 4x64x64), batch 1, PNDM 50 steps (51 U-Net calls), cfg 7.5, ratio 0.4 (20 small calls):

    eager      TorchBackend, one launch sequence per U-Net call (UNetStepModule: CFG + PLMS update)
    graph      TorchBackend, the whole stitched trajectory as ONE CUDA graph
    diffusers  StableDiffusionPipeline's denoising loop (prompt_embeds given, output_type="latent"),
               started on the small U-Net and switched by callback_on_step_end after 20 calls

`--pair sdxl`: random SSD-1B -> SDXL base U-Nets (the real configs, models/sd_random.py: 1331.3M and
2567.5M parameters), 1024 px (latent 4x128x128), batch 1, Euler (SDXL's scheduler config) for a few
steps (default 8), cfg 5.0, random context (2, 77, 2048), pooled text_embeds (2, 1280) and the default
time ids; diffusers' side is StableDiffusionXLPipeline with prompt_embeds / pooled_prompt_embeds given.

The text encoder and VAE are left out on both sides (the same work for both); the latents of the
three are compared. `--cpu-dry-run` runs diffusers' tiny test U-Nets on the CPU (no graphs there).
Needs diffusers; where it is missing the result says so and nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--pair", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: BK-SDM-Tiny -> SD 1.5 at 512 px, PNDM; sdxl: SSD-1B -> SDXL base at 1024 px, Euler")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (sd15), 8 (sdxl)")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def stats(seconds: list[float]) -> dict:
    return {"min_s": round(min(seconds), 5), "median_s": round(statistics.median(seconds), 5),
            "runs_s": [round(s, 5) for s in seconds]}


def pair_setup(pair: str, dry: bool, device: str, seed: int = 0) -> dict:
    """The U-Nets, sizes, sampler and conditioning of a pair: real architectures with random weights on the GPU,
    diffusers' tiny test U-Nets for the CPU dry run. Conditioning is random (text encoders are left out)."""
    from tstitch_trt.models import sd_random

    rng = np.random.default_rng(seed)
    if pair == "sdxl":
        if dry:
            small, large = sd_random.tiny_sdxl_unet(1, small=True), sd_random.tiny_sdxl_unet(2, small=False)
            size, vae_factor = 32, 1
        else:
            small, large = sd_random.random_unet("ssd-1b", 1, device), sd_random.random_unet("sdxl", 2, device)
            size, vae_factor = 1024, 8
        cfg = large.config
        pooled = int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        return {"small": small, "large": large, "size": size, "vae_factor": vae_factor, "sampler": "euler",
                "scheduler": sd_random.SDXL_SCHEDULER, "cfg": 5.0, "default_steps": 8,
                "cond": {"context": rng.standard_normal((2, 77, int(cfg.cross_attention_dim)), dtype=np.float32),
                         "text_embeds": rng.standard_normal((2, pooled), dtype=np.float32),
                         # diffusers' defaults: original size = target size = (height, width), crop (0, 0)
                         "time_ids": np.array([[size, size, 0, 0, size, size]] * 2, dtype=np.float32)}}
    if dry:
        small, large, size, vae_factor = sd_random.tiny_unet(1, small=True), sd_random.tiny_unet(2, small=False), 32, 1
    else:
        small, large = sd_random.random_unet("bk-sdm-tiny", 1, device), sd_random.random_unet("sd15", 2, device)
        size, vae_factor = 512, 8
    width = int(large.config.cross_attention_dim)
    return {"small": small, "large": large, "size": size, "vae_factor": vae_factor, "sampler": "pndm",
            "scheduler": sd_random.SD15_SCHEDULER, "cfg": 7.5, "default_steps": 50,
            "cond": {"context": rng.standard_normal((2, 77, width), dtype=np.float32)}}


def diffusers_pipeline(pair: str, setup: dict):
    """diffusers' own pipeline of the pair's kind, U-Net and scheduler only (the denoising loop)."""
    import diffusers

    sched_cls = getattr(diffusers, setup["scheduler"]["_class_name"])
    scheduler = sched_cls.from_config(setup["scheduler"])
    if pair == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=setup["large"], scheduler=scheduler)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=setup["large"],
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.vae_scale_factor = setup["vae_factor"]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_cond_kwargs(pair: str, cond: dict, to_torch) -> dict:
    """The conditioning as diffusers' pipeline takes it (uncond row 0, cond row 1)."""
    ctx = to_torch(cond["context"])
    kw = {"prompt_embeds": ctx[1:], "negative_prompt_embeds": ctx[:1]}
    if pair == "sdxl":
        pooled = to_torch(cond["text_embeds"])
        kw.update(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1])
    return kw


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    result: dict = {"what": __doc__.splitlines()[0]}
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        result["skipped"] = f"needs diffusers and torch ({e})"
        out.write_text(json.dumps(result, indent=2))
        print(result["skipped"])
        return 0
    from tstitch_trt.export.torch_backend import TorchBackend
    from tstitch_trt.export.unet_export import unet_io_spec
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.diffusers_peer import stitch_by_callback
    from tstitch_trt.runtime.io_roles import StepIO
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.sampling.sd_samplers import sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call
    from tstitch_trt.sampling.trajectory import TrajectoryPlan

    dry = args.cpu_dry_run or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.float16)
    t_setup = time.perf_counter()
    setup = pair_setup(args.pair, dry, device)
    steps = args.steps or setup["default_steps"]
    steps = min(steps, 6) if dry else steps
    size, vae_factor, sampler, cfg_scale = setup["size"], setup["vae_factor"], setup["sampler"], setup["cfg"]
    small, large = setup["small"].to(device, dtype).eval(), setup["large"].to(device, dtype).eval()
    setup["large"] = large
    latent = (1, 4, size // vae_factor, size // vae_factor)  # dry run: the tiny U-Nets' latent is `size`
    table = sd_table(sampler, setup["scheduler"], steps)
    step_model = stitch_schedule_by_call(len(table.timesteps), 2, ratio=args.ratio)
    k = int((step_model == 0).sum())
    plan = TrajectoryPlan(sampler, table.timesteps, table.coef, step_model, None)
    z = np.random.default_rng(1).standard_normal(latent, dtype=np.float32)
    cond = setup["cond"]
    result.update({"pair": args.pair, "device": device, "dtype": str(dtype), "latent": list(latent),
                   "image_px": size * vae_factor if not dry else size, "sampler": sampler, "cfg": cfg_scale,
                   "steps": steps, "unet_calls": plan.steps, "small_calls": k, "ratio": args.ratio,
                   "repeats": args.repeats, "params_m": [round(sum(p.numel() for p in m.parameters()) / 1e6, 3)
                                                         for m in (small, large)],
                   "setup_s": round(time.perf_counter() - t_setup, 2)})
    if not dry:
        result["gpu"] = torch.cuda.get_device_name(0)
    result["complete"] = False

    def save() -> None:  # after every block: a run killed by gpu_check.sh's budget still leaves its numbers
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    save()
    mods = [UNetStepModule(small).eval(), UNetStepModule(large).eval()]
    io = StepIO.from_io(unet_io_spec(mods[0], 77))
    init = z * np.float32(table.init_noise_sigma)  # diffusers scales latents= by init_noise_sigma (Euler: > 1)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()  # warm-up (graph: capture)
        runs, res = [], None
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            res = fn()
            sync()
            runs.append(time.perf_counter() - t0)
        return stats(runs), res

    latents = {}
    for mode, graph in (("eager", False), ("graph", True)):
        if graph and dry:
            continue
        backend = TorchBackend.from_modules(mods, device=device, io=io, cuda_graph=graph)
        result[mode], res = timed(lambda b=backend: run_stitched(b, plan, init, cond, cfg_scale, progress=False))
        result[mode]["loop_mode"] = res.mode
        latents[mode] = res.x
        backend.close()
        save()
    pipe = diffusers_pipeline(args.pair, setup)
    cond_kwargs = diffusers_cond_kwargs(args.pair, cond, lambda a: torch.from_numpy(a).to(device, dtype))

    def diffusers_run():
        switch = stitch_by_callback(pipe, small, large, len(table.timesteps), args.ratio)
        with torch.no_grad():
            lat = pipe(**cond_kwargs, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg_scale,
                       output_type="latent", latents=torch.from_numpy(z).to(device, dtype),
                       callback_on_step_end=switch).images
        return lat.float().cpu().numpy()

    result["diffusers"], latents["diffusers"] = timed(diffusers_run)
    ref = latents["diffusers"]
    scale = float(np.abs(ref).max())
    result["max_rel_diff_vs_diffusers"] = {m: float(np.abs(v - ref).max() / scale) for m, v in latents.items()
                                           if m != "diffusers"}
    result["all_finite"] = {m: bool(np.isfinite(v).all()) for m, v in latents.items()}  # fp16 random weights
    for m in ("eager", "graph"):
        if m in result:
            result[f"speedup_{m}_vs_diffusers"] = round(result["diffusers"]["min_s"] / result[m]["min_s"], 3)
    result["complete"] = True
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("what",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
