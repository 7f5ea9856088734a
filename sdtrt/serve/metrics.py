"""Prometheus metrics of one server, in a registry of its own (so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdtrt_requests", "HTTP generation requests answered, by API and status code",
                                ["api", "code"], registry=r)
        self.request_seconds = Histogram("sdtrt_request_seconds", "Generation request latency, queue included, "
                                         "by API and status code", ["api", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sdtrt_queue_depth", "Jobs waiting for the GPU worker (one per request, one per n_iter iteration)", registry=r)
        self.queue_wait = Histogram("sdtrt_queue_wait_seconds", "Time a request waited before its pass started",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("sdtrt_batch_images", "Images per pipeline pass", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("sdtrt_batch_requests", "Requests per pipeline pass", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.generate_seconds = Histogram("sdtrt_generate_seconds", "Duration of one pipeline pass",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("sdtrt_rejected", "Requests refused because the queue was full (429)", registry=r)
        self.errors = Counter("sdtrt_errors", "Error answers by error kind (validation, queue full, timeout, "
                              "generation failure, ...)", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
