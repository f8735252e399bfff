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

This package imports without torch; torch is imported only for the torch backend and the reference.

Modules (one purpose each): args (the command line), workloads (what runs), runners (our backends
and the reference loop), measure (the figures), targets, report (JSON, Markdown), plots, quality
(--quality), host (machine facts, memory), idle (--wait-idle), run (the command).
"""

from __future__ import annotations

from tstitch_trt.bench.args import add_bench_arguments
from tstitch_trt.bench.idle import IdleGate
from tstitch_trt.bench.measure import measure_sweep, stats, sweep_ratios
from tstitch_trt.bench.run import run_bench
from tstitch_trt.bench.runners import Trajectory, load_reference_loop
from tstitch_trt.bench.targets import evaluate_targets

__all__ = ["IdleGate", "Trajectory", "add_bench_arguments", "evaluate_targets", "load_reference_loop",
           "measure_sweep", "run_bench", "stats", "sweep_ratios"]
