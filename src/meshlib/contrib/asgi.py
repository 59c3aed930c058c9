"""The server half of the mesh as a pure ASGI middleware (so contextvars flow into the app's handlers):

- ``/-/mesh/health`` and ``/-/mesh/metrics`` (Prometheus text);
- the W3C trace context of the caller becomes the parent of a SERVER span, and the current context while the
  handler runs, so ``meshlib.Client`` calls made inside it continue the trace;
- ``x-mesh-deadline`` becomes the incoming deadline (outbound calls cap their timeouts to it), and work whose
  deadline has passed is answered 504 without running, or cut off with 504 if it has not started answering;
- server metrics and the access log line.

Starlette/FastAPI: ``app.add_middleware(MeshMiddleware)``. ``meshlib.serve`` adds it by itself.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..mesh import Mesh
from ..policy.deadline import incoming_deadline, parse_deadline_header
from ..security import authz
from ..security.spiffe import SpiffeId
from ..security.tls import identity_from_pem
from ..telemetry.metrics import status_class

log = logging.getLogger("meshlib.authz")
#: The verified identity of the caller of the request being handled (None: plaintext or not a mesh identity).
peer_identity: contextvars.ContextVar[SpiffeId | None] = contextvars.ContextVar("meshlib_peer_identity", default=None)


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


_PROPAGATOR = TraceContextTextMapPropagator()
Scope = dict[str, Any]


async def _send_json(send: Any, status: int, body: Any, content_type: bytes = b"application/json") -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith("/-/mesh/"):
            await self._mesh_endpoint(path, send)
            return
        mesh = self.mesh
        started = time.monotonic()
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        method = scope["method"]

        deadline = None
        raw_deadline = headers.get("x-mesh-deadline")
        if raw_deadline is not None:
            try:
                deadline = parse_deadline_header(raw_deadline)
            except ValueError as exc:
                await _send_json(send, 400, {"error": str(exc)})
                return
            if deadline <= time.time():
                await _send_json(send, 504, {"error": "deadline already passed before the request was handled"})
                self._record(mesh, scope, headers, method, 504, started, None, peer_of(scope))
                return

        peer = peer_of(scope)
        service_rules = mesh.rules.for_service(mesh.service)
        if service_rules is not None and service_rules.authorization is not None:
            settings = mesh.settings
            decision = authz.decide(service_rules.authorization, peer, settings.trust_domain, settings.namespace)
            if not decision.allowed or decision.would_deny:
                self._denied(mesh, peer, decision, method, scope["path"])
            if not decision.allowed:
                await _send_json(send, 403, {"error": "forbidden", "reason": decision.reason})
                self._record(mesh, scope, headers, method, 403, started, None, peer)
                return

        tel = mesh.telemetry
        parent = _PROPAGATOR.extract(headers)
        span = tel.tracer.start_server(method, "", parent) if tel is not None and tel.tracer.active() else None
        ctx = trace.set_span_in_context(span, parent) if span is not None else parent
        token = otel_context.attach(ctx)
        deadline_token = incoming_deadline.set(deadline)
        peer_token = peer_identity.set(peer)
        status_box = [500]
        response_started = [False]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = int(message["status"])
                response_started[0] = True
            await send(message)

        try:
            if deadline is None:
                await self.app(scope, receive, send_wrapper)
            else:
                with anyio.move_on_after(max(0.0, deadline - time.time())) as cancel_scope:
                    await self.app(scope, receive, send_wrapper)
                if cancel_scope.cancelled_caught and not response_started[0]:
                    status_box[0] = 504
                    await _send_json(send, 504, {"error": "deadline exceeded while handling the request"})
        except Exception:
            status_box[0] = 500
            if span is not None:
                span.set_status(StatusCode.ERROR, "unhandled exception")
            raise
        finally:
            incoming_deadline.reset(deadline_token)
            peer_identity.reset(peer_token)
            otel_context.detach(token)
            self._record(mesh, scope, headers, method, status_box[0], started, span, peer)

    @staticmethod
    def _denied(mesh: Mesh, peer: SpiffeId | None, decision: authz.Decision, method: str, path: str) -> None:
        mode = "permissive" if decision.allowed else "strict"
        if mesh.telemetry is not None:
            labels = (
                ("mesh.service", mesh.service),
                ("mesh.peer_service", peer.service if peer is not None else ""),
                ("mesh.authz_mode", mode),
            )
            mesh.telemetry.metrics.authz_denied.add(1, labels)
        verb = "would deny" if decision.allowed else "denied"
        log.warning("authorization %s %s %s (%s): %s", verb, method, path, mode, decision.reason)

    def _record(
        self,
        mesh: Mesh,
        scope: Scope,
        headers: dict[str, str],
        method: str,
        status: int,
        started: float,
        span: Any,
        peer_id: SpiffeId | None = None,
    ) -> None:
        tel = mesh.telemetry
        if tel is None:
            return
        elapsed = time.monotonic() - started
        route_obj = scope.get("route")
        route = str(getattr(route_obj, "path", "")) if route_obj is not None else ""
        # a verified identity wins; the x-mesh-caller header is only informational
        peer = peer_id.service if peer_id is not None else headers.get("x-mesh-caller", "")
        metrics = tel.metrics
        metrics.server_duration.record(elapsed, metrics.server_labels(peer, route, method, status_class(status)))
        if span is not None:
            if span.is_recording():
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("mesh.service", mesh.service)
                if peer:
                    span.set_attribute("mesh.peer_service", peer)
                if status >= 500:
                    span.set_status(StatusCode.ERROR, str(status))
            span.end()
        if tel.access.wanted():
            ctx = span.get_span_context() if span is not None else None
            tel.access.write(
                {
                    "kind": "server",
                    "source": peer or None,
                    "source_identity": peer_id.uri if peer_id is not None else None,
                    "destination": mesh.service,
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "attempt": int(headers.get("x-mesh-attempt", "1") or 1)
                    if headers.get("x-mesh-attempt", "1").isdigit()
                    else None,
                    "trace_id": f"{ctx.trace_id:032x}" if ctx is not None and ctx.is_valid else None,
                }
            )

    async def _mesh_endpoint(self, path: str, send: Any) -> None:
        mesh = self.mesh
        if path == "/-/mesh/health":
            body = {"status": "draining" if self.draining else "ok", "service": mesh.service}
            await _send_json(send, 503 if self.draining else 200, body)
        elif path == "/-/mesh/metrics":
            text = mesh.telemetry.metrics.prometheus() if mesh.telemetry is not None else ""
            await _send_json(send, 200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")
        else:
            await _send_json(send, 404, {"error": f"no mesh endpoint {path}"})
