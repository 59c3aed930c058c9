"""Server-side mesh TLS for uvicorn.

- ``with_peer_identity``: a subclass of uvicorn's HTTP protocol that, once the handshake is done, puts the ASGI TLS
  extension (``scope["extensions"]["tls"]``, with the peer's SPIFFE ID parsed once per connection) into every
  request's scope (uvicorn itself puts no peer certificate in the scope), and sends a small response as one TLS
  record (``CorkedTransport``).
- ``sniffing``: permissive mode on *one* port, as Istio does it: the first byte of a connection tells a TLS
  ClientHello (0x16) from plaintext HTTP; TLS connections get a TLS layer (client certificate optional), the others
  go straight to HTTP.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any

from .connection_limits import REFUSALS
from .tls import tls_scope_extension

TLS_HANDSHAKE = 0x16


def with_peer_identity(protocol_class: type[Any]) -> type[Any]:
    """uvicorn's HTTP protocol, plus: the ASGI TLS extension in every scope, and a response's writes coalesced into
    one TLS record (see :class:`CorkedTransport`)."""
    sets_scope_per_message = hasattr(protocol_class, "on_message_begin")  # httptools: the scope is made there

    class MeshTLSProtocol(protocol_class):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                super().connection_made(transport)
                return
            super().connection_made(CorkedTransport(transport, asyncio.get_running_loop()))
            self._mesh_tls = tls = tls_scope_extension(ssl_object)
            if sets_scope_per_message:
                return
            app: Any = self.app  # type: ignore[has-type]

            async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
                await app(scope, receive, send)

            self.app = app_with_tls

        def connection_lost(self, exc: Exception | None) -> None:
            transport = getattr(self, "transport", None)
            if type(transport) is CorkedTransport:
                transport.lost = True
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            transport = self.transport
            if type(transport) is CorkedTransport:
                transport.response_complete()
            super().on_response_complete()

        if sets_scope_per_message:

            def on_message_begin(self) -> None:
                super().on_message_begin()
                tls = getattr(self, "_mesh_tls", None)
                if tls is not None:
                    self.scope["extensions"] = {"tls": tls}

    MeshTLSProtocol.__name__ = f"MeshTLS{protocol_class.__name__}"
    return MeshTLSProtocol


class CorkedTransport:
    """A TLS transport that sends a response's headers in the same TLS record as the first part of its body.

    uvicorn writes a response's headers and its body separately; over TLS each write is a record of its own (one
    more encryption, one more system call, one more read for the client). Measured with ``bench/tls_layers.py``
    (uvicorn on uvloop, TLS): two records cost the server 9 to 23 µs more CPU per request than one; over plaintext the
    two writes cost ~1 µs more than one, so plaintext transports are left alone.

    Only the first write of each response is held, and only until the next write, the end of the response
    (``flush``), or the next event-loop turn, whichever comes first: holding longer would delay the answer behind
    the server's own post-response work (telemetry, logging), which costs more latency than the record saves.
    Large writes are never held."""

    __slots__ = ("_armed", "_loop", "_pending", "_transport", "lost")

    #: Writes at least this large are not held back (they fill whole records anyway).
    PASS_THROUGH = 16384
    #: How long a closed connection waits for the peer's TLS close_notify before the socket is dropped. The event
    #: loop would wait 30 s; an idle keep-alive client never answers until it next uses the connection, so a
    #: graceful shutdown with idle clients took half a minute, past Kubernetes' default grace period.
    CLOSE_NOTIFY_WAIT = 0.5

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None
        self._armed = True
        #: Set by the protocol's connection_lost: nothing left to drop.
        self.lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if len(data) < self.PASS_THROUGH:
                self._transport.write(pending + data)
                return
            self._transport.write(pending)
        elif self._armed and len(data) < self.PASS_THROUGH:
            self._armed = False
            self._pending = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._transport.write(pending)

    def response_complete(self) -> None:
        """Send what is held; the next response's headers may be held again."""
        self.flush()
        self._armed = True

    def close(self) -> None:
        self.flush()
        self._transport.close()  # sends close_notify, after what is still buffered
        self._loop.call_later(self.CLOSE_NOTIFY_WAIT, self._drop, self._loop.time() + 30.0)

    def _drop(self, give_up: float) -> None:
        """Drop the socket once what was written has left the TLS layer (a slow reader of a large response keeps
        it), at most as late as the event loop itself would."""
        if self.lost:
            return
        if self._transport.get_write_buffer_size() and self._loop.time() < give_up:
            self._loop.call_later(self.CLOSE_NOTIFY_WAIT, self._drop, give_up)
            return
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        pending = self._pending
        return self._transport.get_write_buffer_size() + (len(pending) if pending is not None else 0)

    def is_closing(self) -> bool:  # asked once per response: not through __getattr__
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:  # pause_reading, resume_reading, set_protocol, ...
        return getattr(self._transport, name)


class _RefusalReportingSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS layer, reporting refused handshakes (no, expired or foreign client certificate, plaintext
    where TLS was expected) to the rate-limited refusal log instead of dropping them silently."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            transport = getattr(self, "_transport", None)
            peer = transport.get_extra_info("peername") if transport is not None else None
            reason = getattr(handshake_exc, "verify_message", None) or getattr(handshake_exc, "reason", None)
            REFUSALS.refused(f"TLS handshake failed: {reason or handshake_exc}", peer)
        super()._on_handshake_complete(handshake_exc)


def sniffing(protocol_class: type[Any], context: ssl.SSLContext, first_byte_timeout: float = 10.0) -> type[Any]:
    class SniffingProtocol(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self._loop = kwargs.get("_loop") or asyncio.get_event_loop()
            self._inner = protocol_class(**kwargs)
            self._transport: asyncio.Transport | None = None
            self._timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._transport = transport  # type: ignore[assignment]
            self._timer = self._loop.call_later(first_byte_timeout, self._silent)

        def _silent(self) -> None:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                REFUSALS.refused(f"no byte within {first_byte_timeout:g}s", transport.get_extra_info("peername"))
                transport.close()

        def data_received(self, data: bytes) -> None:
            transport = self._transport
            assert transport is not None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if data[0] == TLS_HANDSHAKE:
                layer = _RefusalReportingSSLProtocol(
                    self._loop,
                    self._inner,
                    context,
                    None,  # type: ignore[arg-type]  # no waiter: the app protocol is told by connection_made
                    server_side=True,
                    ssl_handshake_timeout=10,
                )
                transport.set_protocol(layer)
                layer.connection_made(transport)
                view = memoryview(data)
                while view:
                    buffer = layer.get_buffer(len(view))
                    n = min(len(buffer), len(view))
                    buffer[:n] = view[:n]
                    layer.buffer_updated(n)
                    view = view[n:]
            else:
                transport.set_protocol(self._inner)
                self._inner.connection_made(transport)
                self._inner.data_received(data)

        def eof_received(self) -> bool | None:
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:  # closed before sending a byte
                self._timer.cancel()
                self._timer = None

    return SniffingProtocol
