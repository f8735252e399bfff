"""The service's settings (from `tstitch-trt serve`'s flags); imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    bundle: str  # as given: "demo" or a directory
    backend: str = "auto"
    precision: str = "auto"  # auto, fp32, bf16: the CPU backend's precision per part (openvino; see run --precision)
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 32  # images per engine batch
    batch_wait_ms: float = 10.0
    max_queued: int = 64
    request_timeout_s: float = 60.0
    body_timeout_s: float = 10.0  # a request's body must arrive whole within this
    latency_target_ms: float | None = None
    max_ratio: float = 0.4

    @property
    def adaptive(self) -> bool:
        return self.latency_target_ms is not None
