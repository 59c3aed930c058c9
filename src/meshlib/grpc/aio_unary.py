"""The grpc.aio unary and client-streaming multicallables (``await stub.Method(request)``, and ``write()`` /
``done_writing()`` on a client stream made without an iterator) and the call they drive.

Calls start at once, as grpc.aio's do. A quiet unary call is grpc.aio's own call object (``aio_quiet.py``). Any
other call returns the mesh's ``aio_calls.UnaryCall`` with its first attempt begun; the rest of its policy flow
(retrying on ``UNAVAILABLE`` on another instance) runs in its awaiter, or in a task of its own when nobody awaits
it. ``AioMethod`` is what every aio stub method shares (the streaming ones in ``aio_channel.py`` too).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc import aio

from ..calls.executors import run_async, start_async
from ..policy.flow import Attempts, Done, Result, Send, Sleep
from ..policy.service import ServiceState
from .aio_calls import RequestWriter, UnaryCall
from .aio_quiet import Parts, QuietUnaryCall, parts_of
from .call import Metadata, RpcAnswer, RpcCall
from .endpoints import EndpointChannel, EndpointChannels
from .facade import Method
from .quiet import judged_quietly, quiet_metadata, quiet_steps
from .status import result_of

#: An attempt whose RPC has started: what ``_AioUnaryCall.finish_attempt`` waits for.
_Begun = tuple[Send, EndpointChannel[aio.Channel], Any]


#: Read once (an enum member read costs ~45 ns a time)
_OK = grpc.StatusCode.OK
#: A call's own (credentials, wait_for_ready, compression) when it sets none: grpc's defaults.
_NO_OPTIONS = (None, None, None)
#: The shared metadata of plain attempts as ``grpc.aio.Metadata``: grpc.aio turns a tuple into one on every call
#: (~2 us); handed one, it uses it as it is (and never changes it).
_AIO_METADATA: dict[Metadata, aio.Metadata] = {}


def _shared_aio_metadata(metadata: Metadata) -> aio.Metadata:
    made = _AIO_METADATA.get(metadata)
    if made is None:
        made = aio.Metadata(*metadata)
        if len(_AIO_METADATA) < 1024:
            _AIO_METADATA[metadata] = made
    return made


class AioMethod(Method[aio.Channel]):
    __slots__ = ()


class Unary(AioMethod):
    """Unary and client-streaming calls (a client stream is not replayable: the flow never retries it)."""

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
    ) -> UnaryCall | QuietUnaryCall:
        writer: RequestWriter | None = None
        if request is None and self.kind == "stream_unary":  # no iterator: the caller writes, then done_writing()
            writer = RequestWriter()
            request = writer.requests()
        facade = self.facade
        state, ready = facade.mesh.service_state_nowait(facade.service)
        plain = not metadata and credentials is None and wait_for_ready is None and compression is None
        if plain and ready:
            steps = quiet_steps(facade, state, timeout, self.kind == "unary_unary")
            if steps is not None:
                return self._quietly(state, steps, request, writer)
        call = UnaryCall(writer)
        options = _NO_OPTIONS if plain else (credentials, wait_for_ready, compression)
        if not ready:  # the service's first call: discovery is waited for off the loop, in the call's coroutine
            call.start(self._after_discovery(request, timeout, metadata, options, call))
            return call
        rpc = self._attempts(state, request, timeout, metadata, options, call)
        # the first attempt's RPC starts now (grpc.aio's own calls start at once); awaiting the call goes on from it
        started = start_async(rpc, rpc)
        call.start(run_async(rpc, rpc, started), begun=started.begun is not None)
        return call

    def _quietly(
        self, state: ServiceState, steps: Attempts, request: Any, writer: RequestWriter | None
    ) -> UnaryCall | QuietUnaryCall:
        """A quiet call (``quiet.py``): its first attempt's RPC started now, with the flow's steps. A unary call is
        grpc.aio's own call object, judged in its own invocation (``aio_quiet.py``); else (a client stream, or a
        grpc release that does not fit) the mesh's call object, judged by its awaiter or its own task. Anything
        but an OK answer is handed to the async executor from where it stands."""
        send = steps.next_attempt()
        if isinstance(send, Done):  # over before an attempt (no endpoint to call, the deadline already past)
            link = UnaryCall(writer)
            link.start(self.carry_on(state, steps, send, request, link, None))
            return link
        facade = self.facade
        endpoints = facade.endpoints
        record = endpoints.acquire(send.endpoint, state)
        try:
            parts = self._quiet_parts(record) if writer is None and self.kind == "unary_unary" else None
            if parts is not None:
                metadata = quiet_metadata(facade.mesh, send)
                return QuietUnaryCall(parts, request, send.timeout, metadata, self, state, steps, send, record)
            link = UnaryCall(writer)
            metadata = quiet_metadata(facade.mesh, send, _shared_aio_metadata)
            real = self.on(record)(request, timeout=send.timeout, metadata=metadata)
        except BaseException:
            endpoints.release(record)
            steps.unanswered()
            self.record_cancelled(state, steps)
            raise
        link.last = real
        link.start(self._finish_quietly(state, steps, send, record, real, request, link), begun=True)
        return link

    def _quiet_parts(self, record: EndpointChannel[aio.Channel]) -> Parts | None:
        """What a quiet grpc call of this method is made of on ``record``'s channel (``aio_quiet.parts_of``),
        looked at once."""
        key = ("quiet", self.method)
        parts: Parts | bool | None = record.callables.get(key)
        if parts is None:
            parts = record.callables[key] = parts_of(self.on(record)) or False
        return parts or None  # type: ignore[return-value]  # (False: looked at, and cannot)

    def record_cancelled(self, state: ServiceState, steps: Attempts) -> None:
        """A quiet call that ended in its first attempt without an answer (an interrupt, a cancel, an RPC that could
        not start), recorded as the driver records one (its steps told first: ``Attempts.unanswered``)."""
        _AioUnaryCall.carrying_on(self.facade.mesh, state, self.method, steps, None).finish(None, None)

    async def _finish_quietly(
        self,
        state: ServiceState,
        steps: Attempts,
        send: Send,
        record: EndpointChannel[aio.Channel],
        real: Any,
        request: Any,
        link: UnaryCall,
    ) -> RpcAnswer:
        try:
            try:
                response = await real
            except aio.AioRpcError as exc:
                code = exc.code()
                answer = RpcAnswer(None, exc, exc, code, record.label)
            except asyncio.CancelledError:  # the caller cancelled: its RPC too, and the call is recorded so
                real.cancel()
                steps.unanswered()
                self.record_cancelled(state, steps)
                raise
            else:
                code = _OK
                answer = RpcAnswer(response, real, None, code, record.label)
        finally:
            self.facade.endpoints.release(record)
        result = result_of(code, send.attempt)
        then = judged_quietly(self.facade, steps, result, code)
        if then is None:
            return answer
        return await self.carry_on(state, steps, then, request, link, (result, answer))

    async def carry_on(
        self,
        state: ServiceState,
        steps: Attempts,
        then: Sleep | Done,
        request: Any,
        link: UnaryCall,
        first: tuple[Result, RpcAnswer] | None,
    ) -> RpcAnswer:
        """A quiet call that needs the whole machinery after all: the call object made now, driven from there."""
        rpc = _AioUnaryCall.carrying_on(self.facade.mesh, state, self.method, steps, then)
        rpc.stub_method = self
        rpc.endpoints = self.facade.endpoints
        rpc.request = request
        rpc.options = _NO_OPTIONS
        rpc.link = link
        return await run_async(rpc, rpc, first=first)

    def _attempts(
        self,
        state: ServiceState,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        options: tuple[Any, Any, Any],
        link: UnaryCall,
    ) -> _AioUnaryCall:
        facade = self.facade
        unary = self.kind == "unary_unary"
        call = _AioUnaryCall(
            facade.mesh, state, facade.service, self.method, metadata, timeout, replayable=unary, hedging=unary
        )
        call.stub_method = self
        call.endpoints = facade.endpoints
        call.request = request
        call.options = options
        call.link = link
        return call

    async def _after_discovery(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        options: tuple[Any, Any, Any],
        link: UnaryCall,
    ) -> RpcAnswer:
        state = await self.facade.state()
        rpc = self._attempts(state, request, timeout, metadata, options, link)
        return await run_async(rpc, rpc, start_async(rpc, rpc))


class _AioUnaryCall(RpcCall):
    """One unary call: the call between its attempts (``RpcCall``) and how each attempt is made on an endpoint
    channel, the shell ``calls.executors.run_async`` runs (its first attempt begun by ``start_async``, in the
    caller's frame). One object a call, not a call and a shell. ``link`` is the ``UnaryCall`` the caller holds."""

    __slots__ = ("endpoints", "link", "options", "request", "stub_method")

    stub_method: Unary
    endpoints: EndpointChannels[aio.Channel]
    request: Any
    options: tuple[Any, Any, Any]
    link: UnaryCall

    def prepare(self, send: Send) -> tuple[Send, EndpointChannel[aio.Channel], Metadata]:
        record = self.endpoints.acquire(send.endpoint, self.state)
        metadata = self.attempt_metadata(send, record.label)
        if type(metadata) is tuple:  # the shared metadata of a plain attempt: grpc.aio's own type, made once
            metadata = _shared_aio_metadata(metadata)
        return send, record, metadata

    def begin_attempt(self, prepared: tuple[Send, EndpointChannel[aio.Channel], Metadata]) -> _Begun:
        """The attempt's RPC, started: grpc.aio's call runs on its own from here."""
        send, record, metadata = prepared
        options = self.options
        try:
            if self.link.cancel_asked:  # the caller cancelled during a backoff: send nothing more
                raise asyncio.CancelledError()
            if options is _NO_OPTIONS:  # the common call: grpc's defaults for the rest
                real = self.stub_method.on(record)(self.request, timeout=send.timeout, metadata=metadata)
            else:
                credentials, wait_for_ready, compression = options
                real = self.stub_method.on(record)(
                    self.request,
                    timeout=send.timeout,
                    metadata=metadata,
                    credentials=credentials,
                    wait_for_ready=wait_for_ready,
                    compression=compression,
                )
        except BaseException:
            self.endpoints.release(record)
            raise
        self.link.last = real
        return send, record, real

    async def finish_attempt(self, begun: _Begun) -> tuple[Result, RpcAnswer]:
        send, record, real = begun
        try:
            try:
                response = await real
            except aio.AioRpcError as exc:
                code = exc.code()
                return result_of(code, send.attempt), RpcAnswer(None, exc, exc, code, record.label)
            except asyncio.CancelledError:  # a hedge lost, or the caller cancelled: cancel its RPC too
                real.cancel()
                raise
            code = _OK
            return result_of(code, send.attempt), RpcAnswer(response, real, None, code, record.label)
        finally:
            self.endpoints.release(record)

    async def arun(self, prepared: tuple[Send, EndpointChannel[aio.Channel], Metadata]) -> tuple[Result, RpcAnswer]:
        return await self.finish_attempt(self.begin_attempt(prepared))

    async def adiscard(self, answer: RpcAnswer, read_small: bool) -> None:
        pass  # nothing to close: a unary answer is read whole
