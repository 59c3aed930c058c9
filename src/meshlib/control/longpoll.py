"""Consul-style blocking queries on asyncio: one future per change, swapped on every change, so any number of
waiters cost one callback each and no thread; a waiter whose client has gone away is released at once (an
abandoned long-poll must not hold memory for its whole wait)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..randomness import uniform

#: Consul adds up to wait/16 of jitter so that watchers which started together do not all return together.
JITTER_FRACTION = 1 / 16
MAX_WAIT = 600.0


class ChangeSignal:
    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self.waiters = 0

    def fire(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> bool:
        """Wait for the next change, at most ``timeout`` seconds, or until ``abandon`` completes; True if a change
        came."""
        future = self._future
        if future is None or future.done():
            future = self._future = asyncio.get_running_loop().create_future()
        self.waiters += 1
        try:
            watched: set[asyncio.Future[Any]] = {future} if abandon is None else {future, abandon}
            done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            return future in done
        finally:
            self.waiters -= 1


async def client_gone(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Returns when the ASGI client disconnects (for a request whose body has not been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def hold(
    signal: ChangeSignal,
    wait: float,
    answered: Callable[[], bool],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    woken: asyncio.Future[Any] | None = None,
) -> None:
    """Hold a long-poll until ``answered()``, ``wait`` (plus jitter) passes, the client goes away, or ``woken``
    completes (the client asked for an early answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + with_jitter(wait)
    gone = asyncio.ensure_future(client_gone(receive))
    stop: asyncio.Future[Any] = gone
    if woken is not None:
        either: asyncio.Future[Any] = loop.create_future()

        def finish(_: asyncio.Future[Any]) -> None:
            if not either.done():
                either.set_result(None)

        gone.add_done_callback(finish)
        woken.add_done_callback(finish)
        stop = either
    try:
        while not answered() and not stop.done():
            remaining = deadline - loop.time()
            if remaining <= 0 or not await signal.wait(remaining, stop):
                break
    finally:
        gone.cancel()


class Wakers:
    """Early answers for multiplexed watches: a client that starts watching another service asks its poll in flight
    to return now (``POST /v1/registry/watch/wake``) instead of cancelling it. A wake that arrives before its poll
    does is kept for that poll, in a bounded table (names are untrusted)."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._early: dict[str, None] = {}

    def register(self, session: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if session in self._early:  # woken before it arrived
            del self._early[session]
            future.set_result(None)
        previous = self._waiting.pop(session, None)
        if previous is not None and not previous.done():
            previous.set_result(None)
        self._waiting[session] = future
        return future

    def done(self, session: str, future: asyncio.Future[None]) -> None:
        if self._waiting.get(session) is future:
            del self._waiting[session]

    def wake(self, session: str) -> bool:
        future = self._waiting.get(session)
        if future is not None:
            if not future.done():
                future.set_result(None)
            return True
        if len(self._early) >= self.LIMIT:
            self._early.pop(next(iter(self._early)))
        self._early[session] = None
        return False


def with_jitter(wait: float) -> float:
    wait = min(max(wait, 0.0), MAX_WAIT)
    return wait + uniform() * wait * JITTER_FRACTION
