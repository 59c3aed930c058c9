"""A request's bytes on an HTTP/1.1 connection, sans I/O, for both engines: the head (validated: nothing from a
caller may split a header or a request line) and the body's parts framed as the head declared (checked: a body
longer or shorter than declared would break the connection's framing)."""

from __future__ import annotations

import re
from typing import Any

import httpcore
import httpx

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_OK = re.compile(rb"[^\r\n\x00]*")
_TARGET = re.compile(rb"[^\x00-\x20\x7f]+")
# a whole well-formed head in one pass (with the line count checked apart: a CR LF inside a value would
# otherwise read as a header line of its own)
_HEAD = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^\x00-\x20\x7f]+ HTTP/1\.1\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n\x00]*\r\n)*\r\n"
)


def request_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], stream: Any
) -> tuple[bytes, int | None, bytes | None]:
    """(the head's bytes, the declared Content-Length or -1 for chunked or None, the whole body when it is already
    in memory). Raises ``httpcore.LocalProtocolError`` naming what would have broken the framing."""
    head = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, b"".join([b"%s: %s\r\n" % pair for pair in headers]))
    if _HEAD.fullmatch(head) is None or head.count(b"\n") != len(headers) + 2:
        _name_the_problem(method, target, headers)
    lowered = head.lower()  # valid now: every line is a header, so a match is a header's name
    framed = b"\ncontent-length:" in lowered or b"\ntransfer-encoding:" in lowered
    length = _framing(headers) if framed else None
    whole: bytes | None = None
    if isinstance(stream, httpx.ByteStream):
        whole = b"".join(stream)
        if length == -1:
            whole = b"%x\r\n%s\r\n0\r\n\r\n" % (len(whole), whole) if whole else b"0\r\n\r\n"
        elif len(whole) != (length or 0):
            raise httpcore.LocalProtocolError(f"the body is {len(whole)} bytes, Content-Length says {length}")
    return head, length, whole


def _framing(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's framing the head declares: its Content-Length, -1 for chunked, None for none. Both at once are
    refused, in either order: a server and a proxy that pick different ones see different requests (smuggling)."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.strip().isdigit() or (length is not None and length != int(value)):
                raise httpcore.LocalProtocolError(f"invalid Content-Length {value!r}")
            length = int(value)
        elif lowered == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise httpcore.LocalProtocolError(f"unsupported Transfer-Encoding {value!r}")
            chunked = True
    if chunked and length is not None:
        raise httpcore.LocalProtocolError("a request may not carry both Content-Length and Transfer-Encoding")
    return -1 if chunked else length


def _name_the_problem(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if _TOKEN.fullmatch(method) is None:
        raise httpcore.LocalProtocolError(f"invalid HTTP method {method!r}")
    if _TARGET.fullmatch(target) is None:
        raise httpcore.LocalProtocolError(f"invalid request target {target!r}")
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None:
            raise httpcore.LocalProtocolError(f"invalid header name {name!r}")
        if _VALUE_OK.fullmatch(value) is None:
            raise httpcore.LocalProtocolError(f"invalid value for header {name.decode()!r}: CR, LF or NUL")
    raise httpcore.LocalProtocolError("invalid request head")  # pragma: no cover - one of the above applies


class Framer:
    """A streamed request body's parts as they go on the wire: chunked, or checked against the Content-Length the
    head declared (a body longer or shorter than declared would break the connection's framing)."""

    __slots__ = ("_chunked", "_length", "_sent")

    def __init__(self, length: int | None) -> None:
        self._chunked = length == -1
        self._length = length or 0
        self._sent = 0

    def frame(self, part: bytes) -> bytes:
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(part), part)
        self._sent += len(part)
        if self._sent > self._length:
            raise httpcore.LocalProtocolError(f"the body is longer than its Content-Length ({self._length})")
        return part

    def end(self) -> bytes:
        """What closes the body (chunked: the last chunk); raises if a sized body came up short."""
        if self._chunked:
            return b"0\r\n\r\n"
        if self._sent != self._length:
            raise httpcore.LocalProtocolError(
                f"the body ended after {self._sent} bytes, Content-Length says {self._length}"
            )
        return b""
