"""The async engine's body streams: a request body written with write flow control, framed as its head declared,
and the answer's body as the caller reads it (parts from the connection's ``AnswerCore``, with read flow control
and the read timeout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpcore

from .h1_request import Framer

if TYPE_CHECKING:
    from .async_h1 import AsyncH1Connection


async def write_body(connection: AsyncH1Connection, stream: Any, length: int | None, timeout: float | None) -> None:
    """Stream a request body, framed as its head declared, pausing while the socket's buffer is full."""
    framer = Framer(length)
    async for part in stream:
        if not part:
            continue
        head = connection._head
        if head is not None and head.done():  # answered before the upload ended (413, 401...): stop sending
            connection._lost = connection._lost or ConnectionAbortedError("answered before the body was sent")
            return
        connection._write(framer.frame(part))
        await connection._drained(timeout)
    end = framer.end()
    if end:
        connection._write(end)
    await connection._drained(timeout)


class Body:
    """An answer's body as it arrives: parts the connection's core collected, read by the caller (httpcore's
    stream interface). Closing it before the end closes the connection: a half-read connection is never reused.
    The connection is not reused while its body is out, so the core's parts are this body's."""

    __slots__ = ("_connection", "_core", "_error", "_timeout", "_waiter", "complete")

    def __init__(self, connection: AsyncH1Connection, timeout: float | None) -> None:
        self._connection = connection
        self._core = connection._core
        self._timeout = timeout
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False

    def finish(self) -> None:
        self.complete = True
        self.wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
            self.wake()

    def wake(self) -> None:  # a result, never an exception: the error is raised by the reader itself
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        core = self._core
        while True:
            if core.parts:
                data = core.take()
                self._connection.resume_reading()
                yield data
            elif self.complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._connection.watch.arm(self._waiter, self._timeout, httpcore.ReadTimeout)

    def take(self) -> bytes:
        """The whole body, once complete (the caller reads it from memory, not through this stream)."""
        return self._core.take()

    async def aclose(self) -> None:
        if not self.complete:
            self._connection._close()
