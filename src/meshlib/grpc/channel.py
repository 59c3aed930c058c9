"""The sync ``grpc.Channel`` drop-in: a facade whose calls go through the mesh.

Generated stubs use it unchanged. Each call's endpoint is chosen by the shared policy core (``policy/flow.py``:
routing, P2C over non-ejected endpoints, breakers, retry budget, deadline) and the call is sent on that endpoint's
own real channel (``endpoints.py``). Unary calls are retried on ``UNAVAILABLE`` only, on another instance; streaming
calls are balanced and counted by the breakers, never retried (their messages cannot be replayed).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..errors import MeshError
from ..policy.flow import HEDGE_DUE, Done, Result, Send, Sleep, Wait
from ..workers import worker_pool
from .call import Metadata, RpcCall, code_of, mesh_failure
from .endpoints import Options
from .facade import Facade, Method, method_of


def _make_channel(target: str, credentials: grpc.ChannelCredentials | None, options: Options) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _close_channel(channel: grpc.Channel) -> None:
    channel.close()


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


def _connect(channel: grpc.Channel) -> None:
    """Start connecting now (what ``try_to_connect`` does), without waiting."""
    channel.subscribe(_ignore, try_to_connect=True)
    channel.unsubscribe(_ignore)


class _Method(Method[grpc.Channel]):
    __slots__ = ()

    def begin(self, metadata: Metadata | None, timeout: float | None, replayable: bool) -> RpcCall:
        facade = self.facade
        mesh = facade.mesh
        try:
            state = mesh.service_state(facade.service)
        except MeshError as exc:
            raise mesh_failure(mesh, exc) from exc
        return RpcCall(
            mesh, state, facade.service, self.method, metadata, timeout, replayable=replayable, hedging=replayable
        )


class _Blocking(_Method, grpc.UnaryUnaryMultiCallable, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Unary and client-streaming calls: one response, so the whole call is driven here (and a unary call
    retried where the policy allows; a client stream is not replayable, so the flow never retries it)."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression, False)[0]

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Future:
        work = (request, timeout, metadata, credentials, wait_for_ready, compression)
        future = worker_pool().submit(self.__call__, *work)
        return _Future(future)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression, True)

    def _call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        want_call: bool,
    ) -> tuple[Any, grpc.Call]:
        call = self.begin(metadata, timeout, self.kind == "unary_unary")
        endpoints = self.facade.endpoints
        flow = call.flow
        mesh_state = call.state
        done: Done | None = None
        response: Any = None
        last: Any = None
        error: BaseException | None = None
        code: grpc.StatusCode | None = None
        side: _SideBySide | None = None  # hedged calls: attempts in flight together
        try:
            action = next(flow)
            while True:
                if isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    action = next(flow)
                elif side is not None or isinstance(action, Wait) or action.hedge_after is not None:
                    if side is None:
                        side = _SideBySide(call, endpoints)
                    if isinstance(action, Send):
                        record = endpoints.acquire(action.endpoint, mesh_state)
                        future = self.on(record).future(
                            request,
                            timeout=action.timeout,
                            metadata=call.attempt_metadata(action, record.label),
                            credentials=credentials,
                            wait_for_ready=wait_for_ready,
                            compression=compression,
                        )
                        side.start(action.attempt, record, future, call.take_attempt_span())
                    answered = side.next(action.hedge_after)
                    action = flow.send(HEDGE_DUE if answered is None else answered)
                else:
                    record = endpoints.acquire(action.endpoint, mesh_state)
                    try:
                        metadata_out = call.attempt_metadata(action, record.label)
                        real = self.on(record)
                        if want_call:
                            response, last = real.with_call(
                                request,
                                timeout=action.timeout,
                                metadata=metadata_out,
                                credentials=credentials,
                                wait_for_ready=wait_for_ready,
                                compression=compression,
                            )
                        else:  # the plain call skips building a call object nobody will see
                            response = real(
                                request,
                                timeout=action.timeout,
                                metadata=metadata_out,
                                credentials=credentials,
                                wait_for_ready=wait_for_ready,
                                compression=compression,
                            )
                        error, code = None, grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        response, last, error, code = None, exc, exc, code_of(exc)
                    finally:
                        endpoints.release(record)
                    action = flow.send(call.attempt_done(record.label, code))
        except StopIteration as stop:
            done = stop.value
        finally:
            flow.close()
            if side is not None:
                side.cancel_rest()
            if done is None:
                call.finish(None, code)
        assert done is not None
        if side is not None:
            response, last, error, code = side.outcome_of(done.winner)
        failure = call.outcome(done, error)
        call.finish(done, code_of(failure))
        if failure is not None:
            raise failure
        return response, last


class _SideBySide:
    """The attempts of one hedged unary call, as gRPC futures in flight together: each one's end is queued, the
    first is handed to the flow, and the losers are cancelled when the call is done."""

    def __init__(self, call: RpcCall, endpoints: Any) -> None:
        self.call = call
        self.endpoints = endpoints
        self.ended: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.futures: dict[int, tuple[Any, str, Any]] = {}  # attempt -> (future, endpoint label, span)
        self.outcomes: dict[int, tuple[Any, Any, BaseException | None, grpc.StatusCode]] = {}

    def start(self, attempt: int, record: Any, future: Any, span: Any) -> None:
        self.futures[attempt] = (future, record.label, span)

        def ended(_: Any) -> None:
            self.endpoints.release(record)
            self.ended.put(attempt)

        future.add_done_callback(ended)

    def next(self, hedge_after: float | None) -> Result | None:
        """The next attempt to end, or None when ``hedge_after`` passes first."""
        try:
            attempt = self.ended.get(timeout=hedge_after)
        except queue.Empty:
            return None
        future, label, span = self.futures.pop(attempt)
        try:
            response = future.result()
        except grpc.RpcError as exc:
            code = code_of(exc)
            self.outcomes[attempt] = (None, exc, exc, code)
        else:
            code = grpc.StatusCode.OK
            self.outcomes[attempt] = (response, future, None, code)
        return self.call.attempt_done(label, code, attempt, span)

    def cancel_rest(self) -> None:
        for future, _, span in self.futures.values():
            future.cancel()
            if span is not None:
                span.end()
        self.futures.clear()

    def outcome_of(self, winner: int) -> tuple[Any, Any, BaseException | None, grpc.StatusCode]:
        return self.outcomes[winner]


class _Streaming(_Method, grpc.UnaryStreamMultiCallable, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """Server- and bidi-streaming calls: balanced and counted by the breakers, never retried. The real call
    object is returned as is (an iterator of responses and a ``grpc.Call``); its end is recorded when it ends."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self.begin(metadata, timeout, False)
        flow = call.flow
        endpoints = self.facade.endpoints
        try:
            action = next(flow)
            while type(action) is not Send:  # a fault-injection delay
                time.sleep(action.seconds)  # type: ignore[union-attr]
                action = next(flow)
        except StopIteration as stop:  # no endpoint, fault abort, deadline: over before it started
            done: Done = stop.value
            failure = call.outcome(done, None)
            call.finish(done, code_of(failure))
            assert failure is not None
            raise failure from None
        record = endpoints.acquire(action.endpoint, call.state)
        try:
            real = self.on(record)(
                request,
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
        ended = threading.Lock()

        def on_end() -> None:
            if not ended.acquire(blocking=False):
                return
            endpoints.release(record)
            code = real.code()
            done: Done | None = None
            try:
                flow.send(call.attempt_done(record.label, code))
            except StopIteration as stop:
                done = stop.value
            finally:
                flow.close()
            call.finish(done, code)

        if not real.add_callback(on_end):  # already over
            on_end()
        return real


class Channel(Facade[grpc.Channel], grpc.Channel):  # type: ignore[misc]
    """A ``grpc.Channel`` to a mesh service (``Channel("payments")``): one real channel per endpoint, the endpoint
    of each call chosen by the mesh. ``credentials=None`` means the mesh's own mTLS when ``MESH_TLS`` is on."""

    make_channel = staticmethod(_make_channel)
    close_channel = staticmethod(_close_channel)
    connect_channel = staticmethod(_connect)

    unary_unary = method_of("unary_unary", _Blocking)
    stream_unary = method_of("stream_unary", _Blocking)
    unary_stream = method_of("unary_stream", _Streaming)
    stream_stream = method_of("stream_stream", _Streaming)

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Connectivity of a mesh service: READY while discovery lists an instance, else TRANSIENT_FAILURE."""
        try:
            state = self.mesh.service_state(self.service)
            ready = bool(state.handles)
        except MeshError:
            ready = False
        callback(grpc.ChannelConnectivity.READY if ready else grpc.ChannelConnectivity.TRANSIENT_FAILURE)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        pass

    def close(self) -> None:
        """Close every endpoint channel (calls in flight are cancelled, as ``grpc.Channel.close`` does)."""
        if "endpoints" in self.__dict__:
            for channel in self.endpoints.close():
                channel.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Future(grpc.Future):  # type: ignore[misc]
    """A ``grpc.Future`` over a thread-pool future (``.future()`` of a mesh unary call)."""

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self._future = future

    def cancel(self) -> bool:
        return self._future.cancel()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def running(self) -> bool:
        return self._future.running()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        error = self._future.exception(timeout)
        return error.__traceback__ if error is not None else None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("a unary call's future is not iterable")
