"""Dynamic batching: the requests to one model, from every client and stream, gathered into one
ONNX Runtime run.

Each ready model the server serves has a :class:`Batcher`, which is a bounded FIFO queue with its
worker threads (on the CPU, one per ``cores / threads per session``, so a single-threaded session
can still use every core; on a GPU one). A request's names, shapes and dtypes are checked against
the model's contract in the caller's thread, so such a bad request fails at once and never reaches
the queue. It then waits in the queue. Its values (NaN, infinity) are checked in the caller's
thread too, except for a caller on an event loop (the KServe servicer): there the worker checks
them, for the whole batch in one pass, so the event loop is spared a numpy call that gives up the
GIL for every request (and waits to take it back from the workers), and a request that holds them
gets the same ``InvalidInputError`` while the others of its batch run. A worker keeps its own
GIL hand-offs to the session run, so a thread caller (the analyser's preprocessing threads)
checks its own values. The worker takes the
oldest request and every later one that can share its run, meaning the same non-batch inputs, for
example the same ``n_samples``. It goes on while the rows fit in ``max_batch_size``; a request
larger than that runs alone. It concatenates them along the batch axis, runs the session once,
splits every output back along that output's own batch axis (axis 1 for ``samples``), and resolves
each caller's future. With ``max_queue_delay`` > 0 the worker waits up to that long after the
oldest request arrived for a fuller batch. With 0 (the default) it takes whatever is queued, so
requests gather while the previous run is busy.

Backpressure is explicit. A request that finds ``max_queue_size`` requests already waiting gets
:class:`~.errors.QueueFullError` (``RESOURCE_EXHAUSTED``) at once. A request whose deadline passed
while it waited is answered with :class:`~.errors.DeadlineExceededError` and not run. ``close()``
stops accepting, and the worker answers everything already queued before it exits.

The knobs come from the model's ``config.pbtxt`` in Triton's own fields, read by
:mod:`.layout` (``max_batch_size``, ``dynamic_batching``, ``instance_group``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

from specserve.runtime.contract import BATCH, ModelContract
from specserve.runtime.engine import metrics
from specserve.runtime.engine.memory import RequestMemory
from specserve.runtime.engine.stats import ModelStats
from specserve.runtime.errors import (
    ContractError,
    DeadlineExceededError,
    InvalidInputError,
    QueueFullError,
    ShuttingDownError,
)
from specserve.runtime.layout import (
    CONFIG_FILE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_SIZE,
    ROWS_PARAMETER,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """Rows per session run (a single larger request runs alone)."""
    max_queue_delay_s: float = 0.0
    """How long the oldest queued request may wait for a fuller batch."""
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    """Requests that may wait; one more is refused with RESOURCE_EXHAUSTED."""
    instances: int = 0
    """Worker threads, i.e. session runs of this model at once (Triton's ``instance_group``
    count); 0: decided by the device (on the CPU, cores / threads per session)."""

    dynamic: bool = True
    """Requests from different callers may share a run (Triton's ``dynamic_batching`` is set);
    False: each request runs alone."""


@dataclass(frozen=True)
class Runner:
    """What a batcher runs: a model version's contract, its input check, its session run and
    its counters (the batcher knows nothing else of the model)."""

    name: str
    version: str
    contract: ModelContract
    prepare: Callable[..., dict[str, np.ndarray]]
    """``prepare(inputs, finite=True)``: check one request's inputs (optional ones filled in);
    raises naming the problem. ``finite`` False leaves the values of the batched inputs to the
    worker (``contract.check_finite``)."""
    execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    """One session run on checked inputs: the outputs by name."""
    stats: ModelStats


@dataclass(eq=False)  # found in the queue by identity
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: Future
    enqueued_ns: int
    deadline: float | None  # time.monotonic() seconds
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop of an asyncio future (None: a concurrent.futures.Future)."""
    nbytes: int = 0
    """Bytes of its inputs, counted in the server's :class:`~.memory.RequestMemory` while queued or running."""
    finite: bool = False
    """Its values were checked already (by a caller that is not an event loop)."""

    def gone(self) -> bool:
        """True when the caller cancelled (its deadline passed, or it hung up); else the future
        is marked running."""
        if self.loop is not None:
            return self.future.cancelled()
        return not self.future.set_running_or_notify_cancel()


def _settle(outcomes: list) -> None:
    """In the event loop: resolve the asyncio futures of one batch (one wake-up per batch)."""
    for future, value, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


def batch_axis(shape: tuple) -> int | None:
    return shape.index(BATCH) if BATCH in shape else None


class Batcher:
    """The queue and worker threads of one loaded model version."""

    def __init__(self, model: Runner, config: BatchingConfig, workers: int = 1, memory: RequestMemory | None = None):
        self.model = model
        self.config = config
        self.memory = memory
        """The server's request-memory budget (None: unbounded), shared by every batcher."""
        contract = model.contract
        self._input_axes = {t.name: batch_axis(t.shape) for t in contract.inputs}
        self._output_axes = {t.name: batch_axis(t.shape) for t in contract.outputs}
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._successor: Batcher | None = None
        """Set when a new version replaced this one: requests that arrive after the close go there."""
        # read at scrape time: nothing to update per request (the latest version's queue is shown)
        metrics.QUEUE_DEPTH.labels(model.name).set_function(lambda: len(self._queue))
        self._threads = [threading.Thread(target=self._loop, name=f"specserve-batch-{model.name}-{i}", daemon=True)
                         for i in range(max(1, config.instances or workers))]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: dict[str, np.ndarray], deadline: float | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Future | asyncio.Future:
        """Queue one request; its future gets the outputs (or the error). With ``loop`` (called
        from that event loop) the future is an asyncio one, and a batch's futures of one loop are
        resolved with a single wake-up of it; else a concurrent.futures.Future. Raises at once for
        a request that does not fit the contract, a full queue, or a closed batcher."""
        t0 = time.perf_counter_ns()
        model = self.model
        try:
            checked = model.prepare(inputs, finite=loop is None)  # see the module's text
            rows = next(a.shape[self._input_axes[n]] for n, a in checked.items() if self._input_axes[n] is not None)
            # runs can be shared by requests whose other inputs are equal; a seed the runtime drew
            # itself (the client sent none) does not count, the batch's run draws its own
            key = tuple((n, a.tobytes()) for n, a in sorted(checked.items())
                        if self._input_axes[n] is None and (n != "seed" or "seed" in inputs))
            future = loop.create_future() if loop is not None else Future()
            nbytes = sum(a.nbytes for a in checked.values())
            request = _Request(checked, rows, key, future, t0, deadline, loop, nbytes, finite=loop is None)
            with self._cond:
                successor = self._successor if self._closed else None
                if self._closed and successor is None:
                    raise ShuttingDownError(f"model {model.name!r} version {model.version} is shutting down")
                if successor is None:
                    if len(self._queue) >= self.config.max_queue_size:
                        metrics.REJECTED.labels(model.name, "queue_full").inc()
                        raise QueueFullError(f"model {model.name!r}: {len(self._queue)} requests are queued "
                                             f"(max_queue_size {self.config.max_queue_size}); retry later")
                    if self.memory is not None:
                        try:
                            self.memory.admit(nbytes, model.name)
                        except QueueFullError:
                            metrics.REJECTED.labels(model.name, "memory").inc()
                            raise
                    self._queue.append(request)
                    self._cond.notify()
            if loop is not None:  # a caller that gives up (deadline, hang-up) takes its arrays out of the queue
                future.add_done_callback(lambda f, r=request: self._withdraw(r) if f.cancelled() else None)
        except Exception:
            model.stats.record_request(False, time.perf_counter_ns() - t0)
            raise
        if successor is not None:  # replaced while this request was being admitted: the new version runs it
            return successor.submit(inputs, deadline, loop)
        return request.future

    def _withdraw(self, request: _Request) -> None:
        """Drop a cancelled request still waiting in the queue (a worker that took it skips it)."""
        with self._cond:
            try:
                self._queue.remove(request)
            except ValueError:
                return  # already taken by a worker
        metrics.REJECTED.labels(self.model.name, "cancelled").inc()
        self.model.stats.record_request(False, time.perf_counter_ns() - request.enqueued_ns)
        if self.memory is not None:
            self.memory.release(request.nbytes)

    def close(self, wait: bool = True, timeout: float | None = None, successor: Batcher | None = None) -> None:
        """Stop accepting; the workers answer every queued request, then exit. ``successor`` (the
        batcher of the version that replaced this one) takes the requests that still arrive."""
        with self._cond:
            self._closed = True
            self._successor = successor
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join(timeout)

    # ---------------------------------------------------------------- worker

    def _rows_waiting(self, key: tuple) -> int:
        return sum(r.rows for r in self._queue if r.key == key)

    def _take(self) -> list[_Request]:
        """Pop the oldest request and the later ones that share its run, while the rows fit."""
        first = self._queue[0]
        taken, kept, rows = [], deque(), 0
        for r in self._queue:
            if not taken or (self.config.dynamic and r.key == first.key
                             and rows + r.rows <= self.config.max_batch_size):
                taken.append(r)
                rows += r.rows
            else:
                kept.append(r)
        self._queue = kept
        return taken

    def _loop(self) -> None:
        limit, delay = self.config.max_batch_size, self.config.max_queue_delay_s
        while True:
            with self._cond:
                while True:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    if delay > 0 and self.config.dynamic:
                        first = self._queue[0]
                        until = first.enqueued_ns * 1e-9 + delay
                        while (not self._closed and self._queue and self._rows_waiting(first.key) < limit
                               and (left := until - time.perf_counter_ns() * 1e-9) > 0):
                            self._cond.wait(left)
                    if self._queue:  # another worker may have taken it meanwhile
                        break
                batch = self._take()
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                log.exception("model %s: batch failed", self.model.name)
                self._deliver([(r, None, exc) for r in batch if not r.future.done()])

    @staticmethod
    def _deliver(outcomes: list[tuple[_Request, dict | None, BaseException | None]]) -> None:
        """Resolve futures: concurrent ones here, asyncio ones in their loop, once per loop."""
        by_loop: dict = {}
        for r, value, error in outcomes:
            if r.loop is not None:
                by_loop.setdefault(r.loop, []).append((r.future, value, error))
            elif error is None:
                r.future.set_result(value)
            else:
                r.future.set_exception(error)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _run(self, batch: list[_Request]) -> None:
        model, now = self.model, time.monotonic()
        live, outcomes = [], []
        for r in batch:
            if r.gone():
                metrics.REJECTED.labels(model.name, "cancelled").inc()
                model.stats.record_request(False, time.perf_counter_ns() - r.enqueued_ns)
                continue
            if r.deadline is not None and now > r.deadline:
                metrics.REJECTED.labels(model.name, "deadline").inc()
                model.stats.record_request(False, time.perf_counter_ns() - r.enqueued_ns)
                outcomes.append((r, None, DeadlineExceededError(
                    f"model {model.name!r}: the deadline passed after {(time.perf_counter_ns() - r.enqueued_ns) / 1e6:.0f} ms "
                    "in the queue; not run")))
                continue
            live.append(r)
        try:
            if live:
                outcomes += self._execute(live)
            self._deliver(outcomes)
        finally:
            if self.memory is not None:
                self.memory.release(sum(r.nbytes for r in batch))

    def _run_session(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """One session run, or, for a single request of more than ``max_batch_size`` rows, one run
        per ``max_batch_size`` rows with the outputs joined: a run's working memory stays that of
        the largest batch the config allows."""
        limit = self.config.max_batch_size
        if rows <= limit:
            return self.model.execute(inputs)
        parts = []
        for start in range(0, rows, limit):
            chunk = {n: a if (ax := self._input_axes[n]) is None else a[(slice(None),) * ax + (slice(start, start + limit),)]
                     for n, a in inputs.items()}
            parts.append(self.model.execute(chunk))
        return {name: np.concatenate([p[name] for p in parts], axis=self._output_axes[name])
                if self._output_axes.get(name) is not None else parts[0][name] for name in parts[0]}

    def _execute(self, live: list[_Request]) -> list[tuple[_Request, dict | None, BaseException | None]]:
        """One session run for ``live``: each request's share of the outputs (or the error)."""
        model = self.model
        first = live[0].inputs
        inputs = {n: (np.concatenate([r.inputs[n] for r in live], axis=ax) if len(live) > 1 else first[n])
                  if (ax := self._input_axes[n]) is not None else first[n] for n in first}
        try:  # the values of an event loop's requests, for the whole batch in one pass
            if not all(r.finite for r in live):
                model.contract.check_finite(inputs)
        except InvalidInputError:
            return self._refuse_not_finite(live)
        t0 = time.perf_counter_ns()
        try:
            outputs = self._run_session(inputs, sum(r.rows for r in live))
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for r in live:
                model.stats.record_request(False, time.perf_counter_ns() - r.enqueued_ns)
            return [(r, None, exc) for r in live]
        t1 = time.perf_counter_ns()
        model.stats.record_execution(sum(r.rows for r in live), t1 - t0)
        outcomes, start = [], 0
        for r in live:
            part = {}
            for name, array in outputs.items():
                ax = self._output_axes.get(name)
                part[name] = array if ax is None or len(live) == 1 else \
                    array[(slice(None),) * ax + (slice(start, start + r.rows),)]
            start += r.rows
            model.stats.record_request(True, time.perf_counter_ns() - r.enqueued_ns, t0 - r.enqueued_ns, r.rows)
            outcomes.append((r, part, None))
        return outcomes


    def _refuse_not_finite(self, live: list[_Request]) -> list[tuple[_Request, dict | None, BaseException | None]]:
        """A batch with NaN or infinity somewhere: those requests get the error, the others run."""
        outcomes, finite = [], []
        for r in live:
            try:
                if not r.finite:
                    self.model.contract.check_finite(r.inputs)
                finite.append(r)
            except InvalidInputError as exc:
                self.model.stats.record_request(False, time.perf_counter_ns() - r.enqueued_ns)
                outcomes.append((r, None, exc))
        return outcomes + (self._execute(finite) if finite else [])


def batching_config(config) -> BatchingConfig:
    """The batcher's knobs from a config (None: the defaults)."""
    if config is None:
        return BatchingConfig()
    rows = config.max_batch_size
    if rows == 0 and ROWS_PARAMETER in config.parameters:  # Triton does not batch it; our parameter
        value = config.parameters[ROWS_PARAMETER].string_value
        if not value.isdigit() or int(value) < 1:
            raise ContractError(f"{CONFIG_FILE}: parameter {ROWS_PARAMETER} must be a positive integer, got {value!r}")
        rows = int(value)
    dynamic = config.HasField("dynamic_batching")
    queue = config.dynamic_batching.default_queue_policy.max_queue_size
    return BatchingConfig(
        max_batch_size=rows or DEFAULT_MAX_BATCH_SIZE,
        max_queue_delay_s=config.dynamic_batching.max_queue_delay_microseconds * 1e-6,
        max_queue_size=queue or DEFAULT_MAX_QUEUE_SIZE,
        instances=sum(group.count or 1 for group in config.instance_group),
        dynamic=dynamic,
    )
