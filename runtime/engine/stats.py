"""Counters of one loaded model version, in the KServe ``ModelStatistics`` sense, mirrored to
the Prometheus metrics (:mod:`.metrics`)."""

from __future__ import annotations

import threading
import time

from specserve.runtime.engine import metrics


class ModelStats:
    """Counters of one loaded model version, in the KServe ``ModelStatistics`` sense: requests that
    succeeded or failed (count and total ns), their time in the queue, inferences (rows answered),
    session runs (executions) with their compute time per batch size, and the time of the last
    inference. Thread-safe. Every record also goes to the Prometheus metrics of model ``name``."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.metrics = metrics.ModelMetrics(name)
        self._lock = threading.Lock()
        self.success = [0, 0]
        self.fail = [0, 0]
        self.queue_ns = 0  # over the successful requests
        self.compute_ns = 0  # over the executions
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = {}

    def record_request(self, ok: bool, total_ns: int, queue_ns: int = 0, rows: int = 0) -> None:
        """One request answered: ``ok``, its whole time, its time in the queue, its rows."""
        self.metrics.observe_request(ok, total_ns * 1e-9, queue_ns * 1e-9)
        with self._lock:
            target = self.success if ok else self.fail
            target[0] += 1
            target[1] += total_ns
            if ok:
                self.queue_ns += queue_ns
                self.inference_count += rows
                self.last_inference_ms = int(time.time() * 1000)

    def record_execution(self, batch: int, compute_ns: int) -> None:
        """One session run of ``batch`` rows (one request's, or several gathered by the batcher)."""
        self.metrics.observe_execution(batch, compute_ns * 1e-9)
        with self._lock:
            self.execution_count += 1
            self.compute_ns += compute_ns
            entry = self.batches.setdefault(batch, [0, 0])
            entry[0] += 1
            entry[1] += compute_ns

    def snapshot(self) -> dict:
        with self._lock:
            return {"success": tuple(self.success), "fail": tuple(self.fail),
                    "queue": (self.success[0], self.queue_ns), "compute": (self.execution_count, self.compute_ns),
                    "inference_count": self.inference_count,
                    "execution_count": self.execution_count, "last_inference_ms": self.last_inference_ms,
                    "batches": {k: tuple(v) for k, v in sorted(self.batches.items())}}
