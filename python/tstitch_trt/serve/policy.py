"""Load-adaptive stitching: move early steps to the small model while requests wait too long.

T-Stitch trades a little quality for speed smoothly through one number, the ratio (share of early
steps on the small model). Under load the service raises it, up to the largest ratio the bundle's
quality curve allows (--max-ratio), and lowers it again as the queue drains. Only requests that leave
ratio and fractions out follow the policy; a request that names its ratio gets exactly that.
"""

from __future__ import annotations

from collections import deque


class AdaptiveRatio:
    """Ratio in [0, max_ratio] in steps of `step`, moved by the mean latency of the last `window` requests.

    Above the target: one step up. Below half the target: one step down (the gap avoids flapping).
    Each move waits for `window` fresh observations, so one batch's results move it at most once.
    """

    def __init__(self, latency_target_ms: float, max_ratio: float, step: float = 0.1, window: int = 4):
        if latency_target_ms <= 0:
            raise ValueError(f"latency target must be > 0 ms, got {latency_target_ms}")
        if not 0.0 <= max_ratio <= 1.0:
            raise ValueError(f"max ratio must be in [0, 1], got {max_ratio}")
        self.target_ms = latency_target_ms
        self.max_ratio = max_ratio
        self.step = step
        self.window = window
        self._level = 0  # ratio = level * step, quantized so that requests keep batching together
        self._recent: deque[float] = deque(maxlen=window)

    @property
    def ratio(self) -> float:
        return round(min(self._level * self.step, self.max_ratio), 6)

    def observe(self, latency_ms: float) -> None:
        self._recent.append(latency_ms)
        if len(self._recent) < self.window:
            return
        mean = sum(self._recent) / len(self._recent)
        if mean > self.target_ms and self.ratio < self.max_ratio:
            self._level += 1
        elif mean < 0.5 * self.target_ms and self._level > 0:
            self._level -= 1
        else:
            return
        self._recent.clear()
