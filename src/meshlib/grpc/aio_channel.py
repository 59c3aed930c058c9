"""The ``grpc.aio.Channel`` drop-in: the async twin of ``channel.py``, on the same ``RpcCall`` and policy core.

Calls start at once, as grpc.aio's do. A unary call is one task that drives the policy flow (retrying on
``UNAVAILABLE`` on another instance); a streaming call resolves its endpoint (waiting off the loop for discovery's
first answer if it must), then is the real call on that endpoint's channel, wrapped only to record its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc import aio

from ..errors import MeshError
from ..policy.flow import HEDGE_DUE, Done, Result, Send, Sleep
from ..policy.service import ServiceState
from .aio_calls import StreamCall, UnaryCall
from .call import Metadata, RpcCall, code_of, mesh_failure
from .endpoints import Options
from .facade import Facade, Method, method_of

_closing: set[asyncio.Task[Any]] = set()


def _make_channel(target: str, credentials: grpc.ChannelCredentials | None, options: Options) -> aio.Channel:
    if credentials is None:
        return aio.insecure_channel(target, options=options)
    return aio.secure_channel(target, credentials, options=options)


def _close_later(channel: aio.Channel) -> None:
    """Retired channels close in the background (their calls are done; nothing waits for it)."""
    try:
        task = asyncio.get_running_loop().create_task(channel.close())
    except RuntimeError:  # no loop running (the loop is gone): nothing left to close on
        return
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _connect(channel: aio.Channel) -> None:
    channel.get_state(try_to_connect=True)


class _AioMethod(Method[aio.Channel]):
    __slots__ = ()


class _Unary(_AioMethod):
    """Unary and client-streaming calls (a client stream is not replayable: the flow never retries it)."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> UnaryCall:
        last: list[Any] = [None]
        coro = self._run(request, timeout, metadata, credentials, wait_for_ready, compression, last)
        return UnaryCall(asyncio.ensure_future(coro), last)

    async def _run(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
        last: list[Any],
    ) -> Any:
        facade = self.facade
        state = await facade.state()
        unary = self.kind == "unary_unary"
        call = RpcCall(
            facade.mesh, state, facade.service, self.method, metadata, timeout, replayable=unary, hedging=unary
        )
        flow = call.flow
        done: Done | None = None
        outcome: _Outcome = (None, None, None, None)
        answered: dict[int, _Outcome] = {}  # hedged calls: each finished attempt's outcome
        side: dict[asyncio.Task[tuple[_Outcome, Result]], int] = {}  # hedged calls: attempts in flight together
        options = (credentials, wait_for_ready, compression)
        try:
            action = next(flow)
            while True:
                kind = type(action)
                if kind is Send and action.hedge_after is None and not side:  # type: ignore[union-attr]
                    outcome, result = await self._attempt(call, state, action, request, options)  # type: ignore[arg-type]
                    last[0] = outcome[3]
                    action = flow.send(result)
                elif kind is Sleep:
                    await asyncio.sleep(action.seconds)  # type: ignore[union-attr]
                    action = next(flow)
                else:  # hedged: a backup alongside, or wait for the attempts in flight
                    if kind is Send:
                        work = self._attempt(call, state, action, request, options, own_span=True)  # type: ignore[arg-type]
                        side[asyncio.ensure_future(work)] = action.attempt  # type: ignore[union-attr]
                    finished, _ = await asyncio.wait(
                        side,
                        timeout=action.hedge_after,  # type: ignore[union-attr]
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not finished:
                        action = flow.send(HEDGE_DUE)
                        continue
                    task = finished.pop()
                    del side[task]
                    answer, result = task.result()
                    answered[result.attempt] = answer
                    action = flow.send(result)
        except StopIteration as stop:
            done = stop.value
        finally:
            flow.close()
            for task in side:  # the losers of a hedged call
                task.cancel()
            for task in side:
                with contextlib.suppress(BaseException):
                    await task
            if done is None:
                call.finish(None, outcome[2])
        assert done is not None
        if answered:
            outcome = answered.get(done.winner, outcome)
            last[0] = outcome[3]
        response, error, _, _ = outcome
        failure = call.outcome(done, error)
        call.finish(done, code_of(failure))
        if failure is not None:
            last[0] = failure
            raise failure
        return response

    async def _attempt(
        self,
        call: RpcCall,
        state: ServiceState,
        action: Send,
        request: Any,
        options: tuple[Any, Any, Any],
        own_span: bool = False,
    ) -> tuple[_Outcome, Result]:
        """One attempt on the chosen endpoint's channel: (response, error, code, the real call) and its Result."""
        endpoints = self.facade.endpoints
        record = endpoints.acquire(action.endpoint, state)
        real: Any = None
        try:
            credentials, wait_for_ready, compression = options
            real = self.on(record)(
                request,
                timeout=action.timeout,
                metadata=call.attempt_metadata(action, record.label),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
            span = call.take_attempt_span() if own_span else None
            try:
                response = await real
            except aio.AioRpcError as exc:
                code = exc.code()
                return (None, exc, code, real), call.attempt_done(record.label, code, action.attempt, span)
            except asyncio.CancelledError:  # a hedge lost: cancel its RPC too
                real.cancel()
                if span is not None:
                    span.end()
                raise
            code = grpc.StatusCode.OK
            return (response, None, code, real), call.attempt_done(record.label, code, action.attempt, span)
        finally:
            endpoints.release(record)


_Outcome = tuple[Any, BaseException | None, grpc.StatusCode | None, Any]


class _AioStreaming(_AioMethod):
    """Server- and bidi-streaming calls: balanced and counted by the breakers, never retried."""

    __slots__ = ()

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> StreamCall:
        coro = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        return StreamCall(asyncio.ensure_future(coro))

    async def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        facade = self.facade
        state = await facade.state()
        call = RpcCall(facade.mesh, state, facade.service, self.method, metadata, timeout, replayable=False)
        flow = call.flow
        try:
            action = next(flow)
            while type(action) is not Send:  # a fault-injection delay
                await asyncio.sleep(action.seconds)  # type: ignore[union-attr]
                action = next(flow)
        except StopIteration as stop:
            done: Done = stop.value
            failure = call.outcome(done, None)
            call.finish(done, code_of(failure))
            assert failure is not None
            raise failure from None
        endpoints = facade.endpoints
        record = endpoints.acquire(action.endpoint, state)
        args = () if request is None and self.kind == "stream_stream" else (request,)
        try:
            real = self.on(record)(
                *args,
                timeout=action.timeout,
                metadata=call.attempt_metadata(action, record.label),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except BaseException:
            endpoints.release(record)
            flow.close()
            call.finish(None, None)
            raise

        async def ended() -> None:
            try:
                code = await real.code()
            finally:
                endpoints.release(record)
            done: Done | None = None
            try:
                flow.send(call.attempt_done(record.label, code))
            except StopIteration as stop:
                done = stop.value
            finally:
                flow.close()
            call.finish(done, code)

        def on_done(_: Any) -> None:
            task = asyncio.get_running_loop().create_task(ended())
            _closing.add(task)
            task.add_done_callback(_closing.discard)

        real.add_done_callback(on_done)
        return real


class AioChannel(Facade[aio.Channel], aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` to a mesh service; see ``meshlib.grpc.Channel``."""

    make_channel = staticmethod(_make_channel)
    close_channel = staticmethod(_close_later)
    connect_channel = staticmethod(_connect)

    unary_unary = method_of("unary_unary", _Unary)
    stream_unary = method_of("stream_unary", _Unary)
    unary_stream = method_of("unary_stream", _AioStreaming)
    stream_stream = method_of("stream_stream", _AioStreaming)

    async def state(self) -> ServiceState:
        mesh = self.mesh
        state, ready = mesh.service_state_nowait(self.service)
        if not ready:  # first call for this service: wait for discovery off the event loop
            try:
                state = await asyncio.to_thread(mesh.service_state, self.service)
            except MeshError as exc:
                raise mesh_failure(mesh, exc) from exc
        return state

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        state, ready = self.mesh.service_state_nowait(self.service)
        if ready and state.handles:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.CONNECTING if not ready else grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() == last_observed_state:
            await asyncio.sleep(0.1)

    async def channel_ready(self) -> None:
        await self.state()
        while self.get_state() != grpc.ChannelConnectivity.READY:
            await asyncio.sleep(0.1)

    async def close(self, grace: float | None = None) -> None:
        if "endpoints" in self.__dict__:
            await asyncio.gather(*(channel.close(grace) for channel in self.endpoints.close()))

    async def __aenter__(self) -> AioChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)
