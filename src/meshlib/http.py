"""The HTTP data plane: ``MeshTransport`` / ``AsyncMeshTransport`` and the ``Client`` / ``AsyncClient`` drop-ins.

Each transport is a thin shell that drives the shared policy generator (``policy/flow.py``): it turns ``Send``
into one HTTP attempt on its connection pool and ``Sleep`` into a sleep, and nothing else. For the chosen
endpoint it builds the ``httpcore.Request`` directly (origin tuple and raw headers), which is cheaper than
copying the ``httpx.URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import anyio
import httpcore
import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY
from opentelemetry.trace import Span, StatusCode

from .client.errors import classify_error, to_httpx_error
from .client.pools import AsyncEndpointPools
from .errors import (
    CircuitOpenError,
    DeadlineExceededError,
    MeshError,
    NoEndpointsError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from .mesh import Mesh
from .policy.classify import classify_status
from .policy.deadline import to_epoch_millis
from .policy.flow import HEDGE_DUE, CallFlow, Done, Result, Send, Sleep, call_flow
from .policy.service import DEFAULT_PLAN, ServiceState
from .propagation import outbound_deadline, propagated_headers
from .telemetry.client_calls import finish_client_call
from .telemetry.metrics import status_class
from .telemetry.tracing import outbound_traceparent, traceparent_of

__all__ = ["AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport", "mesh_service_name"]

_SERVICE_NAMES: dict[str, str | None] = {}
#: httpx's own defaults, so a mesh client behaves like a plain one.
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


def mesh_service_name(host: str) -> str | None:
    """The mesh service a URL host names, or None for a host that goes straight through.

    ``payments`` and ``payments.mesh`` (also ``payments.<namespace>.mesh``) are mesh services; anything with a
    dot, an IP address, or ``localhost`` is not.
    """
    try:
        return _SERVICE_NAMES[host]
    except KeyError:
        pass
    name: str | None
    if host.endswith(".mesh"):
        name = host.split(".", 1)[0] or None
    elif not host or "." in host or ":" in host or host == "localhost":
        name = None
    else:
        name = host
    if len(_SERVICE_NAMES) < 4096:
        _SERVICE_NAMES[host] = name
    return name


# -- exceptions ----------------------------------------------------------------------------------

class _ResponseStream(httpx.SyncByteStream):
    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpcore.ProtocolError as exc:
            raise to_httpx_error(exc) from exc
        except (httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise to_httpx_error(exc) from exc

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _AsyncResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise to_httpx_error(exc) from exc

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


# -- one call: shared by both shells --------------------------------------------------------------

_MESH_HEADER_PREFIX = b"x-mesh-"
_MIRROR_HEADER = (b"x-mesh-mirror", b"1")
_ATTEMPT_VALUES = [str(i).encode() for i in range(16)]


class _Call:
    """Everything one mesh call needs between attempts, shared by the sync and async shells: builds each attempt's
    ``httpcore.Request`` and does the call's telemetry (spans, metrics, access log)."""

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
        self, mesh: Mesh, state: ServiceState, request: httpx.Request, service: str, hedging: bool = False
    ) -> None:
        self.mesh = mesh
        self.request = request
        self.service = service
        url = request.url
        self.scheme = url.raw_scheme
        self.target = url.raw_path
        # Mesh TLS: connect to the endpoint's address, verify the server as <service>.<namespace>.mesh
        self.sni = (service.encode() + mesh.dns_suffix).decode() if mesh.identity is not None else None
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
            plan=plan,
            hedging=hedging,
            record=copy_of is None,
        )

    def attempt_request(self, send: Send) -> httpcore.Request:
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
        return httpcore.Request(
            method=self.request.method,
            url=httpcore.URL(scheme=scheme, host=endpoint.address, port=endpoint.port, target=self.target),
            headers=headers,
            content=self.request.stream,
            extensions=extensions,
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
        """The span ``attempt_request`` just started, now the caller's to end (hedged attempts run side by side)."""
        span, self.attempt_span = self.attempt_span, None
        return span

    def finish(self, done: Done | None, response: httpx.Response | None) -> None:
        """The call is over: end its span, record its metrics and (sampled) access log line."""
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
        finish_client_call(
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
            budget_exhausted=done is not None and done.budget_exhausted,
            span_attributes=span_attributes,
            log_fields={
                "status": status,
                "bytes": int(response.headers.get("content-length", 0) or 0) if response is not None else 0,
            },
        )

class _External:
    """A call to a host outside the mesh: still traced and metered. Marks the context so that an
    ``opentelemetry-instrumentation-httpx`` in the app does not record the same request a second time."""

    __slots__ = ("mesh", "request", "span", "started", "token")

    def __init__(self, mesh: Mesh, request: httpx.Request) -> None:
        tel = mesh.telemetry
        assert tel is not None
        self.mesh = mesh
        self.request = request
        self.started = mesh.clock()
        self.span: Span | None = None
        self.token: contextvars.Token[otel_context.Context] | None = None
        host = request.url.host
        if not tel.tracer.active():
            self.span = None
            self.token = None
            if "traceparent" not in request.headers:
                request.headers["traceparent"] = outbound_traceparent().decode()
            return
        self.span = span = tel.tracer.start_call(request.method, host, str(request.url))
        if "traceparent" not in request.headers:
            request.headers["traceparent"] = (
                traceparent_of(span) if span.is_recording() else outbound_traceparent()
            ).decode()
        ctx = otel_context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, trace.set_span_in_context(span))
        self.token = otel_context.attach(ctx)

    def finish(self, response: httpx.Response | None, error: BaseException | None) -> None:
        if self.token is not None:
            otel_context.detach(self.token)
        tel = self.mesh.telemetry
        assert tel is not None
        status = response.status_code if response is not None else None
        outcome = classify_error(error).kind.value if error is not None else classify_status(status or 0).kind.value
        metrics = tel.metrics
        attrs = metrics.client_labels(
            self.request.url.host, "external", self.request.method, status_class(status), outcome
        )
        metrics.client_duration.record(self.mesh.clock() - self.started, attrs)
        span = self.span
        if span is None:
            return
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if status is None or status >= 500:
                span.set_attribute("error.type", outcome if status is None else str(status))
                span.set_status(StatusCode.ERROR, outcome)
        span.end()


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


def _fault_response(done: Done) -> httpx.Response:
    assert done.abort_status is not None
    return httpx.Response(done.abort_status, headers={"x-mesh-fault": "abort"}, content=b"fault injected by mesh rules")


def _raise_done(done: Done, mesh: Mesh) -> None:
    error = done.error
    assert error is not None
    cause = done.result.error if done.result is not None else None
    if type(error) is NoEndpointsError and error.service and "discovery lists none" in str(error):
        error = NoEndpointsError(f"{error}; {mesh.explain_empty(error.service)}", service=error.service)
    if isinstance(error, MeshError):
        raise error from cause
    raise to_httpx_error(error)


# -- the sync shell -------------------------------------------------------------------------------


class MeshTransport(httpx.BaseTransport):
    """An httpx transport that resolves mesh hosts through discovery and applies the mesh policy; other hosts
    go to ``passthrough`` untouched."""

    def __init__(
        self,
        mesh: Mesh | None,
        *,
        passthrough: httpx.BaseTransport | None = None,
        pool: httpcore.ConnectionPool | Any | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
    ) -> None:
        if mesh is not None:
            self.__dict__["mesh"] = mesh
        self._passthrough = passthrough or httpx.HTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )
        self._pool_settings = (verify, cert, trust_env, limits, http1, http2)
        self._pools = _Pools(lambda: httpcore.ConnectionPool(**self._pool_options), pool)

    @functools.cached_property
    def mesh(self) -> Mesh:
        """The process default Mesh, looked up at the first request rather than when the client was made, so that
        ``meshlib.serve(app, service=...)`` names it even when the app built its clients at import."""
        return Mesh.default()

    @functools.cached_property
    def _pool_options(self) -> dict[str, Any]:
        """Once per transport (building an SSL context costs milliseconds), when the first pool is made."""
        return _pool_options(self.mesh, *self._pool_settings)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        service = mesh_service_name(request.url.host)
        if service is None:
            if self.mesh.telemetry is None:
                return self._passthrough.handle_request(request)
            external = _External(self.mesh, request)
            try:
                passed = self._passthrough.handle_request(request)
            except BaseException as exc:
                external.finish(None, exc)
                raise
            external.finish(passed, None)
            return passed
        try:
            state = self.mesh.service_state(service)
        except MeshError:
            _count_unresolved(self.mesh, service, request)
            raise
        call = _Call(self.mesh, state, request, service)
        flow = call.flow
        response: httpx.Response | None = None
        done: Done | None = None
        try:
            action = next(flow)
            while True:
                if type(action) is Send:
                    if response is not None:
                        _discard(response)
                        response = None
                    try:
                        raw = self._pools.get(service).handle_request(call.attempt_request(action))
                    except Exception as exc:
                        result = Result(classify_error(exc), exc)
                    else:
                        response = httpx.Response(
                            status_code=raw.status,
                            headers=raw.headers,
                            stream=_ResponseStream(raw.stream),
                            extensions=raw.extensions,
                        )
                        result = Result(classify_status(raw.status))
                        if _small_body(raw):  # read it inside the attempt: a reset mid-body is then retryable
                            try:
                                response.read()
                            except Exception as exc:
                                response.close()
                                response = None
                                result = Result(classify_error(exc), exc)
                    call.attempt_done(result)
                    action = flow.send(result)
                else:
                    time.sleep(action.seconds)  # type: ignore[union-attr]
                    action = next(flow)
        except StopIteration as stop:
            done = stop.value
        finally:
            flow.close()
            if done is None or done.error is not None:
                if response is not None:
                    response.close()
                    response = None
            elif response is None:
                response = _fault_response(done)
            call.finish(done, response)
        assert done is not None
        if done.error is not None:
            _raise_done(done, self.mesh)
        assert response is not None
        return response

    def close(self) -> None:
        for pool in self._pools.all():
            pool.close()
        self._passthrough.close()


class _Pools:
    """One connection pool per destination service. httpcore reuses connections by address alone; with mesh TLS a
    connection is verified for one service name, so it must never carry another service's requests (an address
    reused by another service, or a wrong discovery entry, would otherwise skip the identity check)."""

    def __init__(self, factory: Callable[[], Any], shared: Any | None = None) -> None:
        self._factory = factory
        self._shared = shared
        self._pools: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, service: str) -> Any:
        if self._shared is not None:
            return self._shared
        pool = self._pools.get(service)
        if pool is None:
            with self._lock:
                pool = self._pools.get(service)
                if pool is None:
                    pool = self._pools[service] = self._factory()
        return pool

    def all(self) -> list[Any]:
        return [self._shared] if self._shared is not None else list(self._pools.values())


def _pool_options(
    mesh: Mesh, verify: Any, cert: Any, trust_env: bool, limits: httpx.Limits, http1: bool, http2: bool
) -> dict[str, Any]:
    """httpcore pool settings for mesh hops, as httpx would set them; with mesh TLS the instance's identity context
    (a live one: rotations apply to new connections)."""
    ssl_context: ssl.SSLContext = (
        mesh.identity.client
        if mesh.identity is not None
        else httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    )
    return {
        "ssl_context": ssl_context,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
    }


def _count_unresolved(mesh: Mesh, service: str, request: httpx.Request) -> None:
    """A call that failed before it had a route (discovery gave nothing) still counts in the golden signals."""
    tel = mesh.telemetry
    if tel is not None:
        metrics = tel.metrics
        metrics.client_duration.record(
            0.0, metrics.client_labels(service, "default", request.method, "error", "no-endpoints")
        )


#: Responses up to this size (by Content-Length) are read before the attempt counts as answered.
PREFETCH_LIMIT = 64 * 1024


def _small_body(raw: httpcore.Response) -> bool:
    """A small body announced by Content-Length is read inside the attempt, as a proxy buffering it would: an
    instance dying between headers and body is then a failed attempt (retried where allowed), not a ReadError in
    the caller's hands. Larger or chunked bodies stream to the caller untouched."""
    for name, value in raw.headers:
        if name.lower() == b"content-length":
            try:
                return int(value) <= PREFETCH_LIMIT
            except ValueError:
                return False
    return False


def _discard(response: httpx.Response) -> None:
    """Drop an attempt's response that a retry replaces; reading a small body keeps its connection reusable."""
    try:
        length = int(response.headers.get("content-length", "0") or 0)
        if length <= 65536:
            response.read()
    except Exception:
        pass
    finally:
        response.close()


# -- the async shell ------------------------------------------------------------------------------


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        mesh: Mesh | None,
        *,
        passthrough: httpx.AsyncBaseTransport | None = None,
        pool: httpcore.AsyncConnectionPool | Any | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
    ) -> None:
        if mesh is not None:
            self.__dict__["mesh"] = mesh
        self._passthrough = passthrough or httpx.AsyncHTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )
        self._pool_settings = (verify, cert, trust_env, limits, http1, http2)
        # per-endpoint keep-alive stacks (client/pools.py), not httpcore's pool: the endpoint is already chosen
        self._pools = _Pools(lambda: AsyncEndpointPools(**self._pool_options), pool)

    @functools.cached_property
    def mesh(self) -> Mesh:
        """See ``MeshTransport.mesh``."""
        return Mesh.default()

    @functools.cached_property
    def _pool_options(self) -> dict[str, Any]:
        """See ``MeshTransport._pool_options``."""
        return _pool_options(self.mesh, *self._pool_settings)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = mesh_service_name(request.url.host)
        if service is None:
            if self.mesh.telemetry is None:
                return await self._passthrough.handle_async_request(request)
            external = _External(self.mesh, request)
            try:
                passed = await self._passthrough.handle_async_request(request)
            except BaseException as exc:
                external.finish(None, exc)
                raise
            external.finish(passed, None)
            return passed
        state, ready = self.mesh.service_state_nowait(service)
        if not ready:  # first call for this service: wait for discovery off the event loop
            try:
                state = await anyio.to_thread.run_sync(self.mesh.service_state, service)
            except MeshError:
                _count_unresolved(self.mesh, service, request)
                raise
        call = _Call(self.mesh, state, request, service, hedging=_asyncio_running())
        flow = call.flow
        response: httpx.Response | None = None
        done: Done | None = None
        side: _SideBySide | None = None  # attempts in flight together (hedged calls only)
        try:
            action = next(flow)
            while True:
                kind = type(action)
                if kind is Send and action.hedge_after is None and side is None:  # type: ignore[union-attr]
                    if response is not None:
                        await _adiscard(response)
                    result, response = await self._attempt(call, action, service)  # type: ignore[arg-type]
                    call.attempt_done(result)
                    action = flow.send(result)
                elif kind is Sleep:
                    await anyio.sleep(action.seconds)  # type: ignore[union-attr]
                    action = next(flow)
                else:  # hedged: a backup alongside, or wait for the attempts in flight
                    if side is None:
                        side = _SideBySide()
                    if kind is Send:
                        side.start(action.attempt, self._attempt(call, action, service, own_span=True))  # type: ignore[union-attr,arg-type]
                    answered = await side.next(action.hedge_after)  # type: ignore[union-attr]
                    action = flow.send(HEDGE_DUE if answered is None else answered)
        except StopIteration as stop:
            done = stop.value
        finally:
            flow.close()
            if side is not None:
                response = await side.settle(done.winner if done is not None else None)
            if done is None or done.error is not None:
                if response is not None:
                    await response.aclose()
                    response = None
            elif response is None:
                response = _fault_response(done)
            call.finish(done, response)
        assert done is not None
        if done.error is not None:
            _raise_done(done, self.mesh)
        assert response is not None
        return response

    async def _attempt(
        self, call: _Call, action: Send, service: str, own_span: bool = False
    ) -> tuple[Result, httpx.Response | None]:
        """One attempt: the request, and a small body read inside it (a reset mid-body is then a failed attempt)."""
        request = call.attempt_request(action)
        span = call.take_attempt_span() if own_span else None
        response: httpx.Response | None = None
        try:
            try:
                raw = await self._pools.get(service).handle_async_request(request)
            except Exception as exc:
                result = Result(classify_error(exc), exc, action.attempt)
            else:
                response = httpx.Response(
                    status_code=raw.status,
                    headers=raw.headers,
                    stream=_AsyncResponseStream(raw.stream),
                    extensions=raw.extensions,
                )
                result = Result(classify_status(raw.status), None, action.attempt)
                if _small_body(raw):
                    try:
                        await response.aread()
                    except Exception as exc:
                        await response.aclose()
                        response = None
                        result = Result(classify_error(exc), exc, action.attempt)
        except BaseException:  # cancelled (a hedge lost): the connection is closed, never reused half-read
            if response is not None:
                await response.aclose()
            if span is not None:
                span.end()
            raise
        if own_span:
            call.attempt_done(result, span)
        return result, response

    async def aclose(self) -> None:
        for pool in self._pools.all():
            await pool.aclose()
        await self._passthrough.aclose()


def _asyncio_running() -> bool:
    """Hedging runs attempts side by side with asyncio tasks; under another event loop (trio) calls are not hedged."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _SideBySide:
    """The attempts of one hedged call in flight together: the first to finish is handed to the flow; when the
    call is done, the winner's response is kept and every other attempt is cancelled (its connection closed) or,
    if it already finished, its response discarded."""

    __slots__ = ("answered", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[asyncio.Task[tuple[Result, httpx.Response | None]], int] = {}
        self.answered: dict[int, httpx.Response | None] = {}

    def start(self, attempt: int, work: Coroutine[Any, Any, tuple[Result, httpx.Response | None]]) -> None:
        self.tasks[asyncio.ensure_future(work)] = attempt

    async def next(self, hedge_after: float | None) -> Result | None:
        """The next attempt to finish, or None when ``hedge_after`` passes first."""
        finished, _ = await asyncio.wait(self.tasks, timeout=hedge_after, return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            return None
        task = finished.pop()
        del self.tasks[task]
        result, response = task.result()
        self.answered[result.attempt] = response
        return result

    async def settle(self, winner: int | None) -> httpx.Response | None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        self.tasks.clear()
        kept = self.answered.pop(winner, None) if winner is not None else None
        for response in self.answered.values():
            if response is not None:
                await _adiscard(response)
        self.answered.clear()
        return kept


async def _adiscard(response: httpx.Response) -> None:
    try:
        length = int(response.headers.get("content-length", "0") or 0)
        if length <= 65536:
            await response.aread()
    except Exception:
        pass
    finally:
        await response.aclose()


# -- the clients ----------------------------------------------------------------------------------


class Client(httpx.Client):
    """An ``httpx.Client`` whose requests to mesh hosts (``http://payments/...``) go through the mesh.

    Everything httpx accepts keeps working. A ``transport=`` given here serves the non-mesh hosts; mesh hosts
    always take the mesh transport, also when environment proxies are configured.
    """

    def __init__(
        self,
        *,
        mesh: Mesh | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(transport, MeshTransport):
            transport = MeshTransport(
                mesh,
                passthrough=transport,
                verify=verify,
                cert=cert,
                http1=http1,
                http2=http2,
                limits=limits,
                trust_env=trust_env,
            )
        super().__init__(
            transport=transport,
            verify=verify,
            cert=cert,
            http1=http1,
            http2=http2,
            limits=limits,
            trust_env=trust_env,
            **kwargs,
        )

    @property
    def mesh(self) -> Mesh:
        """The Mesh this client's mesh calls go through (the process default one unless ``mesh=`` was given)."""
        transport = self._transport
        assert isinstance(transport, MeshTransport)
        return transport.mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.BaseTransport:
        if mesh_service_name(url.host) is not None:
            return self._transport
        return super()._transport_for_url(url)


class AsyncClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` drop-in; see ``Client``."""

    def __init__(
        self,
        *,
        mesh: Mesh | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(transport, AsyncMeshTransport):
            transport = AsyncMeshTransport(
                mesh,
                passthrough=transport,
                verify=verify,
                cert=cert,
                http1=http1,
                http2=http2,
                limits=limits,
                trust_env=trust_env,
            )
        super().__init__(
            transport=transport,
            verify=verify,
            cert=cert,
            http1=http1,
            http2=http2,
            limits=limits,
            trust_env=trust_env,
            **kwargs,
        )

    @property
    def mesh(self) -> Mesh:
        """See ``Client.mesh``."""
        transport = self._transport
        assert isinstance(transport, AsyncMeshTransport)
        return transport.mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        if mesh_service_name(url.host) is not None:
            return self._transport
        return super()._transport_for_url(url)
