"""Prometheus metrics, on a registry of the app's own (two apps in one process do not share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("diffcore_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=self.registry)
        self.latency = Histogram("diffcore_request_latency_seconds", "HTTP request latency by route", ("route",),
                                 buckets=_LATENCY, registry=self.registry)
        self.dropped = Counter("diffcore_requests_dropped", "queued requests dropped before they ran, by reason",
                               ("reason",), registry=self.registry)
        self.cancelled = Counter("diffcore_requests_cancelled", "running requests stopped at a denoising step "
                                 "boundary, by reason (disconnect, timeout, delete)", ("reason",), registry=self.registry)
        self.queue_depth = Gauge("diffcore_queue_depth", "requests waiting for the engine", registry=self.registry)
        self.batch_size = Histogram("diffcore_batch_size", "requests per engine batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry)
        self.step_latency = Histogram("diffcore_step_latency_seconds", "seconds per denoising step",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                      registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
