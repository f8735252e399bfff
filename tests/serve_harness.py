"""A `tstitch-trt serve` subprocess on loopback for the serve tests: start, talk HTTP, stop, prove cleanup.

Each test module starts ONE service (module-scoped fixture). Ray gets its own short temp dir, so the
cleanup check can name every Ray process of this service (and no one else's) and require them gone.
"""

from __future__ import annotations

import base64
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
from pathlib import Path

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
        self.ray_pids: set[int] = set()

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
    def record_ray_processes(self) -> None:
        """Everything this service started: the driver's descendants and any process naming our temp dir."""
        try:
            self.ray_pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        self.ray_pids |= {p.pid for p in self._naming_tmp()}

    def _naming_tmp(self) -> list:
        return processes_naming(self.ray_tmp)

    def replica_pids(self) -> list[int]:
        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "ServeReplica:tstitch:Generator" in cmd and p.pid in self._family():
                pids.append(p.pid)
        return pids

    def _family(self) -> set[int]:
        self.record_ray_processes()
        return self.ray_pids

    def stop(self) -> list[str]:
        """SIGTERM, as a user would; returns the processes still alive afterwards (then kills them)."""
        self.record_ray_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        deadline = time.monotonic() + 30
        alive = []
        while time.monotonic() < deadline:
            alive = [p for p in self._alive(self.ray_pids | {p.pid for p in self._naming_tmp()})]
            if not alive:
                break
            time.sleep(1.0)
        left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive if _safe_cmd(p)]
        for p in alive:  # ours: make sure nothing survives even when the check fails
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left

    def stop_joined(self) -> int:
        """SIGTERM a service that joined a cluster; the cluster must stay up. Returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=90)
        self.log.close()
        return code

    @staticmethod
    def _alive(pids: set[int]) -> list:
        out = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out


def processes_naming(ray_tmp: str) -> list:
    """Live processes whose command line or RAY_TMPDIR names this temp dir (all of one Ray instance)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["environ"] or {}).get("RAY_TMPDIR", "")
        except (psutil.Error, TypeError):
            continue
        if ray_tmp in text and p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


class RayCluster:
    """`ray start --head` on loopback with its own temp dir: a cluster for `serve` to join (RAY_ADDRESS)."""

    def __init__(self) -> None:
        self.ray_tmp = tempfile.mkdtemp(prefix="tsc", dir="/tmp")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        ray_cli = Path(sys.executable).parent / "ray"
        # token auth off for this throwaway loopback cluster (else the joining driver needs its token)
        env = dict(os.environ, RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)
        subprocess.run([str(ray_cli), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)

    def processes(self) -> list:
        return processes_naming(self.ray_tmp)

    def stop(self) -> list[str]:
        """Terminate this cluster's processes by pid (never `ray stop`, which ends every Ray on the machine)."""
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        left = [f"{p.pid}" for p in self.processes()]
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left


def _safe_cmd(p) -> bool:
    try:
        p.cmdline()
        return True
    except psutil.Error:
        return False


def start_service(args: list[str], replicas: int, block_torch: bool = True) -> Service:
    svc = Service([*args, "--replicas", str(replicas)], block_torch=block_torch)
    try:
        svc.wait_healthy(replicas)
    except BaseException:
        svc.stop()
        raise
    svc.record_ray_processes()
    return svc


def latents_of(body: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(body["latents"])), allow_pickle=False)


def png_of(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
