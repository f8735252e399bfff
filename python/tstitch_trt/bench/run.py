"""`tstitch-trt bench`: load the workload, open the runners, measure, write the reports."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path

from tstitch_trt.bench.args import PARTS
from tstitch_trt.bench.host import HostMemory, host_info, load_average, native_bf16, reset_device_peak, usable_cores
from tstitch_trt.bench.idle import IdleGate
from tstitch_trt.bench.log import logger
from tstitch_trt.bench.measure import measure_e2e, measure_steps, measure_sweep
from tstitch_trt.bench.quality import run_quality
from tstitch_trt.bench.report import markdown_summary, write_outputs
from tstitch_trt.bench.runners import OPENVINO_RUNNERS, BackendRunner, ReferenceRunner
from tstitch_trt.bench.targets import evaluate_targets
from tstitch_trt.bench.workloads import resolve_workload, start_latent, step_labels
from tstitch_trt.errors import UserError

SCHEMA = "tstitch-bench/1"
GPU_BACKENDS = ("trt", "trt-rtx")


def run_bench(args: argparse.Namespace) -> int:
    if args.quality:
        return run_quality(args)
    if args.cache_interval is not None:  # never accepted and ignored
        raise UserError("--cache-interval applies to --quality (FORA's quality sweep); the speed figures run "
                        "without caching: leave it out, or add --quality")
    if args.workload == "sd-bk-tiny-sd15":
        from tstitch_trt.bench.sd import run_sd_bench

        return run_sd_bench(args)
    log = logger()
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
    wanted = args.backends or default_backends(present)
    choices = [b for b in BACKEND_CHOICES if b != "auto"] + list(OPENVINO_RUNNERS)
    unknown = [b for b in wanted if b not in choices]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from {', '.join(dict.fromkeys(choices))}")
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
        "reference_bf16": None,
        "notes": list(w.notes),
    }
    if device.startswith("cuda"):
        result["notes"].append("torch on CUDA runs with TF32 matmuls allowed, as the reference script sets it")
    runners: dict[str, BackendRunner] = {}
    mem = HostMemory()
    gate = IdleGate(args.wait_idle)
    labels = step_labels(w.batch, manifest.num_classes)
    z = start_latent(args.seed, w.batch, manifest.latent_shape)
    log(f"workload {w.name}: {' -> '.join(m.name for m in manifest.models)}, {w.steps} DDIM steps, batch {w.batch}, "
        f"cfg {args.cfg_scale}, {threads} threads; load average {load_average()}")

    for kind in wanted:
        entry: dict = {}
        result["backends"][kind] = entry
        if (kind if kind not in OPENVINO_RUNNERS else "ort") not in present:
            entry.update(status="skipped", reason=f"not in the bundle (it has: {', '.join(present)})")
            continue
        why_not = openvino_unavailable(kind)
        if why_not:
            entry.update(status="skipped", reason=why_not)
            log(f"{kind}: skipped: {why_not}")
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
        reset_device_peak(device)
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
            reset_device_peak(device)
            mem.begin()
            reference = ReferenceRunner(w.bundle, manifest, device)
            for _ in range(args.warmup):
                reference.trajectory(z, labels, w.steps, args.ratio, args.cfg_scale)
            result["reference"] = {"status": "ok", "device": device,
                                   "memory": {"host": mem.end(), "device": reference.memory()}}
        except (FileNotFoundError, UserError) as e:
            result["reference"] = {"status": "skipped", "reason": str(e)}
            log(f"reference loop: skipped: {e}")
    reference_bf16 = None
    if reference is not None and not args.no_reference_bf16:
        if device == "cpu" and not native_bf16():
            result["reference_bf16"] = {"status": "skipped", "reason": "this CPU has no native bf16"}
        else:  # the reference loop with one torch.autocast(bf16) line: the second baseline
            reset_device_peak(device)
            mem.begin()
            reference_bf16 = ReferenceRunner(w.bundle, manifest, device, bf16=True, models=reference.models)
            for _ in range(args.warmup):
                reference_bf16.trajectory(z, labels, w.steps, args.ratio, args.cfg_scale)
            result["reference_bf16"] = {"status": "ok", "device": device,
                                        "memory": {"host": mem.end(), "device": reference_bf16.memory()}}

    if "e2e" in args.parts and (runners or reference):
        measure_e2e(result, runners, reference, z, labels, w.steps, args, log, gate, reference_bf16=reference_bf16)
    for ref in (reference, reference_bf16):
        if ref is not None:
            ref.close()
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


def default_backends(present: list[str]) -> list[str]:
    """The bundle's backends, plus OpenVINO fp32 and bf16 beside ort where openvino is installed."""
    out = list(present)
    if "ort" in present and importlib.util.find_spec("openvino") is not None:
        i = out.index("ort") + 1
        out[i:i] = [k for k in OPENVINO_RUNNERS if not openvino_unavailable(k)]
    return out


def openvino_unavailable(kind: str) -> str | None:
    """Why OpenVINO runner `kind` cannot run here, or None."""
    if kind not in OPENVINO_RUNNERS:
        return None
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'tstitch-trt[openvino]')"
    if OPENVINO_RUNNERS[kind] == "bf16" and not native_bf16():
        return "this CPU has no native bf16 (AVX512_BF16 / AMX)"
    return None


def _command_line() -> str:
    """The command as typed, for the report (run_bench may also be called in-process, e.g. by tests)."""
    argv = sys.argv
    if "bench" in argv[1:] and Path(argv[0]).name in ("tstitch-trt", "__main__.py"):
        return "tstitch-trt " + " ".join(argv[argv.index("bench"):])
    return "tstitch-trt bench (called in-process)"




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
