"""A/B of ONNX Runtime's thread-pool spinning at the stitch switch (see RESULTS.md, "ORT: stop the idle
session spinning").

    python benchmarks/ort_spinning.py --bundle demo --steps 50 --batch 8 --repeats 5 --rounds 2

Each round runs both settings, each in a fresh process (old: the pools spin after a run, ORT's
default; new: `session.force_spinning_stop = 1`, what runtime/ort_backend.py sets). A process warms
up, then samples ratios 0 / 0.4 / 1 in turn `--repeats` times and prints the min and median of each
and the gap at 0.4 to the ideal line (1 - 0.4) T(0) + 0.4 T(1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

RATIOS = (0.0, 0.4, 1.0)


def measure(bundle: str, spinning: bool, steps: int, batch: int, repeats: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from tstitch_trt.demo import resolve_bundle
    from tstitch_trt.pipeline.dit import StitchedPipeline

    base = ort.SessionOptions

    class Options(base):  # drop the backend's setting to measure ORT's default
        def add_session_config_entry(self, key: str, value: str) -> None:
            if not (spinning and key == "session.force_spinning_stop"):
                super().add_session_config_entry(key, value)

    ort.SessionOptions = Options
    pipe = StitchedPipeline.from_bundle(resolve_bundle(bundle), backend="ort")
    labels = [i % pipe.manifest.num_classes for i in range(batch)]
    try:
        pipe(labels, ratio=0.4, steps=steps, seed=0, progress=False)  # warm-up
        runs: dict[float, list[float]] = {r: [] for r in RATIOS}
        for _ in range(repeats):
            for r in RATIOS:
                runs[r].append(pipe(labels, ratio=r, steps=steps, seed=0, progress=False).report["total_seconds"])
    finally:
        pipe.close()
    out = {"setting": "spinning (ORT default)" if spinning else "force_spinning_stop"}
    for stat, f in (("min", min), ("median", lambda v: float(np.median(v)))):
        t = {r: f(v) for r, v in runs.items()}
        ideal = 0.6 * t[0.0] + 0.4 * t[1.0]
        out[stat] = {**{str(r): round(v, 4) for r, v in t.items()}, "gap_pct_0.4": round(100 * (t[0.4] / ideal - 1), 2)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="demo")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=["spinning", "stop"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.bundle, a.child == "spinning", a.steps, a.batch, a.repeats)))
        return 0
    for _ in range(a.rounds):
        for child in ("spinning", "stop"):
            cmd = [sys.executable, __file__, "--child", child, "--bundle", a.bundle, "--steps", str(a.steps),
                   "--batch", str(a.batch), "--repeats", str(a.repeats)]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
