"""The end of every request the mesh sees, written once for every path: outbound mesh calls (HTTP and gRPC), calls
to hosts outside the mesh, and inbound requests (every framework shell and gRPC).

Ending the span, its error status and ``error.type``, the duration histogram and counters, and the sampled access
log line happen here; the shells pass only what is their own (status, route, span and log fields)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from ..policy.decisions import Decision
from ..settings import is_service_name
from . import Telemetry
from .metrics import status_class


def end_span(
    span: Span | None, attributes: Mapping[str, Any], error_type: str | None = None, message: str = ""
) -> None:
    """Set ``attributes``; mark the span failed with ``error_type`` when there is one; end it."""
    if span is None:
        return
    if span.is_recording():
        for key, value in attributes.items():
            span.set_attribute(key, value)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(StatusCode.ERROR, message or error_type)
    span.end()


def _trace_id(span: Span | None) -> str | None:
    ctx = span.get_span_context() if span is not None else trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def record_client_call(
    tel: Telemetry,
    span: Span | None,
    *,
    source: str,
    destination: str,
    route: str,
    method: str,
    path: str,
    status: int | None,
    outcome: str,
    error_type: str | None,
    elapsed: float,
    attempts: int,
    budget_exhausted: bool = False,
    decisions: Sequence[Decision] | None = None,
    span_attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    log_fields: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """One outbound mesh call. ``status`` is an HTTP status (a gRPC status's HTTP equivalent) for the status class;
    ``error_type`` set marks the call failed on its span. ``log_fields`` may be a function, called only for an
    access log line that is written. ``decisions`` (the call's decision log) become ``mesh.decision`` span events and
    the access log's ``decisions`` field. ``span_attributes`` too may be a function, called only for a span."""
    metrics = tel.metrics
    metrics.client_duration.record(
        elapsed, metrics.client_labels(destination, route, method, status_class(status), outcome)
    )
    if attempts > 1 or budget_exhausted:
        peers = (("mesh.service", source), ("mesh.peer_service", destination))
        if attempts > 1:
            metrics.retries.add(attempts - 1, peers)
        if budget_exhausted:
            metrics.budget_exhausted.add(1, peers)
    if span is not None:  # (no span: the common untraced call builds none of this)
        if decisions and span.is_recording():
            for decision in decisions:
                span.add_event("mesh.decision", decision.event_attributes())
        extra = span_attributes() if callable(span_attributes) else span_attributes
        end_span(span, {"mesh.route": route, "mesh.attempts": attempts, **(extra or {})}, error_type, outcome)
    if tel.access.wanted():
        tel.access.write(
            {
                "kind": "client",
                "source": source,
                "destination": destination,
                "method": method,
                "path": path,
                **((log_fields() if callable(log_fields) else log_fields) or {}),
                "outcome": outcome,
                "duration_ms": round(elapsed * 1000, 3),
                "attempts": attempts,
                "route": route,
                "trace_id": _trace_id(span) if span is not None else None,
                **({"decisions": [d.text() for d in decisions]} if decisions else {}),
            }
        )


def record_external_call(
    tel: Telemetry, span: Span | None, *, host: str, method: str, status: int | None, outcome: str, elapsed: float
) -> None:
    """A call to a host outside the mesh (metered and traced, never access-logged: not a mesh hop)."""
    metrics = tel.metrics
    labels = metrics.client_labels(host, "external", method, status_class(status), outcome)
    metrics.client_duration.record(elapsed, labels)
    failed = status is None or status >= 500
    error_type = (outcome if status is None else str(status)) if failed else None
    end_span(span, {"http.response.status_code": status} if status is not None else {}, error_type, outcome)


def record_server_request(
    tel: Telemetry,
    span: Span | None,
    *,
    service: str,
    peer: str,
    peer_uri: str | None,
    route: str,
    method: str,
    path: str,
    status: int,
    elapsed: float,
    mirrored: bool,
    rpc: bool,
    attempt: int | None,
    claimed: str | None = None,
) -> None:
    """One inbound request, after its response. A gRPC shell names its span and sets the RPC attributes itself
    (``rpc``): no HTTP ones are added here. ``claimed`` is an unverified caller's ``x-mesh-caller``, for the access
    log only."""
    metrics = tel.metrics
    if peer_uri is not None and peer not in metrics.verified_peers:
        metrics.note_verified_peer(peer, peer_uri)
    metrics.server_duration.record(elapsed, metrics.server_labels(peer, route, method, status_class(status), mirrored))
    if span is not None:
        attributes: dict[str, Any] = {"mesh.service": service}
        error_type = None
        if not rpc:
            if route and span.is_recording():
                span.update_name(f"{method} {route}")
                attributes["http.route"] = route
            attributes["http.response.status_code"] = status
            error_type = str(status) if status >= 500 else None
        if mirrored:
            attributes["mesh.mirror"] = True
        if peer:
            attributes["mesh.peer_service"] = peer
        end_span(span, attributes, error_type)
    if tel.access.wanted():
        tel.access.write(
            {
                "kind": "server",
                "source": peer or None,
                "source_identity": peer_uri,
                # what an unverified caller says it is: in the log (one line, not a series), if it is a name at all
                **({"claimed_source": claimed} if claimed and is_service_name(claimed) else {}),
                "destination": service,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "attempt": attempt,
                "trace_id": _trace_id(span),
            }
        )
