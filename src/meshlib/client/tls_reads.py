"""httpcore's sync network backend, with TLS reads that take every record already on the socket at once.

Why: an ``ssl.SSLSocket.recv`` returns at most one TLS record (16 KiB of plaintext), where a plaintext socket hands
over everything that has arrived. A 64 KiB answer over mTLS therefore took four trips through httpcore and h11
(tens of microseconds of Python each) where plaintext took one: most of what mesh TLS cost at that size. After a
read of a few KiB or more, the extra records already on the socket are taken with non-blocking ``recv`` calls,
which cost a C call each.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

#: Reads shorter than this came in one small record: nothing more is likely to be waiting.
COALESCE_FROM = 4096
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


class CoalescingBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _PlainStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _PlainStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PlainStream(httpcore.NetworkStream):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        sock = inner.get_extra_info("socket")
        return _TLSStream(inner, sock) if isinstance(sock, ssl.SSLSocket) else inner

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _TLSStream(_PlainStream):
    __slots__ = ("_sock",)

    def __init__(self, inner: httpcore.NetworkStream, sock: ssl.SSLSocket) -> None:
        super().__init__(inner)
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, timeout)  # blocks as httpcore does, with its timeout and error mapping
        if len(data) < COALESCE_FROM or len(data) >= max_bytes:
            return data
        sock = self._sock
        parts = [data]
        total = len(data)
        sock.setblocking(False)
        try:
            while total < max_bytes:
                try:
                    more = sock.recv(max_bytes - total)
                except _WOULD_BLOCK:
                    break
                except OSError:
                    break  # a reset or an unclean close: the next read reports it, with httpcore's mapping
                if not more:
                    break  # the peer closed: the next read sees that too
                parts.append(more)
                total += len(more)
        finally:
            sock.settimeout(timeout)
        return b"".join(parts)
