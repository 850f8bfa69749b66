"""Prometheus metrics of the server, exposed over HTTP (``specserve serve --metrics-port``).

One registry per process (the server is one process). Per model: requests and failures (a
request is one model input a caller asked to run), request latency (checks, queue and run) and
queue-wait histograms, requests refused by the batcher (queue full, deadline passed), and per
session run the compute-time and batch-size histograms; the queue depth; the number of models
ready. Everything is recorded by :class:`~specserve.runtime.engine.repository.ModelStats`, so the KServe
and domain APIs, and the in-process analyzer, all show up.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

REQUESTS = Counter("specserve_requests", "Model requests (one model input a caller asked to run)", ["model"], registry=REGISTRY)
FAILURES = Counter("specserve_request_failures", "Model requests that failed (bad input, run error)", ["model"],
                   registry=REGISTRY)
REQUEST_SECONDS = Histogram("specserve_request_seconds", "Model request latency: input checks, queue and run",
                            ["model"], buckets=_LATENCY, registry=REGISTRY)
QUEUE_SECONDS = Histogram("specserve_queue_seconds", "Time a request waited for its batch to start", ["model"],
                          buckets=_LATENCY, registry=REGISTRY)
COMPUTE_SECONDS = Histogram("specserve_compute_seconds", "ONNX Runtime session run time", ["model"],
                            buckets=_LATENCY, registry=REGISTRY)
BATCH_SIZE = Histogram("specserve_batch_size", "Rows per session run", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096), registry=REGISTRY)
QUEUE_DEPTH = Gauge("specserve_queue_depth", "Requests waiting for a session run", ["model"], registry=REGISTRY)
MODELS_READY = Gauge("specserve_models_ready", "Models loaded and ready to serve", registry=REGISTRY)


REJECTED = Counter("specserve_rejected", "Requests not run: queue full, deadline passed in the queue, or caller gone (cancelled)",
                   ["model", "reason"], registry=REGISTRY)


class ModelMetrics:
    """The metric series of one model, looked up once (``labels()`` per request costs)."""

    def __init__(self, model: str) -> None:
        self.requests = REQUESTS.labels(model)
        self.failures = FAILURES.labels(model)
        self.request_seconds = REQUEST_SECONDS.labels(model)
        self.queue_seconds = QUEUE_SECONDS.labels(model)
        self.compute_seconds = COMPUTE_SECONDS.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        QUEUE_DEPTH.labels(model)  # the series exists from the start (the batcher sets it)

    def observe_request(self, ok: bool, total_s: float, queue_s: float = 0.0) -> None:
        self.requests.inc()
        self.request_seconds.observe(total_s)
        if not ok:
            self.failures.inc()
            return
        self.queue_seconds.observe(queue_s)

    def observe_execution(self, batch: int, compute_s: float) -> None:
        self.compute_seconds.observe(compute_s)
        self.batch_size.observe(batch)


def track_models_ready(count: Callable[[], int]) -> None:
    MODELS_READY.set_function(count)


def start_metrics_server(host: str, port: int) -> int:
    """Serve ``/metrics`` on ``host:port`` in a background thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port
