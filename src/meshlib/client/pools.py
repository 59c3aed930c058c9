"""The sync client's outbound engine for mesh hops: per-endpoint stacks of keep-alive connections
(``h1.H1Connection``), shared by the caller's threads.

The decisions are ``pool_ledger.Ledger``'s, as in the async engine; here they run under one lock per endpoint,
and a thread past ``max_connections`` waits on an event of its own (``pool`` timeout) until a release hands it a
connection or room for one. No lock is held while a connection connects, sends, waits for an answer or closes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import httpcore

from .h1 import H1Connection, SyncBody
from .h1_timer import within
from .outbound import Answer, Outbound, PoolLimits
from .pool_ledger import OPEN, WAIT, LedgerStack, Waiter
from .streams import streaming

_Key = tuple[bytes, str, int]


class EndpointPools(PoolLimits):
    """What ``httpcore.ConnectionPool`` is to httpx's transport, for one destination service's endpoints."""

    def __init__(self, *, http1: bool = True, http2: bool = False, **limits: Any) -> None:
        # http1 / http2 are accepted as the pool options carry them; the transport gives HTTP/2 to httpcore's pool
        super().__init__(**limits)
        self._stacks: dict[_Key, _Stack] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def send(self, request: Outbound) -> Answer:
        """One attempt over a connection of its endpoint's stack. An answer whose body came with its head (most
        small ones) returns its connection at once and carries its body as ``bytes``."""
        if self._pid != os.getpid():
            self._forked()
        key = (request.scheme, request.host, request.port)
        stack = self._stacks.get(key)
        if stack is None:
            with self._lock:
                stack = self._stacks.get(key)
                if stack is None:
                    stack = self._stacks[key] = _Stack(self, key)
        timeouts = request.extensions.get("timeout") or {}
        connection = stack.checkout(timeouts.get("pool"))
        try:
            answer = connection.send(request)
        except BaseException:
            stack.checkin(connection)  # it closed itself if it was left in a bad state
            raise
        if type(answer.stream) is bytes:
            if not streaming.get():
                stack.checkin(connection)
                return answer
            # client.stream(): the connection stays the caller's until the response is closed, as in httpx
            answer.stream = _Returning(_Read(answer.stream), connection, stack)
            return answer
        answer.stream = _Returning(answer.stream, connection, stack)
        return answer

    def close(self) -> None:
        with self._lock:
            stacks, self._stacks = list(self._stacks.values()), {}
        for stack in stacks:
            stack.close()

    def _forked(self) -> None:
        """In a child process (a pre-forking server that made the client before it forked): connections made by
        the parent are its own, and two processes on one connection would read each other's answers. The child
        closes its copies (the parent's stay open) and connects afresh; a lock held at the fork is not reused."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        stacks, self._stacks = list(self._stacks.values()), {}
        for stack in stacks:
            stack.lock = threading.Lock()
            stack.close()

    def stacks(self) -> dict[Any, Any]:
        """The keep-alive stack of each endpoint this pool has used (a snapshot: for diagnostics and tests)."""
        return dict(self._stacks)

    def connections(self) -> int:
        """Open connections over every endpoint (for tests and status)."""
        return sum(stack.ledger.connections() for stack in list(self._stacks.values()))


class _Stack(LedgerStack[H1Connection]):
    """One endpoint's ledger behind a lock; callers past the cap wait on an event of their own, in FIFO order."""

    __slots__ = ("lock",)

    def __init__(self, owner: EndpointPools, origin: _Key) -> None:
        super().__init__(owner, origin)
        self.lock = threading.Lock()

    def checkout(self, timeout: float | None) -> H1Connection:
        ledger = self.ledger
        with self.lock:
            got = ledger.checkout()
            waiter: _ThreadWaiter | None = None
            if got is WAIT:
                waiter = _ThreadWaiter()
                ledger.enqueue(waiter)
            dropped = ledger.take_dropped() if ledger.dropped else None
        if dropped:
            _close_all(dropped)
        if waiter is not None:
            got = self._wait(waiter, timeout)
        if got is OPEN:
            scheme, host, port = self.origin
            owner = self.owner
            return H1Connection(scheme, host, port, owner._ssl_context, owner._expiry)
        assert isinstance(got, H1Connection)
        return got

    def _wait(self, waiter: _ThreadWaiter, timeout: float | None) -> H1Connection | str:
        ledger = self.ledger
        woken = waiter.event.wait(timeout)
        with self.lock:
            if not woken and not waiter.settled:
                ledger.gave_up(waiter)
                _, host, port = self.origin
                raise httpcore.PoolTimeout(
                    f"no connection to {host}:{port} free {within(timeout)} ({ledger.limit} in use)"
                )
        if waiter.closed:
            raise httpcore.ConnectError("the client was closed while this request waited for a connection")
        return waiter.given if waiter.given is not None else OPEN

    def checkin(self, connection: H1Connection) -> None:
        """A request is done with ``connection`` (response closed, or it failed)."""
        ledger = self.ledger
        with self.lock:
            ledger.checkin(connection)
            dropped = ledger.take_dropped() if ledger.dropped else None
        if dropped:
            _close_all(dropped)

    def close(self) -> None:
        ledger = self.ledger
        with self.lock:
            ledger.close()
            dropped = ledger.take_dropped()
        _close_all(dropped)


class _ThreadWaiter(Waiter[H1Connection]):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def wake(self) -> None:
        self.event.set()


def _close_all(connections: list[H1Connection]) -> None:
    for connection in connections:
        connection.close()


class _Read:
    """A body already in memory, handed over as a stream (``client.stream()`` of a small answer)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self) -> Iterator[bytes]:
        if self._data:
            yield self._data

    def close(self) -> None:
        self._data = b""


class _Returning:
    """The response body; closing it (read to the end, or not) returns the connection to its endpoint's stack."""

    __slots__ = ("_connection", "_returned", "_stack", "_stream")

    def __init__(self, stream: SyncBody | _Read, connection: H1Connection, stack: _Stack) -> None:
        self._stream = stream
        self._connection = connection
        self._stack = stack
        self._returned = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        if self._returned:
            return
        self._returned = True
        try:
            self._stream.close()
        finally:
            self._stack.checkin(self._connection)
