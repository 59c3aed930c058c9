"""Reading an answer on an ``AsyncH1Connection``: the httptools (llhttp) callbacks that fill in its status, headers
and body, and decide at its end whether the connection may carry another request."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

import httpcore
import httptools

from .h1_body import Body

if TYPE_CHECKING:
    from .async_h1 import AsyncH1Connection

IDLE, ACTIVE, CLOSED = 0, 1, 2
_HIGH_WATER = 256 * 1024  # buffered response bytes past which the socket stops being read
#: The most an answer's head may hold (status line and header lines, counted as sent); past it the answer is
#: refused. 100 KiB, as httpcore bounds h11 (its max_incomplete_event_size): what httpx accepts, both engines do.
MAX_HEAD_BYTES = 100 * 1024
#: A header line's bytes besides its name and value: ": " and CRLF.
LINE_OVERHEAD = 4


def head_too_large(where: str) -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError(f"{where} sent an answer head over {MAX_HEAD_BYTES} bytes")


#: The version an answer's status line named, as httpx reports it in ``response.http_version``.
HTTP_VERSIONS = {"1.0": b"HTTP/1.0", "1.1": b"HTTP/1.1"}


class KeepAlive:
    """What both engines' connections share: their endpoint, and the keep-alive state their stacks read."""

    __slots__ = ("_host", "_idle_since", "_keepalive", "_port", "_ssl", "_state", "_used")

    def __init__(
        self, scheme: bytes, host: str, port: int, ssl_context: ssl.SSLContext | None, keepalive: float | None
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context if scheme == b"https" else None
        self._keepalive = keepalive
        self._state = IDLE
        self._idle_since = 0.0
        self._used = False

    def _idle_too_long(self) -> bool:
        """Closed, or idle past the keep-alive expiry."""
        if self._state == CLOSED:
            return True
        keepalive = self._keepalive
        return keepalive is not None and self._used and time.monotonic() - self._idle_since > keepalive

    def is_idle(self) -> bool:
        return self._state == IDLE

    def is_closed(self) -> bool:
        return self._state == CLOSED

    def _where(self) -> str:
        return f"{self._host}:{self._port}"

    def get_extra_info(self, info: str) -> Any:
        """The connection is its answers' ``extensions["network_stream"]``, for callers that read a hop's peer
        certificate or addresses as on httpcore's streams: ``ssl_object`` (its ``getpeercert()`` holds the SPIFFE ID
        the mesh verified), ``client_addr``, ``server_addr``, ``socket``; None for other names, or once closed."""
        return None


class AnswerReader:
    """The parser's side of a connection (mixed into ``AsyncH1Connection``, which owns the I/O and the state)."""

    _parser: httptools.HttpResponseParser | None
    _head: asyncio.Future[None] | None
    _transport: asyncio.Transport | None
    _body: Body | None
    _headers: list[tuple[bytes, bytes]]
    _answer_headers: list[tuple[bytes, bytes]]
    _reason: bytes
    _head_bytes: int
    _status: int
    _framed: bool
    _head_request: bool
    _informational: bool
    _reading_paused: bool
    _read_timeout: float | None
    _lost: BaseException | None
    _state: int
    _idle_since: float

    def _where(self) -> str:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def on_status(self, status: bytes) -> None:
        self._reason = status
        self._head_bytes = len(status) + 15  # "HTTP/1.1 200 " and CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + LINE_OVERHEAD
        if self._head_bytes > MAX_HEAD_BYTES:  # a hostile or broken server: bounded, as h11 bounds it
            raise head_too_large(self._where())
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httpcore.RemoteProtocolError(f"{self._where()} switched protocols; mesh hops do not upgrade")
            self._informational = True  # skipped: the real answer follows on the same connection
            return
        self._status = status
        self._version = HTTP_VERSIONS.get(parser.get_http_version(), b"HTTP/1.1")
        self._framed = is_framed(self._headers, status, self._head_request)
        self._answer_headers, self._headers = self._headers, []  # trailers, if any, land apart and are dropped
        self._body = Body(cast("AsyncH1Connection", self), self._read_timeout)
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)  # before a HEAD answer completes: its Connection: close must not fail it
        if self._head_request:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_request:  # a HEAD answer carrying a body anyway: dropped, and the connection with it
            if self._state == IDLE:
                self._close()
            return
        body_stream = self._body
        if body_stream is not None:
            body_stream.feed(body)
            if body_stream.buffered > _HIGH_WATER and self._transport is not None and not self._reading_paused:
                self._reading_paused = True
                self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._headers = []
            return
        body = self._body
        if body is None or body.complete:
            return
        parser = self._parser
        keep = parser is not None and parser.should_keep_alive() and not self._head_request
        if self._head_request:
            keep = keep_alive_header(self._answer_headers)
        self._parser = None  # nothing more may arrive until the next request
        body.finish()
        if keep and self._lost is None and self._state == ACTIVE:
            self._state = IDLE
            self._idle_since = time.monotonic()
        else:
            self._close()


def is_framed(headers: list[tuple[bytes, bytes]], status: int, head_request: bool) -> bool:
    """Whether an answer's end is known without the connection closing: a Content-Length or chunked body, or no
    body at all (HEAD, 204, 304)."""
    if head_request or status in (204, 304):
        return True
    for name, value in headers:
        if len(name) in (14, 17):  # content-length, transfer-encoding
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
    return False


def keep_alive_header(headers: list[tuple[bytes, bytes]]) -> bool:
    """After a HEAD answer (which the parser cannot frame): the connection stays open unless it says close."""
    return not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def lenient_head(data: bytes) -> bytes | None:
    """The bytes of an answer whose head llhttp refused, made acceptable where h11 (httpx's parser) accepts them:
    obs-folded header lines unfolded (RFC 9112 §5.2: a user agent replaces the fold with a space), and a
    Content-Length repeated with one value (two headers of ``2``, or ``2, 2``) given once (RFC 9110 §8.6).
    None when neither applies, or the lengths disagree: the refusal stands. Anything else llhttp checks (header
    characters, framing) still is, on the rewritten head."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    out = [lines[0]]
    changed = False
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and len(out) > 1:  # a continuation of the previous header line
            out[-1] = out[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
            changed = True
        else:
            out.append(line)
    at = [i for i, line in enumerate(out) if line.split(b":", 1)[0].strip().lower() == b"content-length"]
    if at:
        values = {part.strip() for i in at for part in out[i].split(b":", 1)[1].split(b",")}
        if len(at) > 1 or b"," in out[at[0]]:
            if len(values) != 1:
                return None  # lengths that disagree: a smuggling attempt or a broken server
            (value,) = values
            if not value.isdigit():
                return None
            out[at[0]] = b"Content-Length: " + value
            out = [line for i, line in enumerate(out) if i not in at[1:]]
            changed = True
    if not changed:
        return None
    return b"\r\n".join(out) + b"\r\n\r\n" + data[end + 4 :]


def reparse_leniently(connection: Any) -> bool:
    """The answer head llhttp refused, parsed again as h11 would take it (``lenient_head``), on a fresh parser of
    either engine's connection; False when leniency cannot help (the refusal stands)."""
    fixed = lenient_head(connection._raw_head)
    if fixed is None:
        return False
    connection._raw_head = b""
    connection._headers = []  # nothing of the body was kept yet: it only starts after the head
    connection._parser = parser = httptools.HttpResponseParser(connection)
    try:
        parser.feed_data(fixed)
    except Exception:
        return False
    return True
