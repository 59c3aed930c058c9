"""Response bodies between httpcore and the caller: httpcore's errors raised as httpx's while streaming, and
small bodies read inside the attempt (so that a reset mid-body is a failed attempt, retried where allowed)."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpcore
import httpx

from .bare_request import kept_headers
from .errors import to_httpx_error
from .outbound import Answer


class ResponseStream(httpx.SyncByteStream):
    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpcore.ProtocolError as exc:
            raise to_httpx_error(exc) from exc
        except (httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise to_httpx_error(exc) from exc

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class AsyncResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise to_httpx_error(exc) from exc

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


#: Set while ``Client.send(stream=True)`` runs (``client.stream()``): the response is handed over unread, as
#: httpx hands it (no small-body shortcut: ``iter_raw()`` works and ``is_stream_consumed`` is False).
streaming: contextvars.ContextVar[bool] = contextvars.ContextVar("meshlib_streaming", default=False)

#: Responses up to this size (by Content-Length) are read before the attempt counts as answered.
PREFETCH_LIMIT = 64 * 1024


def small_body(raw: httpcore.Response | Answer) -> bool:
    """A small body announced by Content-Length is read inside the attempt, as a proxy buffering it would: an
    instance dying between headers and body is then a failed attempt (retried where allowed), not a ReadError in
    the caller's hands. Larger or chunked bodies stream to the caller untouched."""
    for name, value in raw.headers:
        if name.lower() == b"content-length":
            try:
                return int(value) <= PREFETCH_LIMIT
            except ValueError:
                return False
    return False


def read_small(stream: Any) -> bytes:
    """A small body read inside the attempt (the shells hand it over with ``read_response``)."""
    try:
        body = b"".join(stream)
    finally:
        close = getattr(stream, "close", None)  # httpcore's in-memory streams have none
        if close is not None:
            close()
    return body


async def aread_small(stream: Any) -> bytes:
    try:
        body = b"".join([part async for part in stream])
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return body


def read_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, extensions: Any) -> httpx.Response:
    """An ``httpx.Response`` for a body already in memory, read as ``Response.read()`` would read it. Without a
    Content-Encoding, that read only walks httpx's decoder and chunker generators over one piece of bytes (about
    7 us); here the read state is set directly, when this httpx's responses are known to match it (checked once
    at import: otherwise, and for encoded bodies, httpx reads as usual)."""
    if _DIRECT_READ and not _encoded(headers):
        # (the parser's names and values are bytes already checked: httpx's normalising of each is skipped)
        kept = kept_headers([(name, name.lower(), value) for name, value in headers])
        response = httpx.Response(status, headers=kept, stream=httpx.ByteStream(body), extensions=extensions)
        _mark_read(response, body)
    else:
        response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body), extensions=extensions)
        response.read()
    return response


def _encoded(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(len(name) == 16 and name.lower() == b"content-encoding" for name, _ in headers)


def _mark_read(response: httpx.Response, body: bytes) -> None:
    response._content = body
    response._num_bytes_downloaded = len(body)
    response.is_stream_consumed = True
    response.is_closed = True  # closing a ByteStream does nothing


def _direct_read_matches() -> bool:
    """Whether a directly marked response is in the state httpx's own read leaves (an httpx upgrade that changes
    its internals turns the shortcut off instead of breaking responses)."""
    body = b"meshlib"
    try:
        read = httpx.Response(200, stream=httpx.ByteStream(body))
        read.read()
        marked = httpx.Response(200, stream=httpx.ByteStream(body))
        _mark_read(marked, body)
        pairs = [(b"Content-Type", b"text/plain"), (b"X-A", b"\xff")]
        kept = httpx.Response(200, headers=kept_headers([(k, k.lower(), v) for k, v in pairs]))
        return (
            vars(kept.headers) == vars(httpx.Response(200, headers=pairs).headers)
            and set(vars(read)) - {"_decoder"} == set(vars(marked))
            and (marked.content, marked.num_bytes_downloaded, marked.is_closed, marked.is_stream_consumed)
            == (read.content, read.num_bytes_downloaded, read.is_closed, read.is_stream_consumed)
            and list(marked.iter_bytes()) == list(read.iter_bytes())
        )
    except Exception:
        return False


_DIRECT_READ = _direct_read_matches()


def discard(response: httpx.Response) -> None:
    """Drop an attempt's response that a retry replaces; reading a small body keeps its connection reusable."""
    try:
        length = int(response.headers.get("content-length", "0") or 0)
        if length <= 65536:
            response.read()
    except Exception:
        pass
    finally:
        response.close()


async def adiscard(response: httpx.Response) -> None:
    try:
        length = int(response.headers.get("content-length", "0") or 0)
        if length <= 65536:
            await response.aread()
    except Exception:
        pass
    finally:
        await response.aclose()
