"""Errors to gRPC status codes (one table), request ids, the request log, and the wrapper
that puts every unary handler through that table."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from specserve.runtime.errors import (
    ContractError,
    DeadlineExceededError,
    InvalidInputError,
    InvalidSpectrumError,
    ModelControlError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    ShuttingDownError,
)
from specserve.runtime.serving.decoding import Undecodable

log = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidSpectrumError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ContractError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (ModelControlError, grpc.StatusCode.UNAVAILABLE),  # as Triton answers in model-control mode none
)

_HIDDEN_PATHS: dict[str, str] = {}
"""Filesystem paths that never reach a client, and what is said instead."""


def hide_path(path: str | Path, label: str) -> None:
    """Say ``label`` instead of ``path`` (as given and resolved) in every client-facing message."""
    for text in {str(path), str(Path(path).resolve())}:
        _HIDDEN_PATHS[text] = label


def redact(message: str) -> str:
    """``message`` with every hidden path replaced by its label (longest paths first)."""
    for path in sorted(_HIDDEN_PATHS, key=len, reverse=True):
        message = message.replace(path, _HIDDEN_PATHS[path])
    return message


def code_for(exc: BaseException) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place where errors become gRPC status codes and client-facing messages."""
    code = code_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
        return code, "internal error (see the server log)"
    return code, redact(str(exc))


REQUEST_LOG = logging.getLogger("specserve.requests")
"""One line per inference request (``specserve serve --log-requests`` shows them)."""


_ID_PREFIX = uuid.uuid4().hex[:4]
_ID_COUNTER = itertools.count()


def request_id(given: str) -> str:
    """The client's request id, or a new one (returned in the response, so logs can be matched):
    12 hex digits, a random per-process prefix and a counter (cheaper than a uuid per request)."""
    return given or f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def log_request(kind: str, rid: str, target: str, n: int, t0: float, exc: BaseException | None = None) -> None:
    """Log the request ``rid`` on ``target`` with ``n`` rows/spectra: its status and duration."""
    if not REQUEST_LOG.isEnabledFor(logging.INFO):
        return
    ms = (time.perf_counter() - t0) * 1e3
    if exc is None:
        REQUEST_LOG.info("%s id=%s %s n=%d OK %.1f ms", kind, rid, target, n, ms)
    else:
        REQUEST_LOG.info("%s id=%s %s n=%d %s %.1f ms: %s", kind, rid, target, n, code_for(exc).name, ms,
                         " ".join(str(exc).split())[:300])


@contextlib.contextmanager
def logged(kind: str, rid: str, target: str, n: int):
    """:func:`log_request` around a block."""
    t0 = time.perf_counter()
    try:
        yield
    except Exception as exc:
        log_request(kind, rid, target, n, t0, exc)
        raise
    log_request(kind, rid, target, n, t0)


def unary(handler: Callable) -> Callable:
    """Wrap a unary handler so that every exception goes through :func:`status_for`, and a call
    that starts once the server is shutting down (the servicer's ``stopping`` is set) is refused
    with UNAVAILABLE."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            if self.stopping.is_set():
                raise ShuttingDownError("the server is shutting down; send this request to another server")
            if isinstance(request, Undecodable):
                raise request.error(context.peer(), handler.__name__)
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            code, message = status_for(exc)
            await context.abort(code, message)

    return wrapper


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


