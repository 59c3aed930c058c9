"""The HTTP data plane: ``MeshTransport`` / ``AsyncMeshTransport`` and the ``Client`` / ``AsyncClient`` drop-ins.

Each transport is a thin shell that drives the shared policy generator (``policy/flow.py``): it turns ``Send``
into one HTTP attempt on its connection pool and ``Sleep`` into a sleep, and nothing else. For the chosen
endpoint it builds the ``httpcore.Request`` directly (origin tuple and raw headers), which is cheaper than
copying the ``httpx.URL``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpcore
import httpx

from .errors import MeshError
from .mesh import Mesh
from .policy.classify import classify_error, classify_status
from .policy.deadline import call_deadline, to_epoch_millis
from .policy.flow import CallFlow, Done, Result, Send, call_flow
from .policy.service import DEFAULT_PLAN, ServiceState
from .telemetry.tracing import outbound_traceparent

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

_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def to_httpx_error(exc: BaseException) -> BaseException:
    """httpcore's exceptions as the httpx ones callers already catch; anything else unchanged."""
    for source, target in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, source):
            mapped = target(str(exc))
            mapped.__cause__ = exc
            return mapped
    return exc


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
_ATTEMPT_VALUES = [str(i).encode() for i in range(16)]


class _Call:
    """Everything one mesh call needs between attempts; builds each attempt's ``httpcore.Request``."""

    __slots__ = ("base_headers", "extensions", "flow", "mesh", "read_timeout", "request", "scheme", "target")

    def __init__(self, mesh: Mesh, state: ServiceState, request: httpx.Request) -> None:
        self.mesh = mesh
        self.request = request
        url = request.url
        self.scheme = url.raw_scheme
        self.target = url.raw_path
        raw = request.headers.raw
        keep_trace = False
        for name, _ in raw:  # rare: the app (or OTel instrumentation) set mesh or trace headers itself
            if name[:1] in b"xXtT" and (name[:7].lower() == _MESH_HEADER_PREFIX or name.lower() == b"traceparent"):
                keep_trace = any(k.lower() == b"traceparent" for k, _ in raw)
                raw = [(k, v) for k, v in raw if not k.lower().startswith(_MESH_HEADER_PREFIX)]
                break
        raw.append(mesh.caller_header)
        if not keep_trace:
            raw.append((b"traceparent", outbound_traceparent()))
        self.base_headers = raw
        self.extensions = request.extensions
        timeouts = self.extensions.get("timeout") or {}
        self.read_timeout: float | None = timeouts.get("read")
        now = mesh.clock()
        method = request.method
        plan = state.plan(method, url.path, request.headers.get, mesh.rand) if state.rules is not None else DEFAULT_PLAN
        self.flow: CallFlow = call_flow(
            state,
            method=method,
            replayable=isinstance(request.stream, httpx.ByteStream),
            deadline=call_deadline(now, state.policy.timeout),
            clock=mesh.clock,
            rand=mesh.rand,
            plan=plan,
        )

    def attempt_request(self, send: Send) -> httpcore.Request:
        endpoint = send.endpoint
        headers = list(self.base_headers)
        attempt = send.attempt
        headers.append((b"x-mesh-attempt", _ATTEMPT_VALUES[attempt] if attempt < 16 else str(attempt).encode()))
        extensions = self.extensions
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
            url=httpcore.URL(scheme=self.scheme, host=endpoint.address, port=endpoint.port, target=self.target),
            headers=headers,
            content=self.request.stream,
            extensions=extensions,
        )


def _fault_response(done: Done) -> httpx.Response:
    assert done.abort_status is not None
    return httpx.Response(done.abort_status, headers={"x-mesh-fault": "abort"}, content=b"fault injected by mesh rules")


def _raise_done(done: Done) -> None:
    error = done.error
    assert error is not None
    cause = done.result.error if done.result is not None else None
    if isinstance(error, MeshError):
        raise error from cause
    raise to_httpx_error(error)


# -- the sync shell -------------------------------------------------------------------------------


class MeshTransport(httpx.BaseTransport):
    """An httpx transport that resolves mesh hosts through discovery and applies the mesh policy; other hosts
    go to ``passthrough`` untouched."""

    def __init__(
        self,
        mesh: Mesh,
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
        self.mesh = mesh
        self._passthrough = passthrough or httpx.HTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )
        self._pool = pool or httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        service = mesh_service_name(request.url.host)
        if service is None:
            return self._passthrough.handle_request(request)
        call = _Call(self.mesh, self.mesh.service_state(service), request)
        flow = call.flow
        response: httpx.Response | None = None
        try:
            action = next(flow)
            while True:
                if type(action) is Send:
                    if response is not None:
                        _discard(response)
                        response = None
                    try:
                        raw = self._pool.handle_request(call.attempt_request(action))
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
                    action = flow.send(result)
                else:
                    time.sleep(action.seconds)  # type: ignore[union-attr]
                    action = next(flow)
        except StopIteration as stop:
            done: Done = stop.value
        finally:
            flow.close()
        if done.error is not None:
            if response is not None:
                response.close()
            _raise_done(done)
        if response is None:
            return _fault_response(done)
        return response

    def close(self) -> None:
        self._pool.close()
        self._passthrough.close()


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
        mesh: Mesh,
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
        self.mesh = mesh
        self._passthrough = passthrough or httpx.AsyncHTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )
        self._pool = pool or httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = mesh_service_name(request.url.host)
        if service is None:
            return await self._passthrough.handle_async_request(request)
        state, ready = self.mesh.service_state_nowait(service)
        if not ready:  # first call for this service: wait for discovery off the event loop
            state = await anyio.to_thread.run_sync(self.mesh.service_state, service)
        call = _Call(self.mesh, state, request)
        flow = call.flow
        response: httpx.Response | None = None
        try:
            action = next(flow)
            while True:
                if type(action) is Send:
                    if response is not None:
                        await _adiscard(response)
                        response = None
                    try:
                        raw = await self._pool.handle_async_request(call.attempt_request(action))
                    except Exception as exc:
                        result = Result(classify_error(exc), exc)
                    else:
                        response = httpx.Response(
                            status_code=raw.status,
                            headers=raw.headers,
                            stream=_AsyncResponseStream(raw.stream),
                            extensions=raw.extensions,
                        )
                        result = Result(classify_status(raw.status))
                    action = flow.send(result)
                else:
                    await anyio.sleep(action.seconds)  # type: ignore[union-attr]
                    action = next(flow)
        except StopIteration as stop:
            done: Done = stop.value
        finally:
            flow.close()
        if done.error is not None:
            if response is not None:
                await response.aclose()
            _raise_done(done)
        if response is None:
            return _fault_response(done)
        return response

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self._passthrough.aclose()


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
        self.mesh = mesh or Mesh.default()
        if not isinstance(transport, MeshTransport):
            transport = MeshTransport(
                self.mesh,
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
        self.mesh = mesh or Mesh.default()
        if not isinstance(transport, AsyncMeshTransport):
            transport = AsyncMeshTransport(
                self.mesh,
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

    def _transport_for_url(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        if mesh_service_name(url.host) is not None:
            return self._transport
        return super()._transport_for_url(url)
