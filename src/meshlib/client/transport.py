"""The sync HTTP shell: ``MeshTransport`` drives the policy flow (``policy/flow.py``) over one outbound engine per
destination service (``pools.py``; httpcore's pool for HTTP/2 or a pool given in); hosts outside the mesh go
to a plain httpx transport."""

from __future__ import annotations

import datetime
import functools
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpcore
import httpx

from ..calls.executors import Cancel, run_blocking
from ..calls.recorder import count_unresolved
from ..errors import MeshError
from ..policy.classify import classify_status
from ..policy.flow import Result, Send
from ..runtime import Runtime, process_default
from .call import HttpCall
from .errors import as_httpx_failure, classify_error
from .external import ExternalCall
from .names import mesh_service_name
from .outbound import Answer, Outbound, trace_events
from .pools import EndpointPools
from .streams import ResponseStream, discard, read_response, read_small, small_body, streaming
from .tls_reads import CoalescingBackend

#: The schemes a mesh hop speaks (anything else is httpx's UnsupportedProtocol, as plain httpx raises it).
SCHEMES = frozenset(("http", "https"))


def unsupported_scheme(url: httpx.URL) -> httpx.UnsupportedProtocol:
    return httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{url.scheme}://'.")


#: httpx's own defaults, so a mesh client behaves like a plain one.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


class MeshShell:
    """What the sync and async transports share: the Mesh they serve (the process default unless one was given,
    looked up at the first request) and their pool settings, turned into pool options once."""

    _pool_settings: tuple[Any, ...]
    _pools: ServicePools

    def pool_for(self, service: str) -> Any:
        """The connection pool that carries calls to ``service`` (one per destination: see ``ServicePools``)."""
        return self._pools.get(service)

    def _bind(self, mesh: Runtime | None, pool_settings: tuple[Any, ...]) -> None:
        if mesh is not None:
            self.__dict__["mesh"] = mesh
        self._pool_settings = pool_settings

    @functools.cached_property
    def mesh(self) -> Runtime:
        """The process default Runtime, looked up at the first request rather than when the client was made, so that
        ``meshlib.serve(app, service=...)`` names it even when the app built its clients at import."""
        return process_default()

    @functools.cached_property
    def _pool_options(self) -> dict[str, Any]:
        """Once per transport (building an SSL context costs milliseconds), when the first pool is made."""
        return _pool_options(self.mesh, *self._pool_settings)


class MeshTransport(MeshShell, httpx.BaseTransport):
    """An httpx transport that resolves mesh hosts through discovery and applies the mesh policy; other hosts
    go to ``passthrough`` untouched."""

    def __init__(
        self,
        mesh: Runtime | None,
        *,
        passthrough: httpx.BaseTransport | None = None,
        pool: httpcore.ConnectionPool | Any | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        trust_env: bool = True,
    ) -> None:
        self._bind(mesh, (verify, cert, trust_env, limits, http1, http2))
        self._given_passthrough = passthrough
        lean = http1 and not http2  # the lean HTTP/1.1 engine; HTTP/2 stays on httpcore's pool
        self._pools = ServicePools(
            lambda: (
                EndpointPools(**self._pool_options)
                if lean
                else httpcore.ConnectionPool(**self._pool_options, network_backend=CoalescingBackend())
            ),
            pool,
        )

    @functools.cached_property
    def _passthrough(self) -> httpx.BaseTransport:
        """Hosts outside the mesh when this transport is used on its own (``meshlib.Client`` routes them through
        httpx itself); made at first use (an SSL context costs milliseconds)."""
        if self._given_passthrough is not None:
            return self._given_passthrough
        verify, cert, trust_env, limits, http1, http2 = self._pool_settings
        return httpx.HTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        service = mesh_service_name(url.host)
        if service is not None and url.scheme not in SCHEMES:
            raise unsupported_scheme(url)
        if service is None:
            if self.mesh.telemetry is None:
                return self._passthrough.handle_request(request)
            external = ExternalCall(self.mesh, request)
            try:
                passed = self._passthrough.handle_request(external.request)
            except BaseException as exc:
                external.finish(None, exc)
                raise
            external.finish(passed, None)
            return passed
        try:
            state = self.mesh.service_state(service)
        except MeshError as exc:
            count_unresolved(self.mesh, service, request.method)
            raise as_httpx_failure(exc, None) from None
        call = HttpCall(self.mesh, state, request, service, hedging=True)
        return run_blocking(call, _Hop(self, call))

    def attempt(
        self, request: Outbound, service: str, attempt: int, started: float
    ) -> tuple[Result, httpx.Response | None]:
        """One attempt; a small body is read inside it (a reset mid-body is then a failed, retryable attempt) and
        handed over read, timed from the call's start as httpx would time it."""
        try:
            pools = self._pools.get(service)
            if type(pools) is EndpointPools:
                raw: Answer | httpcore.Response = pools.send(request)
            else:  # httpcore's pool: HTTP/2, or a pool given to the transport
                raw = pools.handle_request(request.to_httpcore())
            trace = request.extensions.get("trace")
            if trace is not None and type(raw) is Answer:  # httpx's extension (httpcore's pools call it themselves)
                for event, info in trace_events(request, raw):
                    trace(event, info)
            arrived: Any = raw.stream
            stream: httpx.SyncByteStream | None
            if streaming.get():  # client.stream(): handed over unread, as httpx would
                body = None
                stream = httpx.ByteStream(arrived) if type(arrived) is bytes else ResponseStream(arrived)
            else:
                body = arrived if type(arrived) is bytes else (read_small(arrived) if small_body(raw) else None)
                stream = None if body is not None else ResponseStream(arrived)
        except Exception as exc:
            return Result(classify_error(exc), exc, attempt), None
        if body is not None:
            response = read_response(raw.status, raw.headers, body, raw.extensions)
            response.elapsed = datetime.timedelta(seconds=self.mesh.clock() - started)
        else:
            response = httpx.Response(raw.status, headers=raw.headers, stream=stream, extensions=raw.extensions)
        return Result(classify_status(raw.status), None, attempt), response

    def close(self) -> None:
        for pool in self._pools.all():
            pool.close()
        if "_passthrough" in self.__dict__:
            self._passthrough.close()


class _Hop:
    """One mesh call's attempts on a ``MeshTransport`` (what ``calls.executors.run_blocking`` runs)."""

    __slots__ = ("call", "transport")

    def __init__(self, transport: MeshTransport, call: HttpCall) -> None:
        self.transport = transport
        self.call = call

    def prepare(self, send: Send) -> tuple[Outbound, int]:
        return self.call.attempt(send), send.attempt

    def run(self, prepared: tuple[Outbound, int], cancel: Cancel | None) -> tuple[Result, httpx.Response | None]:
        # a thread blocked in a socket cannot be stopped: a hedged attempt that lost runs to its end
        request, attempt = prepared
        call = self.call
        return self.transport.attempt(request, call.service, attempt, call.started)

    def discard(self, answer: httpx.Response, read_small: bool) -> None:
        discard(answer) if read_small else answer.close()


class ServicePools:
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
    mesh: Runtime, verify: Any, cert: Any, trust_env: bool, limits: httpx.Limits, http1: bool, http2: bool
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
