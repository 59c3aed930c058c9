"""The end of one outbound mesh call, for every client shell (HTTP and gRPC): the duration histogram, retry and
budget counters, the call span's common attributes and status, and the sampled access log line. The shells pass
only what is their own (status and span attributes, log fields)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Span, StatusCode

from . import Telemetry
from .metrics import status_class


def finish_client_call(
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
    span_attributes: Mapping[str, Any] | None = None,
    log_fields: Mapping[str, Any] | None = None,
) -> None:
    """``status`` is an HTTP status (a gRPC status's HTTP equivalent) for the status class; ``error_type`` set marks
    the call failed on its span."""
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
    if span is not None:
        if span.is_recording():
            span.set_attribute("mesh.route", route)
            span.set_attribute("mesh.attempts", attempts)
            for key, value in (span_attributes or {}).items():
                span.set_attribute(key, value)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(StatusCode.ERROR, outcome)
        span.end()
    if tel.access.wanted():
        ctx = span.get_span_context() if span is not None else None
        tel.access.write(
            {
                "kind": "client",
                "source": source,
                "destination": destination,
                "method": method,
                "path": path,
                **(log_fields or {}),
                "outcome": outcome,
                "duration_ms": round(elapsed * 1000, 3),
                "attempts": attempts,
                "route": route,
                "trace_id": f"{ctx.trace_id:032x}" if ctx is not None and ctx.is_valid else None,
            }
        )
