"""The async HTTP shell: ``AsyncMeshTransport`` drives the policy flow over per-endpoint keep-alive stacks
(``async_pools.py``), with hedged attempts side by side when the rules ask for them."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
from collections.abc import Coroutine
from typing import Any

import anyio
import httpcore
import httpx

from ..errors import MeshError
from ..policy.classify import classify_status
from ..policy.flow import Result, Send
from ..runtime import Runtime
from .async_pools import AsyncEndpointPools
from .call import HttpCall, count_unresolved
from .driver import Alongside, Attempt, Drop, NextDone, Pause, drive
from .errors import as_httpx_failure, classify_error
from .external import ExternalCall
from .names import mesh_service_name
from .outbound import Answer, trace_events
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
                count_unresolved(self.mesh, service, request)
                raise as_httpx_failure(exc, None) from None
        call = HttpCall(self.mesh, state, request, service, hedging=_asyncio_running())
        driver = drive(call)
        side: _Tasks | None = None  # attempts in flight together (hedged calls only)
        try:
            effect = next(driver)
            while True:
                try:
                    kind = type(effect)
                    out: Any = None
                    if kind is Attempt:
                        out = await self._attempt(call, effect.send, service)  # type: ignore[union-attr]
                    elif kind is Pause:
                        await anyio.sleep(effect.seconds)  # type: ignore[union-attr]
                    elif kind is Drop:
                        response = effect.response  # type: ignore[union-attr]
                        await (adiscard(response) if effect.read_small else response.aclose())  # type: ignore[union-attr]
                    else:
                        side = side or _Tasks()
                        if kind is Alongside:
                            send = effect.send  # type: ignore[union-attr]
                            side.start(send.attempt, self._attempt(call, send, service, own_span=True))
                        elif kind is NextDone:
                            out = await side.next(effect.timeout)  # type: ignore[union-attr]
                        else:
                            out = await side.settle(effect.winner)  # type: ignore[union-attr]
                except BaseException as exc:  # cancelled: the call ends the same way, through the driver
                    effect = driver.throw(exc)
                    continue
                effect = driver.send(out)
        except StopIteration as stop:
            answer: httpx.Response = stop.value
            return answer

    async def _attempt(
        self, call: HttpCall, action: Send, service: str, own_span: bool = False
    ) -> tuple[Result, httpx.Response | None]:
        """One attempt: the request, and a small body read inside it (a reset mid-body is then a failed attempt)."""
        request = call.attempt(action)
        span = call.take_attempt_span() if own_span else None
        response: httpx.Response | None = None
        try:
            try:
                pools = self._pools.get(service)
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
                result = Result(classify_error(exc), exc, action.attempt)
            else:
                if isinstance(stream, bytes):
                    # read here, synchronously (cheaper than httpx's async read after us); timed as httpx would
                    response = read_response(raw.status, raw.headers, stream, raw.extensions)
                    response.elapsed = datetime.timedelta(seconds=call.mesh.clock() - call.started)
                else:
                    response = httpx.Response(
                        status_code=raw.status, headers=raw.headers, stream=stream, extensions=raw.extensions
                    )
                result = Result(classify_status(raw.status), None, action.attempt)
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
        if "_passthrough" in self.__dict__:
            await self._passthrough.aclose()


def _asyncio_running() -> bool:
    """Hedging runs attempts side by side with asyncio tasks; under another event loop (trio) calls are not hedged."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Tasks:
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
                await adiscard(response)
        self.answered.clear()
        return kept
