"""The async outbound engine for mesh hops: per-endpoint stacks of idle keep-alive connections, on httpcore's own
connection class (connect, TLS, HTTP/1.1, every timeout phase, cancellation handled as httpcore does).

meshlib has already chosen the endpoint when it sends, so it needs no general pool that matches queued requests
to origins. httpcore 1.0's pool does exactly that, on every request and every release, walking every connection
and polling each socket: quadratic in connections x requests in flight, most of the client's CPU at 16-64 in
flight. Here a checkout pops the endpoint's most recently used idle connection (O(1); one socket poll, on that
connection only, to see it is still usable), and a release pushes it back or hands it straight to a waiting
request. At most ``max_connections`` per endpoint; requests past it wait (``pool`` timeout) in FIFO order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpcore

from .async_h1 import AsyncH1Connection
from .h1_body import Body
from .h1_timer import within
from .outbound import Answer, Outbound, PoolLimits
from .streams import streaming

_Key = tuple[bytes, str, int]
_Connection = AsyncH1Connection | httpcore.AsyncHTTPConnection


class AsyncEndpointPools(PoolLimits):
    """What ``httpcore.AsyncConnectionPool`` is to httpx's transport, for one destination service's endpoints."""

    def __init__(self, *, http1: bool = True, http2: bool = False, lean: bool = True, **limits: Any) -> None:
        super().__init__(**limits)
        # the lean HTTP/1.1 engine (h1.py) needs asyncio; HTTP/2 and other event loops use httpcore's connection
        self._lean = lean and http1 and not http2
        self._http1 = http1
        self._http2 = http2
        self._stacks: dict[_Key, _AsyncStack] = {}

    async def send(self, request: Outbound) -> Answer | httpcore.Response:
        """One attempt over a connection of its endpoint's stack. An answer whose body came with its head (most
        small ones) returns its connection at once and carries its body in memory."""
        key = (request.scheme, request.host, request.port)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks[key] = _AsyncStack(self, key)
        timeouts = request.extensions.get("timeout") or {}
        connection = await stack.checkout(timeouts.get("pool"))
        try:
            if isinstance(connection, AsyncH1Connection):
                answer: Answer | httpcore.Response = await connection.send(request)
            else:
                answer = await connection.handle_async_request(request.to_httpcore())
        except BaseException:
            stack.checkin(connection)  # it closed itself if it was left in a bad state
            raise
        body = answer.stream
        if type(body) is Body and body.complete and not streaming.get():  # client.stream() keeps it until closed
            stack.checkin(connection)
            answer.stream = body.take()  # bytes: read into the response by the shell
            return answer
        answer.stream = _AsyncReturning(body, connection, stack)
        return answer

    async def aclose(self) -> None:
        stacks, self._stacks = list(self._stacks.values()), {}
        for stack in stacks:
            await stack.aclose()

    def stacks(self) -> dict[Any, Any]:
        """The keep-alive stack of each endpoint this pool has used (a snapshot: for diagnostics and tests)."""
        return dict(self._stacks)

    def connections(self) -> int:
        """Open connections over every endpoint (for tests and status)."""
        return sum(stack.active + len(stack.idle) for stack in self._stacks.values())


class _Waiter:
    """One caller waiting for a connection at the cap: handed a connection, or room to open one (None). Built on
    anyio's Event, so it works under asyncio and trio alike (an asyncio future needs a running asyncio loop)."""

    __slots__ = ("closed", "event", "given", "settled")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.given: _Connection | None = None
        self.settled = False  # handed something, gave up, or the pool closed
        self.closed = False

    def done(self) -> bool:
        return self.settled

    def set_result(self, connection: _Connection | None) -> None:
        self.given, self.settled = connection, True
        self.event.set()

    def cancel(self) -> None:
        self.settled = self.closed = True
        self.event.set()


class _AsyncStack:
    __slots__ = ("active", "closed", "evicted", "idle", "origin", "owner", "waiters")

    def __init__(self, owner: AsyncEndpointPools, origin: _Key) -> None:
        self.owner = owner
        self.origin = origin
        self.idle: list[_Connection] = []
        self.active = 0  # checked out, or being connected
        self.waiters: collections.deque[_Waiter] = collections.deque()
        #: Idle connections dropped past the keep-alive cap outside asyncio, closed at the next checkout.
        self.evicted: list[_Connection] = []
        #: The pools were closed: a connection still out (a body being read) is closed when it comes back.
        self.closed = False

    def _new(self) -> _Connection:
        owner = self.owner
        scheme, host, port = self.origin
        if owner._lean:
            return AsyncH1Connection(scheme, host, port, owner._ssl_context, owner._expiry)
        return httpcore.AsyncHTTPConnection(
            origin=httpcore.Origin(scheme, host.encode("ascii"), port),
            ssl_context=owner._ssl_context,
            keepalive_expiry=owner._expiry,
            http1=owner._http1,
            http2=owner._http2,
        )

    async def checkout(self, timeout: float | None) -> _Connection:
        if self.evicted:
            await self.close_evicted()
        idle = self.idle
        while idle:
            connection = idle.pop()
            if connection.has_expired():  # closed by the peer, or idle past keepalive_expiry: one poll, O(1)
                await connection.aclose()
                continue
            self.active += 1
            return connection
        if self.active < self.owner._max:
            self.active += 1
            return self._new()
        # at the cap: wait for a connection handed over by a release (or for room to open one)
        waiter = _Waiter()
        self.waiters.append(waiter)
        try:
            with anyio.fail_after(timeout):
                await waiter.event.wait()
            if waiter.closed:
                raise httpcore.ConnectError("the client was closed while this request waited for a connection")
            handed = waiter.given
        except TimeoutError:
            _, host, port = self.origin
            raise httpcore.PoolTimeout(
                f"no connection to {host}:{port} free {within(timeout)} ({self.owner._max} in use)"
            ) from None
        except BaseException:
            if waiter.settled and not waiter.closed:
                given = waiter.given
                if given is not None:
                    self.checkin(given)  # handed over just as we were cancelled: pass it on
                else:
                    self.active -= 1  # we were given room to open one, and will not
            raise
        finally:
            if not waiter.settled:
                waiter.settled = True  # gave up (timed out, cancelled): a release passes this one by
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
        return handed if handed is not None else self._new()

    def checkin(self, connection: _Connection) -> None:
        """A request is done with ``connection`` (response closed, or it failed)."""
        if self.closed:  # as the sync pools do: nothing is kept once the client is closed
            self.active -= 1
            self._drop(connection)
            return
        reusable = connection.is_idle() and not connection.is_closed()
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.done():
                continue
            # the slot stays counted as active: it moves to the waiter, with this connection or with room for one
            waiter.set_result(connection if reusable else None)
            return
        self.active -= 1
        if not reusable:
            return
        self.idle.append(connection)
        if len(self.idle) > self.owner._keepalive:  # keep the most recently used; close the oldest
            self._drop(self.idle.pop(0))

    def _drop(self, connection: _Connection) -> None:
        if _asyncio_loop():
            _close_soon(connection)
        else:  # trio: no task to close it in from here; the next checkout, release or close does
            self.evicted.append(connection)

    async def close_evicted(self) -> None:
        evicted, self.evicted = self.evicted, []
        for connection in evicted:
            await connection.aclose()

    async def aclose(self) -> None:
        self.closed = True
        idle, self.idle = self.idle + self.evicted, []
        self.evicted = []
        for connection in idle:
            await connection.aclose()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.cancel()


_closing: set[asyncio.Task[None]] = set()


def _asyncio_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _close_soon(connection: _Connection) -> None:
    """Close a connection dropped from a stack without making the caller (a release) wait for it."""
    task = asyncio.get_running_loop().create_task(connection.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class _AsyncReturning:
    """The response body; closing it (read to the end, or not) returns the connection to its endpoint's stack."""

    __slots__ = ("_connection", "_returned", "_stack", "_stream")

    def __init__(self, stream: Any, connection: _Connection, stack: _AsyncStack) -> None:
        self._stream = stream
        self._connection = connection
        self._stack = stack
        self._returned = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        if self._returned:
            return
        try:
            await self._stream.aclose()
        finally:
            self._returned = True
            stack = self._stack
            stack.checkin(self._connection)
            if stack.evicted and stack.closed:
                await stack.close_evicted()
