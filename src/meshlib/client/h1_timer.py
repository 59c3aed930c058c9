"""Timeouts for one connection's waits, with one timer handle reused across requests.

A keep-alive connection waits for one thing at a time (the write buffer to drain, the answer's head, the next
part of its body). A fresh ``call_later`` per wait costs a timer handle and a heap push per request; here the
armed timer stays while requests come and go, and only moves when it fires early (it checks the current wait's
own deadline and re-arms for the rest) or when a wait needs an earlier deadline than the armed one.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

_NO_CONTEXT = contextvars.Context()  # the callback needs none: not copying the caller's saves work per arming


def within(timeout: float | None) -> str:
    """``within 5s`` for an error message; with no timeout set, what did time out (the operating system's own
    limit: connect() gives up with ETIMEDOUT after about two minutes)."""
    return f"within {timeout:g}s" if timeout is not None else "before the operating system's own timeout (none was set)"


class Watch:
    __slots__ = ("_deadline", "_kind", "_loop", "_timeout", "_timer", "_timer_at", "_waiting")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiting: asyncio.Future[Any] | None = None
        self._deadline = 0.0
        self._kind: type[Exception] = TimeoutError
        self._timeout = 0.0

    def arm(self, future: asyncio.Future[Any], timeout: float | None, kind: type[Exception]) -> asyncio.Future[Any]:
        """``future``, to be awaited at once: failed with ``kind`` if ``timeout`` seconds pass before it is done.
        (A plain function returning the future, not a coroutine: one frame less per wait.)"""
        if timeout is None or future.done():
            return future
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiting, self._deadline, self._kind, self._timeout = future, deadline, kind, timeout
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._fire, context=_NO_CONTEXT)
            self._timer_at = deadline
        return future

    def _fire(self) -> None:
        self._timer = None
        future = self._waiting
        if future is None or future.done():
            return
        assert self._loop is not None
        if self._loop.time() >= self._deadline:
            future.set_exception(self._kind(f"no progress {within(self._timeout)}"))
            future.exception()  # its waiter raises it; no "never retrieved" warning if it has gone
        else:  # armed for an earlier wait: move on to this one's deadline
            self._timer = self._loop.call_at(self._deadline, self._fire, context=_NO_CONTEXT)
            self._timer_at = self._deadline

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
