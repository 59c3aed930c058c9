"""A lean HTTP/1.1 client connection for mesh hops: an asyncio ``Protocol`` with httptools (llhttp, the C parser
uvicorn uses) in place of httpcore's connection with h11.

Why: at 64 calls in flight, httpcore's connection (anyio streams, locks, timeouts as context managers, h11's
pure-Python state machine) was most of ``meshlib.AsyncClient``'s CPU per request. Here the event loop calls
``data_received`` and the parser's callbacks fill in the response; the caller waits on one future per phase.

It speaks what a mesh hop needs, and fails closed on anything else: keep-alive, request bodies of a known length
or chunked (streamed, with write flow control), response bodies by Content-Length, chunked or until close
(streamed, with read flow control), 1xx answers skipped, HEAD, ``Connection: close``, a server closing a reused
connection. No upgrades, no pipelining, no HTTP/2 (the pools fall back to httpcore for HTTP/2). Errors are
httpcore's exception classes, so the mesh's verdicts and httpx's exceptions are the same as on every other path.
Reading the answer is ``AnswerCore``'s (shared with the sync engine); this is the I/O, flow control and timeouts.
It implements the part of ``httpcore.AsyncHTTPConnection`` that ``async_pools.py`` uses.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpcore

from .async_h1_body import Body, write_body
from .h1_core import AnswerCore
from .h1_request import request_head
from .h1_timer import Watch, within
from .outbound import Answer, Outbound
from .pool_ledger import ACTIVE, CLOSED, IDLE, KeepAlive

#: httpcore's ``get_extra_info`` names, as asyncio's transports call them.
_TRANSPORT_INFO = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername", "socket": "socket"}


#: Buffered response bytes past which the socket stops being read (until the caller takes them).
_HIGH_WATER = 256 * 1024


class AsyncH1Connection(KeepAlive, asyncio.Protocol):
    """One keep-alive connection to one endpoint, used by one request at a time."""

    def __init__(
        self, scheme: bytes, host: str, port: int, ssl_context: ssl.SSLContext | None, keepalive: float | None
    ) -> None:
        super().__init__(scheme, host, port, ssl_context, keepalive)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = (
            None  # the connection's (asked once: in 3.11 each ask is a getpid)
        )
        self._core = AnswerCore(self._where())
        self._head: asyncio.Future[None] | None = None  # the answer's head, awaited by send()
        self._body: Body | None = None
        self._paused_writing: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._read_timeout: float | None = None
        self._reading_paused = False
        self.watch = Watch()

    # -- what async_pools.py uses -------------------------------------------------------------------------------
    def has_expired(self) -> bool:
        return self._idle_too_long()

    async def aclose(self) -> None:
        self._close()

    async def send(self, request: Outbound) -> Answer:
        timeouts = request.extensions.get("timeout") or {}
        if self._transport is None:
            await self._connect(timeouts.get("connect"), request.extensions.get("sni_hostname"))
        elif self._state != IDLE:
            raise httpcore.ConnectionNotAvailable()
        reused, self._used = self._used, True
        self._state = ACTIVE
        method = request.method
        loop = self._loop
        assert loop is not None
        self._head = head = loop.create_future()
        self._core.start(method)
        self._read_timeout = timeouts.get("read")
        self._body = None
        try:
            head_bytes, length, whole = request_head(method, request.target, request.headers, request.stream)
            transport = self._transport
            assert transport is not None
            if whole is not None:
                if len(whole) < 65536:
                    transport.write(head_bytes + whole)
                else:
                    transport.write(head_bytes)
                    transport.write(whole)
                if self._paused_writing is not None or self._lost is not None:
                    await self._drained(timeouts.get("write"))
            else:
                transport.write(head_bytes)
                await write_body(self, request.stream, length, timeouts.get("write"))
            await self.watch.arm(head, timeouts.get("read"), httpcore.ReadTimeout)
        except BaseException as exc:
            self._close()
            if isinstance(exc, httpcore.RemoteProtocolError) and reused and self._body is None:
                exc.args = (f"{exc} (a reused keep-alive connection to {self._where()})",)
            raise
        body = self._body
        assert body is not None
        core = self._core
        extensions = {"http_version": core.version, "reason_phrase": core.reason, "network_stream": self}
        return Answer(core.status, core.headers, body, extensions)

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        name = _TRANSPORT_INFO.get(info)
        if transport is None or name is None or self._state == CLOSED:
            return None
        return transport.get_extra_info(name)

    # -- I/O helpers used by the body streams ---------------------------------------------------------------
    async def _drained(self, timeout: float | None) -> None:
        if self._lost is not None and self._head is not None and not self._head.done():
            raise httpcore.WriteError(f"the connection to {self._where()} closed while the request was sent")
        paused = self._paused_writing
        if paused is not None:
            await self.watch.arm(paused, timeout, httpcore.WriteTimeout)

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def _connect(self, timeout: float | None, sni: str | None) -> None:
        self._loop = loop = asyncio.get_running_loop()
        host = self._host
        server_hostname = (sni or host) if self._ssl is not None else None
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: self, host, self._port, ssl=self._ssl, server_hostname=server_hostname
                )
        except TimeoutError:
            self._close()
            raise httpcore.ConnectTimeout(f"no connection to {self._where()} {within(timeout)}") from None
        except OSError as exc:  # refused, unreachable, and TLS failures (ssl.SSLError is an OSError)
            self._close()
            raise httpcore.ConnectError(f"{exc} (connecting to {self._where()})") from exc
        except BaseException:  # cancelled mid-connect: never kept as if it were an idle connection
            self._close()
            raise

    def _close(self) -> None:
        self._state = CLOSED
        self.watch.stop()
        transport = self._transport
        if transport is not None:
            transport.abort() if self._body is None or not self._body.complete else transport.close()
        self._fail(httpcore.ReadError("the connection was closed by the client"))

    def _fail(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            _settle(head, exc)
        body = self._body
        if body is not None and not body.complete:
            body.fail(exc)
        paused = self._paused_writing
        if paused is not None and not paused.done():
            _settle(paused, httpcore.WriteError(str(exc)))

    # -- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._state != ACTIVE:  # bytes nobody asked for: the connection cannot be trusted
            self._close()
            return
        core = self._core
        heading = not core.head_done
        try:
            core.feed(data)
        except httpcore.ProtocolError as failure:
            self._lost = failure
            self._fail(failure)
            self._close()
            return
        if heading:
            if not core.head_done:
                return
            self._body = Body(self, self._read_timeout)
            head = self._head
            if head is not None and not head.done():
                head.set_result(None)  # before a HEAD answer completes: its Connection: close must not fail it
        body = self._body
        if body is None:
            return
        if core.parts:
            body.wake()
            if core.buffered > _HIGH_WATER and self._transport is not None and not self._reading_paused:
                self._reading_paused = True
                self._transport.pause_reading()
        if core.complete and not body.complete:
            body.finish()
            if core.reusable and self._lost is None and self._state == ACTIVE:
                self._now_idle()
            else:
                self._close()

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        self.watch.stop()
        if self._lost is None:
            self._lost = exc or ConnectionResetError("closed by the server")
        paused = self._paused_writing
        if paused is not None and not paused.done():
            _settle(paused, httpcore.WriteError(f"{self._where()} closed the connection during the upload"))
        head, body = self._head, self._body
        if (head is not None and not head.done()) or (body is not None and not body.complete):
            try:
                self._core.ended()  # a body delimited by the connection's end is complete now
            except httpcore.RemoteProtocolError as failure:
                self._fail(failure)
            else:
                if body is not None:
                    body.finish()
        self._state = CLOSED

    def pause_writing(self) -> None:
        self._paused_writing = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        paused, self._paused_writing = self._paused_writing, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and self._state != CLOSED:
            self._reading_paused = False
            self._transport.resume_reading()


def _settle(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail a future that may have no waiter left (the request already gave up): no "never retrieved" warning."""
    future.set_exception(exc)
    future.exception()
