"""One image with diffusers' pipeline (SD 1.5 or SDXL) on the CPU (torch fp32, or bf16 autocast): the torch peer.

    python benchmarks/diffusers_t2i.py PIPELINE_DIR --size 512 --steps 4 --precision fp32|bf16 [--guidance 7.5] \
        --out r.json

The pipeline class is the directory's (model_index.json: StableDiffusionPipeline, StableDiffusionXLPipeline), with
its own scheduler (SD 1.5 parts: PNDM; SDXL: Euler).
Writes load seconds, the image seconds (prompt -> decoded pixels), every U-Net call's ms (a forward
pre/post hook pair) and the VAE decode ms (vae.decode wrapped). bf16: torch.autocast("cpu", bfloat16)
around the whole call (weights stay fp32, as a user would run it).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (SD 1.5: 7.5, SDXL: 5.0)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import contextlib

    import torch
    from diffusers import DiffusionPipeline

    with open(f"{args.pipeline}/model_index.json") as f:
        sdxl = json.load(f)["_class_name"].startswith("StableDiffusionXL")
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, **extra)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    calls: list[float] = []
    start: list[float] = []
    pipe.unet.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    pipe.unet.register_forward_hook(lambda *_: calls.append(1e3 * (time.perf_counter() - start[-1])))
    decode_ms: list[float] = []
    real_decode = pipe.vae.decode

    def timed_decode(*a, **kw):
        t = time.perf_counter()
        out = real_decode(*a, **kw)
        decode_ms.append(1e3 * (time.perf_counter() - t))
        return out

    pipe.vae.decode = timed_decode
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
             guidance_scale=args.guidance, generator=g, output_type="np")
    image_s = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump({"load_seconds": load_s, "image_seconds": image_s, "unet_call_ms": calls,
                   "vae_decode_ms": sum(decode_ms), "pipeline": type(pipe).__name__,
                   "scheduler": type(pipe.scheduler).__name__, "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
