"""Timings for benchmarks/gpu_check.sh: the torch-CUDA backend with and without a whole-trajectory CUDA graph.

DiT-S/2 -> DiT-XL/2 at 256 px (latent 4x32x32), randomized weights built in-process (no bundle,
no download), batch 8 (the reference's demo labels), DDIM 100 steps, cfg 1.5, ratio 0.4:

    eager      TorchBackend, one launch sequence per step (StepModule: CFG + update in one module)
    graph      TorchBackend, the whole trajectory captured once as ONE CUDA graph and replayed
    reference  the public T-Stitch/DiT loop as written (benchmarks/reference_loop.py), fp32 only

for fp16 (the engines' precision) and fp32 (the published baseline's; TF32 matmuls allowed in
every fp32 mode, as the reference script does). Each mode: one warm-up, then `--repeats` timed
trajectories (wall clock, host to host, including the uploads and the final read-back); min and
median. `--cpu-dry-run` runs the same code on tiny models on the CPU (no graphs there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny models on the CPU: exercise the code paths")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    p.add_argument("--small", default="DiT-S/2")
    p.add_argument("--large", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp16,fp32")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip what would start after this many seconds")
    p.add_argument("--tests-rc", type=int, default=None, help="exit code of the GPU tests (from gpu_check.sh)")
    p.add_argument("--tests-summary", default=None)
    return p.parse_args(argv)


def stats(seconds: list[float]) -> dict:
    return {"min_s": round(min(seconds), 5), "median_s": round(statistics.median(seconds), 5),
            "runs_s": [round(s, 5) for s in seconds]}


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> bool:
        return time.monotonic() - self.t0 < self.budget_s

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from tstitch_trt.export.step_module import StepModule
    from tstitch_trt.export.torch_backend import TorchBackend
    from tstitch_trt.models.dit import dit_config, randomized_dit
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.sampling.stitch import steps_per_model
    from tstitch_trt.sampling.trajectory import plan_trajectory

    clock = Clock(args.budget_s)
    dry = args.cpu_dry_run
    if dry:
        device, size, batch, steps, repeats = "cpu", 64, 2, 10, 1
        overrides = {"depth": 2, "hidden_size": 64, "num_heads": 2}
        precisions = ["fp32"]
    else:
        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device (use --cpu-dry-run off the GPU)", file=sys.stderr)
            return 2
        device, size, batch, steps, repeats = "cuda", args.image_size, args.batch, args.steps, args.repeats
        overrides = {}
        precisions = [p for p in args.precisions.split(",") if p]
    latent = (4, size // 8, size // 8)
    report: dict = {
        "what": "torch-CUDA backend, eager vs whole-trajectory CUDA graph vs the reference loop",
        "dry_run": dry,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "config": {"models": [args.small, args.large], "image_size": size, "latent": list(latent), "batch": batch,
                   "sampler": "ddim", "steps": steps, "cfg": args.cfg, "ratio": args.ratio, "repeats": repeats,
                   "weights": "randomized (timing only)", "arch_overrides": overrides},
        "gpu_tests": {"rc": args.tests_rc, "summary": args.tests_summary},
        "results": {},
        "skipped": [],
        "complete": False,
    }

    def save() -> None:  # after every block: a run killed by its time limit still leaves its numbers
        report["total_s"] = clock.elapsed
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    # -- models and one fixed trajectory --------------------------------------------------------------------
    t0 = time.perf_counter()
    nets = [randomized_dit(dit_config(a, input_size=latent[1], num_classes=1000, **overrides), seed=i + 1).eval()
            for i, a in enumerate((args.small, args.large))]
    report["build_models_s"] = round(time.perf_counter() - t0, 2)
    save()
    rng = np.random.default_rng(0)
    shape = (batch, *latent)
    x_init = rng.standard_normal(shape, dtype=np.float32)
    labels = np.array([DEMO_LABELS[i % len(DEMO_LABELS)] for i in range(batch)], dtype=np.int64)
    plan = plan_trajectory("ddim", steps, 2, shape, rng, ratio=args.ratio)
    report["config"]["steps_per_model"] = steps_per_model(plan.step_model, 2)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int) -> tuple[list[float], object]:
        out, seconds = None, []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            seconds.append(time.perf_counter() - t)
        return seconds, out

    eager_fp32_x = None
    for precision in precisions:
        if not clock.left():
            report["skipped"].append(f"{precision}: time budget ({args.budget_s:.0f} s) spent")
            continue
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
        torch.backends.cuda.matmul.allow_tf32 = precision == "fp32"  # the reference script's setting
        torch.backends.cudnn.allow_tf32 = precision == "fp32"
        res: dict = {"tf32": precision == "fp32"}
        modules = [StepModule(copy.deepcopy(n).to(device=device, dtype=dtype), guidance_channels=3).eval()
                   for n in nets]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def run(backend):
            return run_stitched(backend, plan, x_init, labels, args.cfg, progress=False)

        eager_x = None
        try:
            eager = TorchBackend.from_modules(modules, latent, device=device, cuda_graph=False)
            run(eager)  # warm-up: kernels, cuBLAS handles, allocator
            seconds, last = timed(lambda b=eager: run(b), repeats)
            small = [ms for ms, m in zip(last.step_ms, plan.step_model, strict=True) if m == 0]
            large = [ms for ms, m in zip(last.step_ms, plan.step_model, strict=True) if m == 1]
            res["eager"] = {**stats(seconds), "mode": last.mode,
                            "step_ms_small_mean": round(float(np.mean(small)), 4) if small else None,
                            "step_ms_large_mean": round(float(np.mean(large)), 4) if large else None}
            eager_x = last.x
            if precision == "fp32":
                eager_fp32_x = eager_x
            del eager
        except Exception as e:  # record and go on: one failure must not lose the other numbers
            res["eager"] = {"error": f"{type(e).__name__}: {e}"}

        if clock.left():
            try:
                graph = TorchBackend.from_modules(modules, latent, device=device, cuda_graph=True)
                first_s, first = timed(lambda b=graph: run(b), 1)  # warm-up + capture + first replay
                seconds, last = timed(lambda b=graph: run(b), repeats)
                gpu_ms = sum(last.engine_ms) if last.engine_ms else None
                res["graph"] = {**stats(seconds), "mode": last.mode,
                                "first_call_with_capture_s": round(first_s[0], 4),
                                "gpu_ms_per_trajectory": round(gpu_ms, 3) if gpu_ms is not None else None,
                                "notes": first.notes + last.notes}
                if eager_x is not None:
                    res["graph"]["max_abs_diff_vs_eager"] = float(np.max(np.abs(last.x - eager_x)))
                    res["graph"]["max_abs_eager"] = float(np.max(np.abs(eager_x)))
                    res["graph_speedup_median"] = round(res["eager"]["median_s"] / res["graph"]["median_s"], 3)
                del graph
            except Exception as e:
                res["graph"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            report["skipped"].append(f"{precision} graph: time budget spent")
        if device == "cuda":
            res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del modules
        if device == "cuda":
            torch.cuda.empty_cache()
        report["results"][precision] = res
        save()
        print(f"[{clock.elapsed:6.1f}s] {precision}: " + json.dumps(res), flush=True)

    # -- the public reference loop (fp32, TF32 as its sample script) --------------------------------------------
    if "fp32" in precisions and clock.left():
        try:
            report["results"]["reference_fp32"] = reference(nets, x_init, labels, steps, args, device, timed,
                                                            repeats, eager_fp32_x)
        except Exception as e:
            report["results"]["reference_fp32"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{clock.elapsed:6.1f}s] reference: " + json.dumps(report["results"]["reference_fp32"]), flush=True)
    elif "fp32" in precisions:
        report["skipped"].append("reference: time budget spent")

    report["complete"] = True
    save()
    print(f"wrote {args.out}")
    return 0


def reference(nets, x_init, labels, steps, args, device, timed, repeats, eager_x) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from reference_loop import reference_sample
    except ImportError as e:
        return {"skipped": f"benchmarks/reference_loop.py not importable ({e})"}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    models = [copy.deepcopy(n).to(device).eval() for n in nets]
    z = torch.from_numpy(x_init).to(device)
    lab = [int(v) for v in labels]

    def run():
        return reference_sample(models, z, lab, steps, ratio=args.ratio, cfg_scale=args.cfg)

    run()
    seconds, out = timed(run, repeats)
    res = {**stats(seconds), "tf32": True}
    if eager_x is not None:
        x = out.float().cpu().numpy()
        res["max_abs_diff_vs_eager_fp32"] = float(np.max(np.abs(x - eager_x)))
    return res


if __name__ == "__main__":
    sys.exit(main())
