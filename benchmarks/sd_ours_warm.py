"""Ours warm, in process: StitchedSDPipeline.from_bundle(backend="openvino"), one untimed call, then timed calls.

    python benchmarks/sd_ours_warm.py BUNDLE --precision fp32|bf16 --size 512 --steps 4 --ratios 0,0.4 \
        [--warm-steps 2] [--repeats 1] [--cache-interval N --cache-branch K] --out result.json

What GenAI's "image" is (generate() on a pipeline already loaded and compiled) measured for ours: `tstitch-trt
run` is one process per image, so its image time includes importing the compiled blobs and opening the text
encoder and VAE on their first call; here those happen in the untimed call (at the largest ratio, so both
U-Nets, the text encoder and the VAE are loaded; --warm-steps keeps it short: the compiled shapes do not
depend on the step count). Then --repeats rounds of one call per ratio, each with the report's per-call,
text encoder, VAE and whole-image figures. Also written: the precision every compiled part really runs in,
read back from OpenVINO's runtime models (the runtimePrecision of their Convolution / FullyConnected / MatMul /
fused-attention Subgraph nodes), so a bf16 request that fell back to fp32 shows. --cache-interval /
--cache-branch: DeepCache (a bundle built with --cache-branch K), on the untimed and the timed calls alike; the
per-call figures are then split into full and cached calls (unet_calls()).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import resource
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
PROMPT = "a photograph of an astronaut riding a horse"
HEAVY = ("Convolution", "FullyConnected", "MatMul", "Subgraph", "GroupConvolution", "Deconvolution")


def heavy_precisions(compiled: Any) -> dict[str, int]:
    """{"layerType:runtimePrecision": count} over the compute-heavy nodes of a compiled model's runtime graph."""
    from tstitch_trt.runtime.openvino_precision import runtime_precisions

    return dict(collections.Counter(f"{t}:{p}" for t, p, _ in runtime_precisions(compiled) if t in HEAVY))


def compiled_parts(pipe: Any) -> dict[str, Any]:
    """{part: ov.CompiledModel} of the U-Nets (the backend's) and the text encoder / VAE (OpenVinoGraph's)."""
    from tstitch_trt.runtime.openvino_graph import OpenVinoGraph

    parts = dict(zip(pipe.model_names, pipe.backend.compiled, strict=True))
    for name, cached in zip(pipe.model_names, getattr(pipe.backend, "cached_compiled", []), strict=False):
        parts[f"{name} (DeepCache cached graph)"] = cached
    for obj in gc.get_objects():  # the text encoder / VAE graphs live inside closures: found by type
        if isinstance(obj, OpenVinoGraph) and obj.compiled is not None:
            parts[obj.path.parent.name + "/" + obj.path.name] = obj.compiled
    return parts


def unet_calls(report: dict[str, Any]) -> dict[str, list[float]]:
    """A run report's per-U-Net-call ms by model ("small": the first model's calls, "large": the rest); with
    DeepCache (report["cache"]) also split into "small_full", "small_cached", "large_full", "large_cached"."""
    small, ms = report["steps_per_model"][0], report["step_ms"]
    out = {"small": ms[:small], "large": ms[small:]}
    cache = report.get("cache")
    if cache:
        cached = set(cache["cached_calls"])
        for model, calls in (("small", range(small)), ("large", range(small, len(ms)))):
            out[f"{model}_full"] = [ms[i] for i in calls if i not in cached]
            out[f"{model}_cached"] = [ms[i] for i in calls if i in cached]
    return out


def sample(report: dict[str, Any]) -> dict[str, Any]:
    cache = report.get("cache")
    return {"image_seconds": report["total_seconds"], "loop_seconds": report["loop_seconds"],
            "vae_decode_ms": 1e3 * report["decode_seconds"], "text_encoder_ms": 1e3 * report["text_encoder_seconds"],
            "unet_call_ms": unet_calls(report), "precision": report["precisions"],
            "full_calls": None if not cache else cache["full_calls"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warm-steps", type=int, default=2, help="steps of the untimed call (same shapes, fewer calls)")
    p.add_argument("--ratios", default="0,0.4")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (SD 1.5: 7.5, SDXL: 5.0)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of one timed call per ratio")
    p.add_argument("--cache-interval", type=int, default=1, help="DeepCache's cache_interval (1 = off)")
    p.add_argument("--cache-branch", type=int, default=None, help="DeepCache's cache_branch_id (the bundle's)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    pipe = StitchedSDPipeline.from_bundle(args.bundle, backend="openvino", precision=args.precision)
    open_s = time.perf_counter() - t0
    # the bundle's own sampler (SD 1.5: PNDM), as `run` and GenAI use
    call = dict(prompt=PROMPT, steps=args.steps, cfg_scale=args.guidance, seed=0, height=args.size, width=args.size,
                progress=False, cache_interval=args.cache_interval, cache_branch=args.cache_branch)
    t0 = time.perf_counter()
    warm = pipe(**{**call, "steps": args.warm_steps, "ratio": max(ratios)})
    warm_s = time.perf_counter() - t0
    calls = unet_calls(warm.report)
    if args.cache_interval > 1 and not all(calls[f"{m}_cached"] for m in ("small", "large") if calls[m]):
        # a cached graph first used in a timed call would put its blob import inside that image's time
        raise SystemExit(f"the untimed call ({args.warm_steps} steps) leaves a model's cached graph unused "
                         f"(full calls {warm.report['cache']['full_calls']}); raise --warm-steps")
    runs: dict[str, list[dict[str, Any]]] = {f"r{r:g}": [] for r in ratios}
    for _ in range(args.repeats):
        for r in ratios:
            runs[f"r{r:g}"].append(sample(pipe(**call, ratio=r).report))
    out = {"open_seconds": open_s, "warm_call_seconds": warm_s, "warm_call": sample(warm.report), "runs": runs,
           "precisions": warm.report["precisions"], "notes": warm.report["notes"],
           "runtime_precisions": {k: heavy_precisions(c) for k, c in compiled_parts(pipe).items()},
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "process_seconds_to_here": time.perf_counter() - T0}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
