"""The machine: CPU, versions, load, usable cores, peak host and torch device memory."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512_BF16 or AMX; Linux /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class HostMemory:
    """Peak resident memory of this process over a section (Linux: VmHWM reset via clear_refs)."""

    def __init__(self) -> None:
        self.resettable = True
        self.start_mb = 0.0

    def begin(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (Linux >= 4.0)
        except OSError:
            self.resettable = False
        self.start_mb = self._status("VmRSS") or 0.0

    def end(self) -> dict:
        peak = self._status("VmHWM")
        note = None
        if peak is None or not self.resettable:  # process-wide high-water mark since start
            import resource

            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = ru / 1024 if sys.platform != "darwin" else ru / 2**20
            note = "process-wide peak since start (the peak could not be reset per section)"
        out: dict[str, object] = {"rss_before_mb": round(self.start_mb, 1), "peak_rss_mb": round(peak, 1),
               "peak_rss_added_mb": round(max(peak - self.start_mb, 0.0), 1)}
        if note:
            out["note"] = note
        return out

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None

def reset_device_peak(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _DEVICE_BASE["allocated"] = torch.cuda.memory_allocated()


_DEVICE_BASE = {"allocated": 0}  # torch's allocated bytes when the current section began


def torch_device_memory() -> dict:
    """Peak torch CUDA allocation of the current section, beyond what earlier sections still hold."""
    import torch

    peak = torch.cuda.max_memory_allocated()
    return {"peak_allocated_mb": round(peak / 2**20, 1),
            "peak_allocated_added_mb": round((peak - _DEVICE_BASE["allocated"]) / 2**20, 1)}


def host_info(threads: int, device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cores": usable_cores(), "threads": threads,
                  "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        import onnxruntime  # type: ignore[import-untyped]

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except ImportError:
        pass
    info["native_bf16"] = native_bf16()
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
