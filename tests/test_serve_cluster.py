"""`tstitch-trt serve` with RAY_ADDRESS joins that cluster instead of starting Ray, and on SIGTERM removes
only its own application: the cluster keeps running (and this test then ends it, by pid)."""

from __future__ import annotations

import time

import pytest

from serve_harness import RayCluster, Service

pytestmark = pytest.mark.serve


def test_joins_the_cluster_and_leaves_it_running():
    cluster = RayCluster()
    try:
        before = {p.pid for p in cluster.processes()}
        assert before, "ray start left no process naming its temp dir"
        svc = Service(["--bundle", "demo", "--replicas", "1"], cluster=cluster)
        try:
            svc.wait_healthy(1)
            status, _, body = svc.post({"class_labels": [4], "steps": 4})
            assert status == 200, body
            # the service started no Ray of its own: its replicas run under the cluster's raylet
            assert svc.replica_pids(), "no replica process found"
        finally:
            code = svc.stop_joined()
        assert code == 0, svc.output()[-2000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # our replicas go; the cluster's own processes stay
            names = [" ".join(p.cmdline()) for p in cluster.processes()]
            if not any("ServeReplica:tstitch" in n for n in names):
                break
            time.sleep(1)
        alive = {p.pid for p in cluster.processes()}
        assert not any("ServeReplica:tstitch" in " ".join(p.cmdline()) for p in cluster.processes())
        assert before <= alive, "the service's shutdown stopped processes of the cluster it joined"
    finally:
        left = cluster.stop()
    assert not left, left
