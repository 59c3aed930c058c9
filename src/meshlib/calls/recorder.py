"""What every mesh call keeps between its attempts, whatever its protocol: the call's span and each attempt's,
the deadline header's value, the outcome a finished call is counted under, and the recording of its end
(metrics, access log, decision log). ``client/call.py`` (HTTP) and ``grpc/call.py`` build on it; they add only
how their protocol spells headers, statuses and errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Span, StatusCode

from ..errors import (
    CircuitOpenError,
    DeadlineExceededError,
    NoEndpointsError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from ..policy.classify import Verdict
from ..policy.deadline import to_epoch_millis
from ..policy.decisions import log_decisions
from ..policy.decisions import logger as decision_logger
from ..policy.flow import CallFlow, Done, Send
from ..policy.service import CallPlan
from ..runtime import Runtime
from ..telemetry.record import record_client_call

#: How a call the mesh ended is counted (``mesh.outcome``), by the core's error class; the first match wins.
ERROR_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (NoEndpointsError, "no-endpoints"),
    (CircuitOpenError, "circuit-open"),
    (DeadlineExceededError, "deadline-exceeded"),
    (RetryBudgetExhaustedError, "retry-budget-exhausted"),
    (UnavailableError, "unavailable"),
)


def outcome_of(done: Done | None, verdict_kind: str) -> str:
    """The outcome a finished call is counted under; ``verdict_kind``: its last attempt's, when the mesh did not
    end it."""
    if done is None:
        return "cancelled"
    if done.abort_status is not None:
        return "fault-abort"
    error = done.error
    if error is not None:
        for cls, name in ERROR_OUTCOMES:
            if isinstance(error, cls):
                return name
        return "local-error"
    return verdict_kind


class CallRecorder:
    """The protocol-neutral part of one call (see the module). Subclasses set ``flow`` and ``plan``."""

    __slots__ = ("attempt_span", "flow", "keep_trace", "mesh", "plan", "recording", "service", "span", "started")

    flow: CallFlow
    plan: CallPlan
    started: float

    def __init__(self, mesh: Runtime, service: str, span: Span | None, keep_trace: bool) -> None:
        self.mesh = mesh
        self.service = service
        self.span = span
        self.recording = span is not None and span.is_recording()
        self.attempt_span: Span | None = None
        self.keep_trace = keep_trace

    def start_attempt_span(self, operation: str, label: str, send: Send) -> Span | None:
        """The attempt's span, when the call is traced (the caller's thread or task: its trace context)."""
        if not self.recording:
            return None
        assert self.span is not None and self.mesh.telemetry is not None
        span = self.mesh.telemetry.tracer.start_attempt(self.span, operation, label, send.attempt, send.breaker_state)
        self.attempt_span = span
        return span

    def take_attempt_span(self) -> Span | None:
        """The span the last prepared attempt started, now the caller's to end (hedged attempts run side by side)."""
        span, self.attempt_span = self.attempt_span, None
        return span

    def end_attempt_span(self, span: Span | None, verdict: Verdict, attributes: dict[str, Any]) -> None:
        """End an attempt's span (None: the one running alone)."""
        if span is None:
            span, self.attempt_span = self.attempt_span, None
        if span is not None:
            for key, value in attributes.items():
                span.set_attribute(key, value)
            if verdict.is_failure:
                span.set_attribute("error.type", verdict.key)
                span.set_status(StatusCode.ERROR, verdict.key)
            span.end()

    def deadline_header(self, budget: float) -> str:
        """``x-mesh-deadline``: the attempt's deadline as epoch milliseconds."""
        return deadline_header(self.mesh, budget)

    def ended_quietly(self, done: Done | None, method: str, status_class: str, outcome: str) -> bool:
        """The common end, when it is all there is to record: one attempt answered, no span, no decision log at
        DEBUG, no access log: its duration, and nothing else. False (nothing recorded) when the call needs
        ``record_end``."""
        tel = self.mesh.telemetry
        if tel is None or done is None or self.span is not None or self.attempt_span is not None:
            return False
        if done.attempts != 1 or done.error is not None or done.budget_exhausted or done.abort_status is not None:
            return False
        if tel.access.may_write() or (done.decisions and decision_logger.isEnabledFor(logging.DEBUG)):
            return False  # (a sampled access log draws its sample in record_end: once a call)
        metrics = tel.metrics
        labels = metrics.client_labels(self.service, self.plan.choice.label, method, status_class, outcome)
        metrics.client_duration.record(self.mesh.clock() - self.started, labels)
        return True

    def record_end(
        self,
        done: Done | None,
        *,
        method: str,
        path: str,
        status: int | None,
        outcome: str,
        error_type: str | None,
        span_attributes: dict[str, Any] | Callable[[], dict[str, Any]],
        log_fields: Any,
    ) -> None:
        """The call is over: its decision log, its span ended, its metrics and (sampled) access log line."""
        decisions = done.decisions if done is not None else None
        if decisions:
            log_decisions(self.service, decisions)
        tel = self.mesh.telemetry
        if tel is None:
            return
        if self.attempt_span is not None:  # cancelled mid-attempt
            self.attempt_span.end()
            self.attempt_span = None
        record_client_call(
            tel,
            self.span,
            source=self.mesh.service,
            destination=self.service,
            route=self.plan.choice.label,
            method=method,
            path=path,
            status=status,
            outcome=outcome,
            error_type=error_type,
            elapsed=self.mesh.clock() - self.started,
            attempts=done.attempts if done is not None else 0,
            decisions=decisions,
            budget_exhausted=done is not None and done.budget_exhausted,
            span_attributes=span_attributes,
            log_fields=log_fields,
        )


def deadline_header(mesh: Runtime, budget: float) -> str:
    """``x-mesh-deadline`` for an attempt given ``budget`` seconds from now: its deadline as epoch milliseconds."""
    now = mesh.clock()
    return str(to_epoch_millis(now + budget, now, time.time()))


def count_unresolved(mesh: Runtime, service: str, method: str) -> None:
    """A call that failed before it had a route (discovery gave nothing) still counts in the golden signals, in
    every shell alike."""
    tel = mesh.telemetry
    if tel is not None:
        metrics = tel.metrics
        metrics.client_duration.record(0.0, metrics.client_labels(service, "default", method, "error", "no-endpoints"))
