"""Server-side mesh TLS for uvicorn.

- ``with_peer_identity``: a subclass of uvicorn's HTTP protocol that, once the handshake is done, puts the ASGI TLS
  extension (``scope["extensions"]["tls"]``, with the peer's SPIFFE ID parsed once per connection) into every
  request's scope. uvicorn itself puts no peer certificate in the scope.
- ``sniffing``: permissive mode on *one* port, as Istio does it: the first byte of a connection tells a TLS
  ClientHello (0x16) from plaintext HTTP; TLS connections get a TLS layer (client certificate optional), the others
  go straight to HTTP.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any

from .tls import tls_scope_extension

TLS_HANDSHAKE = 0x16


def with_peer_identity(protocol_class: type[Any]) -> type[Any]:
    class MeshTLSProtocol(protocol_class):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                return
            tls = tls_scope_extension(ssl_object)
            app: Any = self.app  # type: ignore[has-type]

            async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
                await app(scope, receive, send)

            self.app = app_with_tls

    MeshTLSProtocol.__name__ = f"MeshTLS{protocol_class.__name__}"
    return MeshTLSProtocol


def sniffing(protocol_class: type[Any], context: ssl.SSLContext) -> type[Any]:
    class SniffingProtocol(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self._loop = kwargs.get("_loop") or asyncio.get_event_loop()
            self._inner = protocol_class(**kwargs)
            self._transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            transport = self._transport
            assert transport is not None
            if data[0] == TLS_HANDSHAKE:
                layer = asyncio.sslproto.SSLProtocol(
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
            pass  # closed before sending a byte

    return SniffingProtocol
