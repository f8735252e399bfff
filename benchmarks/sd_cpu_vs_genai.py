"""SD on the CPU, side by side in one run: `tstitch-trt run` (openvino) vs OpenVINO GenAI vs diffusers (torch).

    python benchmarks/sd_cpu_vs_genai.py --bundle BUNDLE [--optimum OPTIMUM_DIR] [--large SD_PIPELINE_DIR] \
        [--small SMALL_UNET_DIR] [--genai-python /path/to/genai-venv/bin/python] \
        [--size 512] [--steps 4] [--ratios 0,0.4] [--precisions fp32] [--genai-precisions fp32,bf16] \
        [--diffusers-precisions fp32,bf16] [--repeats 2] [--runners ours,ours-warm,genai,diffusers] \
        [--genai-generates 2] [--guidance 7.5] [--sampler NAME] [--no-model-cache] [--lock FILE] \
        [--cache-branch K --cache-intervals 1,3] --out results.json

SDXL (SSD-1B -> SDXL at 1024 px): --size 1024 --guidance 5.0 (SDXL's default) --sampler euler; with
--no-model-cache neither engine keeps compiled models on disk (an SDXL pair's blobs are ~19 GB): ours compiles
each U-Net at its first call (the low-memory mode), so that call's time goes to "first_call_ms" and the per-call
figures are the calls after it; GenAI compiles during its load, outside its image.

BUNDLE: `tstitch-trt build --model SMALL --model LARGE --backend ort`; OPTIMUM_DIR: `optimum-cli export
openvino --model LARGE --task text-to-image --weight-format fp32 OUT` (the same weights). Every
measurement is its own process, so each has its own peak RSS (os.wait4's ru_maxrss of that process) and
whole-process wall time; the runners alternate within each repeat (ours r=0, ours r=0.4, GenAI, diffusers
fp32, diffusers bf16, ...), so load drifting on a shared machine hits all alike. One warm-up process per
cached runner fills its compiled-model cache first (its figures are kept as "first run").

Per run: per-U-Net-call ms (ours: the report's step_ms, by model; GenAI: its raw unet durations;
diffusers: a forward hook), VAE decode, whole image (prompt -> pixels, in process), whole process, peak
RSS. Min and median over --repeats. "ours-warm" (benchmarks/sd_ours_warm.py) measures ours the way GenAI's
image is measured: one process loads the pipeline, makes one untimed image, then one timed image per ratio
(`run`'s image includes importing the compiled blobs and opening the text encoder and VAE); its process
time is not one image's, so it has none. --genai-generates 2 times a second generate() in GenAI's process
too ("genai-P-warm"; GenAI's process time stays its first image's). GenAI runs in its own environment
(--genai-python, script benchmarks/genai_t2i.py) and at ratio 0 only (it has no stitching): it is the SD 1.5
large model alone. --cache-branch K (a bundle built with `--cache-branch K`) with --cache-intervals 1,3: ours
(both runners) once per DeepCache interval too, runners named "...-iN"; per-call figures also split into full
and cached calls (small_full, small_cached, large_full, large_cached), and each sample keeps the report's full
calls.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from sd_ours_warm import unet_calls

HERE = Path(__file__).resolve().parent
PROMPT = "a photograph of an astronaut riding a horse"


LOCK: list[str] = []  # --lock: a file flock()ed around each measured process (a shared machine's big-memory lock)


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB of that process, output tail); raises on failure. With --lock, the lock is
    taken before the clock starts and released when the process ends (waiting for it is not timed)."""
    with contextlib.ExitStack() as stack:
        if LOCK:
            f = stack.enter_context(open(LOCK[0], "a"))
            fcntl.flock(f, fcntl.LOCK_EX)
        return _run_timed(cmd, env)


def _run_timed(cmd: list[str], env: dict[str, str] | None) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return wall, usage.ru_maxrss / 2**20, tail


NO_CACHE = "/proc/no-openvino-cache"  # unwritable: OpenVINO keeps no compiled-model blobs (--no-model-cache)
COMPILE_IN_FIRST_CALL = "one step model compiled at a time"  # the openvino backend's note in the low-memory mode


def ours_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    return {**os.environ, "TSTITCH_OPENVINO_CACHE": NO_CACHE if args.no_model_cache else str(work / "ov-cache")}


def split_calls(report: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({model: call ms}, {model: first call ms}) from a run report. Where the backend compiled each step model at
    its first call (its note says so), that call is compile + inference: it is kept apart, not a per-call figure
    (a model's first call is always a full one, so DeepCache's "_full" lists lose it too)."""
    calls = unet_calls(report)
    if not any(COMPILE_IN_FIRST_CALL in n for n in report.get("notes", [])):
        return calls, {}
    first = {m: calls[m][:1] for m in ("small", "large") if calls[m]}
    return {k: v[1:] if k in ("small", "large", "small_full", "large_full") else v for k, v in calls.items()}, first


def cache_args(args: argparse.Namespace, interval: int) -> list[str]:
    """ours' DeepCache flags (none without --cache-branch: a plain bundle's runs stay as before)."""
    if args.cache_branch is None:
        return []
    return ["--cache-interval", str(interval), "--cache-branch", str(args.cache_branch)]


def cache_suffix(args: argparse.Namespace, interval: int) -> str:
    return "" if args.cache_branch is None else f"-i{interval}"


def ours(args: argparse.Namespace, ratio: float, precision: str, work: Path, interval: int = 1) -> dict[str, Any]:
    report = work / f"ours-{precision}-{ratio}{cache_suffix(args, interval)}.json"
    cmd = [sys.executable, "-m", "tstitch_trt.cli", "run", "--bundle", args.bundle, "--backend", "openvino",
           "--precision", precision, "--prompt", PROMPT, "--steps", str(args.steps), "--ratio", str(ratio),
           "--height", str(args.size), "--width", str(args.size), "--seed", "0", "--cfg-scale", str(args.guidance),
           *(["--sampler", args.sampler] if args.sampler else []), "--report", str(report),
           "--out", str(work / "ours.png"), *cache_args(args, interval)]
    wall, rss, _ = run_process(cmd, ours_env(args, work))
    r = json.loads(report.read_text())
    calls, first = split_calls(r)
    return {"process_seconds": wall, "peak_rss_gb": rss, "image_seconds": r["total_seconds"],
            "loop_seconds": r["loop_seconds"], "vae_decode_ms": 1e3 * r["decode_seconds"],
            "text_encoder_ms": 1e3 * r["text_encoder_seconds"], "unet_call_ms": calls, "first_call_ms": first,
            "precision": r.get("precisions", r.get("precision")), "notes": r.get("notes", []),
            "full_calls": (r.get("cache") or {}).get("full_calls")}


def ours_warm(args: argparse.Namespace, ratios: list[float], precision: str, work: Path,
              interval: int = 1) -> dict[str, dict[str, Any]]:
    """{"ours-warm-P[-iN]-rR": sample} per ratio, from one process (load, one untimed image, one timed image per
    ratio)."""
    suffix = cache_suffix(args, interval)
    out = work / f"ours-warm-{precision}{suffix}.json"
    cmd = [sys.executable, str(HERE / "sd_ours_warm.py"), args.bundle, "--precision", precision, "--size",
           str(args.size), "--steps", str(args.steps), "--ratios", ",".join(f"{r:g}" for r in ratios),
           "--guidance", str(args.guidance), "--out", str(out), *cache_args(args, interval)]
    if interval > 1:  # the untimed call must use every cached graph (sd_ours_warm.py checks): 4 PNDM steps do
        cmd += ["--warm-steps", str(max(4, min(args.steps, 6)))]
    wall, rss, _ = run_process(cmd, ours_env(args, work))
    r = json.loads(out.read_text())
    samples = {}
    for key, runs in r["runs"].items():
        for s in runs:
            samples[f"ours-warm-{precision}{suffix}-{key}"] = {**s, "process_seconds": None, "peak_rss_gb": rss,
                                                       "warm_process_seconds": wall, "open_seconds": r["open_seconds"],
                                                       "runtime_precisions": r["runtime_precisions"]}
    return samples


def genai(args: argparse.Namespace, precision: str, work: Path, generates: int) -> dict[str, dict[str, Any]]:
    name = f"genai-{precision}"
    out = work / f"{name}.json"
    cmd = [args.genai_python, str(HERE / "genai_t2i.py"), args.optimum, "--prompt", PROMPT, "--size",
           str(args.size), "--steps", str(args.steps), "--precision", {"fp32": "f32", "bf16": "bf16"}[precision],
           "--cache-dir", "" if args.no_model_cache else str(work / "genai-cache"), "--guidance", str(args.guidance),
           "--generates", str(generates), "--out", str(out)]
    wall, rss, _ = run_process(cmd)
    r = json.loads(out.read_text())
    later = sum(w["generate_seconds"] for w in r["warm"])  # the process figure is one image's: later images off
    samples = {name: {"process_seconds": wall - later, "peak_rss_gb": rss, "image_seconds": r["generate_seconds"],
                      "load_seconds": r["load_seconds"], "vae_decode_ms": r["vae_decode_ms"],
                      "text_encoder_ms": r["text_encoder_ms"], "unet_call_ms": {"large": r["unet_call_ms"]}}}
    for w in r["warm"][-1:]:
        samples[f"{name}-warm"] = {"process_seconds": None, "peak_rss_gb": rss, "image_seconds": w["generate_seconds"],
                                   "vae_decode_ms": w["vae_decode_ms"], "text_encoder_ms": w["text_encoder_ms"],
                                   "unet_call_ms": {"large": w["unet_call_ms"]}}
    return samples


def diffusers_run(args: argparse.Namespace, precision: str, work: Path) -> dict[str, Any]:
    out = work / f"diffusers-{precision}.json"
    cmd = [sys.executable, str(HERE / "diffusers_t2i.py"), args.large, "--prompt", PROMPT, "--size",
           str(args.size), "--steps", str(args.steps), "--precision", precision, "--guidance", str(args.guidance),
           "--out", str(out)]
    wall, rss, _ = run_process(cmd)
    r = json.loads(out.read_text())
    return {"process_seconds": wall, "peak_rss_gb": rss, "image_seconds": r["image_seconds"],
            "load_seconds": r["load_seconds"], "vae_decode_ms": r["vae_decode_ms"],
            "unet_call_ms": {"large": r["unet_call_ms"]}}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median over repeats of every figure (per-call: over every call of every repeat)."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"min": float(min(values)), "median": float(np.median(values))} if values else {}

    out: dict[str, Any] = {"repeats": len(samples)}
    for key in ("process_seconds", "image_seconds", "vae_decode_ms", "peak_rss_gb", "text_encoder_ms",
                "loop_seconds", "load_seconds"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        if vals:
            out[key] = stats(vals)
    for model in ("small", "large", "small_full", "small_cached", "large_full", "large_cached"):
        calls = [c for s in samples for c in s["unet_call_ms"].get(model, [])]
        if calls:
            out[f"unet_{model}_call_ms"] = stats(calls)
        first = [c for s in samples for c in s.get("first_call_ms", {}).get(model, [])]
        if first:  # compile + the first call (ours without a model cache)
            out[f"unet_{model}_first_call_ms"] = stats(first)
    for extra in ("precision", "notes", "runtime_precisions", "warm_process_seconds", "full_calls"):
        if extra in samples[-1]:
            out[extra] = samples[-1][extra]
    return out


def cpu_host() -> dict[str, Any]:
    """The CPU model and the flags that decide OpenVINO's bf16 path (avx512_bf16, AMX), from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16")
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted}}


def sample_load(trace: list[tuple[str, float]], stop: threading.Event) -> None:
    """(UTC time, 1-minute load average) every 15 s (the benchmark's own process counts in it: ~1-2 on 2 cores)."""
    while not stop.wait(15.0):
        trace.append((time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--optimum", help="GenAI's runs: optimum-cli's IR export of the large pipeline")
    p.add_argument("--large", help="the diffusers SD pipeline directory (diffusers' runs)")
    p.add_argument("--genai-python", help="GenAI's runs: its environment's python")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="PNDM steps (4 steps = 5 U-Net calls)")
    p.add_argument("--ratios", default="0,0.4")
    p.add_argument("--precisions", default="fp32", help="ours (tstitch-trt run --precision)")
    p.add_argument("--genai-precisions", default="fp32,bf16", help="GenAI's INFERENCE_PRECISION_HINT (bf16 is its "
                   "default on a bf16 CPU)")
    p.add_argument("--diffusers-precisions", default="fp32,bf16", help="torch fp32 / bf16 autocast")
    p.add_argument("--lock", help="flock this file around each measured process (not timed)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale, all runners (SD 1.5: 7.5, SDXL: 5.0)")
    p.add_argument("--sampler", help="ours' --sampler (default: the bundle's; GenAI and diffusers use the "
                   "scheduler of their directory)")
    p.add_argument("--no-model-cache", action="store_true", help="no compiled-model cache on disk for ours or GenAI "
                   "(so no cache-filling first runs): every process compiles")
    p.add_argument("--runners", default="ours,ours-warm,genai,diffusers", help="run in this order in each repeat")
    p.add_argument("--genai-generates", type=int, default=2, help="2: also a warm second generate() per process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-branch", type=int, default=None, help="DeepCache: the bundle's --cache-branch (ours' "
                   "runs then take --cache-interval per --cache-intervals)")
    p.add_argument("--cache-intervals", default="1", help="DeepCache intervals for ours (with --cache-branch)")
    p.add_argument("--work", help="scratch directory (compiled-model caches); default: a temporary one")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="add --repeats more repeats to the samples already in --out "
                   "(same --work: its caches are warm, so no first runs); the summaries cover all of them")
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    precisions = args.precisions.split(",")
    runners = args.runners.split(",")
    intervals = [int(n) for n in args.cache_intervals.split(",")]
    if "genai" in runners and not (args.optimum and args.genai_python):
        p.error("the genai runner needs --optimum and --genai-python (or leave it out of --runners)")
    if "diffusers" in runners and not args.large:
        p.error("the diffusers runner needs --large (or leave it out of --runners)")
    if args.cache_branch is None and intervals != [1]:
        p.error("--cache-intervals needs --cache-branch (the bundle's DeepCache branch)")
    work = Path(args.work or tempfile.mkdtemp(prefix="sd-cpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.lock:
        LOCK.append(args.lock)
    # (name, fn, needs a cache warm-up process); fn returns {runner name: sample}
    plan: list[tuple[str, Any, bool]] = []
    if "ours" in runners:
        named = [(f"ours-{prec}-r{r:g}{cache_suffix(args, n)}", r, prec, n)
                 for prec in precisions for n in intervals for r in ratios]
        plan += [(name, lambda name=name, r=r, prec=prec, n=n: {name: ours(args, r, prec, work, n)}, True)
                 for name, r, prec, n in named]
    if "ours-warm" in runners:  # its own untimed image warms it (the compiled-model cache is ours-*'s)
        plan += [(f"ours-warm-{prec}{cache_suffix(args, n)}",
                  lambda prec=prec, n=n: ours_warm(args, ratios, prec, work, n), False)
                 for prec in precisions for n in intervals]
    if "genai" in runners:
        plan += [(f"genai-{prec}", lambda gen=1, prec=prec: genai(args, prec, work, gen), True)
                 for prec in args.genai_precisions.split(",")]
    if "diffusers" in runners:
        plan += [(f"diffusers-{prec}", lambda prec=prec: {f"diffusers-{prec}": diffusers_run(args, prec, work)},
                  False) for prec in args.diffusers_precisions.split(",")]
    result: dict[str, Any] = {"size": args.size, "steps": args.steps, "prompt": PROMPT, "guidance": args.guidance,
                              "model_cache": not args.no_model_cache, "cache_branch": args.cache_branch,
                              "host": {**cpu_host(), "load_at_start": os.getloadavg()},
                              "command": " ".join(sys.argv), "first_run": {}, "runs": {}}
    prev = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).exists() else None
    if prev is not None:  # the first runs, failures and process log of the earlier invocation are kept
        result.update({k: prev[k] for k in ("first_run", "failed", "processes", "host") if k in prev})
        result["command"] = [*([prev["command"]] if isinstance(prev["command"], str) else prev["command"]),
                             result["command"]]
    trace: list[tuple[str, float]] = prev.get("load_trace", []) if prev else []
    result["load_trace"] = trace
    stop = threading.Event()
    threading.Thread(target=sample_load, args=(trace, stop), daemon=True).start()
    failed: dict[str, str] = {}
    order = {"ours": runners.index("ours") if "ours" in runners else 0}  # each runner kind where --runners puts it
    order.update({k: runners.index(k) for k in ("ours-warm", "genai", "diffusers") if k in runners})
    plan.sort(key=lambda item: order["ours-warm" if item[0].startswith("ours-warm") else item[0].split("-")[0]])
    for name, fn, cached in plan:  # warm-up: compiled-model caches filled (ours, GenAI); figures of a cold start kept
        if cached and prev is None and not args.no_model_cache:
            print(f"first run (cache cold): {name} ...", flush=True)
            try:
                result["first_run"].update(fn())
            except RuntimeError as e:  # one runner failing must not lose the others' figures: recorded, skipped
                failed[name] = str(e)[-2000:]
                print(f"  FAILED: {str(e)[-500:]}", flush=True)
    failed = {**result.get("failed", {}), **failed}
    result["failed"] = failed
    plan = [(name, fn, cached) for name, fn, cached in plan if name not in failed]
    samples: dict[str, list[dict[str, Any]]] = prev.get("samples", {}) if prev else {}
    done = max((len(v) for v in samples.values()), default=0)
    for rep in range(done, done + args.repeats):
        for name, fn, _ in plan:
            print(f"repeat {rep + 1}/{done + args.repeats}: {name} ...", flush=True)
            t = time.perf_counter()
            if name.startswith("genai"):
                got = fn(gen=args.genai_generates)
            else:
                got = fn()
            for key, s in got.items():
                samples.setdefault(key, []).append(s)
                proc = "-" if s["process_seconds"] is None else f"{s['process_seconds']:.2f} s"
                calls = {m: [round(c / 1e3, 2) for c in v] for m, v in s["unet_call_ms"].items()}
                print(f"  {key}: image {s['image_seconds']:.2f} s, process {proc}, VAE {s['vae_decode_ms'] / 1e3:.2f} "
                      f"s, peak RSS {s['peak_rss_gb']:.2f} GB, calls {calls} s, first calls "
                      f"{s.get('first_call_ms', {})} ms (load {os.getloadavg()[0]:.2f})", flush=True)
            result.setdefault("processes", []).append({"runner": name, "repeat": rep + 1, "load_after": os.getloadavg(),
                                                       "seconds": time.perf_counter() - t})
            Path(args.out).write_text(json.dumps({**result, "runs": {k: summarize(v) for k, v in samples.items()
                                                                      if v}, "samples": samples}, indent=2))
    stop.set()
    result["host"]["load_at_end"] = os.getloadavg()
    result["runs"] = {k: summarize(v) for k, v in samples.items()}
    result["samples"] = samples
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
