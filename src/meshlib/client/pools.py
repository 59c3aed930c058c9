"""The sync client's outbound engine for mesh hops: per-endpoint stacks of idle keep-alive connections
(``h1.H1Connection``), shared by the caller's threads.

As in the async engine (``async_pools.py``): meshlib has already chosen the endpoint when it sends, so a checkout pops
that endpoint's most recently used idle connection (one poll, on that connection only, to see it is still
usable), and a release pushes it back and wakes one waiting thread. At most ``max_connections`` per endpoint;
threads past it wait (``pool`` timeout). No lock is held while a connection connects, sends or waits for an answer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpcore

from .h1 import H1Connection, SyncBody
from .h1_timer import within
from .outbound import Answer, Outbound, PoolLimits
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
            stack.ready = threading.Condition(threading.Lock())
            stack.close()

    def stacks(self) -> dict[Any, Any]:
        """The keep-alive stack of each endpoint this pool has used (a snapshot: for diagnostics and tests)."""
        return dict(self._stacks)

    def connections(self) -> int:
        """Open connections over every endpoint (for tests and status)."""
        return sum(stack.active + len(stack.idle) for stack in list(self._stacks.values()))


class _Stack:
    __slots__ = ("active", "closed", "idle", "origin", "owner", "ready")

    def __init__(self, owner: EndpointPools, origin: _Key) -> None:
        self.owner = owner
        self.origin = origin
        self.idle: list[H1Connection] = []
        self.active = 0  # checked out, or being connected
        self.closed = False  # the client was closed: connections still in use are closed when released
        self.ready = threading.Condition(threading.Lock())

    def checkout(self, timeout: float | None) -> H1Connection:
        owner = self.owner
        deadline: float | None = None
        with self.ready:
            while True:
                idle = self.idle
                while idle:
                    connection = idle.pop()
                    if not connection.has_expired():  # closed by the peer or idle too long: it closed itself
                        self.active += 1
                        return connection
                if self.active < owner._max:
                    self.active += 1
                    break
                if timeout is not None:
                    deadline = deadline or time.monotonic() + timeout
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.ready.wait(left):
                        if self.idle or self.active < owner._max:
                            continue  # freed just as the wait ended
                        _, host, port = self.origin
                        raise httpcore.PoolTimeout(
                            f"no connection to {host}:{port} free {within(timeout)} ({owner._max} in use)"
                        )
                else:
                    self.ready.wait()
        scheme, host, port = self.origin
        return H1Connection(scheme, host, port, owner._ssl_context, owner._expiry)

    def checkin(self, connection: H1Connection) -> None:
        """A request is done with ``connection`` (response closed, or it failed)."""
        dropped: H1Connection | None = None
        with self.ready:
            self.active -= 1
            if self.closed:
                dropped = connection
            elif connection.is_idle() and not connection.is_closed():
                self.idle.append(connection)
                if len(self.idle) > self.owner._keepalive:  # keep the most recently used; close the oldest
                    dropped = self.idle.pop(0)
            self.ready.notify()
        if dropped is not None:
            dropped.close()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            idle, self.idle = self.idle, []
        for connection in idle:
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
