"""`tstitch-trt serve`: start (or join) Ray, deploy the application, block, shut down cleanly on a signal."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

from tstitch_trt.demo import DEMO_NAME
from tstitch_trt.errors import UserError
from tstitch_trt.serve.config import ServeConfig

KEEP_ALIVE_S = 5  # uvicorn's own default


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    from tstitch_trt.argtypes import int_in, non_negative, positive, unit

    s.add_argument("--bundle", default=DEMO_NAME, help="bundle directory, or 'demo'")
    s.add_argument("--backend", default="auto", help="auto, trt, trt-rtx, ort, openvino, torch")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="openvino (CPU): bf16 or fp32 per part; auto: bf16 where the bundle records it as safe on "
                        "this CPU's bf16 ISA (as run --precision)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless you mean otherwise)")
    s.add_argument("--port", type=int_in(1, 65535), default=8000, help="HTTP port")
    s.add_argument("--replicas", type=int_in(1, 1024), default=None,
                   help="engine replicas (default: one per GPU, else one per --cores-per-replica)")
    s.add_argument("--cores-per-replica", type=int_in(1, 1024), default=4, help="CPU cores per replica without a GPU")
    s.add_argument("--max-batch-size", type=int_in(1, 65536), default=32,
                   help="images per engine batch and per request (1: no batching)")
    s.add_argument("--batch-wait-ms", type=non_negative, default=10.0,
                   help="how long an idle engine waits to fill a batch")
    s.add_argument("--max-queued", type=int_in(1, 1_000_000), default=64,
                   help="queued requests beyond that answer 503")
    s.add_argument("--request-timeout-s", type=positive, default=60.0, help="slower requests answer 504")
    s.add_argument("--body-timeout-s", type=positive, default=10.0,
                   help="a request body that has not arrived whole by then answers 408 and its connection is closed")
    s.add_argument("--latency-target-ms", type=positive, default=None,
                   help="load-adaptive stitching: raise the ratio while latency exceeds this (default: off)")
    s.add_argument("--max-ratio", type=unit, default=0.4, help="the highest ratio the adaptive policy uses")


def replica_resources(replicas: int | None, cores_per_replica: int) -> tuple[int, float, float]:
    """(replicas, cpus, gpus) per replica: one per GPU, else one per `cores_per_replica` cores."""
    from tstitch_trt.runtime.cuda import device_count

    gpus = device_count()
    cores = os.cpu_count() or 1
    if replicas is None:
        replicas = gpus if gpus else max(1, cores // cores_per_replica)
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    if gpus:
        if replicas > gpus:
            raise UserError(f"--replicas {replicas} but {gpus} GPU(s) are visible; one replica per GPU")
        return replicas, 1.0, 1.0
    # CPU: share the cores (fractions let more replicas than cores start; they then share CPUs)
    return replicas, round(min(float(cores_per_replica), cores / replicas), 3), 0.0


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def service_config(args: argparse.Namespace) -> ServeConfig:
    """Check the flags (one line each) and size the replicas; raises UserError."""
    import importlib.util

    try:  # find_spec, not import: importing Ray Serve takes seconds, and a flag error should not wait
        missing = importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None
    except (ImportError, ValueError):  # ValueError: a module blocked as sys.modules[name] = None
        missing = True
    if missing:
        raise UserError("serve needs Ray Serve: pip install 'tstitch-trt[serve]'")
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queued", args.max_queued, 0),
                             ("--cores-per-replica", args.cores_per_replica, 1), ("--port", args.port, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise UserError(f"--port must be <= 65535, got {args.port}")
    if args.request_timeout_s <= 0 or args.batch_wait_ms < 0 or args.body_timeout_s <= 0:
        raise UserError("--request-timeout-s and --body-timeout-s must be > 0 and --batch-wait-ms >= 0")
    if not 0.0 <= args.max_ratio <= 1.0:
        raise UserError(f"--max-ratio must be in [0, 1], got {args.max_ratio}")
    if args.latency_target_ms is not None and args.latency_target_ms <= 0:
        raise UserError(f"--latency-target-ms must be > 0, got {args.latency_target_ms}")
    replicas, cpus, gpus = replica_resources(args.replicas, args.cores_per_replica)
    return ServeConfig(bundle=str(args.bundle), backend=args.backend, precision=args.precision, replicas=replicas,
                       cpus_per_replica=cpus,
                       gpus_per_replica=gpus, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                       max_queued=args.max_queued, request_timeout_s=args.request_timeout_s,
                       body_timeout_s=args.body_timeout_s,
                       latency_target_ms=args.latency_target_ms, max_ratio=args.max_ratio)


def serve_forever(cfg: ServeConfig, host: str, port: int) -> int:
    """Deploy and block until SIGINT / SIGTERM; then delete the app, stop Serve and (if ours) Ray."""
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.demo import resolve_bundle
    from tstitch_trt.pipeline.backends import backend_candidates
    from tstitch_trt.serve.requests import pipeline_kind

    manifest = read_manifest(resolve_bundle(cfg.bundle))  # a bad bundle or backend fails here, before Ray starts
    pipeline_kind(manifest)
    for kind, _ in backend_candidates(manifest, cfg.backend, cfg.precision):
        if cfg.precision == "bf16" and kind != "openvino":  # refused here, in one line, before Ray starts
            raise UserError(f"--precision bf16 is for --backend openvino (CPU); {kind} runs its engines' own precision")
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        check_port_free(host, port)

    import ray
    from ray import serve

    from tstitch_trt.serve.app import APP_NAME, build_app

    stop = threading.Event()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, namespace="tstitch-serve",
                 configure_logging=False)
    except ConnectionError as e:  # RAY_ADDRESS names a cluster that is down, or refuses us (auth token)
        raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {str(e).splitlines()[0]}") from None
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        # idle keep-alive connections are closed after KEEP_ALIVE_S (Ray's default keeps them 90 s)
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_S})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        print(f"serving {cfg.bundle} on http://{host}:{port} ({cfg.replicas} replica(s), max batch "
              f"{cfg.max_batch_size}, max queued {cfg.max_queued}); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping ...", flush=True)
    finally:
        if address is None:
            serve.shutdown()  # our own Ray: stop Serve entirely
        else:
            serve.delete(APP_NAME)  # a shared cluster: remove only our application
        ray.shutdown()
    return 0
