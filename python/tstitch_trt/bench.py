"""`tstitch-trt bench`: speed, host overhead and memory of every backend against the reference loop.

What it measures, for each backend present in the bundle (trt / trt-rtx need an NVIDIA GPU):

- ms per step of each model at the step batches (CFG doubles the batch inside the step);
- end-to-end trajectory time, next to the reference loop (benchmarks/reference_loop.py: the public
  T-Stitch code's eager PyTorch DDIM loop on the same weights); speedup = reference / ours;
- time against the stitch ratio next to the ideal line (1 - s/N) T_large + s/N T_small, where s of
  the N steps ran on the small model, and the gap in percent;
- host overhead per step (wall minus engine time, `LoopResult.host_overhead_ms_per_step`);
- peak host RSS per backend (and device memory where a backend reports it).

Every figure is repeated after warm-up; min and median are reported (min is the estimate least
disturbed by other load on the machine; targets are checked on it). Results are ratios measured
side by side in one run, so they mean the same on any machine. Writes bench.json and bench.md
(and PNGs with --plot) into --out. Speed targets live here, never in timed tests.

This module imports without torch; torch is imported only for the torch backend and the reference.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError

SCHEMA = "tstitch-bench/1"
WORKLOADS = ("demo", "dit-s-xl", "sd-bk-tiny-sd15")
GPU_BACKENDS = ("trt", "trt-rtx")
PARTS = ("steps", "e2e", "sweep")
# The reference's demo labels (REFERENCE.md); cycled and taken modulo the bundle's class count.
DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
TARGETS = {
    "ort_speedup_vs_reference": 1.3,  # at least, end to end
    "ratio_gap_pct": 5.0,  # |measured - ideal| / ideal, at every ratio
    "host_overhead_pct": 2.0,  # of the step time
}
DEFAULT_CACHE = Path(os.environ.get("TSTITCH_BENCH_CACHE", Path.home() / ".cache" / "tstitch-trt" / "bench"))


# --- arguments -----------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"ratios must be in [0, 1], got {text!r}")
    return vals


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=None, help="bundle directory ('demo' = --workload demo)")
    p.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="demo: the built-in demo pair (default); dit-s-xl: DiT-S/2 -> DiT-XL/2 at 256 px, random "
                        "weights, built once into --cache; sd-bk-tiny-sd15: random BK-SDM-Tiny -> SD 1.5 U-Nets "
                        "against diffusers' pipeline (tstitch_trt/bench_sd.py)")
    p.add_argument("--backends", type=_name_list, default=None,
                   help="comma list of trt, trt-rtx, ort, torch (default: every backend in the bundle)")
    p.add_argument("--sweep-backends", type=_name_list, default=None,
                   help="backends that get the ratio sweep (default: all measured)")
    p.add_argument("--parts", type=_name_list, default=list(PARTS),
                   help=f"what to measure, comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference PyTorch loop")
    p.add_argument("--device", default="auto", help="torch backend and reference loop device: auto, cpu, cuda")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps per trajectory (default: the workload's)")
    p.add_argument("--batch", type=int, default=None, help="images per trajectory (default: the workload's)")
    p.add_argument("--step-batches", type=_int_list, default=None,
                   help="batches of the per-step figures (default 1,8,16; 1 for dit-s-xl on a CPU)")
    p.add_argument("--ratio", type=float, default=0.4, help="stitch ratio of the end-to-end figure (0.4)")
    p.add_argument("--ratios", type=_float_list, default=None,
                   help="ratios of the sweep (default 0,0.1,...,1; 0 and 1 are always added: they define the "
                        "ideal line)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every figure (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the first timed one (1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every backend and the reference (default: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and labels")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where built workload bundles are kept and reused")
    p.add_argument("--out", default="bench-out", help="output directory (bench.json, bench.md, PNGs)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots (matplotlib; --quality always does)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="shared machines: before each timed run, wait up to SECONDS for other processes to leave "
                        "the CPUs idle (Linux; 0 = off)")
    p.add_argument("--check-targets", action="store_true", help="exit 1 when a speed target is missed")
    p.add_argument("--quality", action="store_true", help="FID / accuracy sweep over the ratio (demo pair)")
    p.add_argument("--quality-images", type=int, default=500, help="images per ratio of the quality sweep")


# --- workloads -----------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    bundle: Path
    steps: int
    batch: int
    step_batches: list[int]
    notes: list[str] = field(default_factory=list)


def workload_defaults(name: str, gpu: bool) -> tuple[int, int, list[int]]:
    """(steps, batch, step batches). The paper's setting on a GPU; a CPU-sized one for DiT-XL on a CPU."""
    if name == "dit-s-xl" and not gpu:
        # DiT-XL/2 is ~240 GFLOP per step at batch 1 (CFG: 2 rows): minutes per trajectory on a few cores.
        # 5 steps keep the ratio grid exact at 0.2 (s of the 5 steps on DiT-S/2 at ratio s/5).
        return 5, 1, [1]
    return (100 if name == "dit-s-xl" else 50), 8, [1, 8, 16]


def resolve_workload(args: argparse.Namespace, gpu: bool, log: Callable[[str], None]) -> Workload:
    name = args.workload
    bundle_arg = args.bundle
    if bundle_arg == "demo":
        bundle_arg, name = None, name or "demo"
    if bundle_arg is not None and name is not None:
        raise UserError("give either --bundle DIR or --workload NAME, not both")
    notes: list[str] = []
    if bundle_arg is not None:
        bundle, name = Path(bundle_arg), "bundle"
    elif (name or "demo") == "demo":
        name = "demo"
        bundle = resolve_bundle(None)
    else:
        bundle = dit_s_xl_bundle(Path(args.cache), log)
    steps, batch, step_batches = workload_defaults(name, gpu)
    w = Workload(name, bundle, args.steps or steps, args.batch or batch, args.step_batches or step_batches, notes)
    if w.steps < 1 or w.batch < 1:
        raise UserError(f"--steps and --batch must be >= 1 (got {w.steps}, {w.batch})")
    return w


def dit_s_xl_bundle(cache: Path, log: Callable[[str], None]) -> Path:
    """DiT-S/2 -> DiT-XL/2 at 256 px (latent 4x32x32), random weights, torch + ort; built once, reused."""
    out = cache / "dit-s-xl"
    if not _bundle_ok(out, ["torch", "ort"], names=["DiT-S/2", "DiT-XL/2"]):
        log(f"building DiT-S/2 -> DiT-XL/2 (random weights, torch + ort) into {out}; once, several minutes "
            "(the XL fp32 graph is ~2.7 GB) ...")
        from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

        build_bundle(BuildConfig(models=[ModelSpec("DiT-S/2", "random:0"), ModelSpec("DiT-XL/2", "random:1")],
                                 out=out, backends=["torch", "ort"]),
                     on_model=lambda n: log(f"  exporting {n} ..."))
    return out


def _bundle_ok(path: Path, backends: list[str], names: list[str] | None = None) -> bool:
    from tstitch_trt.bundle.manifest import read_manifest

    try:
        m = read_manifest(path)
    except UserError:
        return False
    return all(b in m.backends() for b in backends) and (names is None or [x.name for x in m.models] == names)


# --- small helpers -------------------------------------------------------------------------------
def stats(samples: Sequence[float]) -> dict:
    v = [float(s) for s in samples]
    return {"min": min(v), "median": float(np.median(v)), "max": max(v), "n": len(v), "samples": v}


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class HostMemory:
    """Peak resident memory of this process over a section (Linux: VmHWM reset via clear_refs)."""

    def __init__(self) -> None:
        self.resettable = True
        self.start_mb = 0.0

    def begin(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (Linux >= 4.0)
        except OSError:
            self.resettable = False
        self.start_mb = self._status("VmRSS") or 0.0

    def end(self) -> dict:
        peak = self._status("VmHWM")
        note = None
        if peak is None or not self.resettable:  # process-wide high-water mark since start
            import resource

            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = ru / 1024 if sys.platform != "darwin" else ru / 2**20
            note = "process-wide peak since start (the peak could not be reset per section)"
        out: dict[str, object] = {"rss_before_mb": round(self.start_mb, 1), "peak_rss_mb": round(peak, 1),
               "peak_rss_added_mb": round(max(peak - self.start_mb, 0.0), 1)}
        if note:
            out["note"] = note
        return out

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None


class IdleGate:
    """Waits, before a timed run, until processes other than this one leave the CPUs (nearly) idle.

    On a shared machine one busy neighbour makes 2-thread OpenMP code stall at every barrier, which
    swamps the differences being measured. Other processes' load is this machine's busy time
    (/proc/stat) minus this process's own (/proc/self/stat), sampled over `window` seconds.
    """

    def __init__(self, max_wait_s: float, busy_cores: float = 0.25, window: float = 1.0):
        self.max_wait_s = max_wait_s
        self.busy_cores = busy_cores
        self.window = window
        self.waits = self.timeouts = 0
        self.waited_s = 0.0

    def wait(self) -> None:
        if self.max_wait_s <= 0:
            return
        t0 = time.perf_counter()
        while True:
            busy = self.others_busy_cores()
            if busy is None or busy < self.busy_cores:
                break
            if time.perf_counter() - t0 > self.max_wait_s:
                self.timeouts += 1
                break
        self.waits += 1
        self.waited_s += time.perf_counter() - t0

    def others_busy_cores(self) -> float | None:
        a = self._sample()
        time.sleep(self.window)
        b = self._sample()
        if a is None or b is None or b[0] <= a[0]:
            return None
        total, busy, own = (y - x for x, y in zip(a, b, strict=True))
        return max(busy - own, 0) / (total / (os.cpu_count() or 1))

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        return sum(cpu[:8]), sum(cpu[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime

    def report(self) -> dict:
        return {"max_wait_s": self.max_wait_s, "busy_cores_threshold": self.busy_cores, "waits": self.waits,
                "timeouts": self.timeouts, "waited_s": round(self.waited_s, 1)}


def _labels(batch: int, num_classes: int) -> np.ndarray:
    return np.array([DEMO_LABELS[i % len(DEMO_LABELS)] % num_classes for i in range(batch)], dtype=np.int64)


def _latent(seed: int, batch: int, shape: Sequence[int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


# --- runners: our backends and the reference loop ------------------------------------------------
@dataclass
class Trajectory:
    seconds: float  # end to end: planning, upload, all steps, read-back
    latent: np.ndarray
    steps_per_model: list[int]
    step_ms_mean: float | None = None
    engine_ms_total: float | None = None
    host_overhead_ms_per_step: float | None = None  # LoopResult: mean(step wall - engine)


class BackendRunner:
    """One of our backends behind the pipeline (what a user calls), without decoding."""

    def __init__(self, kind: str, bundle: Path, manifest, device: str, threads: int):
        from tstitch_trt.pipeline.dit import StitchedPipeline

        self.name = kind
        self.backend = open_bench_backend(kind, bundle, manifest, device, threads)
        self.pipe = StitchedPipeline(bundle, manifest, self.backend, "benchmark")
        self.device = self.backend.device

    def trajectory(self, z: np.ndarray, labels: np.ndarray, steps: int, ratio: float, cfg: float) -> Trajectory:
        t0 = time.perf_counter()
        res = self.pipe(class_labels=labels.tolist(), ratio=ratio, steps=steps, sampler="ddim", cfg_scale=cfg,
                        init_noise=z, progress=False, decode=False)
        seconds = time.perf_counter() - t0
        rep = res.report
        engine = rep["engine_ms"]
        return Trajectory(seconds, res.latents, rep["steps_per_model"], float(np.mean(rep["step_ms"])),
                          None if engine is None else float(np.sum(engine)), rep["host_overhead_ms_per_step"])

    def step_times(self, model: int, batch: int, repeats: int, warmup: int,
                   gate: IdleGate | None = None) -> tuple[list[float], list[float] | None]:
        """Wall (and engine) ms of single steps of `model` at `batch`: every step on that model."""
        from tstitch_trt.runtime.loop import run_stitched
        from tstitch_trt.sampling.trajectory import plan_trajectory

        m = self.pipe.manifest
        n_models = len(m.models)
        onehot = [1.0 if i == model else 0.0 for i in range(n_models)]
        shape = (batch, *m.latent_shape)
        x = _latent(1, batch, m.latent_shape)
        labels = _labels(batch, m.num_classes)

        def plan(n: int):
            return plan_trajectory("ddim", n, n_models, shape, np.random.default_rng(0), fractions=onehot)

        for _ in range(warmup):
            run_stitched(self.backend, plan(1), x, labels, 1.5)
        wall: list[float] = []
        engine: list[float] | None = []
        while len(wall) < repeats:
            if gate is not None:
                gate.wait()
            res = run_stitched(self.backend, plan(repeats), x, labels, 1.5)
            if res.mode == "steps":  # one sample per step
                wall += res.step_ms
                engine = engine + res.engine_ms if (engine is not None and res.engine_ms) else None
            else:  # one launch for the whole trajectory: one sample per trajectory
                wall.append(float(np.mean(res.step_ms)))
                engine = engine + [float(np.mean(res.engine_ms))] if (engine is not None and res.engine_ms) else None
        return wall[:repeats], None if engine is None else engine[:repeats]

    def memory(self) -> dict | None:
        """Device memory where the backend reports it (e.g. TensorRT scratch + buffers)."""
        report = getattr(self.backend, "memory_report", None)
        if callable(report):
            return report()
        if self.name == "torch" and str(self.device).startswith("cuda"):
            return _torch_device_memory()
        return None

    def close(self) -> None:
        self.pipe.close()


class ReferenceRunner:
    """benchmarks/reference_loop.py on the bundle's torch weights."""

    name = "reference"

    def __init__(self, bundle: Path, manifest, device: str):
        self.ref = load_reference_loop()
        self.device = device
        self.manifest = manifest
        self.models = self.ref.load_reference_models(bundle, manifest, device=device)

    def trajectory(self, z: np.ndarray, labels: np.ndarray, steps: int, ratio: float, cfg: float) -> Trajectory:
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        zt = torch.from_numpy(z).to(self.device)
        st: dict = {}
        out = self.ref.reference_sample(self.models, zt, [int(v) for v in labels], steps, ratio=ratio,
                                        cfg_scale=cfg, guidance_channels=self.manifest.guidance_channels, stats=st)
        latent = out.cpu().numpy()  # the caller gets a host latent, as from our pipeline
        return Trajectory(time.perf_counter() - t0, latent, st["calls_per_model"])

    def memory(self) -> dict | None:
        if self.device.startswith("cuda"):
            return _torch_device_memory()
        return None

    def close(self) -> None:
        self.models = []


def open_bench_backend(kind: str, bundle: Path, manifest, device: str, threads: int):
    """Our backend `kind`, with the benchmark's thread count for the CPU ones."""
    if kind == "ort":
        from tstitch_trt.runtime import ort_backend

        opener = getattr(ort_backend, "open_ort_backend", None)
        if opener is not None:  # CUDA execution provider where onnxruntime-gpu and a GPU exist
            return opener(bundle, manifest, device=None if device == "auto" else device, threads=threads)
        return ort_backend.OrtBackend(bundle, manifest, providers=["CPUExecutionProvider"], threads=threads)
    if kind == "torch":
        from tstitch_trt.export.torch_backend import TorchBackend

        return TorchBackend(bundle, manifest, device=device)
    from tstitch_trt.pipeline.backends import open_backend

    return open_backend(kind, bundle, manifest, device=device)


def benchmarks_dir() -> Path | None:
    """The source checkout's benchmarks/ (the reference loop is a benchmark, not part of the package)."""
    env = os.environ.get("TSTITCH_BENCHMARKS_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    return next((c for c in candidates if (c / "reference_loop.py").is_file()), None)


def load_reference_loop():  # -> module
    name = "tstitch_bench_reference_loop"
    if name in sys.modules:
        return sys.modules[name]
    d = benchmarks_dir()
    if d is None:
        raise UserError("benchmarks/reference_loop.py was not found (it ships with the source checkout); "
                        "run from the repository, set TSTITCH_BENCHMARKS_DIR, or pass --no-reference")
    spec = importlib.util.spec_from_file_location(name, d / "reference_loop.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- the benchmark -------------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    if args.quality:
        return run_quality(args)
    if args.workload == "sd-bk-tiny-sd15":
        from tstitch_trt.bench_sd import run_sd_bench

        return run_sd_bench(args)
    log = _logger()
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        raise UserError(f"unknown --parts {bad[0]!r}; choose from {', '.join(PARTS)}")
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    if not 0.0 <= args.ratio <= 1.0:
        raise UserError(f"--ratio must be in [0, 1], got {args.ratio}")
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.pipeline.backends import BACKEND_CHOICES, tensorrt_module
    from tstitch_trt.runtime.cuda import device_count as cuda_device_count

    gpus = cuda_device_count()
    w = resolve_workload(args, gpus > 0, log)
    manifest = read_manifest(w.bundle)
    threads = args.threads or usable_cores()
    present = manifest.backends()
    wanted = args.backends or present
    unknown = [b for b in wanted if b not in BACKEND_CHOICES or b == "auto"]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from trt, trt-rtx, ort, torch")
    need_torch = "torch" in wanted or not args.no_reference
    device = _torch_device(args.device, threads) if need_torch else "cpu"

    result: dict = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": _command_line(),
        "host": host_info(threads, device),
        "workload": {
            "name": w.name, "bundle": str(w.bundle), "models": [m.name for m in manifest.models],
            "gmacs_per_forward": [round(m.macs_per_forward / 1e9, 3) for m in manifest.models],
            "latent_shape": list(manifest.latent_shape), "sampler": "ddim", "steps": w.steps, "batch": w.batch,
            "cfg_scale": args.cfg_scale, "ratio": args.ratio, "step_batches": w.step_batches,
            "repeats": args.repeats, "warmup": args.warmup, "threads": threads, "torch_device": device,
            "parts": list(args.parts),
        },
        "load_average": {"start": load_average()},
        "backends": {},
        "reference": None,
        "notes": list(w.notes),
    }
    if device.startswith("cuda"):
        result["notes"].append("torch on CUDA runs with TF32 matmuls allowed, as the reference script sets it")
    runners: dict[str, BackendRunner] = {}
    mem = HostMemory()
    gate = IdleGate(args.wait_idle)
    labels = _labels(w.batch, manifest.num_classes)
    z = _latent(args.seed, w.batch, manifest.latent_shape)
    log(f"workload {w.name}: {' -> '.join(m.name for m in manifest.models)}, {w.steps} DDIM steps, batch {w.batch}, "
        f"cfg {args.cfg_scale}, {threads} threads; load average {load_average()}")

    for kind in wanted:
        entry: dict = {}
        result["backends"][kind] = entry
        if kind not in present:
            entry.update(status="skipped", reason=f"not in the bundle (it has: {', '.join(present)})")
            continue
        if kind in GPU_BACKENDS and gpus == 0:
            entry.update(status="skipped", reason="needs an NVIDIA GPU")
            log(f"{kind}: skipped: needs an NVIDIA GPU")
            continue
        if kind in GPU_BACKENDS and tensorrt_module(kind) is None:
            entry.update(status="skipped", reason=f"{kind} runtime module is not installed")
            continue
        if kind == "ort" and device.startswith("cuda") and args.backends is None and not _ort_has_cuda():
            # a GPU-sized workload (batch 8, 100 steps of DiT-XL) would take hours on the host CPU
            entry.update(status="skipped", reason="onnxruntime here runs on the CPU only (no CUDA execution "
                                                  "provider); pass --backends ort to time it anyway")
            log(f"ort: skipped: {entry['reason']}")
            continue
        _reset_device_peak(device)
        mem.begin()
        runner = BackendRunner(kind, w.bundle, manifest, device, threads)
        runners[kind] = runner
        entry.update(status="ok", device=str(runner.device))
        if "e2e" in args.parts or "sweep" in args.parts:
            for _ in range(args.warmup):  # warm the end-to-end shape now: memory is read with it
                runner.trajectory(z, labels, w.steps, args.ratio, args.cfg_scale)
        if "steps" in args.parts:
            entry["step_ms"] = measure_steps(runner, manifest, w.step_batches, args.repeats, args.warmup, log, gate)
        entry["memory"] = {"host": mem.end(), "device": runner.memory()}
        if "e2e" not in args.parts and "sweep" not in args.parts:
            runner.close()
            runners.pop(kind)
            gc.collect()

    reference = None
    if not args.no_reference and "e2e" in args.parts:
        try:
            _reset_device_peak(device)
            mem.begin()
            reference = ReferenceRunner(w.bundle, manifest, device)
            for _ in range(args.warmup):
                reference.trajectory(z, labels, w.steps, args.ratio, args.cfg_scale)
            result["reference"] = {"status": "ok", "device": device,
                                   "memory": {"host": mem.end(), "device": reference.memory()}}
        except (FileNotFoundError, UserError) as e:
            result["reference"] = {"status": "skipped", "reason": str(e)}
            log(f"reference loop: skipped: {e}")

    if "e2e" in args.parts and (runners or reference):
        measure_e2e(result, runners, reference, z, labels, w.steps, args, log, gate)
    if reference is not None:
        reference.close()
    if "sweep" in args.parts:
        sweep_on = args.sweep_backends or list(runners)
        for kind in sweep_on:
            if kind in runners:
                result["backends"][kind]["ratio_sweep"] = measure_sweep(
                    runners[kind], z, labels, w.steps, args, len(manifest.models), log, gate)
    for r in runners.values():
        r.close()
    result["load_average"]["end"] = load_average()
    if args.wait_idle > 0:
        result["idle_gate"] = gate.report()
    result["targets"] = evaluate_targets(result)
    out = Path(args.out)
    write_outputs(result, out, plot=args.plot)
    log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    print(markdown_summary(result))
    missed = [t for t in result["targets"] if t["pass"] is False]
    return 1 if (args.check_targets and missed) else 0


def _command_line() -> str:
    """The command as typed, for the report (run_bench may also be called in-process, e.g. by tests)."""
    argv = sys.argv
    if "bench" in argv[1:] and Path(argv[0]).name in ("tstitch-trt", "cli.py", "__main__.py"):
        return "tstitch-trt " + " ".join(argv[argv.index("bench"):])
    return "tstitch-trt bench (called in-process)"


def _logger() -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    return log


def _torch_device(requested: str, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)  # the same thread count as every other backend
    device = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: torch sees no CUDA device (this torch: {torch.__version__})")
    if device.startswith("cuda"):
        # as the reference script does; applies to our torch backend too, so both run the same math
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _ort_has_cuda() -> bool:
    from tstitch_trt.runtime.ort_backend import ort_providers

    return "CUDAExecutionProvider" in ort_providers()


def _reset_device_peak(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _DEVICE_BASE["allocated"] = torch.cuda.memory_allocated()


_DEVICE_BASE = {"allocated": 0}  # torch's allocated bytes when the current section began


def _torch_device_memory() -> dict:
    """Peak torch CUDA allocation of the current section, beyond what earlier sections still hold."""
    import torch

    peak = torch.cuda.max_memory_allocated()
    return {"peak_allocated_mb": round(peak / 2**20, 1),
            "peak_allocated_added_mb": round((peak - _DEVICE_BASE["allocated"]) / 2**20, 1)}


def host_info(threads: int, device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cores": usable_cores(), "threads": threads,
                  "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        import onnxruntime  # type: ignore[import-untyped]

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
                log: Callable[[str], None], gate: IdleGate | None = None) -> None:
    """Round-robin repeats (reference, then each backend) so drifting load hits all alike."""
    order: list = ([reference] if reference is not None else []) + list(runners.values())
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
    if reference is not None:
        ref_runs = runs["reference"]
        ref_stats = stats([t.seconds for t in ref_runs])
        result["reference"]["e2e"] = {"seconds": ref_stats, "steps_per_model": ref_runs[0].steps_per_model}
    for name, trajs in runs.items():
        if name == "reference":
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


def evaluate_targets(result: dict) -> list[dict]:
    """The speed targets, checked on the min of repeats (see the module docstring)."""
    out = []
    be = result["backends"]
    ort = be.get("ort", {})
    if "speedup_vs_reference" in ort.get("e2e", {}):
        v = ort["e2e"]["speedup_vs_reference"]["min"]
        t = TARGETS["ort_speedup_vs_reference"]
        out.append({"target": f"ort end to end >= {t}x faster than the reference loop", "backend": "ort",
                    "value": round(v, 3), "median": round(ort["e2e"]["speedup_vs_reference"]["median"], 3),
                    "pass": v >= t})
    for name, e in be.items():
        sw = e.get("ratio_sweep")
        if sw and sw.get("status") == "ok":
            v = sw["max_abs_gap_pct"]["min"]
            t = TARGETS["ratio_gap_pct"]
            out.append({"target": f"stitched time within {t}% of the ideal line at every ratio", "backend": name,
                        "value": round(v, 2), "median": round(sw["max_abs_gap_pct"]["median"], 2), "pass": v <= t})
        t = TARGETS["host_overhead_pct"]
        for key, what in (("host_overhead_pct", "in the loop: step wall - engine"),
                          ("trajectory_overhead_pct", "whole trajectory: planning, upload, loop, read-back")):
            hp = e.get("e2e", {}).get(key)
            if hp:
                out.append({"target": f"host overhead < {t}% of the step time ({what})", "backend": name,
                            "value": round(hp["min"], 3), "median": round(hp["median"], 3), "pass": hp["min"] < t})
    return out


# --- outputs -------------------------------------------------------------------------------------
def write_outputs(result: dict, out: Path, plot: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "bench.json", json.dumps(result, indent=2, default=_json_default))
    _atomic_text(out / "bench.md", markdown_report(result))
    if plot:
        result.setdefault("plots", [])
        for p in write_plots(result, out):
            result["plots"].append(str(p))


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['min'] * scale:.{digits}f} / {s['median'] * scale:.{digits}f}"


def markdown_summary(result: dict) -> str:
    """The headline table (printed to the terminal)."""
    w = result["workload"]
    lines = [f"## {w['name']}: {' -> '.join(w['models'])}, DDIM {w['steps']} steps, batch {w['batch']}, "
             f"cfg {w['cfg_scale']}, ratio {w['ratio']} (min / median of {w['repeats']})", "",
             "| runner | device | end to end s | speedup vs reference | loop host overhead ms/step (% of step) "
             "| trajectory host overhead ms/step (%) | peak RSS added MB |",
             "|---|---|---|---|---|---|---|"]
    ref = result.get("reference") or {}
    if ref.get("status") == "ok" and "e2e" in ref:
        host = ref.get("memory", {}).get("host", {})
        lines.append(f"| reference loop (eager PyTorch) | {ref['device']} | {_ms(ref['e2e']['seconds'], digits=3)} "
                     f"| 1.00 | - | - | {host.get('peak_rss_added_mb', '-')} |")
    for name, e in result["backends"].items():
        if e.get("status") != "ok":
            lines.append(f"| {name} | - | skipped: {e.get('reason')} | | | | |")
            continue
        e2e = e.get("e2e", {})
        sp = e2e.get("speedup_vs_reference")
        sp_s = f"{sp['min']:.2f} / {sp['median']:.2f}" if sp else "-"
        cols = []
        for ms_key, pct_key in (("host_overhead_ms_per_step", "host_overhead_pct"),
                                ("trajectory_overhead_ms_per_step", "trajectory_overhead_pct")):
            ho, hp = e2e.get(ms_key), e2e.get(pct_key)
            cols.append(f"{_ms(ho, digits=3)} ({hp['min']:.3f}% / {hp['median']:.3f}%)" if ho and hp else "-")
        host = e.get("memory", {}).get("host", {})
        lines.append(f"| {name} | {e.get('device')} | {_ms(e2e.get('seconds'), digits=3)} | {sp_s} | {cols[0]} "
                     f"| {cols[1]} | {host.get('peak_rss_added_mb', '-')} |")
    if result.get("targets"):
        lines += ["", "| target | backend | value (min) | median | pass |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['backend']} | {t['value']} | {t['median']} | "
                         f"{'yes' if t['pass'] else 'NO'} |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    h, la = result["host"], result["load_average"]
    lines = ["# tstitch-trt benchmark", "", f"`{result['command']}`", "",
             f"- host: {h['cpu']}, {h['usable_cores']} usable cores, {h['threads']} threads"
             + (f", GPU {h['gpu']}" if h.get("gpu") else ""),
             f"- versions: onnxruntime {h.get('onnxruntime', '-')}, torch {h.get('torch', '-')}, numpy {h['numpy']}",
             f"- load average (1, 5, 15 min): start {la.get('start')}, end {la.get('end')}",
             f"- created {result['created']}"]
    if result.get("idle_gate"):
        g = result["idle_gate"]
        lines.append(f"- --wait-idle {g['max_wait_s']}: {g['waits']} timed runs waited {g['waited_s']} s in all for "
                     f"other processes to use < {g['busy_cores_threshold']} cores ({g['timeouts']} gave up waiting)")
    lines.append("")
    lines += [markdown_summary(result), ""]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    step_rows = []
    for name, e in result["backends"].items():
        for model, per_b in (e.get("step_ms") or {}).items():
            for b, s in per_b.items():
                step_rows.append(f"| {name} | {model} | {b} | {_ms(s['wall_ms'])} | {_ms(s.get('engine_ms'))} "
                                 f"| {s['gflops_at_min']} |")
    if step_rows:
        lines += ["", "## ms per step (min / median; CFG doubles the batch inside the step)", "",
                  "| backend | model | batch | wall ms | engine ms | GFLOP/s at min |", "|---|---|---|---|---|---|"]
        lines += step_rows
    for name, e in result["backends"].items():
        sw = e.get("ratio_sweep")
        if not sw or sw.get("status") != "ok":
            continue
        lines += ["", f"## {name}: time against the ratio (s, min / median) next to the ideal line", "",
                  "| ratio | small steps | measured s | ideal s | gap % |", "|---|---|---|---|---|"]
        for p in sw["points"]:
            lines.append(f"| {p['ratio']:.2f} | {p['small_steps']} | {_ms(p['seconds'], digits=3)} "
                         f"| {_pair(p['ideal_seconds'], 3)} "
                         f"| {_pair(p['gap_pct'], 2)} |")
    mem_rows = []
    for name, e in list(result["backends"].items()) + [("reference", result.get("reference") or {})]:
        m = e.get("memory")
        if m:
            host, dev = m.get("host", {}), m.get("device")
            mem_rows.append(f"| {name} | {host.get('rss_before_mb')} | {host.get('peak_rss_mb')} "
                            f"| {host.get('peak_rss_added_mb')} | {json.dumps(dev) if dev else '-'} |")
    if mem_rows:
        lines += ["", "## memory", "", "| runner | RSS before MB | peak RSS MB | peak added MB | device |",
                  "|---|---|---|---|---|"] + mem_rows
    return "\n".join(lines) + "\n"


def _pair(d: dict, digits: int) -> str:
    return f"{d['min']:.{digits}f} / {d['median']:.{digits}f}"


def write_plots(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the dev extra)") from None
    written = []
    sweeps = {n: e["ratio_sweep"] for n, e in result["backends"].items()
              if e.get("ratio_sweep", {}) and e["ratio_sweep"].get("status") == "ok"}
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, sw) in enumerate(sweeps.items()):
            r = [p["ratio"] for p in sw["points"]]
            color = f"C{i}"
            ax.plot(r, [p["seconds"]["min"] for p in sw["points"]], "o-", color=color, label=f"{name} measured (min)")
            ax.plot(r, [p["ideal_seconds"]["min"] for p in sw["points"]], "--", color=color, alpha=0.6,
                    label=f"{name} ideal line")
        ax.set_xlabel("ratio (share of steps on the small model)")
        ax.set_ylabel("seconds per trajectory")
        ax.set_title(f"{result['workload']['name']}: time against ratio")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "ratio_sweep.png"))
        plt.close(fig)
    bars = []
    ref = result.get("reference") or {}
    if ref.get("e2e"):
        bars.append(("reference", ref["e2e"]["seconds"]))
    bars += [(n, e["e2e"]["seconds"]) for n, e in result["backends"].items() if e.get("e2e")]
    if bars:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([b[0] for b in bars], [b[1]["median"] for b in bars], color="#999", label="median")
        ax.bar([b[0] for b in bars], [b[1]["min"] for b in bars], color="#36c", width=0.5, label="min")
        ax.set_ylabel("seconds per trajectory")
        ax.set_title("end to end")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "e2e.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


# --- quality (the demo pair's evaluator) -----------------------------------------------------------
def run_quality(args: argparse.Namespace) -> int:
    """FID / class accuracy / ms per image against the ratio: tstitch_trt.eval.quality on the demo pair."""
    from tstitch_trt.eval import quality

    if args.workload not in (None, "demo"):
        raise UserError(f"--quality scores digits with the demo pair's classifier; it does not apply to "
                        f"--workload {args.workload} (use --bundle DIR with a demo-style bundle, or no --workload)")
    bundle = resolve_bundle(args.bundle)
    if args.quality_images < 2:
        raise UserError(f"--quality-images must be >= 2 (a covariance needs two samples), got {args.quality_images}")
    ratios = args.ratios if args.ratios is not None else list(quality.DEFAULT_RATIOS)
    backend = args.backends[0] if args.backends else "auto"
    result = quality.quality_sweep(bundle, ratios, args.quality_images, backend=backend, steps=args.steps or 50,
                                   cfg_scale=args.cfg_scale, seed=args.seed, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = quality.write_quality_report(result, markdown_path=out / "quality.md", png_path=out / "quality.png",
                                           json_path=out / "quality.json")
    print(quality.quality_table(result))
    _logger()("wrote " + ", ".join(str(p) for p in written))
    if out / "quality.png" not in written:
        _logger()("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0
