"""Bidirectional streams answered concurrently, in the order the messages came."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)

STREAM_WINDOW = 64
"""Messages of one stream in flight at once (their answers still go back in order)."""


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
                    window: int = STREAM_WINDOW) -> AsyncIterator:
    """Answer a stream's messages concurrently and yield the answers in the order the messages
    came. ``start(message)`` is called as each message is read: it queues the work and returns an
    awaitable of the answer, which reports its own errors in-band. Up to ``window`` messages are in
    flight, so the batcher can gather them. Once ``stopping`` is set (SIGTERM) no further message
    is read: the ones already read are answered, then :class:`StreamCut` is raised unless the
    client had closed its side (nothing unread), so the stream never ends OK with answers missing."""
    pending: asyncio.Queue = asyncio.Queue(maxsize=window)
    done = object()
    failed: list[Exception] = []
    cut = False
    answered = 0

    async def read() -> None:
        nonlocal cut
        try:
            async for message in requests:
                await pending.put(start(message))
        except asyncio.CancelledError:
            cut = True  # shutting down: read nothing more (a second cancel, from the finally below, ends it)
        except Exception as exc:  # noqa: BLE001 - raised by the consumer, after the answers so far
            failed.append(exc)
        await pending.put(done)

    reader = asyncio.create_task(read())
    stop = asyncio.ensure_future(stopping.wait())
    stop.add_done_callback(lambda f: None if f.cancelled() else reader.cancel())
    try:
        while (answer := await pending.get()) is not done:
            yield await answer
            answered += 1
        if failed:  # a broken request stream
            raise failed[0]
        if cut:
            raise StreamCut(answered)
    finally:
        stop.cancel()
        reader.cancel()
        while not pending.empty():
            answer = pending.get_nowait()
            if answer is not done:
                if asyncio.iscoroutine(answer):
                    answer.close()
                else:
                    answer.cancel()


async def ready_value(value):
    return value


