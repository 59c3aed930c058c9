"""One mesh call between its attempts, shared by the sync and async HTTP shells: each attempt's request for the
chosen endpoint (an ``outbound.Outbound``: origin and raw headers, cheaper than copying the ``httpx.URL``; turned
into an ``httpcore.Request`` only where httpcore sends it), and the call's telemetry."""

from __future__ import annotations

import time
from typing import Any

import httpx
from opentelemetry.trace import Span, StatusCode

from ..errors import (
    CircuitOpenError,
    DeadlineExceededError,
    NoEndpointsError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from ..policy.deadline import to_epoch_millis
from ..policy.decisions import log_decisions
from ..policy.flow import CallFlow, Done, Result, Send, call_flow
from ..policy.service import DEFAULT_PLAN, ServiceState
from ..propagation import outbound_deadline, propagated_headers
from ..runtime import Runtime
from ..telemetry.record import record_client_call
from ..telemetry.tracing import outbound_traceparent, traceparent_of
from .outbound import Outbound

_MESH_HEADER_PREFIX = b"x-mesh-"
_MIRROR_HEADER = (b"x-mesh-mirror", b"1")
_ATTEMPT_VALUES = [str(i).encode() for i in range(16)]


class HttpCall:
    """Everything one mesh call needs between attempts, shared by the sync and async shells: builds each attempt's
    ``Outbound`` request and does the call's telemetry (spans, metrics, access log)."""

    __slots__ = (
        "attempt_span",
        "base_headers",
        "extensions",
        "flow",
        "keep_trace",
        "mesh",
        "plan",
        "read_timeout",
        "recording",
        "request",
        "scheme",
        "service",
        "sni",
        "span",
        "started",
        "target",
    )

    def __init__(
        self, mesh: Runtime, state: ServiceState, request: httpx.Request, service: str, hedging: bool = False
    ) -> None:
        self.mesh = mesh
        self.request = request
        self.service = service
        url = request.url
        self.scheme = url.raw_scheme
        self.target = url.raw_path
        # Mesh TLS: connect to the endpoint's address, verify the server as <service>.<namespace>.mesh
        self.sni = mesh.server_name(service) if mesh.identity is not None else None
        carried = propagated_headers.get()
        if carried:  # routing headers of the request being handled, unless this call sets them itself
            headers = request.headers
            for key, value in carried:
                if key not in headers:
                    headers[key] = value
        raw = request.headers.raw
        keep_trace = False
        for name, _ in raw:  # rare: the app (or OTel instrumentation) set mesh or trace headers itself
            if name[:1] in b"xXtT" and (name[:7].lower() == _MESH_HEADER_PREFIX or name.lower() == b"traceparent"):
                keep_trace = any(k.lower() == b"traceparent" for k, _ in raw)
                raw = [(k, v) for k, v in raw if not k.lower().startswith(_MESH_HEADER_PREFIX)]
                break
        raw.append(mesh.caller_header)
        copy_of = request.extensions.get("mesh_mirror")
        if copy_of is not None:  # a mirrored copy says so: the receiving side counts it apart
            raw.append(_MIRROR_HEADER)
        self.keep_trace = keep_trace
        method = request.method
        tel = mesh.telemetry
        self.span = (
            tel.tracer.start_call(method, service, str(url)) if tel is not None and tel.tracer.active() else None
        )
        self.recording = self.span is not None and self.span.is_recording()
        self.attempt_span: Span | None = None
        if not keep_trace and not self.recording:
            raw.append((b"traceparent", outbound_traceparent()))
        self.base_headers = raw
        self.extensions = request.extensions
        timeouts = self.extensions.get("timeout") or {}
        self.read_timeout: float | None = timeouts.get("read")
        now = self.started = state.last_used = mesh.clock()
        replayable = isinstance(request.stream, httpx.ByteStream)
        if copy_of is not None:  # a mirrored copy: to its subset, once (never retried, never hedged)
            plan = state.mirror_plan(copy_of)
            replayable = hedging = False
        else:
            rules = state.rules
            plan = DEFAULT_PLAN if rules is None else state.plan(method, url.path, request.headers.get, mesh.rand)
            if plan.mirror is not None:
                mesh.mirror.submit(service, request, plan.mirror)
        self.plan = plan
        self.flow: CallFlow = call_flow(
            state,
            method=method,
            replayable=replayable,
            deadline=outbound_deadline(now, state.policy.timeout),
            clock=mesh.clock,
            rand=mesh.rand,
            paused=mesh.paused,
            plan=plan,
            hedging=hedging,
            record=copy_of is None,
            attempt_timeout=_shortest(timeouts),
        )

    def attempt(self, send: Send) -> Outbound:
        endpoint = send.endpoint
        headers = list(self.base_headers)
        attempt = send.attempt
        headers.append((b"x-mesh-attempt", _ATTEMPT_VALUES[attempt] if attempt < 16 else str(attempt).encode()))
        if self.recording:
            assert self.span is not None and self.mesh.telemetry is not None
            span = self.mesh.telemetry.tracer.start_attempt(
                self.span, self.request.method, endpoint.authority, attempt, send.breaker_state
            )
            self.attempt_span = span
            if not self.keep_trace:
                headers.append((b"traceparent", traceparent_of(span)))
        extensions = self.extensions
        scheme = self.scheme
        # only a permissive client honours an instance that advertises plaintext; strict never downgrades
        if self.sni is not None and (self.mesh.strict or endpoint.meta.get("mesh_tls") != "off"):
            scheme = b"https"
            extensions = {**extensions, "sni_hostname": self.sni}
        budget = send.timeout
        if budget is not None:
            timeouts = extensions.get("timeout")
            capped = {k: budget if v is None or v > budget else v for k, v in (timeouts or {}).items()}
            if not capped:
                capped = {"connect": budget, "read": budget, "write": budget, "pool": budget}
            extensions = {**extensions, "timeout": capped}
        else:
            budget = self.read_timeout
        if budget is not None:
            now = self.mesh.clock()
            millis = to_epoch_millis(now + budget, now, time.time())
            headers.append((b"x-mesh-deadline", str(millis).encode()))
        return Outbound(
            self.request.method.encode("ascii"),
            scheme,
            endpoint.address,
            endpoint.port,
            self.target,
            headers,
            self.request.stream,
            extensions,
        )

    def attempt_done(self, result: Result, span: Span | None = None) -> None:
        """End the attempt's span (``span``: one of several in flight, taken with ``take_attempt_span``)."""
        if span is None:
            span = self.attempt_span
            self.attempt_span = None
        if span is not None:
            verdict = result.verdict
            if verdict.status is not None:
                span.set_attribute("http.response.status_code", verdict.status)
            if verdict.is_failure:
                span.set_attribute("error.type", verdict.key)
                span.set_status(StatusCode.ERROR, verdict.key)
            span.end()

    def take_attempt_span(self) -> Span | None:
        """The span ``attempt`` just started, now the caller's to end (hedged attempts run side by side)."""
        span, self.attempt_span = self.attempt_span, None
        return span

    def finish(self, done: Done | None, response: httpx.Response | None) -> None:
        """The call is over: end its span, record its metrics and (sampled) access log line."""
        decisions = done.decisions if done is not None else None
        if decisions:
            log_decisions(self.service, decisions)
        tel = self.mesh.telemetry
        if tel is None:
            return
        if self.attempt_span is not None:  # cancelled mid-attempt
            self.attempt_span.end()
            self.attempt_span = None
        status = response.status_code if response is not None else None
        outcome = _outcome(done, status)
        span_attributes: dict[str, Any] = {}
        if self.plan.choice.subset is not None:
            span_attributes["mesh.subset"] = self.plan.choice.subset
        if status is not None:
            span_attributes["http.response.status_code"] = status
        record_client_call(
            tel,
            self.span,
            source=self.mesh.service,
            destination=self.service,
            route=self.plan.choice.label,
            method=self.request.method,
            path=self.request.url.path,
            status=status,
            outcome=outcome,
            error_type=(outcome if status is None else str(status)) if status is None or status >= 500 else None,
            elapsed=self.mesh.clock() - self.started,
            attempts=done.attempts if done is not None else 0,
            decisions=decisions,
            budget_exhausted=done is not None and done.budget_exhausted,
            span_attributes=span_attributes,
            log_fields=lambda: {
                "status": status,
                "bytes": int(response.headers.get("content-length", 0) or 0) if response is not None else 0,
            },
        )


def _outcome(done: Done | None, status: int | None) -> str:
    if done is None:
        return "cancelled"
    if done.abort_status is not None:
        return "fault-abort"
    error = done.error
    if error is not None:
        return _ERROR_OUTCOMES.get(type(error), "local-error")
    if done.result is not None:
        return done.result.verdict.kind.value
    return "success" if status is not None and status < 500 else "server-error"


_ERROR_OUTCOMES: dict[type[BaseException], str] = {
    NoEndpointsError: "no-endpoints",
    CircuitOpenError: "circuit-open",
    DeadlineExceededError: "deadline-exceeded",
    RetryBudgetExhaustedError: "retry-budget-exhausted",
    UnavailableError: "unavailable",
}


def count_unresolved(mesh: Runtime, service: str, request: httpx.Request) -> None:
    """A call that failed before it had a route (discovery gave nothing) still counts in the golden signals."""
    tel = mesh.telemetry
    if tel is not None:
        metrics = tel.metrics
        metrics.client_duration.record(
            0.0, metrics.client_labels(service, "default", request.method, "error", "no-endpoints")
        )


def _shortest(timeouts: dict[str, float | None]) -> float | None:
    """The caller's tightest httpx timeout (connect, read, write or pool: each bounds every attempt)."""
    values = [value for value in timeouts.values() if value is not None]
    return min(values) if values else None
