"""A lean blocking HTTP/1.1 client connection for the sync client's mesh hops: a socket (TLS when the hop is) and
httptools (llhttp, the C parser uvicorn uses) in place of httpcore's connection with h11.

Why: one request at a time on loopback, httpcore's sync connection (h11's pure-Python state machine, its stream,
trace and pool plumbing) costs about 270 us of client CPU more than a blocking socket fed to llhttp, on a machine
where the whole plain-httpx call costs about 500 us. In a sequential caller that CPU is latency: it is most of
what a mesh hop added over calling the application directly.

It speaks what ``h1.AsyncH1Connection`` (the async engine) speaks, and fails closed the same way: keep-alive, request
bodies of a known length or chunked, response bodies by Content-Length, chunked or until close, 1xx answers
skipped, HEAD, ``Connection: close``, a server closing a reused connection; no upgrades, no pipelining, no HTTP/2.
Errors are httpcore's exception classes, so verdicts and httpx's exceptions match every other path.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import httpcore

from .h1_core import AnswerCore
from .h1_request import Framer, request_head
from .h1_timer import within
from .outbound import Answer, Outbound
from .pool_ledger import ACTIVE, CLOSED, IDLE, KeepAlive

#: One read's size: what httpcore reads, and more than a TLS record (16 KiB), so a read never splits one.
READ_SIZE = 65536
#: Request bodies in memory up to this size go out in the same write as the head.
_JOIN_BELOW = 65536


class H1Connection(KeepAlive):
    """One keep-alive connection to one endpoint, used by one thread's request at a time. Reading the answer is
    ``AnswerCore``'s; this is the socket, its timeouts and the waits."""

    __slots__ = ("_core", "_poll", "_sock", "_timeout")

    def __init__(
        self, scheme: bytes, host: str, port: int, ssl_context: ssl.SSLContext | None, keepalive: float | None
    ) -> None:
        super().__init__(scheme, host, port, ssl_context, keepalive)
        self._sock: socket.socket | None = None
        self._poll: Any = None
        self._timeout: float | None = -1.0  # what the socket is set to (settimeout is a system call: set on change)
        self._core = AnswerCore(self._where())

    # -- what pools.py uses ---------------------------------------------------------------------------
    def has_expired(self) -> bool:
        """Closed, idle past the keep-alive expiry, or readable while idle (the server closed it, or sent bytes
        nobody asked for: either way it cannot carry a request). One poll of this socket only; the pool closes
        an expired connection outside its lock."""
        return self._idle_too_long() or (self._poll is not None and bool(self._poll.poll(0)))

    def get_extra_info(self, info: str) -> Any:
        sock = self._sock
        if sock is None:
            return None
        if info == "ssl_object":
            return sock if isinstance(sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        return sock if info == "socket" else None

    def close(self) -> None:
        self._state = CLOSED
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def send(self, request: Outbound) -> Answer:
        """Write the request and read the answer's head. A body that came with the head (most small answers) is
        returned as ``bytes`` and the connection is idle again; otherwise the body streams from the socket."""
        extensions = request.extensions
        timeouts = extensions.get("timeout") or {}
        if self._sock is None:
            if self._state == CLOSED:
                raise httpcore.ConnectionNotAvailable()
            self._connect(timeouts.get("connect"), extensions.get("sni_hostname"))
        elif self._state != IDLE:
            raise httpcore.ConnectionNotAvailable()
        reused, self._used = self._used, True
        self._state = ACTIVE
        core = self._core
        core.start(request.method)
        try:
            head, length, whole = request_head(request.method, request.target, request.headers, request.stream)
            self._send_request(head, length, whole, request.stream, timeouts.get("write"))
            self._set_timeout(timeouts.get("read"))
            while not core.head_done:
                self.receive()
        except BaseException as exc:  # errors, and interruptions: a half-used connection is never reused
            self.close()
            if isinstance(exc, httpcore.RemoteProtocolError) and reused:
                exc.args = (f"{exc} (a reused keep-alive connection to {self._where()})",)
            raise
        extensions = {"http_version": core.version, "reason_phrase": core.reason, "network_stream": self}
        if core.complete:
            return Answer(core.status, core.headers, core.take(), extensions)
        return Answer(core.status, core.headers, SyncBody(self), extensions)

    # -- I/O ----------------------------------------------------------------------------------------------
    def _set_timeout(self, seconds: float | None) -> None:
        if seconds != self._timeout:
            assert self._sock is not None
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def _connect(self, timeout: float | None, sni: str | None) -> None:
        host = self._host
        try:
            sock = socket.create_connection((host, self._port), timeout=timeout)
        except TimeoutError:
            self.close()
            raise httpcore.ConnectTimeout(f"no connection to {self._where()} {within(timeout)}") from None
        except OSError as exc:
            self.close()
            raise httpcore.ConnectError(f"{exc} (connecting to {self._where()})") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:  # the handshake, under the connect timeout; the identity is checked here
                sock = self._ssl.wrap_socket(sock, server_hostname=sni or host)
        except TimeoutError:
            sock.close()
            self.close()
            raise httpcore.ConnectTimeout(f"no TLS handshake with {self._where()} {within(timeout)}") from None
        except OSError as exc:  # ssl.SSLError is an OSError: a refused certificate names itself
            sock.close()
            self.close()
            raise httpcore.ConnectError(f"{exc} (connecting to {self._where()})") from exc
        except BaseException:
            sock.close()
            self.close()
            raise
        self._sock = sock
        self._timeout = timeout
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def _send_request(
        self, head: bytes, length: int | None, whole: bytes | None, stream: Any, timeout: float | None
    ) -> None:
        sock = self._sock
        assert sock is not None
        self._set_timeout(timeout)

        def write(data: bytes) -> None:
            try:
                sock.sendall(data)
            except TimeoutError:
                raise httpcore.WriteTimeout(
                    f"could not send the request to {self._where()} {within(timeout)}"
                ) from None
            except OSError as exc:
                raise _WriteFailed from exc

        try:
            if whole is None:
                write(head)
                framer = Framer(length)
                for part in stream:  # the caller's iterator: its own errors propagate as they are
                    if part:
                        write(framer.frame(part))
                write(framer.end())
            elif len(whole) < _JOIN_BELOW:
                write(head + whole)
            else:
                write(head)
                write(whole)
        except _WriteFailed:
            # the server may have answered and closed before reading it all (a 413, a 401): read that answer, as
            # httpcore does; with no answer, the read names the closed connection
            pass

    def receive(self) -> None:
        """One read, fed to the core; the end of the connection is the core's to judge (a body delimited by the
        close ends there; an answer cut short is an error naming what was missing)."""
        sock = self._sock
        if sock is None:
            raise httpcore.ReadError(f"the connection to {self._where()} was closed by the client")
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no answer from {self._where()} {within(self._timeout)}") from None
        except OSError as exc:
            raise httpcore.ReadError(f"{exc} (reading from {self._where()})") from exc
        if data:
            core = self._core
            core.feed(data)
            if core.complete and self._state == ACTIVE:
                self._finished()
        else:
            self.close()
            self._core.ended()

    def receive_ready(self) -> None:
        """Reads what is already on the socket, up to ``READ_SIZE`` buffered, without waiting: ``SSLSocket.recv``
        returns one 16 KiB record per call, and each part handed to httpx costs a pass through its decoders, so a
        large answer over TLS goes up in parts as large as in plaintext."""
        poll = self._poll
        core = self._core
        while not core.complete and self._sock is not None and core.buffered < READ_SIZE and poll.poll(0):
            self.receive()

    def _finished(self) -> None:
        """The answer is whole (its body may still be unread, in memory): the connection is idle again if the core
        says it may carry another request, and closed otherwise."""
        if self._core.reusable and self._state == ACTIVE:
            self._now_idle()
        else:
            self.close()


class _WriteFailed(Exception):
    """The socket refused a write (the server closed or reset the connection)."""


class SyncBody:
    """An answer's body streamed from its connection (httpcore's sync stream interface). Closing it before the end
    closes the connection: a half-read connection is never reused."""

    __slots__ = ("_connection",)

    def __init__(self, connection: H1Connection) -> None:
        self._connection = connection

    @property
    def complete(self) -> bool:
        return self._connection._core.complete

    def __iter__(self) -> Iterator[bytes]:
        connection = self._connection
        core = connection._core
        while True:
            if core.parts:
                yield core.take()
            elif core.complete:
                return
            else:
                try:
                    connection.receive()
                    connection.receive_ready()
                except BaseException:
                    connection.close()
                    raise

    def close(self) -> None:
        if not self._connection._core.complete:
            self._connection.close()
