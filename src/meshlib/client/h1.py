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
import time
from collections.abc import Iterator
from typing import Any

import httpcore
import httptools

from .h1_answer import (
    ACTIVE,
    CLOSED,
    HTTP_VERSIONS,
    IDLE,
    LINE_OVERHEAD,
    MAX_HEAD_BYTES,
    KeepAlive,
    head_too_large,
    is_framed,
    keep_alive_header,
    reparse_leniently,
)
from .h1_body import Framer, request_head
from .h1_timer import within
from .outbound import Answer, Outbound

#: One read's size: what httpcore reads, and more than a TLS record (16 KiB), so a read never splits one.
READ_SIZE = 65536
#: Request bodies in memory up to this size go out in the same write as the head.
_JOIN_BELOW = 65536


class H1Connection(KeepAlive):
    """One keep-alive connection to one endpoint, used by one thread's request at a time."""

    __slots__ = (
        "_complete",
        "_framed",
        "_head_bytes",
        "_head_done",
        "_head_request",
        "_headers",
        "_informational",
        "_parser",
        "_parts",
        "_poll",
        "_raw_head",
        "_reason",
        "_sock",
        "_status",
        "_stray",
        "_timeout",
        "_version",
    )

    def __init__(
        self, scheme: bytes, host: str, port: int, ssl_context: ssl.SSLContext | None, keepalive: float | None
    ) -> None:
        super().__init__(scheme, host, port, ssl_context, keepalive)
        self._sock: socket.socket | None = None
        self._poll: Any = None
        self._timeout: float | None = -1.0  # what the socket is set to (settimeout is a system call: set on change)
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._reason = b""
        self._version = b"HTTP/1.1"
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_done = False
        self._head_request = False
        self._informational = False
        self._framed = False
        self._complete = False
        self._stray = False
        self._parts: list[bytes] = []

    # -- what pools._Stack uses ---------------------------------------------------------------------------
    def has_expired(self) -> bool:
        """Closed, idle past the keep-alive expiry, or readable while idle (the server closed it, or sent bytes
        nobody asked for: either way it cannot carry a request). One poll of this socket only."""
        if self._state == CLOSED:
            return True
        if self._idle_too_long() or (self._poll is not None and self._poll.poll(0)):
            self.close()
            return True
        return False

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
        method = request.method
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._raw_head = b""
        self._parts = []
        self._head_bytes = 0
        self._head_done = self._complete = self._informational = self._stray = False
        self._head_request = method == b"HEAD"
        try:
            head, length, whole = request_head(method, request.target, request.headers, request.stream)
            self._send_request(head, length, whole, request.stream, timeouts.get("write"))
            self._set_timeout(timeouts.get("read"))
            while not self._head_done:
                if not self.receive():
                    raise httpcore.RemoteProtocolError(f"{self._where()} closed the connection without an answer")
        except BaseException as exc:  # errors, and interruptions: a half-used connection is never reused
            self.close()
            if isinstance(exc, httpcore.RemoteProtocolError) and reused:
                exc.args = (f"{exc} (a reused keep-alive connection to {self._where()})",)
            raise
        extensions = {"http_version": self._version, "reason_phrase": self._reason, "network_stream": self}
        if self._complete:
            parts = self._parts
            self._parts = []
            return Answer(self._status, self._headers, parts[0] if len(parts) == 1 else b"".join(parts), extensions)
        return Answer(self._status, self._headers, SyncBody(self), extensions)

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

    def receive(self) -> bool:
        """One read, fed to the parser; False at the end of the connection (handled as the answer's state says)."""
        sock = self._sock
        if sock is None:
            raise httpcore.ReadError(f"the connection to {self._where()} was closed by the client")
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no answer from {self._where()} {within(self._timeout)}") from None
        except OSError as exc:
            raise httpcore.ReadError(f"{exc} (reading from {self._where()})") from exc
        if not data:
            self._ended()
            return False
        parser = self._parser
        if parser is None:  # bytes after the answer, in the same read: the connection cannot be trusted
            self._stray = True
            return True
        heading = not self._head_done  # its bytes are kept in case the head needs leniency
        if heading:
            self._raw_head += data
        try:
            parser.feed_data(data)
        except Exception as exc:  # the parser's errors, and ours raised from its callbacks
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, httpcore.ProtocolError):
                raise cause from None
            if heading and reparse_leniently(self):
                return True
            if self._complete:  # a whole answer, then garbage in the same read (a 204 with a body): keep the
                self._stray = True  # answer, as httpx does, and never reuse the connection
                self.close()
                return True
            raise httpcore.RemoteProtocolError(f"malformed HTTP response from {self._where()}: {exc}") from None
        return True

    def receive_ready(self) -> None:
        """Reads what is already on the socket, up to ``READ_SIZE`` buffered, without waiting: ``SSLSocket.recv``
        returns one 16 KiB record per call, and each part handed to httpx costs a pass through its decoders, so a
        large answer over TLS goes up in parts as large as in plaintext."""
        poll = self._poll
        while (
            not self._complete
            and poll is not None
            and self._sock is not None
            and sum(map(len, self._parts)) < READ_SIZE
            and poll.poll(0)
        ):
            self.receive()

    def _ended(self) -> None:
        """The server closed the connection: an unframed body ends here; anything else is left incomplete."""
        if self._head_done and not self._complete and not self._framed:
            self._complete = True
        elif self._head_done and not self._complete:
            self.close()
            raise httpcore.RemoteProtocolError(f"{self._where()} closed the connection mid-body")
        self.close()

    # -- httptools callbacks -----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:  # a second answer in the same read: nobody asked for it
            self._stray = True
            self.close()

    def on_status(self, status: bytes) -> None:
        if not self._complete:
            self._reason = status
            self._head_bytes = len(status) + 15  # "HTTP/1.1 200 " and CRLF, counted as the async engine does

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # trailers (after the head) are dropped, never mixed into the headers
            self._head_bytes += len(name) + len(value) + LINE_OVERHEAD
            if self._head_bytes > MAX_HEAD_BYTES:  # a hostile or broken server: bounded, as h11 bounds it
                raise head_too_large(self._where())
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None or self._complete:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httpcore.RemoteProtocolError(f"{self._where()} switched protocols; mesh hops do not upgrade")
            self._informational = True  # skipped: the real answer follows on the same connection
            self._headers = []
            return
        self._status = status
        self._version = HTTP_VERSIONS.get(parser.get_http_version(), b"HTTP/1.1")
        self._framed = is_framed(self._headers, status, self._head_request)
        self._head_done = True
        if self._head_request:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_done and not self._complete:
            self._parts.append(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        parser = self._parser
        if parser is None or self._complete:
            return
        keep = parser.should_keep_alive() and not self._head_request
        if self._head_request:
            keep = keep_alive_header(self._headers)
        self._parser = None  # nothing more may arrive until the next request
        self._complete = True
        if keep and not self._stray and self._state == ACTIVE:
            self._state = IDLE
            self._idle_since = time.monotonic()
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
        return self._connection._complete

    def __iter__(self) -> Iterator[bytes]:
        connection = self._connection
        while True:
            parts = connection._parts
            if parts:
                connection._parts = []
                yield parts[0] if len(parts) == 1 else b"".join(parts)
            elif connection._complete:
                if connection._stray:
                    connection.close()
                return
            else:
                try:
                    connection.receive()
                    connection.receive_ready()
                except BaseException:
                    connection.close()
                    raise

    def close(self) -> None:
        if not self._connection._complete:
            self._connection.close()
