"""A `tstitch-trt serve` subprocess on loopback for the serve tests: start, talk HTTP, stop, prove cleanup.

Each test module starts ONE service (module-scoped fixture), in its own session: the cleanup check
requires every process of that session (all of Ray's, none of anyone else's) gone after SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

psutil = pytest.importorskip("psutil", reason="the serve tests need psutil (a Ray dependency)")
pytest.importorskip("ray.serve", reason="the serve tests need the serve extra: pip install -e '.[serve]'")

BLOCKER = Path(__file__).parent / "torch_blocker"
START_TIMEOUT_S = 240  # Ray's start plus the replicas' on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, args: list[str], block_torch: bool = True, cluster: RayCluster | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # short: Ray's socket paths must fit; a joined cluster's, so that its processes are ours to check
        self.ray_tmp = cluster.ray_tmp if cluster else tempfile.mkdtemp(prefix="tsr", dir="/tmp")
        self.blocker_log = Path(self.ray_tmp) / "torch-blocked-pids.txt"
        env = dict(os.environ, RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        if cluster:
            env["RAY_ADDRESS"] = cluster.address
        if block_torch:
            env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            env["TORCH_BLOCKER_LOG"] = str(self.blocker_log)
        self.log = open(Path(self.ray_tmp) / "serve.log", "w+")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "tstitch_trt.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.cluster = cluster

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: bytes | dict | None = None,
                timeout: float = 120.0) -> tuple[int, dict, bytes]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def post(self, body: bytes | dict, timeout: float = 120.0) -> tuple[int, dict, dict]:
        status, headers, raw = self.request("POST", "/v1/generate", body, timeout)
        return status, headers, json.loads(raw)

    def get_json(self, path: str) -> tuple[int, dict]:
        status, _, raw = self.request("GET", path, timeout=30)
        return status, json.loads(raw)

    def wait_healthy(self, replicas: int, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                status, body = self.get_json("/health")
                last = (status, body)
                if status == 200 and body.get("replicas_running") == replicas:
                    return body
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(1.0)
        raise AssertionError(f"service not healthy after {timeout} s (last: {last}):\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    # ------------------------------------------------------------------ processes
    # The service runs in its own session (start_new_session): every process Ray starts for it inherits
    # that session id (Ray does not call setsid), even once reparented to init. So "what this service
    # left behind" is exactly the live processes of its session, found by id, never by name.
    @property
    def session(self) -> int:
        return self.cluster.session if self.cluster else self.proc.pid

    def replica_pids(self) -> list[int]:
        return [p.pid for p in session_processes(self.session)
                if "ServeReplica:tstitch:Generator" in " ".join(_cmdline(p))]

    def stop(self) -> list[str]:
        """SIGTERM, as a user would; returns the processes of its session still alive afterwards (then
        kills them, so that nothing survives even when the check fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        left = wait_session_gone(self.session, timeout=30)
        self.log.close()
        if not self.cluster:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left

    def stop_joined(self) -> int:
        """SIGTERM a service that joined a cluster; the cluster must stay up. Returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=90)
        self.log.close()
        return code


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def session_processes(sid: int) -> list:
    """Live (non-zombie) processes of session `sid`, this test process excluded."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except OSError:
            continue
    return out


def wait_session_gone(sid: int, timeout: float) -> list[str]:
    """Wait for session `sid` to empty; describe and SIGKILL whatever is left (ours: we started it)."""
    deadline = time.monotonic() + timeout
    alive = session_processes(sid)
    while alive and time.monotonic() < deadline:
        time.sleep(1.0)
        alive = session_processes(sid)
    left = [f"{p.pid} {' '.join(_cmdline(p))[:100]}" for p in alive]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return left


class RayCluster:
    """`ray start --head --block` on loopback in its own session: a cluster for `serve` to join."""

    def __init__(self) -> None:
        self.ray_tmp = tempfile.mkdtemp(prefix="tsc", dir="/tmp")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        ray_cli = Path(sys.executable).parent / "ray"
        # token auth off for this throwaway loopback cluster (else the joining driver needs its token)
        env = dict(os.environ, RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)
        self.log = open(Path(self.ray_tmp) / "ray-start.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.session = self.proc.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._gcs_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ray start failed:\n{Path(self.log.name).read_text()[-2000:]}")
            time.sleep(1.0)

    def _gcs_up(self) -> bool:
        host, port = self.address.split(":")
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex((host, int(port))) == 0

    def processes(self) -> list:
        return session_processes(self.session)

    def stop(self) -> list[str]:
        """SIGTERM `ray start --block` (it stops its cluster), then require the session empty."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        left = wait_session_gone(self.session, timeout=30)
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left


def start_service(args: list[str], replicas: int, block_torch: bool = True) -> Service:
    svc = Service([*args, "--replicas", str(replicas)], block_torch=block_torch)
    try:
        svc.wait_healthy(replicas)
    except BaseException:
        svc.stop()
        raise
    return svc


def latents_of(body: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(body["latents"])), allow_pickle=False)


def png_of(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def browser_page(profile: Path) -> Iterator[Any]:
    """A page of Debian's chromium, headless, driven by Playwright (never playwright's own browser); skips, with
    the reason, where chromium or playwright is missing (scripts/test.sh installs both)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the browser-test extra (playwright)")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=chromium, headless=True,
                                                   args=CHROMIUM_FLAGS)
        try:
            yield ctx.new_page()
        finally:
            ctx.close()
