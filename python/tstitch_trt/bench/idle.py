"""Waiting for a shared machine's CPUs to go idle before a timed run (--wait-idle)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class IdleGate:
    """Waits, before a timed run, until processes other than this one leave the CPUs (nearly) idle.

    On a shared machine one busy neighbour makes 2-thread OpenMP code stall at every barrier, which
    swamps the differences being measured. Other processes' load is this machine's busy time
    (/proc/stat) minus this process's own (/proc/self/stat), sampled over `window` seconds.
    """

    def __init__(self, max_wait_s: float, busy_cores: float = 0.25, window: float = 1.0):
        self.max_wait_s = max_wait_s
        self.busy_cores = busy_cores
        self.window = window
        self.waits = self.timeouts = 0
        self.waited_s = 0.0

    def wait(self) -> None:
        if self.max_wait_s <= 0:
            return
        t0 = time.perf_counter()
        while True:
            busy = self.others_busy_cores()
            if busy is None or busy < self.busy_cores:
                break
            if time.perf_counter() - t0 > self.max_wait_s:
                self.timeouts += 1
                break
        self.waits += 1
        self.waited_s += time.perf_counter() - t0

    def others_busy_cores(self) -> float | None:
        a = self._sample()
        time.sleep(self.window)
        b = self._sample()
        if a is None or b is None or b[0] <= a[0]:
            return None
        total, busy, own = (y - x for x, y in zip(a, b, strict=True))
        return max(busy - own, 0) / (total / (os.cpu_count() or 1))

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        return sum(cpu[:8]), sum(cpu[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime

    def report(self) -> dict:
        return {"max_wait_s": self.max_wait_s, "busy_cores_threshold": self.busy_cores, "waits": self.waits,
                "timeouts": self.timeouts, "waited_s": round(self.waited_s, 1)}
