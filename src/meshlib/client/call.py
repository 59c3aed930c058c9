"""One mesh call between its attempts, shared by the sync and async HTTP shells: each attempt's request for the
chosen endpoint (an ``outbound.Outbound``: origin and raw headers, cheaper than copying the ``httpx.URL``; turned
into an ``httpcore.Request`` only where httpcore sends it), and the call's telemetry."""

from __future__ import annotations

from typing import Any

import httpx
from opentelemetry.trace import Span

from ..calls.recorder import CallRecorder, outcome_of
from ..errors import MeshError, NoEndpointsError
from ..policy.decisions import log_decisions
from ..policy.flow import Done, Result, Send, call_flow
from ..policy.service import DEFAULT_PLAN, ServiceState
from ..propagation import outbound_deadline, propagated_headers
from ..runtime import Runtime
from ..telemetry.metrics import status_class
from ..telemetry.tracing import carried_traceparent, traceparent_of
from .errors import as_httpx_failure, to_httpx_error
from .outbound import Outbound

_MESH_HEADER_PREFIX = b"x-mesh-"
_MIRROR_HEADER = (b"x-mesh-mirror", b"1")
_ATTEMPT_VALUES = [str(i).encode() for i in range(16)]


class HttpCall(CallRecorder):
    """Everything one mesh call needs between attempts, shared by the sync and async shells: builds each attempt's
    ``Outbound`` request, says what the caller gets, and does the call's telemetry (spans, metrics, access log)."""

    __slots__ = ("base_headers", "extensions", "read_timeout", "request", "scheme", "sni", "target")

    def __init__(
        self, mesh: Runtime, state: ServiceState, request: httpx.Request, service: str, hedging: bool = False
    ) -> None:
        self.request = request
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
        method = request.method
        tel = mesh.telemetry
        span = tel.tracer.start_call(method, service, str(url)) if tel is not None and tel.tracer.active() else None
        super().__init__(mesh, service, span, keep_trace)
        if not keep_trace and not self.recording:
            trace_header = carried_traceparent()
            if trace_header is not None:
                raw.append((b"traceparent", trace_header))
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
        self.flow = call_flow(
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
        """The request of one attempt, for the endpoint the flow chose; its span starts here."""
        endpoint = send.endpoint
        headers = list(self.base_headers)
        attempt = send.attempt
        headers.append((b"x-mesh-attempt", _ATTEMPT_VALUES[attempt] if attempt < 16 else str(attempt).encode()))
        span = self.start_attempt_span(self.request.method, endpoint.authority, send)
        if span is not None and not self.keep_trace:
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
            headers.append((b"x-mesh-deadline", self.deadline_header(budget).encode()))
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

    # -- what the driver asks (calls.driver.Recorder) ----------------------------------------------------------

    def attempt_done(self, result: Result, answer: httpx.Response | None, span: Span | None = None) -> None:
        verdict = result.verdict
        if span is not None or self.attempt_span is not None:
            attributes = {} if verdict.status is None else {"http.response.status_code": verdict.status}
            self.end_attempt_span(span, verdict, attributes)

    def fault_answer(self, done: Done) -> httpx.Response:
        assert done.abort_status is not None
        return httpx.Response(
            done.abort_status, headers={"x-mesh-fault": "abort"}, content=b"fault injected by mesh rules"
        )

    def conclude(self, done: Done, answer: httpx.Response | None) -> httpx.Response | BaseException:
        """The response, or the mesh's error as the httpx class of what ended the call (``client/errors.py``)."""
        error = done.error
        if error is None:
            assert answer is not None
            return answer
        cause = done.result.error if done.result is not None else None
        if type(error) is NoEndpointsError and error.service and error.reason == NoEndpointsError.NONE_LISTED:
            error = NoEndpointsError(
                f"{error}; {self.mesh.explain_empty(error.service)}", service=error.service, reason=error.reason
            )
        if isinstance(error, MeshError):
            if done.decisions:
                error.decisions = tuple(done.decisions)
            error = as_httpx_failure(error, cause)
            error.__cause__ = cause
            return error
        return to_httpx_error(error)

    def finish(self, done: Done | None, outcome: httpx.Response | BaseException | None) -> None:
        response = outcome if isinstance(outcome, httpx.Response) else None
        if self.mesh.telemetry is None:
            if done is not None and done.decisions:
                log_decisions(self.service, done.decisions)
            return
        status = response.status_code if response is not None else None
        kind = (
            done.result.verdict.kind.value
            if done is not None and done.result is not None
            else ("success" if status is not None and status < 500 else "server-error")
        )
        outcome_name = outcome_of(done, kind)
        if status is not None and self.ended_quietly(done, self.request.method, status_class(status), outcome_name):
            return
        span_attributes: dict[str, Any] = {}
        if self.plan.choice.subset is not None:
            span_attributes["mesh.subset"] = self.plan.choice.subset
        if status is not None:
            span_attributes["http.response.status_code"] = status
        self.record_end(
            done,
            method=self.request.method,
            path=self.request.url.path,
            status=status,
            outcome=outcome_name,
            error_type=(outcome_name if status is None else str(status)) if status is None or status >= 500 else None,
            span_attributes=span_attributes,
            log_fields=lambda: {
                "status": status,
                "bytes": int(response.headers.get("content-length", 0) or 0) if response is not None else 0,
            },
        )


def _shortest(timeouts: dict[str, float | None]) -> float | None:
    """The caller's tightest httpx timeout (connect, read, write or pool: each bounds every attempt)."""
    values = [value for value in timeouts.values() if value is not None]
    return min(values) if values else None
