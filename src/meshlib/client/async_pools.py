"""The async outbound engine for mesh hops: per-endpoint stacks of keep-alive connections, on the lean HTTP/1.1
engine (``async_h1.py``) under asyncio, and on httpcore's own connection class for HTTP/2 and under trio.

httpcore 1.0's pool matches queued requests to origins on every request and every release, walking every
connection and polling each socket: quadratic in connections x requests in flight, most of the client's CPU at
16-64 in flight. meshlib has already chosen the endpoint, so the decisions are ``pool_ledger.Ledger``'s (O(1)
per checkout and release, shared with the sync engine); requests past ``max_connections`` wait (``pool``
timeout) in FIFO order on anyio events, so they wait the same way under asyncio and trio.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpcore

from .async_h1 import AsyncH1Connection
from .async_h1_body import Body
from .h1_timer import within
from .outbound import Answer, Outbound, PoolLimits
from .pool_ledger import OPEN, WAIT, LedgerStack, Waiter
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
            answer.stream = body.take()  # bytes: read into the response by the shell
            stack.checkin(connection)
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
        return sum(stack.ledger.connections() for stack in self._stacks.values())


class _AnyioWaiter(Waiter[_Connection]):
    """Woken by anyio's Event, so waits work under asyncio and trio alike (an asyncio future needs a running
    asyncio loop)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()


class _AsyncStack(LedgerStack[_Connection]):
    """One endpoint's ledger; callers past the cap wait on an anyio event of their own, in FIFO order."""

    __slots__ = ()

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
        ledger = self.ledger
        got = ledger.checkout()
        if ledger.dropped:
            await self.close_dropped()
        if got is WAIT:
            got = await self._wait(timeout)
        if got is OPEN:
            return self._new()
        return got  # type: ignore[return-value]

    async def _wait(self, timeout: float | None) -> _Connection | str:
        ledger = self.ledger
        waiter = _AnyioWaiter()
        ledger.enqueue(waiter)
        try:
            with anyio.fail_after(timeout):
                await waiter.event.wait()
        except BaseException as exc:  # timed out or cancelled: what it was handed just then passes on
            ledger.gave_up(waiter)
            self._release_dropped()
            if isinstance(exc, TimeoutError):
                _, host, port = self.origin
                raise httpcore.PoolTimeout(
                    f"no connection to {host}:{port} free {within(timeout)} ({ledger.limit} in use)"
                ) from None
            raise
        if waiter.closed:
            raise httpcore.ConnectError("the client was closed while this request waited for a connection")
        return waiter.given if waiter.given is not None else OPEN

    def checkin(self, connection: _Connection) -> None:
        """A request is done with ``connection`` (response closed, or it failed)."""
        ledger = self.ledger
        ledger.checkin(connection)
        if ledger.dropped:
            self._release_dropped()

    def _release_dropped(self) -> None:
        """Close what the ledger dropped without making the caller (a release) wait: the lean connections at once,
        httpcore's in a task; under trio (no task to close them in from here) at the next checkout or close."""
        ledger = self.ledger
        left: list[_Connection] = []
        for connection in ledger.take_dropped():
            if type(connection) is AsyncH1Connection:
                connection._close()
            elif _asyncio_loop():
                _close_soon(connection)
            else:
                left.append(connection)
        ledger.dropped.extend(left)

    async def close_dropped(self) -> None:
        for connection in self.ledger.take_dropped():
            await connection.aclose()

    async def aclose(self) -> None:
        self.ledger.close()
        await self.close_dropped()


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
            if stack.ledger.dropped:  # under trio, or after the pools closed
                await stack.close_dropped()
