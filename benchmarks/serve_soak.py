"""Soak of `tstitch-trt serve` with hostile input mixed in (issue 22): N requests, good and bad interleaved, on
loopback, bounded concurrency; every good request must be answered 200 with the same latents as the first
answer for its seed, every bad one 400 with one JSON line; the replica's and the ingress's RSS are read
before (after a warm-up) and after.

    python benchmarks/serve_soak.py --bundle BUNDLE --requests 2000 --out bench-out/soak.json

Starts its own service on 127.0.0.1 (never another address) and stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

HOST = "127.0.0.1"
DEEP = "[" * 100_000 + "]" * 100_000
BAD = [  # the classes of issue 22, as raw bodies
    '{"prompt": "a", "seed": -1}',
    '{"prompt": "a", "seed": ' + "7" * 5000 + "}",
    '{"prompt": "a \\udcff"}',
    '{"prompt": "a", "cfg_scale": NaN}',
    '{"prompt": "a", "cfg_scale": 1e308}',
    '{"prompt": "a", "fractions": [NaN, 1.0]}',
    '{"prompt": "a", "sampler": "ddim", "eta": -1.0}',
    '{"prompt": "a", "sampler": "pndm", "eta": 0.5}',
    '{"prompt": "a", "sampler": "pndm", "steps": 1000}',
    DEEP,
    '{"prompt": ' + DEEP + "}",
    json.dumps({"prompt": "x" * (1 << 20)}),
    json.dumps({"y" * (1 << 20): 1}),
]
SEEDS = (1, 2, 3, 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/generate", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rss_mb(session: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) != session:
                continue
            cmd = " ".join(p.cmdline())
            for role in ("Generator", "Ingress"):
                if f"ServeReplica:tstitch:{role}" in cmd:
                    out[role] = round(p.memory_info().rss / 2**20, 1)
        except (psutil.Error, OSError):
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=200, help="good requests before RSS is first read")
    ap.add_argument("--out", default="bench-out/soak.json")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="tss", dir="/tmp")
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tstitch_trt.cli", "serve", "--host", HOST, "--port", str(port),
                             "--bundle", args.bundle, "--backend", "ort", "--replicas", "1", "--max-batch-size", "4",
                             "--batch-wait-ms", "20"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=10) as r:
                    if r.status == 200:
                        break
            except (OSError, ValueError):
                time.sleep(1)

        def good(seed: int) -> bytes:
            return json.dumps({"prompt": f"soak {seed}", "seed": seed, "steps": args.steps,
                               "return_latents": True}).encode()

        reference: dict[int, np.ndarray] = {}
        for s in SEEDS:  # the reference answer per seed, alone
            status, body = post(url, good(s))
            assert status == 200, body
            reference[s] = np.load(io.BytesIO(base64.b64decode(body["latents"])), allow_pickle=False)
        # warm-up at the soak's concurrency: every batch size the engines will see, so that the runtime's arenas
        # have grown to their working size before "before" is read
        with ThreadPoolExecutor(args.concurrency) as ex:
            list(ex.map(lambda i: post(url, good(SEEDS[i % len(SEEDS)])), range(args.warmup)))
        time.sleep(2)
        before = rss_mb(proc.pid)
        plan = [("bad", BAD[i // 2 % len(BAD)].encode("utf-8", "surrogatepass")) if i % 2 else
                ("good", SEEDS[i // 2 % len(SEEDS)]) for i in range(args.requests)]

        def one(item):
            kind, x = item
            if kind == "good":
                status, body = post(url, good(x))
                if status != 200:
                    return "good-failed", status
                got = np.load(io.BytesIO(base64.b64decode(body["latents"])), allow_pickle=False)
                return ("good-ok" if np.array_equal(got, reference[x]) and body["images"] else "good-wrong"), status
            status, body = post(url, x)
            ok = status == 400 and isinstance(body.get("error"), str) and "\n" not in body["error"] \
                and len(body["error"]) < 600
            return ("bad-400" if ok else "bad-other"), status

        t0 = time.monotonic()
        results = []
        trend = []  # RSS after each quarter: growth shows as a rising line, not just two numbers
        quarter = max(1, len(plan) // 4)
        with ThreadPoolExecutor(args.concurrency) as ex:
            for start in range(0, len(plan), quarter):
                results += list(ex.map(one, plan[start:start + quarter]))
                trend.append(rss_mb(proc.pid))
        seconds = time.monotonic() - t0
        time.sleep(2)
        after = rss_mb(proc.pid)
        counts: dict[str, int] = {}
        for r, _ in results:
            counts[r] = counts.get(r, 0) + 1
        report = {"requests": args.requests, "concurrency": args.concurrency, "steps": args.steps,
                  "seconds": round(seconds, 1), "counts": counts, "warmup": args.warmup, "rss_mb_before": before,
                  "rss_mb_per_quarter": trend, "rss_mb_after": after,
                  "bundle": args.bundle}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return 0 if set(counts) <= {"good-ok", "bad-400"} else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
