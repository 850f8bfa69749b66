"""Bounded request memory, and memory given back after a burst.

:class:`RequestMemory` counts the bytes of request data the batchers hold, queued or running, for
the whole server. A request that would take it past its limit is refused at once with
:class:`~.errors.QueueFullError` (``RESOURCE_EXHAUSTED``) naming both figures, before it is
queued; the bytes are given back when the batcher is done with the request (answered or expired),
or when a caller that gave up (deadline, hang-up) has its request taken out of the queue.

:class:`Trimmer` gives memory back to the operating system once the server is idle. ONNX
Runtime's CPU arena keeps each session's peak working memory, and glibc keeps what many threads
freed in per-thread heaps: after a burst of large batches the process stays at its peak for good
(measured: an SPT session went from 67 MB to 156 MB after one 256-row run with the arena, to 312
MB without it, and to 74-76 MB after an arena shrink and ``malloc_trim``). A second after the
last request left, off the request path, every session shrinks its arena and ``malloc_trim(0)``
returns the rest. The arena stays on while serving: without it PhysFormer's 64-row throughput
halved (5.3 against 11.5 messages/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

from specserve.runtime.errors import QueueFullError

log = logging.getLogger(__name__)

MB = 1024 * 1024


class RequestMemory:
    """Bytes of requests held by the batchers, under ``limit`` (None: counted, never refused)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.last_release = time.monotonic()
        self.touched = False
        """Set when requests came and went since the last trim."""
        self._lock = threading.Lock()

    def admit(self, nbytes: int, model: str) -> None:
        """Take ``nbytes`` for a request to ``model``, or raise QueueFullError. A request alone on
        an idle server is always admitted (the message limit bounds it)."""
        with self._lock:
            if self.limit is not None and self.used and self.used + nbytes > self.limit:
                raise QueueFullError(
                    f"model {model!r}: the server holds {self.used / MB:.1f} MB of requests and this one needs "
                    f"{nbytes / MB:.1f} MB more (limit {self.limit / MB:.0f} MB, --max-queued-mb); retry later")
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self.touched = True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken by :meth:`admit`."""
        with self._lock:
            self.used -= nbytes
            self.last_release = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last request left, 0 while any is held."""
        with self._lock:
            return 0.0 if self.used else time.monotonic() - self.last_release


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def malloc_settings(cores: int | None = None) -> tuple[tuple[int, int], ...]:
    """The glibc ``mallopt`` settings of a server on ``cores`` cores (default: this process's)."""
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ((M_MMAP_THRESHOLD, 4 * MB), (M_TRIM_THRESHOLD, 8 * MB), (M_ARENA_MAX, max(1, cores)))


def return_freed_memory(cores: int | None = None) -> bool:
    """Fix glibc's thresholds so that freed memory is reused while the server is busy and given
    back once it is idle, with a bound on what the heaps may keep. Call it before the models load.

    - Blocks of 4 MiB or more (a message's tensors, a large batch) get their own mapping, unmapped
      when freed. Smaller ones, such as one message's preprocessing temporaries (64 spectra x
      3,011 pixels in float64 is 1.5 MB), are reused from the heaps.
    - A heap's free top goes back to the system past 8 MiB, and there is one heap (arena) per core.
      ``malloc_trim``, which :class:`Trimmer` calls once the server is idle, gives back free
      memory inside the heaps but not the top of a thread's heap, so those tops bound what stays.

    glibc starts with 128 KiB for both and raises them to the size of each large block freed (up to
    32 MB), and it keeps 8 heaps per core. Before, both were fixed at 128 KiB (the server's memory
    after a warm-up fell from 291 to 129 MB against glibc's own behaviour), so every temporary of
    128 KiB or more was a fresh mapping. Its pages faulted in on first touch and were unmapped again
    on free, which made the preprocessing 1.7x slower (1.31 against 0.79 ms per spectrum). The LAMOST
    exposure took 7.6-8.0 s then and 5.2-5.9 s now. The overload probe's memory 10 s after is
    1.11-1.12x idle with these settings; it was 1.09x before (``specserve bench hostile``,
    docs/performance.md).

    False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(option, value)) for option, value in malloc_settings(cores)])
    except (OSError, AttributeError):
        return False


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    """A daemon thread that, once the server has been idle ``after`` seconds following some
    requests, calls ``shrink()`` (the sessions give back their arenas' free chunks) and then
    ``malloc_trim(0)``; while idle, ``malloc_trim`` again every ``every`` seconds."""

    def __init__(self, memory: RequestMemory, shrink=lambda: None, after: float = 1.0, interval: float = 0.5,
                 every: float = 5.0):
        self.memory, self.shrink, self.after, self.interval, self.every = memory, shrink, after, interval, every
        self.trims = 0
        self._trim = _malloc_trim()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specserve-trim", daemon=True)

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> "Trimmer":
        if self._trim is None:
            log.info("malloc_trim is not available here: freed memory is given back only as glibc sees fit")
            self._trim = lambda pad: 0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            idle = self.memory.idle_for()
            if self.memory.touched and idle >= self.after:
                self.memory.touched = False
                try:
                    self.shrink()
                except Exception:  # noqa: BLE001 - a failed shrink leaves memory held, nothing worse
                    log.exception("shrinking the session arenas failed")
            elif not (idle >= self.after and time.monotonic() - last >= self.every):
                continue
            # also every few idle seconds: messages refused before any model saw them (too large,
            # too many calls) leave gRPC's freed buffers behind too
            self._trim(0)
            self.trims += 1
            last = time.monotonic()
