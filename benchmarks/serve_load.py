"""Loopback load test of `tstitch-trt serve` on the demo pair: images/s and p50/p95 latency against
concurrency, batching on and off, and the load-adaptive stitch ratio off and on.

    python benchmarks/serve_load.py --out bench-out/serve --plot docs/serve_load.png

Starts each service itself on 127.0.0.1 (never any other address), runs a closed-loop ramp (each of
`c` clients sends its next request when the last one is answered), and stops: every level is bounded
by --seconds-per-level and --max-requests-per-level, and every service is stopped with SIGTERM.

Configurations (one service each for the first two flags sets, requests differ):
  batching off      --max-batch-size 1,   ratio 0.4 in every request
  batching on       --max-batch-size 16,  ratio 0.4
  policy off        --max-batch-size 16,  ratio 0.0 (large model only: the best quality, the slowest)
  policy on         --max-batch-size 16 --latency-target-ms L --max-ratio 0.4, ratio left to the service
With the policy on, the quality cost is measured at the ratios it chose with the demo pair's evaluator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only, on purpose: this tool generates load


class LocalService:
    def __init__(self, port: int, flags: list[str], log: Path):
        self.url = f"http://{HOST}:{port}"
        self.tmp = tempfile.mkdtemp(prefix="tsl", dir="/tmp")  # Ray's own temp dir: short socket paths
        env = dict(os.environ, RAY_TMPDIR=self.tmp, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)  # never join a cluster: this starts and stops its own Ray
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "tstitch_trt.cli", "serve", "--host", HOST,
                                      "--port", str(port), "--replicas", "1", *flags],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
                    if r.status == 200:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"serve not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_level(url: str, body: dict, concurrency: int, seconds: float, max_requests: int) -> dict:
    """Closed loop: `concurrency` clients, each sending back-to-back until the time or request budget ends."""
    results: list[dict] = []
    lock = threading.Lock()
    issued = [0]
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        seed = 1000 * k
        while time.monotonic() < stop_at:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
            seed += 1
            t0 = time.monotonic()
            try:
                status, out = post(url, dict(body, seed=seed), timeout=300)
            except OSError as e:
                status, out = -1, {"error": repr(e)}
            rec = {"status": status, "latency_s": time.monotonic() - t0}
            if status == 200:
                rep = out["report"]
                rec.update(images=rep["batch"], ratio=rep["ratio"], batch_size=rep["batch_size"],
                           queue_ms=rep["queue_ms"], compute_ms=rep["compute_ms"])
            with lock:
                results.append(rec)

    t_start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency_s"] for r in ok]) * 1e3
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 2),
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "images_per_s": round(sum(r["images"] for r in ok) / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "mean_batch": round(float(np.mean([r["batch_size"] for r in ok])), 2) if ok else None,
        "ratios": dict(Counter(str(r["ratio"]) for r in ok)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/serve", help="directory for results.json and the service logs")
    p.add_argument("--plot", default=None, help="PNG to draw (e.g. docs/serve_load.png)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--levels", default="1,4,16,64", help="concurrency ramp")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seconds-per-level", type=float, default=20.0)
    p.add_argument("--max-requests-per-level", type=int, default=400)
    p.add_argument("--latency-target-ms", type=float, default=1000.0)
    p.add_argument("--quality-images", type=int, default=200, help="evaluator images per chosen ratio (0: skip)")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw --plot from an earlier results.json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.plot or "serve_load.png"))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(v) for v in args.levels.split(",")]
    base = {"class_labels": [7], "steps": args.steps}  # one image per request
    queue = str(2 * max(levels))  # no 503s in this test: it measures latency, not rejection
    services = [
        ("B1", ["--max-batch-size", "1", "--max-queued", queue], [("batching off", {"ratio": 0.4})]),
        ("B16", ["--max-batch-size", "16", "--max-queued", queue],
         [("batching on", {"ratio": 0.4}), ("policy off", {"ratio": 0.0})]),
        ("B16-adaptive", ["--max-batch-size", "16", "--max-queued", queue, "--latency-target-ms",
                          str(args.latency_target_ms), "--max-ratio", "0.4"], [("policy on", {})]),
    ]
    results = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "steps": args.steps, "levels": levels, "latency_target_ms": args.latency_target_ms, "configs": {}}
    for name, flags, configs in services:
        svc = LocalService(args.port, flags, out / f"serve-{name}.log")
        try:
            svc.wait_ready()
            for _ in range(3):  # warm-up: the first calls allocate
                post(svc.url, dict(base, ratio=0.4), timeout=120)
            for label, extra in configs:
                rows = []
                for c in levels:
                    row = run_level(svc.url, dict(base, **extra), c, args.seconds_per_level,
                                    args.max_requests_per_level)
                    print(f"{label:13s} c={c:3d}: {row['images_per_s']:7.2f} img/s  p50 {row['p50_ms']} ms  "
                          f"p95 {row['p95_ms']} ms  batch {row['mean_batch']}  ratios {row['ratios']}  "
                          f"{row['statuses']}", flush=True)
                    rows.append(row)
                results["configs"][label] = {"flags": flags, "request": dict(base, **extra), "levels": rows}
        finally:
            svc.stop()
    if args.quality_images:
        results["quality"] = quality_at_chosen_ratios(results["configs"]["policy on"]["levels"],
                                                      args.quality_images, args.steps)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")
    if args.plot:
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def quality_at_chosen_ratios(rows: list[dict], images: int, steps: int) -> dict:
    """The demo pair's evaluator (class accuracy, Frechet distance) at every ratio the policy used."""
    from tstitch_trt.demo import demo_bundle_dir
    from tstitch_trt.eval.quality import quality_sweep

    chosen: Counter = Counter()
    for row in rows:
        chosen.update({float(k): v for k, v in row["ratios"].items()})
    ratios = sorted(set(chosen) | {0.0})
    sweep = quality_sweep(demo_bundle_dir(), ratios, images, backend="ort", steps=steps)
    points = {p["ratio"]: {"fid": round(p["fid"], 2), "accuracy": p["accuracy"]} for p in sweep["points"]}
    total = sum(chosen.values())
    mean_fid = sum(points[r]["fid"] * n for r, n in chosen.items()) / total
    return {"images_per_ratio": images, "requests_per_ratio": {str(k): v for k, v in sorted(chosen.items())},
            "points": {str(k): v for k, v in points.items()}, "request_weighted_fid": round(mean_fid, 2),
            "fid_large_only": points[0.0]["fid"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend = {"batching off": "batching off (max batch 1), ratio 0.4", "batching on": "batching on (16), ratio 0.4",
              "policy off": "batching on, ratio 0 (large model only)",
              "policy on": f"batching on, adaptive ratio 0-0.4 (target {results.get('latency_target_ms', 0):g} ms)"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, cfg in results["configs"].items():
        xs = [r["concurrency"] for r in cfg["levels"]]
        a.plot(xs, [r["images_per_s"] for r in cfg["levels"]], marker="o", label=legend.get(label, label))
        b.plot(xs, [r["p95_ms"] for r in cfg["levels"]], marker="o", label=label)
    for ax, title in ((a, "throughput (images / s)"), (b, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.set_ylim(bottom=0)
    b.set_yscale("log")
    a.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"tstitch-trt serve, demo pair, DDIM {results['steps']} steps, 1 replica, loopback")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
