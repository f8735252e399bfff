"""`tstitch-trt serve` with RAY_ADDRESS joins that cluster instead of starting Ray, and on SIGTERM removes
only its own application: the cluster keeps running (the test then stops it and requires it gone)."""

from __future__ import annotations

import time

import pytest

from serve_harness import RayCluster, Service, session_processes

pytestmark = pytest.mark.serve


def test_joins_the_cluster_and_leaves_it_running():
    cluster = RayCluster()
    try:
        before = {p.pid for p in cluster.processes()}
        svc = Service(["--bundle", "demo", "--replicas", "1"], cluster=cluster)
        try:
            svc.wait_healthy(1)
            status, _, body = svc.post({"class_labels": [4], "steps": 4})
            assert status == 200, body
            assert svc.replica_pids(), "no replica in the cluster's processes"
            own = [p.pid for p in session_processes(svc.proc.pid) if p.pid != svc.proc.pid]
            assert not own, f"the joining service started processes of its own: {own}"
        finally:
            code = svc.stop_joined()
        assert code == 0, svc.output()[-2000:]
        deadline = time.monotonic() + 60
        while svc.replica_pids() and time.monotonic() < deadline:  # our replicas go ...
            time.sleep(1)
        assert not svc.replica_pids()
        alive = {p.pid for p in cluster.processes()}
        assert before <= alive, "the service's shutdown stopped processes of the cluster it joined"  # ... it stays
    finally:
        left = cluster.stop()
    assert not left, f"processes of the cluster survived its stop: {left}"
