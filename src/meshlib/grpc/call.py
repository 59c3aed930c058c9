"""One gRPC call through the mesh, between its attempts: shared by the sync and the grpc.aio facades.

It builds the call's plan and policy flow, each attempt's metadata (caller, attempt number, deadline, trace
context), and does the call's telemetry. The shells only send attempts on endpoint channels and sleep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from logging import DEBUG
from typing import Any, NamedTuple, TypeVar

from opentelemetry.trace import Span

import grpc

from ..calls.recorder import CallRecorder, outcome_of
from ..errors import NoEndpointsError
from ..policy.decisions import log_decisions
from ..policy.decisions import logger as decision_logger
from ..policy.flow import Attempts, Done, Result, Send, Sleep, attempts_flow, call_flow
from ..policy.service import DEFAULT_PLAN, ServiceState
from ..propagation import outbound_deadline, propagated_headers
from ..runtime import Runtime
from ..telemetry.tracing import carried_traceparent, traceparent_of
from .status import (
    HTTP_BY_NUMBER,
    VERDICTS_BY_NUMBER,
    MeshRpcError,
    code_of_http,
    from_mesh_error,
    number_of,
    with_attempts,
)

Metadata = Sequence[tuple[str, str | bytes]]
_ATTEMPTS = [str(i) for i in range(16)]
_OK = grpc.StatusCode.OK
_TRACE_KEYS = ("traceparent", "tracestate")
#: caller -> the metadata of its plain attempts 0..15 (see ``RpcCall.attempt_metadata``); few callers per process
_PLAIN_METADATA: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {}


def plain_metadata(caller: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    made = _PLAIN_METADATA.get(caller)
    if made is None:
        made = tuple((("x-mesh-caller", caller), ("x-mesh-attempt", number)) for number in _ATTEMPTS)
        if len(_PLAIN_METADATA) < 64:
            _PLAIN_METADATA[caller] = made
    return made


class RpcAnswer(NamedTuple):
    """What one attempt got: the response (None: failed), the real call object (or the RpcError), the error, the
    status, and the endpoint it went to."""

    response: Any
    call: Any
    error: BaseException | None
    code: grpc.StatusCode | None
    label: str


C = TypeVar("C", bound="RpcCall")


class RpcCall(CallRecorder):
    """Everything one logical call needs between attempts."""

    __slots__ = ("attempts", "base", "hedging", "method", "state")

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
        self.state = state
        self.method = method
        #: the flow may hedge (``.future()`` then waits on its attempts together, on a thread)
        self.hedging = hedging
        caller = mesh.service
        base: list[tuple[str, str | bytes]] | None = None  # None: the caller's name is the whole of it
        keep_trace = False
        carried = propagated_headers.get()
        if metadata or carried:
            base = []
            if metadata:
                for key, value in metadata:  # the mesh's own keys are the mesh's to set
                    if not key.startswith("x-mesh-"):
                        base.append((key, value))
                        keep_trace = keep_trace or key in _TRACE_KEYS
            if carried:  # routing headers of the request being handled, unless this call sets them itself
                present = {key for key, _ in base}
                base.extend((key, value) for key, value in carried if key not in present)
            base.append(("x-mesh-caller", caller))
        tel = mesh.telemetry
        span = tel.tracer.start_rpc(service, method) if tel is not None and tel.tracer.active() else None
        CallRecorder.__init__(self, mesh, service, span, keep_trace)
        if not keep_trace and not self.recording:
            trace_header = carried_traceparent()  # the same rule as HTTP: inside a trace only
            if trace_header is not None:
                if base is None:
                    base = [("x-mesh-caller", caller)]
                base.append(("traceparent", trace_header.decode()))
        self.base = base
        #: "<endpoint> <code>" of each failed attempt (None until one fails), for the error that names them
        self.attempts: list[str] | None = None
        now = self.started = state.last_used = mesh.clock()
        plan = DEFAULT_PLAN
        if state.rules is not None:
            pairs = base if base is not None else (("x-mesh-caller", caller),)
            lookup = {key: value for key, value in pairs if isinstance(value, str)}
            plan = state.plan("POST", method, lookup.get, mesh.rand)
            if plan.retry_non_idempotent:  # gRPC retries only what gRPC calls safe (UNAVAILABLE), whatever a route says
                plan = dataclasses.replace(plan, retry_non_idempotent=False)
        self.plan = plan
        policy_timeout = state.policy.timeout
        if timeout is None or (policy_timeout is not None and policy_timeout < timeout):
            timeout = policy_timeout
        self.flow = call_flow(
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
            # the decision log is read by spans, access log lines and DEBUG logging only (not by gRPC errors)
            explain=self.recording
            or (tel is not None and tel.access.may_write())
            or decision_logger.isEnabledFor(DEBUG),
        )

    @classmethod
    def carrying_on(
        cls: type[C], mesh: Runtime, state: ServiceState, method: str, steps: Attempts, then: Sleep | Done | None
    ) -> C:
        """A quiet call (``quiet.py``) that needs the call object after all, made where its steps stand: its flow
        goes on from ``then`` (what they came to; None: the call was interrupted, and has no flow to run). What a
        quiet call is makes the rest plain: no metadata of its own, no span, the default plan, no hedging."""
        self = cls.__new__(cls)
        CallRecorder.__init__(self, mesh, state.name, None, False)
        self.state = state
        self.method = method
        self.hedging = False
        self.base = None
        self.attempts = None
        self.started = steps.started
        self.plan = DEFAULT_PLAN
        if then is not None:
            self.flow = attempts_flow(steps, then)
        return self

    def attempt_metadata(self, send: Send, label: str) -> Metadata:
        """The metadata of one attempt; the attempt's own span starts here. The common call (no metadata of its own,
        no trace, no deadline) sends the same two pairs every time: one shared tuple, made once per caller and
        attempt number (a tuple only then: every other attempt's metadata is a list of its own)."""
        attempt = send.attempt
        base = self.base
        if base is None and send.timeout is None and not self.recording and attempt < 16:
            return plain_metadata(self.mesh.service)[attempt]
        metadata = list(base) if base is not None else [("x-mesh-caller", self.mesh.service)]
        metadata.append(("x-mesh-attempt", _ATTEMPTS[attempt] if attempt < 16 else str(attempt)))
        if self.recording:
            span = self.start_attempt_span("grpc", label, send)
            if span is not None and not self.keep_trace:
                metadata.append(("traceparent", traceparent_of(span).decode()))
        if send.timeout is not None:
            metadata.append(("x-mesh-deadline", self.deadline_header(send.timeout)))
        return metadata

    # -- what the driver asks (calls.driver.Recorder) ----------------------------------------------------------

    def attempt_done(self, result: Result, answer: RpcAnswer | None, span: Span | None = None) -> None:
        code = answer.code if answer is not None else None
        verdict = result.verdict
        if verdict.is_failure:
            label = answer.label if answer is not None else "?"
            if self.attempts is None:
                self.attempts = []
            self.attempts.append(f"{label} {code.name if code is not None else 'UNKNOWN'}")
        if span is not None or self.attempt_span is not None:
            self.end_attempt_span(span, verdict, {"rpc.grpc.status_code": code.value[0] if code is not None else 2})

    def fault_answer(self, done: Done) -> RpcAnswer:
        assert done.abort_status is not None
        code = code_of_http(done.abort_status)
        error = MeshRpcError(code, f"{self.service}: fault injected by mesh rules (abort {done.abort_status})")
        return RpcAnswer(None, error, error, code, "")

    def conclude(self, done: Done, answer: RpcAnswer | None) -> RpcAnswer | BaseException:
        """The last attempt's answer, or the error to raise: the mesh's (no endpoint, open breakers, deadline), a
        failed attempt's own RpcError with every attempt named, or an application status exactly as sent."""
        if done.error is not None:
            return mesh_failure(self.mesh, done.error)
        assert answer is not None
        error = answer.error
        if error is None:
            return answer
        result = done.result
        if done.abort_status is None and result is not None and result.verdict.is_failure:
            wrapped: BaseException = with_attempts(error, self.service, self.attempts or [])
            return wrapped
        return error

    def finish(self, done: Done | None, outcome: RpcAnswer | BaseException | None) -> None:
        if self.mesh.telemetry is None:
            if done is not None and done.decisions:
                log_decisions(self.service, done.decisions)
            return
        code = outcome.code if isinstance(outcome, RpcAnswer) else code_of(outcome) if outcome is not None else None
        if code is _OK and self.ended_quietly(done, "POST", "2xx", "success"):
            return
        number = number_of(code) if code is not None else 2  # (no code: UNKNOWN)
        name = outcome_of(done, VERDICTS_BY_NUMBER[number].kind._value_)
        self.record_end(
            done,
            method="POST",
            path=self.method,
            status=HTTP_BY_NUMBER[number] if code is not None else None,
            outcome=name,
            error_type=None if number == 0 else name,
            span_attributes=lambda: {"rpc.grpc.status_code": number},
            log_fields=lambda: {"grpc_status": code.name if code is not None else None},
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


def kept(error: BaseException) -> BaseException:
    """An attempt's error, caught to be kept in its answer, without the traceback of where it was caught: that
    traceback holds the attempt's frame, and through it the whole call, in a reference cycle that only the
    garbage collector would break (a retried call's answers kept alive until its next pass). Raised again, it
    gets a traceback of where it is raised."""
    error.__traceback__ = None
    return error


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
