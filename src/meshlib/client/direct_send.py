"""The last steps of httpx's ``send`` for a request the mesh transport serves, without the parts that cost there and
do nothing for it.

For every request, httpx runs its auth flow (an async generator, ended by a ``StopAsyncIteration``) even when
there is no auth, enters a ``contextlib`` context manager to name the request in a transport error, asks an ABC
whether the request's stream is the right kind, and wraps the response's stream to time its close, which for a
mesh answer already read whole is a no-op the client then unwraps. Together about a twentieth of a mesh call's CPU
at 64 calls in flight. Here: no auth flow when there is no auth (httpx's ``Auth()`` hands the request back
unchanged and ends), and for mesh hosts httpx's ``_send_single_request`` step by step, minus those costs. The
steps are those of the httpx versions listed in ``_WRITTEN_FOR`` (checked by reading them); any other httpx takes
its own way for every request.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

#: The httpx versions whose ``_send_single_request`` and ``_send_handling_auth`` these steps follow.
_WRITTEN_FOR = ("0.28.", "0.29.")

_BoundSyncStream: Any = getattr(httpx._client, "BoundSyncStream", None)
_BoundAsyncStream: Any = getattr(httpx._client, "BoundAsyncStream", None)
_logger: Any = getattr(httpx._client, "logger", None)

#: This httpx sends as these steps do.
DIRECT_SEND: bool = (
    httpx.__version__.startswith(_WRITTEN_FOR)
    and None not in (_BoundSyncStream, _BoundAsyncStream, _logger)
    and hasattr(httpx.Client, "_send_handling_redirects")
    and hasattr(httpx.AsyncClient, "_send_handling_redirects")
)


def no_auth(auth: httpx.Auth) -> bool:
    """Whether the request's auth is httpx's "none": ``Auth`` itself, whose flow yields the request once."""
    return type(auth) is httpx.Auth


def send_to_mesh(client: Any, request: httpx.Request) -> httpx.Response:
    """``httpx.Client._send_single_request`` for a request the mesh transport serves."""
    start = time.perf_counter()
    if type(request.stream) is not httpx.ByteStream and not isinstance(request.stream, httpx.SyncByteStream):
        raise RuntimeError("Attempted to send an async request with a sync Client instance.")
    try:
        response: httpx.Response = client._mesh_transport.handle_request(request)
    except httpx.RequestError as exc:
        exc.request = request
        raise
    return _received(client, request, response, start, _BoundSyncStream)


async def asend_to_mesh(client: Any, request: httpx.Request) -> httpx.Response:
    """``httpx.AsyncClient._send_single_request`` for a request the mesh transport serves."""
    start = time.perf_counter()
    if type(request.stream) is not httpx.ByteStream and not isinstance(request.stream, httpx.AsyncByteStream):
        raise RuntimeError("Attempted to send a sync request with an AsyncClient instance.")
    try:
        response: httpx.Response = await client._mesh_transport.handle_async_request(request)
    except httpx.RequestError as exc:
        exc.request = request
        raise
    return _received(client, request, response, start, _BoundAsyncStream)


def _received(
    client: Any, request: httpx.Request, response: httpx.Response, start: float, bound: Any
) -> httpx.Response:
    response.request = request
    if not response.is_closed:  # a body still to read: its close is timed, as httpx times it
        response.stream = bound(response.stream, response=response, start=start)
    client._cookies.extract_cookies(response)
    response.default_encoding = client._default_encoding
    if _logger.isEnabledFor(logging.INFO):
        _logger.info(
            'HTTP Request: %s %s "%s %d %s"',
            request.method,
            request.url,
            response.http_version,
            response.status_code,
            response.reason_phrase,
        )
    return response
