"""The server half of the mesh as a pure ASGI middleware (so contextvars flow into the app's handlers).

Starlette/FastAPI: ``app.add_middleware(MeshMiddleware)``; ``meshlib.serve`` adds it by itself. It serves
``/-/mesh/health`` and ``/-/mesh/metrics``, enforces the deadline (504) and authorization (403) before the handler,
makes the caller's trace context, deadline and identity current while it runs, and records the server span,
metrics and access log line. The decisions live in ``meshlib.inbound``, shared with the WSGI and Django glue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import anyio

from ..inbound import Reply, admit, handling, mesh_endpoint, peer_identity
from ..runtime import Runtime, process_default
from ..security.spiffe import SpiffeId
from ..security.tls import identity_from_pem

#: uvicorn's own logger for an app's exceptions: where a server's log set-up already shows them.
_server_log = logging.getLogger("uvicorn.error")

Scope = dict[str, Any]
__all__ = ["MeshMiddleware", "peer_identity", "peer_of"]


def peer_of(scope: Scope) -> SpiffeId | None:
    """The caller's SPIFFE ID from the ASGI TLS extension (our uvicorn protocol parses it once per connection;
    other servers give the PEM chain)."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None
    if "mesh.peer_identity" in tls:
        identity: SpiffeId | None = tls["mesh.peer_identity"]
        return identity
    chain = tls.get("client_cert_chain") or []
    return identity_from_pem(chain[0]) if chain else None


async def _send_reply(send: Any, reply: Reply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"content-type", reply.content_type.encode()),
                (b"content-length", str(len(reply.body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": reply.body})


def _mesh_headers(raw: Any, propagated: tuple[str, ...]) -> dict[str, str]:
    """The request headers the mesh reads (its own ``x-mesh-*``, the trace context, the propagated names),
    decoded; the others are left alone (decoding every header cost more than all of the mesh's decisions)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        first = name[:1]
        if first in b"xXtT" or propagated:
            key = name.decode("latin-1").lower()
            if key.startswith(("x-mesh-", "trace")) or key in propagated:
                headers[key] = value.decode("latin-1")
    return headers


async def _within(seconds: float, handler: Coroutine[Any, Any, None]) -> bool:
    """Run ``handler`` for at most ``seconds``: True if it ended in time. On asyncio, ``asyncio.timeout`` (one timer
    handle; anyio's cancel scope costs about twice as much per request); elsewhere (trio), anyio's."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        with anyio.move_on_after(max(0.0, seconds)) as scope:
            await handler
        return not scope.cancelled_caught
    timeout = asyncio.timeout(max(0.0, seconds))
    try:
        async with timeout:
            await handler
    except TimeoutError:
        if not timeout.expired():  # the handler's own TimeoutError
            raise
        return False
    return True


class MeshMiddleware:
    def __init__(self, app: Any, mesh: Runtime | None = None) -> None:
        self.app = app
        self._mesh = mesh
        self.draining = False

    @property
    def mesh(self) -> Runtime:
        if self._mesh is None:
            self._mesh = process_default()
        return self._mesh

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("meshlib.inbound"):  # not HTTP, or an outer MeshMiddleware did it
            await self.app(scope, receive, send)
            return
        mesh = self.mesh
        path = scope["path"]
        reply = mesh_endpoint(mesh, path, self.draining)
        if reply is not None:
            await _send_reply(send, reply)
            return
        headers = _mesh_headers(scope["headers"], mesh.propagated_names)
        adm = admit(mesh, scope["method"], path, headers.get, peer_of(scope), headers)
        if adm.reply is not None:
            await _send_reply(send, adm.reply)
            return
        scope["meshlib.inbound"] = True  # tells WSGI glue below (a2wsgi passes the scope) that this is done
        status = [500]
        started = [False]

        whole = [False]

        async def send_wrapper(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                status[0] = int(message["status"])
                started[0] = True
            elif kind == "http.response.body" and not message.get("more_body"):
                whole[0] = True
            await send(message)

        try:
            try:
                with handling(adm):
                    if adm.deadline is None:
                        await self.app(scope, receive, send_wrapper)
                    else:
                        in_time = await _within(adm.deadline - time.time(), self.app(scope, receive, send_wrapper))
                        if not in_time and not started[0]:
                            status[0] = 504
                            await _send_reply(
                                send, Reply.json(504, {"error": "deadline exceeded while handling the request"})
                            )
            except Exception:
                if not whole[0]:
                    raise  # the server must close the connection: the response is cut short
                # Starlette sends its 500 and then re-raises; the server would close a connection whose response
                # is complete, while the client already reuses it for its next request (a reset, unsafe to
                # retry for a POST). Logged as the server would, and the connection is kept.
                _server_log.exception("Exception in ASGI application (its response was sent whole)")
        finally:
            route_obj = scope.get("route")  # Starlette's; a WSGI framework under a2wsgi notes its own
            route = scope.get("meshlib.route") or (str(getattr(route_obj, "path", "")) if route_obj is not None else "")
            adm.finish(status[0], route)
