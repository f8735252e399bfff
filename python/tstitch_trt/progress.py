"""Progress of long stages (exports, engine builds): one line per stage with its elapsed time and the
process's peak resident memory so far (real-size builds are memory-bound: the figure says which stage
set the peak).

On a terminal the current stage's line ticks its elapsed seconds while it runs (exports take
20 s and more, engine builds minutes); elsewhere (logs, CI) each stage prints one finished line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (0 where the OS does not report it)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports kB, macOS bytes


class Stages:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None, tick_seconds: float = 0.5):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.tick_seconds = tick_seconds
        self.count = 0
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()

    @property
    def total_seconds(self) -> float:
        return time.perf_counter() - self._t0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time `name`; print it when done (and tick it on a terminal while it runs)."""
        self.count += 1
        label = f"[{self.count}] {name}"
        t0 = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.live:
            def tick() -> None:
                while not stop.wait(self.tick_seconds):
                    self.stream.write(f"\r{label} ... {time.perf_counter() - t0:.0f} s")
                    self.stream.flush()

            self.stream.write(f"{label} ...")
            self.stream.flush()
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            elapsed = time.perf_counter() - t0
            self.seconds[name] = elapsed
            end = "\r" if self.live else ""
            rss = peak_rss_bytes()
            memory = f", peak RSS {rss / 2**30:.2f} GB" if rss else ""
            self.stream.write(f"{end}{label} {'done' if ok else 'failed'} in {elapsed:.1f} s{memory}\n")
            self.stream.flush()
