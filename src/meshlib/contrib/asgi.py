"""The server half of the mesh as a pure ASGI middleware (so contextvars flow into the app's handlers).

Starlette/FastAPI: ``app.add_middleware(MeshMiddleware)``; ``meshlib.serve`` adds it by itself. It serves
``/-/mesh/health`` and ``/-/mesh/metrics``, enforces the deadline (504) and authorization (403) before the handler,
makes the caller's trace context, deadline and identity current while it runs, and records the server span,
metrics and access log line. The decisions live in ``meshlib.inbound``, shared with the WSGI and Django glue.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from ..inbound import Reply, admit, handling, mesh_endpoint, peer_identity
from ..mesh import Mesh
from ..security.spiffe import SpiffeId
from ..security.tls import identity_from_pem

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


class MeshMiddleware:
    def __init__(self, app: Any, mesh: Mesh | None = None) -> None:
        self.app = app
        self._mesh = mesh
        self.draining = False

    @property
    def mesh(self) -> Mesh:
        if self._mesh is None:
            self._mesh = Mesh.default()
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
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        adm = admit(mesh, scope["method"], path, headers.get, peer_of(scope), headers)
        if adm.reply is not None:
            await _send_reply(send, adm.reply)
            return
        scope["meshlib.inbound"] = True  # tells WSGI glue below (a2wsgi passes the scope) that this is done
        status = [500]
        started = [False]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                started[0] = True
            await send(message)

        try:
            with handling(adm):
                if adm.deadline is None:
                    await self.app(scope, receive, send_wrapper)
                else:
                    with anyio.move_on_after(max(0.0, adm.deadline - time.time())) as cancel_scope:
                        await self.app(scope, receive, send_wrapper)
                    if cancel_scope.cancelled_caught and not started[0]:
                        status[0] = 504
                        await _send_reply(
                            send, Reply.json(504, {"error": "deadline exceeded while handling the request"})
                        )
        finally:
            route_obj = scope.get("route")
            adm.finish(status[0], str(getattr(route_obj, "path", "")) if route_obj is not None else "")
