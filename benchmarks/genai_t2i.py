"""One image with OpenVINO GenAI's Text2ImagePipeline; runs in the benchmark's own environment, not the package's.

    /path/to/genai-venv/bin/python benchmarks/genai_t2i.py OPTIMUM_DIR --size 512 --steps 4 --precision f32 \
        --cache-dir DIR --out result.json

OPTIMUM_DIR: `optimum-cli export openvino --model DIR --task text-to-image --weight-format fp32 OUT` of the
same diffusers directory the bundle was built from. GenAI's fastest setting is used: the pipeline is
reshaped to the static batch / size / guidance before compiling (as its own samples do), with the
compiled-model cache in --cache-dir (so a repeat run compiles from cache, like ours). --precision is the
CPU plugin's INFERENCE_PRECISION_HINT (f32, bf16). Writes load / generate / per-U-Net-call / VAE decode
seconds from GenAI's own performance metrics. --generates 2: a second generate() on the same pipeline
(after the first one's first-inference effects) is timed too ("warm", GenAI's side of
benchmarks/sd_ours_warm.py); "process_seconds_to_here" is taken after the first one, so the process figure stays one
image's. Imports nothing from tstitch_trt.
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def _total_ms(value) -> float:
    """A GenAI duration in ms: a number, or one per model (text encoders) summed."""
    return float(sum(value.values())) if isinstance(value, dict) else float(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generates", type=int, default=1, help="2: also time a second, warm generate()")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import numpy as np
    import openvino_genai as genai

    t0 = time.perf_counter()
    pipe = genai.Text2ImagePipeline(args.models)
    pipe.reshape(1, args.size, args.size, args.guidance)
    props = {"INFERENCE_PRECISION_HINT": args.precision, "PERFORMANCE_HINT": "LATENCY"}
    if args.cache_dir:
        props["CACHE_DIR"] = args.cache_dir
    pipe.compile("CPU", **props)
    load_s = time.perf_counter() - t0

    def generate() -> tuple[dict, object]:
        t0 = time.perf_counter()
        image = pipe.generate(args.prompt, width=args.size, height=args.size, num_inference_steps=args.steps,
                              guidance_scale=args.guidance, rng_seed=args.seed)
        generate_s = time.perf_counter() - t0
        m = pipe.get_performance_metrics()  # of the last generate()
        unet_ms = [float(d) / 1e3 for d in m.raw_metrics.unet_inference_durations]  # microseconds -> ms
        return {"generate_seconds": generate_s, "unet_call_ms": unet_ms,
                "vae_decode_ms": _total_ms(m.get_vae_decoder_infer_duration()),
                "text_encoder_ms": _total_ms(m.get_text_encoder_infer_duration())}, image

    first, image = generate()
    to_here = time.perf_counter() - T0
    pixels = np.asarray(image.data)
    out = {"load_seconds": load_s, **first, "image_shape": list(pixels.shape), "image_std": float(pixels.std()),
           "process_seconds_to_here": to_here, "warm": [generate()[0] for _ in range(args.generates - 1)]}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
