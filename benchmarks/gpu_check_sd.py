"""SD timings for benchmarks/gpu_check.sh: the torch-CUDA backend on U-Net step modules, with and without
the whole-trajectory CUDA graph, against diffusers' StableDiffusionPipeline on the same GPU.

Random BK-SDM-Tiny -> SD 1.5 U-Nets (the real architectures, every parameter random, fp16), 512 px
(latent 4x64x64), batch 1, PNDM 50 steps (51 U-Net calls), cfg 7.5, ratio 0.4 (20 small calls):

    eager      TorchBackend, one launch sequence per U-Net call (UNetStepModule: CFG + PLMS update)
    graph      TorchBackend, the whole stitched trajectory as ONE CUDA graph
    diffusers  StableDiffusionPipeline's denoising loop (prompt_embeds given, output_type="latent"),
               started on the small U-Net and switched by callback_on_step_end after 20 calls

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
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def stats(seconds: list[float]) -> dict:
    return {"min_s": round(min(seconds), 5), "median_s": round(statistics.median(seconds), 5),
            "runs_s": [round(s, 5) for s in seconds]}


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
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tstitch_trt.export.torch_backend import TorchBackend
    from tstitch_trt.export.unet_export import unet_io_spec
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.sd_random import SD15_SCHEDULER, random_unet, tiny_unet
    from tstitch_trt.runtime.io_roles import StepIO
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.sampling.sd_samplers import sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call
    from tstitch_trt.sampling.trajectory import TrajectoryPlan

    dry = args.cpu_dry_run or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.float16)
    if dry:
        small, large, size, steps = tiny_unet(1, small=True), tiny_unet(2, small=False), 32, min(args.steps, 6)
        vae_factor = 1  # the tiny U-Nets' latent is the size given here
    else:
        small, large, size, steps = random_unet("bk-sdm-tiny", 1), random_unet("sd15", 2), 512, args.steps
        vae_factor = 8
    small, large = small.to(device, dtype).eval(), large.to(device, dtype).eval()
    latent = (1, 4, size // vae_factor, size // vae_factor)
    table = sd_table("pndm", SD15_SCHEDULER, steps)
    step_model = stitch_schedule_by_call(len(table.timesteps), 2, ratio=args.ratio)
    k = int((step_model == 0).sum())
    plan = TrajectoryPlan("pndm", table.timesteps, table.coef, step_model, None)
    rng = np.random.default_rng(0)
    z = rng.standard_normal(latent, dtype=np.float32)
    width = int(large.config.cross_attention_dim)
    context = rng.standard_normal((2, 77, width), dtype=np.float32)
    result.update({"device": device, "dtype": str(dtype), "latent": list(latent), "unet_calls": plan.steps,
                   "small_calls": k, "ratio": args.ratio, "repeats": args.repeats})
    if not dry:
        result["gpu"] = torch.cuda.get_device_name(0)
    mods = [UNetStepModule(small).eval(), UNetStepModule(large).eval()]
    io = StepIO.from_io(unet_io_spec(mods[0], 77))

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
        result[mode], res = timed(lambda b=backend: run_stitched(b, plan, z, context, 7.5, progress=False))
        result[mode]["loop_mode"] = res.mode
        latents[mode] = res.x
        backend.close()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=large,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.vae_scale_factor = vae_factor
    pipe.set_progress_bar_config(disable=True)
    ctx = torch.from_numpy(context).to(device, dtype)

    def diffusers_run():
        pipe.unet = small if k > 0 else large

        def switch(p, i, t, kwargs):
            if i + 1 == k:
                p.unet = large
            return {}

        with torch.no_grad():
            lat = pipe(prompt_embeds=ctx[1:], negative_prompt_embeds=ctx[:1], height=size, width=size,
                       num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                       latents=torch.from_numpy(z).to(device, dtype), callback_on_step_end=switch).images
        return lat.float().cpu().numpy()

    result["diffusers"], latents["diffusers"] = timed(diffusers_run)
    ref = latents["diffusers"]
    scale = float(np.abs(ref).max())
    result["max_rel_diff_vs_diffusers"] = {m: float(np.abs(v - ref).max() / scale) for m, v in latents.items()
                                           if m != "diffusers"}
    for m in ("eager", "graph"):
        if m in result:
            result[f"speedup_{m}_vs_diffusers"] = round(result["diffusers"]["min_s"] / result[m]["min_s"], 3)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("what",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
