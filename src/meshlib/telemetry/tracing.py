"""Traces for every mesh call: a CLIENT span per logical call, a child span per attempt (so retries show), and
W3C ``traceparent``/``tracestate`` on every outbound request — also when no SDK is configured, in which case the
incoming trace id is carried on (or a new one started) without recording anything.

Nothing is exported unless the application configured a TracerProvider, or ``OTEL_TRACES_EXPORTER`` names an
exporter (see ``configure_from_env``).
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Tracer, TracerProvider

from ..randomness import getrandbits as _getrandbits
from .exporters import exporters, requested

_configured = False


def _span_reader() -> Callable[[], Span | None] | None:
    """The current span read straight from OTel's context variable: two C calls instead of the five Python ones of
    ``trace.get_current_span()``, on every call outside a recording span. None (use the public API) when OTel's
    runtime context is not the default contextvars one, or its internals moved."""
    try:
        from opentelemetry import context
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace.propagation import _SPAN_KEY

        runtime = context._RUNTIME_CONTEXT
        if type(runtime) is not ContextVarsRuntimeContext:
            return None
        current = runtime._current_context
        if not isinstance(current, contextvars.ContextVar):
            return None
    except (ImportError, AttributeError):
        return None

    def read() -> Span | None:
        span = current.get().get(_SPAN_KEY)
        if span is None or isinstance(span, Span):
            return span
        return None

    return read


_read_span = _span_reader()
_configure_lock = threading.Lock()


def configure_from_env(service: str) -> None:
    """Install an SDK TracerProvider with the exporters ``OTEL_TRACES_EXPORTER`` names, once per process, and only
    when the application has not installed a provider of its own."""
    global _configured
    if not requested("traces") or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    with _configure_lock:
        if _configured or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        made = exporters("traces")
        if not made:  # nothing would record anywhere (said in the log): keep the no-op fast path
            _configured = True
            return
        provider = SdkTracerProvider(resource=Resource.create({"service.name": service}))
        for exporter in made:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _configured = True


def random_traceparent(trace_id: int = 0, flags: int = 1) -> bytes:
    return b"00-%032x-%016x-%02x" % (trace_id or _getrandbits(128) or 1, _getrandbits(64) or 1, flags)


def carried_traceparent() -> bytes | None:
    """The one rule for every outbound mesh call that records no span of its own (HTTP and gRPC alike): inside a
    trace (a request being handled, an active span), carry its trace id on with a fresh span id; outside one,
    send none. A random id made per call outside a trace would link nothing (the next call gets another), and it
    costs: a fresh value each call defeats HPACK on gRPC, and is work on every HTTP request. The callee starts its
    own trace, as it would for any caller without one."""
    if _read_span is not None:
        span = _read_span()
        if span is None:  # the common case: no trace here at all
            return None
    else:
        span = trace.get_current_span()
    ctx = span.get_span_context()
    if ctx.is_valid:
        return random_traceparent(ctx.trace_id, ctx.trace_flags)
    return None


def traceparent_of(span: Span) -> bytes:
    ctx = span.get_span_context()
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)


class MeshTracer:
    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._active = provider is not None
        self._next_check = 0.0
        self.tracer: Tracer = (provider or trace.get_tracer_provider()).get_tracer("meshlib")

    def active(self) -> bool:
        """Is anything recording spans? With no SDK provider installed (the default), creating no-op spans would
        cost ~3 us a request for nothing; the trace context is still carried on (``carried_traceparent``).
        A global provider can be installed once, later, and never removed: look again at most once a second."""
        if self._active:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + 1.0
        self._active = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        return self._active

    def start_call(self, method: str, service: str, url: str) -> Span:
        return self.tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "server.address": service,
                "url.full": url,
                "mesh.service": service,
            },
        )

    def start_rpc(self, service: str, full_method: str) -> Span:
        """A gRPC client call, named and attributed by OpenTelemetry's RPC conventions (``pkg.Service/Method``)."""
        name = full_method.lstrip("/")
        rpc_service, _, rpc_method = name.partition("/")
        return self.tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": rpc_service,
                "rpc.method": rpc_method,
                "server.address": service,
                "mesh.service": service,
            },
        )

    def start_attempt(self, call: Span, method: str, endpoint: str, attempt: int, breaker_state: str) -> Span:
        if not call.is_recording():
            return INVALID_SPAN
        return self.tracer.start_span(
            f"{method} attempt {attempt}",
            context=trace.set_span_in_context(call),
            kind=SpanKind.INTERNAL,
            attributes={"mesh.endpoint": endpoint, "mesh.attempt": attempt, "mesh.breaker_state": breaker_state},
        )

    def start_server(self, method: str, route: str, parent: object | None) -> Span:
        return self.tracer.start_span(
            f"{method} {route}" if route else method,
            context=parent,  # type: ignore[arg-type]
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
