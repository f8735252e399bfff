"""GET /metrics: Prometheus counters and histograms, kept by the HTTP ingress (one per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # our own: Ray's processes keep theirs in the default one
        r = self.registry
        self.requests = Counter("tstitch_requests", "POST /v1/generate answers by HTTP status", ["status"], registry=r)
        self.images = Counter("tstitch_images", "images generated", registry=r)
        self.batch_size = Histogram("tstitch_batch_size", "engine batch (images) each request ran in",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue = Histogram("tstitch_queue_seconds", "time from arrival at a replica to the start of its batch",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("tstitch_compute_seconds", "engine batch compute time (loop + decode)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tstitch_request_seconds", "end-to-end time of answered requests at the ingress",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ratio = Histogram("tstitch_stitch_ratio", "stitch ratio (share of steps on the small model) used",
                               buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.last_ratio = Gauge("tstitch_stitch_ratio_last", "stitch ratio of the last answered request", registry=r)

    def answered(self, status: int, seconds: float, report: dict | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if report is None:
            return
        self.latency.observe(seconds)
        self.images.inc(report["batch"])
        self.batch_size.observe(report["batch_size"])
        self.queue.observe(report["queue_ms"] / 1e3)
        self.compute.observe(report["compute_ms"] / 1e3)
        if report.get("ratio") is not None:
            self.ratio.observe(report["ratio"])
            self.last_ratio.set(report["ratio"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
