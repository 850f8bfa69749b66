"""What one server will hold at once: calls, message sizes, request memory, stream windows and
connection lifetimes (``specserve serve --max-...``; docs/serving.md, "Limits").

Each bound answers with a status, never with memory growth:

- ``max_concurrent_rpcs`` calls at once; gRPC refuses the next with ``RESOURCE_EXHAUSTED``.
- ``max_message_bytes`` per message, sized from the loaded models unless given: the largest legal
  batch of any model's KServe inputs, and a ``specserve.v1`` message of
  :data:`RAW_SPECTRA_PER_MESSAGE` raw spectra of twice the largest model grid, with room for
  framing. A larger message is refused by gRPC with ``RESOURCE_EXHAUSTED`` before it is read.
- ``max_queued_bytes`` of request data queued or running in the batchers, server-wide
  (:class:`~specserve.runtime.engine.memory.RequestMemory`); a request beyond it gets
  ``RESOURCE_EXHAUSTED`` at once (in-band, with its id, in a stream).
- A stream has at most ``stream_window`` messages, and ``stream_window_bytes`` of them, read and
  not yet answered; beyond that the server stops reading it, so HTTP/2 flow control slows the
  sender instead of the server buffering.
- A connection quiet for ``keepalive_s`` is pinged and dropped when the ping goes unanswered for
  ``keepalive_timeout_s``: dead peers, and clients that stall halfway through a message (gRPC
  calls the handler only once the whole message is in, so nothing else would end such a call). A
  connection with no call for ``idle_connection_s`` is closed (clients reconnect on their next call).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from specserve.runtime import dtypes
from specserve.runtime.contract import DYNAMIC_DIMS
from specserve.runtime.engine.memory import MB
from specserve.runtime.serving.streams import STREAM_WINDOW, STREAM_WINDOW_BYTES
RAW_SPECTRA_PER_MESSAGE = 64
"""Spectra of one ``specserve.v1`` message the message limit makes room for (``analyze``'s default batch)."""
RAW_BYTES_PER_PIXEL = 8 + 4 + 4 + 1
"""A raw spectrum's pixel on the wire: wavelength (double), flux and ivar (float), mask (bool)."""
MIN_MESSAGE_BYTES = 64 * MB
"""Never less: a client sending a whole test split of raw spectra in one Analyze (33 MB for the
kit's giants) must still be served."""
STREAM_LOOKAHEAD_BYTES = 4 * MB
"""HTTP/2 receive window of one stream: what gRPC reads ahead of the server."""


@dataclass(frozen=True)
class Limits:
    max_concurrent_rpcs: int = 256
    max_message_bytes: int | None = None
    """None: sized from the models when the server starts (:func:`message_limit`)."""
    max_queued_bytes: int = 64 * MB
    stream_window: int = STREAM_WINDOW
    stream_window_bytes: int = STREAM_WINDOW_BYTES
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    idle_connection_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent_rpcs", "max_queued_bytes", "stream_window", "stream_window_bytes",
                     "keepalive_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_message_bytes is not None and self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")

    def channel_options(self, message_bytes: int) -> list[tuple[str, int]]:
        """grpc server options for these limits."""
        return [
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # current gRPC core waits for the ping's answer this long, whatever keepalive_timeout says
            # (60 s by default: a stalled half-sent call was dropped only after 62 s with --keepalive-s 2)
            ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # clients may ping every 10 s (grpc's own clients back off on a GOAWAY for pinging too often)
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", int(self.idle_connection_s * 1000)),
            # a stream's receive window stays at 4 MB: with gRPC's bandwidth-delay probing it grew
            # until 16 flood streams held 2.6 GB of unread messages (measured); the stream rate of
            # 1- and 64-spectrum messages changed by less than 10 %
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_LOOKAHEAD_BYTES),
        ]


def _input_row_bytes(model) -> tuple[int, int]:
    """(bytes of one batch row of ``model``'s KServe inputs, its largest grid in pixels)."""
    card = model.card
    row, pixels = 0, card.dims.get("n_pixels", 0)
    for spec in card.contract.inputs:
        fixed = [d for d in spec.resolve(card.dims) if d not in DYNAMIC_DIMS]
        row += math.prod(fixed) * dtypes.from_name(spec.dtype).numpy.itemsize
    return row, pixels


def message_limit(models: Iterable) -> int:
    """The receive limit for the ready ``models`` (LoadedModel): room for every model's largest
    batch and for a domain message of :data:`RAW_SPECTRA_PER_MESSAGE` raw spectra of twice the
    largest grid, plus a quarter for framing, rounded up to a MiB and at least
    :data:`MIN_MESSAGE_BYTES`."""
    largest, grid = 0, 0
    for model in models:
        if not model.ready:
            continue
        row, pixels = _input_row_bytes(model)
        largest = max(largest, row * model.batching.max_batch_size)
        grid = max(grid, pixels)
    domain = RAW_SPECTRA_PER_MESSAGE * 2 * grid * RAW_BYTES_PER_PIXEL
    return max(MIN_MESSAGE_BYTES, math.ceil(1.25 * max(largest, domain) / MB) * MB)
