"""Calls to hosts outside the mesh: passed to plain httpx (the caller's own transport, mount or proxy), and still
traced and metered. The request goes out as the caller made it: when a tracer records, a copy carries the call
span's ``traceparent``; with no tracer, nothing is added (a random trace id would only leak to a third party)."""

from __future__ import annotations

import contextvars

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY
from opentelemetry.trace import Span

from ..policy.classify import classify_status
from ..runtime import Runtime
from ..telemetry.record import record_external_call
from ..telemetry.tracing import traceparent_of
from .errors import classify_error


class ExternalCall:
    """A call to a host outside the mesh: still traced and metered. Marks the context so that an
    ``opentelemetry-instrumentation-httpx`` in the app does not record the same request a second time."""

    __slots__ = ("mesh", "request", "span", "started", "token")

    def __init__(self, mesh: Runtime, request: httpx.Request) -> None:
        tel = mesh.telemetry
        assert tel is not None
        self.mesh = mesh
        self.request = request
        self.started = mesh.clock()
        self.span: Span | None = None
        self.token: contextvars.Token[otel_context.Context] | None = None
        if not tel.tracer.active():
            return
        self.span = span = tel.tracer.start_call(request.method, request.url.host, str(request.url))
        if span.is_recording() and "traceparent" not in request.headers:
            # the trace goes on, on a copy: the caller's own request stays exactly as it was made (a redirect
            # builds on it, and it is handed back as response.request)
            headers = request.headers.copy()
            headers["traceparent"] = traceparent_of(span).decode()
            self.request = httpx.Request(
                request.method, request.url, headers=headers, stream=request.stream, extensions=request.extensions
            )
        ctx = otel_context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, trace.set_span_in_context(span))
        self.token = otel_context.attach(ctx)

    def finish(self, response: httpx.Response | None, error: BaseException | None) -> None:
        if self.token is not None:
            otel_context.detach(self.token)
        tel = self.mesh.telemetry
        assert tel is not None
        status = response.status_code if response is not None else None
        outcome = classify_error(error).kind.value if error is not None else classify_status(status or 0).kind.value
        record_external_call(
            tel,
            self.span,
            host=self.request.url.host,
            method=self.request.method,
            status=status,
            outcome=outcome,
            elapsed=self.mesh.clock() - self.started,
        )
