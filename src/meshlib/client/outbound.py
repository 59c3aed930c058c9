"""One attempt's request and answer as the async engine passes them: plain slotted objects. httpcore's models
validate and copy every header on construction; the attempt's headers are built by the mesh and checked once,
where they are written (``h1_request.request_head``). httpcore's objects are made only where httpcore runs."""

from __future__ import annotations

import ssl
from typing import Any

import httpcore


class Outbound:
    """An attempt's request: the endpoint's origin, the target and raw headers, the body stream."""

    __slots__ = ("extensions", "headers", "host", "method", "port", "scheme", "stream", "target")

    def __init__(
        self,
        method: bytes,
        scheme: bytes,
        host: str,
        port: int,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: Any,
        extensions: dict[str, Any],
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.host = host
        self.port = port
        self.target = target
        self.headers = headers
        self.stream = stream
        self.extensions = extensions

    def to_httpcore(self) -> httpcore.Request:
        return httpcore.Request(
            method=self.method,
            url=httpcore.URL(scheme=self.scheme, host=self.host, port=self.port, target=self.target),
            headers=self.headers,
            content=self.stream,
            extensions=self.extensions,
        )


class Answer:
    """An attempt's response head and body stream (the attributes of ``httpcore.Response`` the shells read); the
    body as ``bytes`` when it came whole with the head."""

    __slots__ = ("extensions", "headers", "status", "stream")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], stream: Any, extensions: dict[str, Any]):
        self.status = status
        self.headers = headers
        self.stream = stream
        self.extensions = extensions


class PoolLimits:
    """httpx's pool options as both engines' per-endpoint stacks read them (``limits`` apply per endpoint)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int | None = 100,
        max_keepalive_connections: int | None = 20,
        keepalive_expiry: float | None = 5.0,
    ) -> None:
        self._ssl_context = ssl_context
        self._max = max_connections or 1_000_000
        self._keepalive = max_keepalive_connections if max_keepalive_connections is not None else self._max
        self._expiry = keepalive_expiry


#: The ``trace`` extension's events for one exchange, in httpcore's names and order (httpx's command line prints
#: the answer's status line and headers from the last one).
_SENT = ("http11.send_request_headers.started", "http11.send_request_headers.complete")
_HEAD = ("http11.receive_response_headers.started", "http11.receive_response_headers.complete")


def trace_events(request: Outbound, answer: Any) -> list[tuple[str, dict[str, Any]]]:
    """What a ``trace`` callback is told of one attempt whose answer head arrived."""
    extensions = answer.extensions
    head = (
        extensions.get("http_version", b"HTTP/1.1"),
        answer.status,
        extensions.get("reason_phrase", b""),
        list(answer.headers),
    )
    return [
        (_SENT[0], {"request": request.to_httpcore()}),
        (_SENT[1], {"return_value": None}),
        (_HEAD[0], {"request": request.to_httpcore()}),
        (_HEAD[1], {"return_value": head}),
    ]
