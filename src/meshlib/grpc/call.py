"""One gRPC call through the mesh, between its attempts: shared by the sync and the grpc.aio facades.

It builds the call's plan and policy flow, each attempt's metadata (caller, attempt number, deadline, trace
context), and does the call's telemetry. The shells only send attempts on endpoint channels and sleep.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
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
from ..telemetry.tracing import random_traceparent, traceparent_of
from .status import HTTP_EQUIVALENT, MeshRpcError, code_of_http, from_mesh_error, verdict_of, with_attempts

Metadata = Sequence[tuple[str, str | bytes]]
_ATTEMPTS = [str(i) for i in range(16)]
_TRACE_KEYS = ("traceparent", "tracestate")


class RpcCall:
    """Everything one logical call needs between attempts."""

    __slots__ = (
        "attempt_span",
        "attempts",
        "base",
        "flow",
        "keep_trace",
        "mesh",
        "method",
        "plan",
        "recording",
        "service",
        "span",
        "started",
        "state",
    )

    def __init__(
        self,
        mesh: Runtime,
        state: ServiceState,
        service: str,
        method: str,
        metadata: Metadata | None,
        timeout: float | None,
        *,
        replayable: bool,
        hedging: bool = False,
    ) -> None:
        self.mesh = mesh
        self.state = state
        self.service = service
        self.method = method
        base: list[tuple[str, str | bytes]] = []
        keep_trace = False
        if metadata:
            for key, value in metadata:  # the mesh's own keys are the mesh's to set
                if not key.startswith("x-mesh-"):
                    base.append((key, value))
                    keep_trace = keep_trace or key in _TRACE_KEYS
        carried = propagated_headers.get()
        if carried:  # routing headers of the request being handled, unless this call sets them itself
            present = {key for key, _ in base}
            base.extend((key, value) for key, value in carried if key not in present)
        base.append(("x-mesh-caller", mesh.service))
        self.keep_trace = keep_trace
        tel = mesh.telemetry
        self.span: Span | None = (
            tel.tracer.start_rpc(service, method) if tel is not None and tel.tracer.active() else None
        )
        self.recording = self.span is not None and self.span.is_recording()
        self.attempt_span: Span | None = None
        if not keep_trace and not self.recording:
            # inside a trace (a request being handled): carry it on. Outside one there is nothing to carry, and a
            # fresh random value per call defeats HPACK and costs more than the rest of the metadata together.
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                base.append(("traceparent", random_traceparent(context.trace_id, context.trace_flags).decode()))
        self.base = base
        self.attempts: list[str] = []
        now = self.started = state.last_used = mesh.clock()
        plan = DEFAULT_PLAN
        if state.rules is not None:
            lookup = {key: value for key, value in base if isinstance(value, str)}
            plan = state.plan("POST", method, lookup.get, mesh.rand)
            if plan.retry_non_idempotent:  # gRPC retries only what gRPC calls safe (UNAVAILABLE), whatever a route says
                plan = dataclasses.replace(plan, retry_non_idempotent=False)
        self.plan = plan
        policy_timeout = state.policy.timeout
        if timeout is None or (policy_timeout is not None and policy_timeout < timeout):
            timeout = policy_timeout
        self.flow: CallFlow = call_flow(
            state,
            method="POST",
            replayable=replayable,
            hedgeable=True,  # hedging set for a gRPC service says its calls may run twice (gRPC's hedging policy)
            hedging=hedging,
            deadline=outbound_deadline(now, timeout),
            clock=mesh.clock,
            rand=mesh.rand,
            paused=mesh.paused,
            plan=plan,
        )

    def attempt_metadata(self, send: Send, label: str) -> list[tuple[str, str | bytes]]:
        """The metadata of one attempt; the attempt's own span starts here."""
        metadata = list(self.base)
        attempt = send.attempt
        metadata.append(("x-mesh-attempt", _ATTEMPTS[attempt] if attempt < 16 else str(attempt)))
        if self.recording:
            assert self.span is not None and self.mesh.telemetry is not None
            span = self.mesh.telemetry.tracer.start_attempt(self.span, "grpc", label, attempt, send.breaker_state)
            self.attempt_span = span
            if not self.keep_trace:
                metadata.append(("traceparent", traceparent_of(span).decode()))
        if send.timeout is not None:
            now = self.mesh.clock()
            metadata.append(("x-mesh-deadline", str(to_epoch_millis(now + send.timeout, now, time.time()))))
        return metadata

    def attempt_done(
        self, label: str, code: grpc.StatusCode | None, attempt: int = 0, span: Span | None = None
    ) -> Result:
        """The attempt's verdict for the flow; its span ends (``span``: one of several attempts in flight, taken
        with ``take_attempt_span``)."""
        verdict = verdict_of(code)
        if verdict.is_failure:
            self.attempts.append(f"{label} {code.name if code is not None else 'UNKNOWN'}")
        if span is None:
            span, self.attempt_span = self.attempt_span, None
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0] if code is not None else 2)
            if verdict.is_failure:
                span.set_attribute("error.type", verdict.key)
                span.set_status(StatusCode.ERROR, verdict.key)
            span.end()
        return Result(verdict, None, attempt)

    def take_attempt_span(self) -> Span | None:
        span, self.attempt_span = self.attempt_span, None
        return span

    def outcome(self, done: Done, error: BaseException | None) -> BaseException | None:
        """What the caller gets: None (the last attempt's response) or the error to raise. ``error`` is the last
        attempt's own RpcError, if it had one."""
        if done.abort_status is not None:
            code = code_of_http(done.abort_status)
            return MeshRpcError(code, f"{self.service}: fault injected by mesh rules (abort {done.abort_status})")
        if done.error is not None:  # the mesh ended the call: no endpoint, open breakers, deadline
            return mesh_failure(self.mesh, done.error)
        if error is None:
            return None
        result = done.result
        if isinstance(error, grpc.RpcError) and result is not None and result.verdict.is_failure:
            wrapped: BaseException = with_attempts(error, self.service, self.attempts)
            return wrapped
        return error  # an application status (NOT_FOUND...): exactly what the server sent

    def finish(self, done: Done | None, code: grpc.StatusCode | None) -> None:
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
        outcome = _outcome(done, code)
        record_client_call(
            tel,
            self.span,
            source=self.mesh.service,
            destination=self.service,
            route=self.plan.choice.label,
            method="POST",
            path=self.method,
            status=HTTP_EQUIVALENT.get(code) if code is not None else None,
            outcome=outcome,
            error_type=None if code is grpc.StatusCode.OK else outcome,
            elapsed=self.mesh.clock() - self.started,
            attempts=done.attempts if done is not None else 0,
            decisions=decisions,
            span_attributes={"rpc.grpc.status_code": code.value[0] if code is not None else 2},
            log_fields={"grpc_status": code.name if code is not None else None},
        )


def _outcome(done: Done | None, code: grpc.StatusCode | None) -> str:
    if done is None:
        return "cancelled"
    if done.abort_status is not None:
        return "fault-abort"
    error = done.error
    if error is not None:
        for cls, name in _ERROR_OUTCOMES:
            if isinstance(error, cls):
                return name
    return verdict_of(code).kind.value


_ERROR_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (NoEndpointsError, "no-endpoints"),
    (CircuitOpenError, "circuit-open"),
    (DeadlineExceededError, "deadline-exceeded"),
    (RetryBudgetExhaustedError, "retry-budget-exhausted"),
    (UnavailableError, "unavailable"),
)


def code_of(error: BaseException | None) -> grpc.StatusCode:
    """The status a caller sees for ``error`` (None: OK)."""
    if error is None:
        return grpc.StatusCode.OK
    code = getattr(error, "code", None)
    if callable(code):
        value: Any = code()
        if isinstance(value, grpc.StatusCode):
            return value
    return grpc.StatusCode.UNKNOWN


def mesh_failure(mesh: Runtime, error: BaseException) -> MeshRpcError:
    """A mesh error raised before any attempt (no answer from discovery, unknown service), as an RpcError whose
    details say where discovery looked and which name was probably meant."""
    if (
        isinstance(error, NoEndpointsError)
        and error.service
        and error.reason in (NoEndpointsError.NONE_LISTED, NoEndpointsError.UNKNOWN_SERVICE)
    ):
        error = NoEndpointsError(
            f"{error}; {mesh.explain_empty(error.service)}", service=error.service, reason=error.reason
        )
    return from_mesh_error(error)
