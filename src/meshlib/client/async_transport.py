"""The async HTTP shell: ``AsyncMeshTransport`` drives the policy flow over per-endpoint keep-alive stacks
(``async_pools.py``), with hedged attempts side by side when the rules ask for them."""

from __future__ import annotations

import asyncio
import datetime
import functools
from typing import Any

import anyio
import httpcore
import httpx

from ..calls.executors import run_async
from ..calls.recorder import count_unresolved
from ..errors import MeshError
from ..policy.classify import classify_status
from ..policy.flow import Result, Send
from ..runtime import Runtime
from .async_pools import AsyncEndpointPools
from .call import HttpCall
from .errors import as_httpx_failure, classify_error
from .external import ExternalCall
from .names import mesh_service_name
from .outbound import Answer, Outbound, trace_events
from .streams import AsyncResponseStream, adiscard, aread_small, read_response, small_body, streaming
from .transport import DEFAULT_LIMITS, SCHEMES, MeshShell, ServicePools, unsupported_scheme


class AsyncMeshTransport(MeshShell, httpx.AsyncBaseTransport):
    """The async twin of ``MeshTransport``."""

    def __init__(
        self,
        mesh: Runtime | None,
        *,
        passthrough: httpx.AsyncBaseTransport | None = None,
        pool: httpcore.AsyncConnectionPool | Any | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        trust_env: bool = True,
    ) -> None:
        self._bind(mesh, (verify, cert, trust_env, limits, http1, http2))
        self._given_passthrough = passthrough
        # per-endpoint keep-alive stacks (client/async_pools.py), not httpcore's pool: the endpoint is already chosen
        self._pools = ServicePools(lambda: AsyncEndpointPools(**self._pool_options, lean=_asyncio_running()), pool)

    @functools.cached_property
    def _passthrough(self) -> httpx.AsyncBaseTransport:
        """See ``MeshTransport._passthrough``."""
        if self._given_passthrough is not None:
            return self._given_passthrough
        verify, cert, trust_env, limits, http1, http2 = self._pool_settings
        return httpx.AsyncHTTPTransport(
            verify=verify, cert=cert, http1=http1, http2=http2, limits=limits, trust_env=trust_env
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        service = mesh_service_name(url.host)
        if service is not None and url.scheme not in SCHEMES:
            raise unsupported_scheme(url)
        if service is None:
            if self.mesh.telemetry is None:
                return await self._passthrough.handle_async_request(request)
            external = ExternalCall(self.mesh, request)
            try:
                passed = await self._passthrough.handle_async_request(external.request)
            except BaseException as exc:
                external.finish(None, exc)
                raise
            external.finish(passed, None)
            return passed
        state, ready = self.mesh.service_state_nowait(service)
        if not ready:  # first call for this service: wait for discovery off the event loop
            try:
                state = await anyio.to_thread.run_sync(self.mesh.service_state, service)
            except MeshError as exc:
                count_unresolved(self.mesh, service, request.method)
                raise as_httpx_failure(exc, None) from None
        # (asked only when the service hedges: in Python 3.11 each ask of the running loop is a getpid system call)
        call = HttpCall(self.mesh, state, request, service, hedging=state.hedger is not None and _asyncio_running())
        return await run_async(call, _AsyncHop(self, call))

    async def attempt(self, call: HttpCall, request: Outbound, attempt: int) -> tuple[Result, httpx.Response | None]:
        """One attempt: the request, and a small body read inside it (a reset mid-body is then a failed attempt)."""
        response: httpx.Response | None = None
        try:
            try:
                pools = self._pools.get(call.service)
                if type(pools) is AsyncEndpointPools:
                    raw = await pools.send(request)
                else:  # a pool given to the transport (httpcore's interface)
                    raw = await pools.handle_async_request(request.to_httpcore())
                trace = request.extensions.get("trace")
                if trace is not None and type(raw) is Answer:  # an async callable here, as httpcore calls it
                    for event, info in trace_events(request, raw):
                        await trace(event, info)
                arrived: Any = raw.stream
                stream: Any
                if streaming.get():  # client.stream(): handed over unread, as httpx would
                    stream = httpx.ByteStream(arrived) if type(arrived) is bytes else AsyncResponseStream(arrived)
                else:
                    stream = (
                        arrived
                        if type(arrived) is bytes
                        # not already in memory
                        else (await aread_small(arrived) if small_body(raw) else AsyncResponseStream(arrived))
                    )
            except Exception as exc:
                result = Result(classify_error(exc), exc, attempt)
            else:
                if isinstance(stream, bytes):
                    # read here, synchronously (cheaper than httpx's async read after us); timed as httpx would
                    response = read_response(raw.status, raw.headers, stream, raw.extensions)
                    response.elapsed = datetime.timedelta(seconds=call.mesh.clock() - call.started)
                else:
                    response = httpx.Response(
                        status_code=raw.status, headers=raw.headers, stream=stream, extensions=raw.extensions
                    )
                result = Result(classify_status(raw.status), None, attempt)
        except BaseException:  # cancelled (a hedge lost): the connection is closed, never reused half-read
            if response is not None:
                await response.aclose()
            raise
        return result, response

    async def aclose(self) -> None:
        for pool in self._pools.all():
            await pool.aclose()
        if "_passthrough" in self.__dict__:
            await self._passthrough.aclose()


def _asyncio_running() -> bool:
    """Hedging runs attempts side by side with asyncio tasks; under another event loop (trio) calls are not hedged."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _AsyncHop:
    """One mesh call's attempts on an ``AsyncMeshTransport`` (what ``calls.executors.run_async`` runs)."""

    __slots__ = ("call", "transport")

    def __init__(self, transport: AsyncMeshTransport, call: HttpCall) -> None:
        self.transport = transport
        self.call = call

    def prepare(self, send: Send) -> tuple[Outbound, int]:
        return self.call.attempt(send), send.attempt

    async def arun(self, prepared: tuple[Outbound, int]) -> tuple[Result, httpx.Response | None]:
        request, attempt = prepared
        return await self.transport.attempt(self.call, request, attempt)

    async def adiscard(self, answer: httpx.Response, read_small: bool) -> None:
        await (adiscard(answer) if read_small else answer.aclose())
