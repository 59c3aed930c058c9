"""The server half of the mesh as plain decisions, shared by every framework shell (ASGI, WSGI/Flask, Django):

``admit`` runs before the handler — mesh endpoints, deadline, identity and authorization, trace context — and
``Admission.finish`` after it — server span, metrics, access log. The shells only move bytes and set context.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .logsafe import Throttle, printable
from .policy.deadline import parse_deadline_header
from .propagation import incoming_deadline, propagated_headers
from .runtime import Runtime
from .security import authz
from .security.spiffe import SpiffeId
from .security.tls import identity_from_der, identity_from_pem
from .telemetry.metrics import UNVERIFIED_PEER
from .telemetry.record import record_server_request

log = logging.getLogger("meshlib.authz")
_PROPAGATOR = TraceContextTextMapPropagator()
HEALTH = "/-/mesh/health"
METRICS = "/-/mesh/metrics"


@dataclass
class Reply:
    """A response the mesh gives itself, without running the handler."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any) -> Reply:
        return cls(status, json.dumps(payload).encode())


@dataclass
class Admission:
    mesh: Runtime
    method: str
    path: str
    started: float
    peer: SpiffeId | None
    caller: str
    attempt: str | None
    #: Epoch seconds, from ``x-mesh-deadline``.
    deadline: float | None = None
    #: Set when the handler must not run; the shell sends it.
    reply: Reply | None = None
    span: Span | None = None
    context: otel_context.Context | None = None
    #: The request's headers named by MESH_PROPAGATE_HEADERS, sent on by mesh calls made while handling it.
    propagated: tuple[tuple[str, str], ...] = ()
    #: A gRPC call: its shell names the span and sets the RPC attributes; ``finish`` adds no HTTP ones.
    rpc: bool = False
    #: A mirrored copy (``x-mesh-mirror: 1``): its metrics and span say so.
    mirrored: bool = False
    finished: bool = field(default=False, repr=False)

    def finish(self, status: int, route: str = "") -> None:
        """After the response: end the server span, record metrics and the access log line. Idempotent."""
        if self.finished:
            return
        self.finished = True
        tel = self.mesh.telemetry
        if tel is None:
            return
        record_server_request(
            tel,
            self.span,
            service=self.mesh.service,
            peer=self.peer.service if self.peer is not None else (UNVERIFIED_PEER if self.caller else ""),
            peer_uri=self.peer.uri if self.peer is not None else None,
            route=route,
            method=self.method,
            path=self.path,
            status=status,
            elapsed=time.monotonic() - self.started,
            mirrored=self.mirrored,
            rpc=self.rpc,
            attempt=_attempt_number(self.attempt),
            claimed=self.caller if self.peer is None else None,
        )


def _attempt_number(raw: str | None) -> int | None:
    """``x-mesh-attempt`` for the access log: a small ASCII number, else nothing (it is informational)."""
    if raw is None or len(raw) > 4 or not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)


def mesh_endpoint(mesh: Runtime, path: str, draining: bool = False) -> Reply | None:
    """``/-/mesh/health`` and ``/-/mesh/metrics``; None for any other path."""
    if path == HEALTH:
        return Reply.json(
            503 if draining else 200, {"status": "draining" if draining else "ok", "service": mesh.service}
        )
    if path == METRICS:
        text = mesh.telemetry.metrics.prometheus() if mesh.telemetry is not None else ""
        return Reply(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
    if path.startswith("/-/mesh/"):
        return Reply.json(404, {"error": f"no mesh endpoint {path}"})
    return None


def admit(
    mesh: Runtime,
    method: str,
    path: str,
    header: Callable[[str], str | None],
    peer: SpiffeId | None,
    carrier: Mapping[str, str],
) -> Admission:
    """Decide everything that happens before the handler. ``header`` looks up a lower-case header name;
    ``carrier`` holds the trace headers (``traceparent``, ``tracestate``)."""
    caller = header("x-mesh-caller") or ""
    adm = Admission(mesh, method, path, time.monotonic(), peer, caller, header("x-mesh-attempt"))
    adm.mirrored = header("x-mesh-mirror") == "1"
    raw_deadline = header("x-mesh-deadline")
    if raw_deadline is not None:
        try:
            adm.deadline = parse_deadline_header(raw_deadline, time.time())
        except ValueError as exc:
            adm.reply = Reply.json(400, {"error": str(exc)})
            return adm
        if adm.deadline <= time.time():
            adm.reply = Reply.json(504, {"error": "deadline already passed before the request was handled"})
            adm.finish(504)
            return adm

    service_rules = mesh.rules.for_service(mesh.service)
    if service_rules is not None and service_rules.authorization is not None:
        settings = mesh.settings
        decision = authz.decide(service_rules.authorization, peer, settings.trust_domain, settings.namespace)
        if not decision.allowed or decision.would_deny:
            _denied(mesh, peer, decision, method, path)
        if not decision.allowed:
            adm.reply = Reply.json(403, {"error": "forbidden", "reason": decision.reason})
            adm.finish(403)
            return adm

    names = mesh.propagated_names
    if names:
        adm.propagated = tuple((n, v) for n in names if (v := header(n)) is not None)
    parent = incoming_trace(carrier)
    tel = mesh.telemetry
    if tel is not None and tel.tracer.active():
        adm.span = tel.tracer.start_server(method, "", parent)
        adm.context = trace.set_span_in_context(adm.span, parent)
    else:
        adm.context = parent
    return adm


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def incoming_trace(carrier: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context: what OTel's W3C propagator extracts, without its getter, module-level regex
    search and header-list plumbing for the one form mesh hops send (a version 00 ``traceparent``, no
    ``tracestate``). Every other form goes to the propagator itself."""
    header = carrier.get("traceparent")
    if header is None:
        return otel_context.Context()
    match = _TRACEPARENT.fullmatch(header)
    if match is None or "tracestate" in carrier:
        return _PROPAGATOR.extract(carrier)
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return otel_context.Context()
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote), otel_context.Context())


#: Denial lines: one a second per (verdict, caller identity), so a flood of refused calls cannot flood the log.
_DENIALS = Throttle(1.0)


def _denied(mesh: Runtime, peer: SpiffeId | None, decision: authz.Ruling, method: str, path: str) -> None:
    mode = "permissive" if decision.allowed else "strict"
    if mesh.telemetry is not None:
        labels = (
            ("mesh.service", mesh.service),
            ("mesh.peer_service", peer.service if peer is not None else ""),
            ("mesh.authz_mode", mode),
        )
        mesh.telemetry.metrics.authz_denied.add(1, labels)
    verb = "would deny" if decision.allowed else "denied"
    held = _DENIALS.allow(f"{verb} {peer.uri if peer is not None else ''}")
    if held is None:
        return
    more = f" ({held} more like it since the last line)" if held else ""
    log.warning(
        "authorization %s %s %s (%s): %s%s",
        verb,
        printable(method, 16),
        printable(path),
        mode,
        printable(decision.reason, 300),
        more,
    )


#: The verified identity of the caller of the request being handled (None: plaintext or not a mesh identity).
peer_identity: contextvars.ContextVar[SpiffeId | None] = contextvars.ContextVar("meshlib_peer_identity", default=None)


@contextlib.contextmanager
def handling(adm: Admission) -> Iterator[None]:
    """While the handler runs: the incoming deadline, the caller's identity and the trace context are current, so
    ``meshlib.Client`` calls made inside it inherit them."""
    deadline_token = incoming_deadline.set(adm.deadline)
    peer_token = peer_identity.set(adm.peer)
    propagated_token = propagated_headers.set(adm.propagated)
    otel_token = otel_context.attach(adm.context) if adm.context is not None else None
    try:
        yield
    finally:
        if otel_token is not None:
            otel_context.detach(otel_token)
        propagated_headers.reset(propagated_token)
        peer_identity.reset(peer_token)
        incoming_deadline.reset(deadline_token)


def identity_from_environ(environ: Mapping[str, Any]) -> SpiffeId | None:
    """The caller's identity under a WSGI server: werkzeug's ``SSL_CLIENT_CERT`` (PEM) or gunicorn's socket."""
    pem = environ.get("SSL_CLIENT_CERT")
    if pem:
        return identity_from_pem(pem)
    sock = environ.get("gunicorn.socket")
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is not None:
        try:
            der = getpeercert(binary_form=True)
        except (OSError, ValueError):
            der = None
        if der:
            return identity_from_der(der)
    return None
