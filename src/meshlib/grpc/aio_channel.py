"""The ``grpc.aio.Channel`` drop-in: the async twin of ``channel.py``, on the same ``RpcCall`` and policy core.

Calls start at once, as grpc.aio's do. Unary and client-streaming calls are ``aio_unary.py``'s. A streaming call
resolves its endpoint (waiting off the loop for discovery's first answer if it must), then is the real call on that
endpoint's channel, wrapped only to record its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from grpc import aio

from ..calls.driver import begin_stream, end_stream
from ..calls.recorder import count_unresolved
from ..errors import MeshError
from ..policy.flow import Send
from ..policy.service import ServiceState
from .aio_calls import StreamCall, as_aio_error
from .aio_unary import AioMethod, Unary
from .call import Metadata, RpcAnswer, RpcCall, mesh_failure
from .endpoints import Options
from .facade import Facade, method_of
from .status import result_of

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


class _AioStreaming(AioMethod):
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
        coro = _as_aio_errors(self._start, request, timeout, metadata, credentials, wait_for_ready, compression)
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
        starting = begin_stream(call)
        try:
            while True:  # a fault-injection delay
                await asyncio.sleep(next(starting))
        except StopIteration as stop:
            send: Send = stop.value
        endpoints = facade.endpoints
        record = endpoints.acquire(send.endpoint, state)
        args = () if request is None and self.kind == "stream_stream" else (request,)
        try:
            real = self.on(record)(
                *args,
                timeout=send.timeout,
                metadata=call.attempt_metadata(send, record.label),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except BaseException:
            endpoints.release(record)
            end_stream(call, None, None)
            raise

        async def ended() -> None:
            try:
                code = await real.code()
            finally:
                endpoints.release(record)
            answer = RpcAnswer(None, real, None, code, record.label)
            end_stream(call, result_of(code, send.attempt), answer)

        def on_done(_: Any) -> None:
            task = asyncio.get_running_loop().create_task(ended())
            _closing.add(task)
            task.add_done_callback(_closing.discard)

        real.add_done_callback(on_done)
        return real


async def _as_aio_errors(start: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """A streaming call the mesh ends before it starts fails as grpc.aio's own do (``AioRpcError``). The call's
    coroutine is made here, so a call cancelled before it ran leaves none behind unawaited."""
    try:
        return await start(*args)
    except grpc.RpcError as failure:
        error = as_aio_error(failure)
        raise error from error.__cause__


class AioChannel(Facade[aio.Channel], aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` to a mesh service; see ``meshlib.grpc.Channel``."""

    make_channel = staticmethod(_make_channel)
    close_channel = staticmethod(_close_later)
    connect_channel = staticmethod(_connect)

    unary_unary = method_of("unary_unary", Unary)
    stream_unary = method_of("stream_unary", Unary)
    unary_stream = method_of("unary_stream", _AioStreaming)
    stream_stream = method_of("stream_stream", _AioStreaming)

    async def state(self) -> ServiceState:
        mesh = self.mesh
        state, ready = mesh.service_state_nowait(self.service)
        if not ready:  # first call for this service: wait for discovery off the event loop
            try:
                state = await asyncio.to_thread(mesh.service_state, self.service)
            except MeshError as exc:
                count_unresolved(mesh, self.service, "POST")
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
