"""FORA x T-Stitch on the demo pair: quality (FID, class accuracy) and time per image, ratio x cache interval.

    TSTITCH_ORT_SPIN=0 nice -n 19 python benchmarks/fora_quality.py --images 500 --out bench-out/fora

1. Builds the demo pair again from its shipped weights with FORA's cached step graphs (`build --cache-scheme
   fora`, the shipped bundle's settings) and checks that at interval 1 it samples exactly what the shipped bundle
   samples (so every difference below comes from the caching).
2. Quality: the demo's evaluator (tstitch_trt.eval.quality: the pair's classifier, Frechet distance on its
   features against the 500 held-out digits), the same labels and initial noise at every point.
3. Speed: time per image of batches of --batch, every configuration once per round, rounds interleaved (a load
   burst on a shared machine then hits every configuration alike); wall min and median over the rounds, and the
   process's CPU time (median), the steadier figure where other jobs share the cores.

Writes fora.json and fora.md (the table) into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.demo import demo_bundle_dir
from tstitch_trt.demo.rebuild import rebuild_demo
from tstitch_trt.eval.quality import quality_sweep
from tstitch_trt.pipeline.dit import StitchedPipeline


def check_interval_one(bundle: Path) -> None:
    labels = list(range(10))
    got = []
    for b in (demo_bundle_dir(), bundle):
        pipe = StitchedPipeline.from_bundle(b, backend="ort")
        try:
            got.append(pipe(class_labels=labels, ratio=0.4, steps=50, seed=0, decode=False).latents)
        finally:
            pipe.close()
    if not np.array_equal(*got):
        raise SystemExit("the FORA demo bundle at interval 1 does not sample what the shipped bundle samples")


def time_points(bundle: Path, configs: list[tuple[float, int]], batch: int, rounds: int, steps: int
                ) -> dict[tuple[float, int], list[tuple[float, float]]]:
    """(wall, CPU) seconds per image of each configuration, per round. CPU: the process's user + system time (ORT's
    threads included), which a machine shared with other jobs inflates far less than wall time."""
    pipe = StitchedPipeline.from_bundle(bundle, backend="ort")
    labels = np.arange(batch) % pipe.manifest.num_classes
    out: dict[tuple[float, int], list[tuple[float, float]]] = {c: [] for c in configs}
    try:
        for c in configs:  # warm-up: the cached graphs' sessions open at their first use
            pipe(class_labels=labels[:2], ratio=c[0], steps=steps, seed=0, cache_interval=c[1], decode=False)
        for r in range(rounds):
            for ratio, interval in configs:
                t0, c0 = time.perf_counter(), time.process_time()
                pipe(class_labels=labels, ratio=ratio, steps=steps, seed=r, cache_interval=interval)
                out[(ratio, interval)].append(((time.perf_counter() - t0) / batch, (time.process_time() - c0) / batch))
    finally:
        pipe.close()
    return out


def step_cpu_ms(bundle: Path, batch: int, calls: int) -> dict[str, float]:
    """CPU ms (process time, median of `calls`) of one call of each model's full and cached step graph at `batch`,
    through the backend's own launch path (ORT, bound buffers)."""
    import dataclasses

    from tstitch_trt.runtime.ort_backend import OrtBackend
    from tstitch_trt.sampling.trajectory import plan_trajectory

    m = read_manifest(bundle)
    backend = OrtBackend(bundle, m)
    shape = (batch, *m.latent_shape)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    labels = np.arange(batch) % m.num_classes
    out = {}
    try:
        for i, model in enumerate(m.models):
            for cached in (False, True):
                plan = plan_trajectory("ddim", calls, 2, shape, np.random.default_rng(0), ratio=0.0)
                plan = dataclasses.replace(plan, cached=np.array([cached and k > 0 for k in range(calls)]))
                backend.prepare(plan, x, labels, 1.5)
                backend.launch(0, i)  # a full call first: the kept features exist
                times = []
                for k in range(1, calls):
                    c0 = time.process_time()
                    backend.launch(k, i)
                    times.append(time.process_time() - c0)
                out[f"{model.name} {'cached' if cached else 'full'}"] = 1e3 * statistics.median(times)
    finally:
        backend.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500, help="images per point for FID / accuracy")
    p.add_argument("--ratios", default="0,0.4")
    p.add_argument("--intervals", default="1,2,3")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (0: quality only)")
    p.add_argument("--work", default="bench-out/fora-demo-bundle", help="where the FORA demo bundle is built")
    p.add_argument("--out", default="bench-out/fora")
    p.add_argument("--step-calls", type=int, default=11, help="calls per graph of the per-step CPU figure")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(v) for v in args.ratios.split(",")]
    intervals = [int(v) for v in args.intervals.split(",")]
    t_start = time.perf_counter()
    bundle = rebuild_demo(Path(args.work))
    check_interval_one(bundle)
    steps_cpu = step_cpu_ms(bundle, args.batch, args.step_calls)
    print("CPU ms per call at batch", args.batch, json.dumps({k: round(v, 1) for k, v in steps_cpu.items()}))
    points, reference = [], None
    if args.images:  # the same sweep as `tstitch-trt bench --quality --cache-interval 1,2,3`
        res = quality_sweep(bundle, ratios, args.images, backend="ort", steps=args.steps, batch=args.batch,
                            cache_intervals=intervals, progress=True)
        points, reference = res["points"], res["reference"]
    configs = [(r, n) for r in ratios for n in intervals]
    timings = time_points(bundle, configs, args.batch, args.rounds, args.steps) if args.rounds else {}
    for pt in points:
        ts = timings.get((pt["ratio"], pt["cache_interval"]))
        if ts:
            pt["ms_per_image_min"] = 1e3 * min(w for w, _ in ts)
            pt["ms_per_image_median"] = 1e3 * statistics.median(w for w, _ in ts)
            pt["cpu_ms_per_image_median"] = 1e3 * statistics.median(c for _, c in ts)
    base = next((pt for pt in points if pt["ratio"] == 0 and pt["cache_interval"] == 1), {})
    lines = ["| ratio | FORA interval | steps S / L | full calls S / L | FID | class accuracy | ms / image (min) "
             "| ms / image (median) | CPU ms / image (median) | CPU time vs ratio 0, interval 1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pt in points:
        full = pt["full_calls_per_model"]
        ms_min, ms_med = pt.get("ms_per_image_min"), pt.get("ms_per_image_median")
        cpu = pt.get("cpu_ms_per_image_median")
        rel = f"{cpu / base['cpu_ms_per_image_median']:.2f}x" if cpu and base.get("cpu_ms_per_image_median") else "-"
        lines.append(f"| {pt['ratio']:.1f} | {pt['cache_interval']} | {' / '.join(map(str, pt['steps_per_model']))} "
                     f"| {' / '.join(map(str, full))} | {pt['fid']:.2f} | {pt['accuracy']:.1%} | "
                     f"{'-' if ms_min is None else f'{ms_min:.1f}'} | {'-' if ms_med is None else f'{ms_med:.1f}'} "
                     f"| {'-' if cpu is None else f'{cpu:.1f}'} | {rel} |")
    table = "\n".join(lines)
    print(table)
    result = {"images_per_point": args.images, "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
              "step_cpu_ms": steps_cpu, "reference": reference, "points": points,
              "wall_seconds": time.perf_counter() - t_start}
    (out / "fora.json").write_text(json.dumps(result, indent=2))
    (out / "fora.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
