"""Bidirectional streams answered concurrently, in the order the messages came."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from specserve.runtime.serving.decoding import Undecodable

log = logging.getLogger(__name__)

STREAM_WINDOW = 64
"""Messages of one stream in flight at once (their answers still go back in order)."""
STREAM_WINDOW_BYTES = 8 * 1024 * 1024
"""Bytes of one stream's messages in flight at once (one message larger than this goes alone)."""


def message_size(message) -> int:
    """Bytes of a request message as it came (an Undecodable's size, else protobuf's ByteSize)."""
    return message.size if isinstance(message, Undecodable) else message.ByteSize()


class StreamCut(Exception):
    """The server stopped reading a stream the client had not closed (SIGTERM): every message read
    was answered, later ones were never read. The stream must not end OK."""

    def __init__(self, answered: int):
        super().__init__(answered)
        self.answered = answered

    def message(self, last_id: str) -> str:
        last = f" (the last id {last_id!r})" if last_id else ""
        return (f"the server is shutting down: the first {self.answered} messages of this stream were "
                f"answered{last}; messages sent after them were not read, send them again")


async def answer_in_order(requests: AsyncIterator, start: Callable[[object], Awaitable], stopping: asyncio.Event,
                          window: int = STREAM_WINDOW, window_bytes: int = STREAM_WINDOW_BYTES) -> AsyncIterator:
    """Answer a stream's messages concurrently and yield the answers in the order the messages
    came. ``start(message)`` is called as each message is read: it queues the work and returns an
    awaitable of the answer, which reports its own errors in-band. Up to ``window`` messages, and
    ``window_bytes`` of them, are in flight, so the batcher can gather them; then the stream is
    not read until answers go out (flow control slows the sender). Once ``stopping`` is set
    (SIGTERM) no further message is read: the ones already read are answered, then
    :class:`StreamCut` is raised unless the client had closed its side (nothing unread), so the
    stream never ends OK with answers missing."""
    pending: asyncio.Queue = asyncio.Queue()
    done = object()
    failed: list[Exception] = []
    cut = False
    answered = 0
    in_flight = [0, 0]  # messages, bytes
    freed = asyncio.Event()

    async def read() -> None:
        nonlocal cut
        try:
            async for message in requests:
                size = message_size(message)
                while in_flight[0] and (in_flight[0] >= window or in_flight[1] + size > window_bytes):
                    freed.clear()
                    await freed.wait()
                in_flight[0] += 1
                in_flight[1] += size
                await pending.put((start(message), size))
        except asyncio.CancelledError:
            cut = True  # shutting down: read nothing more (a second cancel, from the finally below, ends it)
        except Exception as exc:  # noqa: BLE001 - raised by the consumer, after the answers so far
            failed.append(exc)
        await pending.put(done)

    reader = asyncio.create_task(read())
    stop = asyncio.ensure_future(stopping.wait())
    stop.add_done_callback(lambda f: None if f.cancelled() else reader.cancel())
    try:
        while (item := await pending.get()) is not done:
            answer, size = item
            yield await answer
            answered += 1
            in_flight[0] -= 1
            in_flight[1] -= size
            freed.set()
        if failed:  # a broken request stream
            raise failed[0]
        if cut:
            raise StreamCut(answered)
    finally:
        stop.cancel()
        reader.cancel()
        while not pending.empty():
            item = pending.get_nowait()
            if item is not done:
                answer = item[0]
                if asyncio.iscoroutine(answer):
                    answer.close()
                else:
                    answer.cancel()


async def ready_value(value):
    return value


