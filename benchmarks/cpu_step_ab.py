"""Per-step A/B of the CPU backends, alternating step by step: ort, openvino fp32, openvino bf16.

    python benchmarks/cpu_step_ab.py --bundle ~/.cache/tstitch-trt/bench/dit-s-xl --model 1 --batch 1 --rounds 4

`tstitch-trt bench` times per-step figures one backend after the other; on a shared machine a load
burst then lands on one backend only. Here every round runs one step of each backend in turn (the
same model, batch and inputs, through the backends' own launch path), so drifting load hits all
alike. Prints min / median seconds and the speedup against ort (min over min, median over median).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.runtime.loop import run_stitched
from tstitch_trt.runtime.openvino_backend import OpenVinoBackend
from tstitch_trt.runtime.ort_backend import OrtBackend
from tstitch_trt.sampling.trajectory import plan_trajectory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="demo")
    p.add_argument("--model", type=int, default=-1, help="index in stitch order (default: the largest)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    bundle = resolve_bundle(args.bundle)
    m = read_manifest(bundle)
    n = len(m.models)
    model = args.model % n
    shape = (args.batch, *m.latent_shape)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    labels = np.arange(args.batch) % m.num_classes
    plan = plan_trajectory("ddim", 1, n, shape, np.random.default_rng(0),
                           fractions=[1.0 if i == model else 0.0 for i in range(n)])
    runners = {"ort": OrtBackend(bundle, m, threads=args.threads),
               "openvino": OpenVinoBackend(bundle, m, precision="fp32", threads=args.threads),
               "openvino-bf16": OpenVinoBackend(bundle, m, precision="bf16", threads=args.threads)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for k, b in runners.items():
            res = run_stitched(b, plan, x, labels, 1.5, progress=False)
            if r:
                times[k].append(res.step_ms[0] / 1e3)
    out = {}
    for k, v in times.items():
        out[k] = {"min_s": min(v), "median_s": float(np.median(v)), "samples": v,
                  "x_ort_min": min(times["ort"]) / min(v),
                  "x_ort_median": float(np.median(times["ort"]) / np.median(v))}
    print(json.dumps({"model": m.models[model].name, "batch": args.batch, "rounds": args.rounds, **out}, indent=1))


if __name__ == "__main__":
    main()
