"""Where OpenVINO's CPU time goes in one graph: latency, the runtime model's layer types, per-type time.

    python benchmarks/ov_profile.py GRAPH --shape x=1,4,64,64 --shape context=2,77,768 ... \
        [--precision fp32|bf16] [--mark-bf16] [--repeats 5] [--threads 2] [--top 12] [--json OUT]

GRAPH: an ONNX file (a bundle's step graph) or an OpenVINO IR .xml (optimum-intel's export). Every
input gets the static shape given with --shape (name=d0,d1,...; "name=" for a scalar); inputs are
random normal, except integer ones (zeros) and inputs named t / timestep (500). Prints the min and
median latency of --repeats infers, the number of runtime-model nodes of each layer type (do the
attentions run as ScaledDotProductAttention or as fused MHA Subgraphs, or as separate MatMul /
Softmax?) and the time per layer type from OpenVINO's per-layer counters (PERF_COUNT). The same
script on our step graph and on optimum's U-Net shows the differences side by side. --mark-bf16 (with
--precision bf16) compiles the graph as the engine does (runtime/openvino_precision.marked_for_bf16: softmax,
normalization statistics, the embeddings and the graph tail kept fp32), to compare with the plain hint.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from pathlib import Path

import numpy as np


def parse_shape(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.partition("=")
    return name, [int(d) for d in dims.split(",") if d]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("graph")
    p.add_argument("--shape", action="append", default=[], help="name=d0,d1,... (repeat per input)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--mark-bf16", action="store_true", help="keep sensitive ops fp32 as the engine's bf16 does")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS (0: OpenVINO's choice)")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    t0 = time.perf_counter()
    model = core.read_model(args.graph)
    shapes = dict(parse_shape(s) for s in args.shape)
    model.reshape({i.get_any_name(): shapes[i.get_any_name()] for i in model.inputs})
    if args.mark_bf16:
        from tstitch_trt.runtime.openvino_precision import marked_for_bf16

        model = marked_for_bf16(core, model)
    read_s = time.perf_counter() - t0
    hint = {"fp32": "f32", "bf16": "bf16"}[args.precision]
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": True}
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = args.threads
    t0 = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - t0
    del model
    rng = np.random.default_rng(0)
    inputs = {}
    for inp in compiled.inputs:
        name, shape = inp.get_any_name(), list(inp.get_shape())
        dtype = inp.get_element_type().to_dtype()
        if np.issubdtype(dtype, np.integer):
            inputs[name] = np.zeros(shape, dtype=dtype)
        elif name in ("t", "timestep"):
            inputs[name] = np.full(shape, 500.0, dtype=dtype)
        else:
            inputs[name] = rng.standard_normal(shape).astype(dtype)
    req = compiled.create_infer_request()
    req.infer(inputs)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        req.infer(inputs)
        times.append(time.perf_counter() - t0)
    per_type: dict[str, float] = collections.defaultdict(float)
    for c in req.profiling_info:
        if c.status == c.status.EXECUTED:
            per_type[c.exec_type.split("_")[0] + ":" + c.node_type] += c.real_time.total_seconds()
    counts = collections.Counter(op.get_rt_info()["layerType"].astype(str)
                                 for op in compiled.get_runtime_model().get_ordered_ops())
    total = sum(per_type.values())
    precisions = collections.Counter(f"{op.get_rt_info()['layerType'].astype(str)}:"
                                     f"{op.get_rt_info()['runtimePrecision'].astype(str)}"
                                     for op in compiled.get_runtime_model().get_ordered_ops())
    out = {"graph": os.path.basename(args.graph), "precision": args.precision, "marked": args.mark_bf16,
           "shapes": shapes, "runtime_precisions": dict(precisions.most_common()),
           "read_s": read_s, "compile_s": compile_s, "min_s": min(times), "median_s": float(np.median(times)),
           "layer_types": dict(counts.most_common()), "ms_by_type": {k: v * 1e3 for k, v in
                                                                   sorted(per_type.items(), key=lambda kv: -kv[1])},
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(f"{out['graph']} {args.precision}: read {read_s:.1f} s, compile {compile_s:.1f} s, "
          f"infer min {min(times):.3f} s median {out['median_s']:.3f} s, peak RSS {out['peak_rss_gb']:.2f} GB")
    print("runtime layer types: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print("layer type:runtime precision: " + ", ".join(f"{k} {v}" for k, v in precisions.most_common()))
    print(f"time by (kernel:layer type), counters' total {total:.3f} s:")
    for k, v in list(out["ms_by_type"].items())[:args.top]:
        print(f"  {v / 1e3:8.3f} s  {100 * v / 1e3 / total:5.1f}%  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
