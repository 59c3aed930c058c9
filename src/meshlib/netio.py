"""The sync network backend for mesh hops: httpcore's ``NetworkBackend`` with fewer system calls per request.

Why not httpcore's own ``SyncBackend``: it sets the socket timeout (an ``ioctl``) before every read and write, and
CPython then ``poll``s before every ``send``, though a keep-alive socket's send buffer is all but always free. And
its TLS stream is an ``ssl.SSLSocket``: OpenSSL reads each TLS record with two ``read`` calls (5-byte header, then
the rest) and hands back one record per call, so a response written as two records (uvicorn writes headers and body
separately) costs five reads and a second trip through httpcore and h11. Measured on loopback: 13 system calls per
keep-alive mTLS request, against 8 for plaintext.

Here the socket stays non-blocking and is only polled when it must wait: a read polls, then takes everything there
is in one ``recv``; a write sends at once. TLS runs over memory BIOs (``ssl.SSLObject``, the same OpenSSL
engine and verification as ``SSLSocket``): one ``recv`` feeds every record that has arrived and one read returns
all of their plaintext. A keep-alive request costs 5 system calls, TLS or not.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

import httpcore

#: Bytes asked of the kernel per ``recv``: a whole HTTP/1.1 read (httpcore asks for 64 KiB) or several TLS records.
RECV_SIZE = 65536

#: Plaintext encrypted per step when writing (a large body is not encrypted into memory all at once).
WRITE_CHUNK = 256 * 1024

_SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class MeshNetworkBackend(httpcore.NetworkBackend):
    """TCP connections as :class:`SocketStream`; ``start_tls`` turns one into a :class:`TLSStream`."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        source = None if local_address is None else (local_address, 0)
        try:
            sock = socket.create_connection((host, port), timeout, source_address=source)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "timed out connecting") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return SocketStream(sock)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[_SocketOption] | None = None
    ) -> httpcore.NetworkStream:
        return httpcore.SyncBackend().connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Waiter:
    """poll() on one socket, for reading or for writing, with httpcore's timeout semantics (None = forever)."""

    __slots__ = ("_readable", "_writable")

    def __init__(self, sock: socket.socket) -> None:
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(sock, select.POLLOUT)

    def readable(self, deadline: float | None) -> bool:
        return bool(self._readable.poll(_millis(deadline)))

    def writable(self, deadline: float | None) -> bool:
        return bool(self._writable.poll(_millis(deadline)))

    def readable_now(self) -> bool:
        return bool(self._readable.poll(0))


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _millis(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _recv(sock: socket.socket, waiter: _Waiter, size: int, deadline: float | None) -> bytes:
    """Wait until readable, then take what is there. An answer already waiting is the rarer case, so poll first (as
    CPython does for sockets with a timeout). Raises TimeoutError; OSErrors pass through."""
    while True:
        if not waiter.readable(deadline):
            raise TimeoutError("timed out reading")
        try:
            return sock.recv(size)
        except BlockingIOError:  # woken for nothing: wait again
            continue


def _send_all(sock: socket.socket, waiter: _Waiter, data: bytes | memoryview, timeout: float | None) -> None:
    """Send at once; wait for the socket only when its buffer is full. The timeout bounds each wait, not the whole
    write (as httpcore's own streams do: a large upload may take long while it makes progress). Raises
    TimeoutError; OSErrors pass through."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            sent = 0
        if sent:
            view = view[sent:]
        elif not waiter.writable(_deadline(timeout)):
            raise TimeoutError("timed out writing")


class SocketStream(httpcore.NetworkStream):
    """A plaintext connection on a non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._waiter = _Waiter(sock)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return _recv(self._sock, self._waiter, max_bytes, _deadline(timeout))
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            _send_all(self._sock, self._waiter, buffer, timeout)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        try:
            return TLSStream(self._sock, self._waiter, ssl_context, server_hostname, timeout)
        except BaseException:
            self.close()
            raise

    def get_extra_info(self, info: str) -> Any:
        return _extra_info(self._sock, self._waiter, info, None, False)


def _extra_info(sock: socket.socket, waiter: _Waiter, info: str, ssl_object: Any, buffered: bool) -> Any:
    if info == "ssl_object":
        return ssl_object
    if info == "socket":
        return sock
    if info == "client_addr":
        return sock.getsockname()
    if info == "server_addr":
        return sock.getpeername()
    if info == "is_readable":  # httpcore asks before reusing an idle connection: anything there means it is over
        return buffered or sock.fileno() == -1 or waiter.readable_now()
    return None


class TLSStream(httpcore.NetworkStream):
    """TLS over memory BIOs on a non-blocking socket. Verification is the context's (hostname, chain, client
    certificate), exactly as with ``wrap_socket``."""

    def __init__(
        self,
        sock: socket.socket,
        waiter: _Waiter,
        context: ssl.SSLContext,
        server_hostname: str | None,
        timeout: float | None,
    ) -> None:
        self._sock = sock
        self._waiter = waiter
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        #: The last read filled the caller's buffer, so OpenSSL may hold more plaintext of that record.
        self._maybe_more = False
        deadline = _deadline(timeout)
        try:
            self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush(_remaining(deadline))
                    self._fill(deadline)
            self._flush(_remaining(deadline))
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from exc
        except ssl.SSLEOFError as exc:
            raise httpcore.ConnectError("the server closed the connection during the TLS handshake") from exc
        except OSError as exc:  # ssl.SSLError (verification included) is an OSError
            raise httpcore.ConnectError(str(exc)) from exc

    def _fill(self, deadline: float | None) -> None:
        data = _recv(self._sock, self._waiter, RECV_SIZE, deadline)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def _flush(self, timeout: float | None) -> None:
        data = self._outgoing.read()
        if data:
            _send_all(self._sock, self._waiter, data, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        tls, incoming = self._tls, self._incoming
        deadline = _deadline(timeout)
        try:
            if not incoming.pending and not (self._maybe_more and tls.pending()):
                self._fill(deadline)
            while True:
                try:
                    data = tls.read(max_bytes)
                    break
                except ssl.SSLWantReadError:  # a partial record, or only session tickets so far
                    self._flush(timeout)
                    self._fill(deadline)
            if incoming.pending and data:  # more records arrived together (headers, then body): hand them all over
                parts, total = [data], len(data)
                while incoming.pending and total < max_bytes:
                    try:
                        more = tls.read(max_bytes - total)
                    except ssl.SSLWantReadError:
                        break
                    if not more:
                        break
                    parts.append(more)
                    total += len(more)
                data = b"".join(parts)
            self._maybe_more = len(data) >= max_bytes
            if self._outgoing.pending:  # e.g. an answer to a TLS 1.3 KeyUpdate
                self._flush(timeout)
            return data
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""  # closed without close_notify: an EOF, as SSLSocket's suppress_ragged_eofs reports it
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            view = memoryview(buffer)
            for start in range(0, len(view), WRITE_CHUNK):  # encrypt and send piecewise: no second copy of a body
                self._tls.write(view[start : start + WRITE_CHUNK])
                self._flush(timeout)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        raise NotImplementedError("TLS in TLS (an HTTPS proxy) is not used for mesh hops")

    def get_extra_info(self, info: str) -> Any:
        buffered = bool(self._incoming.pending) or (self._maybe_more and self._tls.pending() > 0)
        return _extra_info(self._sock, self._waiter, info, self._tls, buffered)
