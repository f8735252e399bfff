"""The figures: per-step times, end-to-end round robin, the ratio sweep next to the ideal line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import numpy as np

from tstitch_trt.bench.host import load_average
from tstitch_trt.bench.idle import IdleGate
from tstitch_trt.bench.runners import BackendRunner, ReferenceRunner, Trajectory


def stats(samples: Sequence[float]) -> dict:
    v = [float(s) for s in samples]
    return {"min": min(v), "median": float(np.median(v)), "max": max(v), "n": len(v), "samples": v}


def measure_steps(runner: BackendRunner, manifest, batches: list[int], repeats: int, warmup: int,
                  log: Callable[[str], None], gate: IdleGate | None = None) -> dict:
    """{model: {batch: {wall ms stats, engine ms stats, achieved GFLOP/s}}}."""
    out: dict = {}
    for i, m in enumerate(manifest.models):
        per_batch: dict = {}
        for b in batches:
            wall, engine = runner.step_times(i, b, repeats, max(warmup, 1), gate)
            flops = 2.0 * m.macs_per_forward * 2 * b  # CFG: 2b rows through the network
            st = stats(wall)
            per_batch[str(b)] = {"wall_ms": st, "engine_ms": None if engine is None else stats(engine),
                                 "gflops_at_min": round(flops / (st["min"] * 1e-3) / 1e9, 2)}
            log(f"{runner.name}: {m.name} batch {b}: {st['min']:.2f} ms/step min, {st['median']:.2f} median")
        out[m.name] = per_batch
    return out


def measure_e2e(result: dict, runners: dict[str, BackendRunner], reference: ReferenceRunner | None,
                z: np.ndarray, labels: np.ndarray, steps: int, args: argparse.Namespace,
                log: Callable[[str], None], gate: IdleGate | None = None,
                reference_bf16: ReferenceRunner | None = None) -> None:
    """Round-robin repeats (the baselines, then each backend) so drifting load hits all alike.

    Every backend also gets `speedup_vs`: its speed against each other runner of the same round robin
    (reference, reference-bf16, ort, ...), min over min and median over median.
    """
    baselines = [r for r in (reference, reference_bf16) if r is not None]
    order: list = baselines + list(runners.values())
    runs: dict[str, list[Trajectory]] = {r.name: [] for r in order}
    loads = []
    for rep in range(args.repeats):
        for r in order:
            if gate is not None:
                gate.wait()
            runs[r.name].append(r.trajectory(z, labels, steps, args.ratio, args.cfg_scale))
        loads.append(load_average())
        log(f"end to end, repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1].seconds:.3f} s" for k, v in runs.items()) + f"; load {loads[-1]}")
    result["load_average"]["e2e"] = loads
    ref_stats = None
    all_stats = {name: stats([t.seconds for t in trajs]) for name, trajs in runs.items()}
    for b in baselines:
        key = b.name.replace("-", "_")  # result["reference"], result["reference_bf16"]
        result[key]["e2e"] = {"seconds": all_stats[b.name], "steps_per_model": runs[b.name][0].steps_per_model}
    if reference is not None:
        ref_stats = all_stats["reference"]
    for name, trajs in runs.items():
        if name in ("reference", "reference-bf16"):
            continue
        sec = stats([t.seconds for t in trajs])
        e2e: dict = {"seconds": sec, "steps_per_model": trajs[0].steps_per_model}
        over = [t.host_overhead_ms_per_step for t in trajs]
        if all(o is not None for o in over):
            step_ms = [t.step_ms_mean for t in trajs]
            pct = [100.0 * o / s for o, s in zip(over, step_ms, strict=True)]  # type: ignore[operator]
            e2e["host_overhead_ms_per_step"] = stats(over)  # type: ignore[arg-type]
            e2e["host_overhead_pct"] = stats(pct)
        engine = [t.engine_ms_total for t in trajs]
        if all(e is not None for e in engine):
            # everything that is not engine time, planning and upload included, spread over the steps
            traj_over = [(t.seconds * 1e3 - e) / steps for t, e in zip(trajs, engine, strict=True)]  # type: ignore[operator]
            e2e["trajectory_overhead_ms_per_step"] = stats(traj_over)
            e2e["trajectory_overhead_pct"] = stats([100.0 * o / (t.seconds * 1e3 / steps)
                                                    for o, t in zip(traj_over, trajs, strict=True)])
        if ref_stats is not None:
            e2e["speedup_vs_reference"] = {"min": ref_stats["min"] / sec["min"],
                                           "median": ref_stats["median"] / sec["median"]}
            ref_latent = runs["reference"][0].latent
            scale = float(np.abs(ref_latent).max()) or 1.0
            e2e["max_abs_diff_vs_reference"] = float(np.abs(trajs[0].latent - ref_latent).max())
            e2e["max_rel_diff_vs_reference"] = e2e["max_abs_diff_vs_reference"] / scale
        e2e["speedup_vs"] = {other: {"min": s["min"] / sec["min"], "median": s["median"] / sec["median"]}
                             for other, s in all_stats.items() if other != name}
        result["backends"][name]["e2e"] = e2e


def sweep_ratios(requested: list[float] | None, steps: int) -> list[float]:
    """Default 0, 0.1, ..., 1 (0, 1/N, ..., 1 when N < 10 steps); 0 and 1 always included."""
    if requested is None:
        k = min(steps, 10)
        requested = [round(i / k, 4) for i in range(k + 1)]
    return sorted({0.0, 1.0, *requested})


def measure_sweep(runner: BackendRunner, z: np.ndarray, labels: np.ndarray, steps: int, args: argparse.Namespace,
                  n_models: int, log: Callable[[str], None], gate: IdleGate | None = None) -> dict | None:
    """Time against the ratio next to the ideal line (1 - s/N) T(0) + s/N T(1)."""
    if n_models != 2:
        return {"status": "skipped", "reason": f"a ratio stitches 2 models; the bundle has {n_models}"}
    ratios = sweep_ratios(args.ratios, steps)
    points: list[dict] = []
    for r in ratios:
        trajs = []
        for _ in range(args.repeats):
            if gate is not None:
                gate.wait()
            trajs.append(runner.trajectory(z, labels, steps, r, args.cfg_scale))
        points.append({"ratio": r, "small_steps": trajs[0].steps_per_model[0],
                       "seconds": stats([t.seconds for t in trajs])})
        log(f"{runner.name}: ratio {r:.2f} ({points[-1]['small_steps']}/{steps} small steps): "
            f"{points[-1]['seconds']['min']:.3f} s min")
    t_large = points[0]["seconds"]  # ratio 0
    t_small = points[-1]["seconds"]  # ratio 1
    for p in points:
        frac = p["small_steps"] / steps
        p["ideal_seconds"] = {}
        p["gap_pct"] = {}
        for k in ("min", "median"):
            ideal = (1 - frac) * t_large[k] + frac * t_small[k]
            p["ideal_seconds"][k] = ideal
            p["gap_pct"][k] = 100.0 * (p["seconds"][k] - ideal) / ideal
    return {"status": "ok", "points": points,
            "max_abs_gap_pct": {k: max(abs(p["gap_pct"][k]) for p in points) for k in ("min", "median")}}
