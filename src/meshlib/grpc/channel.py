"""The sync ``grpc.Channel`` drop-in: a facade whose calls go through the mesh.

Generated stubs use it unchanged. Each call's endpoint is chosen by the shared policy core (``policy/flow.py``:
routing, P2C over non-ejected endpoints, breakers, retry budget, deadline) and the call is sent on that endpoint's
own real channel (``endpoints.py``). Unary calls (``unary.py``) are retried on ``UNAVAILABLE`` only, on another
instance; streaming calls (here) are balanced and counted by the breakers, never retried (their messages cannot be
replayed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ..calls.driver import begin_stream, end_stream
from ..errors import MeshError
from ..policy.flow import Send
from .call import Metadata, RpcAnswer, RpcCall
from .endpoints import Options
from .facade import Facade, method_of
from .status import FailedStream, result_of
from .unary import Blocking, SyncMethod


def _make_channel(target: str, credentials: grpc.ChannelCredentials | None, options: Options) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _close_channel(channel: grpc.Channel) -> None:
    channel.close()


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


def _connect(channel: grpc.Channel) -> None:
    """Start connecting now, without waiting. ``subscribe(try_to_connect=True)`` does it on a polling thread of
    grpc's that outlives the subscription for a while: a channel closed under that thread (a mesh closed soon
    after its first discovery answer) killed it with "Cannot monitor channel state: Channel closed!" printed to
    stderr. So the thread's own first step is taken here, where grpc's channel has it."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is not None:
        check(True)
        return
    channel.subscribe(_ignore, try_to_connect=True)
    channel.unsubscribe(_ignore)


class _Streaming(SyncMethod, grpc.UnaryStreamMultiCallable, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
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
        try:
            call = self.begin(self.state(), RpcCall, metadata, timeout, False)
            starting = begin_stream(call)
            while True:  # a fault-injection delay
                time.sleep(next(starting))
        except StopIteration as stop:
            send: Send = stop.value
        except grpc.RpcError as failure:  # over before it started: it fails when read, as grpc's own calls do
            return FailedStream.of(failure)
        endpoints = self.facade.endpoints
        record = endpoints.acquire(send.endpoint, call.state)
        try:
            real = self.on(record)(
                request,
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
        ended = threading.Lock()

        def on_end() -> None:
            if not ended.acquire(blocking=False):
                return
            endpoints.release(record)
            code = real.code()
            answer = RpcAnswer(None, real, None, code, record.label)
            end_stream(call, result_of(code, send.attempt), answer)

        if not real.add_callback(on_end):  # already over
            on_end()
        return real


class Channel(Facade[grpc.Channel], grpc.Channel):  # type: ignore[misc]
    """A ``grpc.Channel`` to a mesh service (``Channel("payments")``): one real channel per endpoint, the endpoint
    of each call chosen by the mesh. ``credentials=None`` means the mesh's own mTLS when ``MESH_TLS`` is on."""

    make_channel = staticmethod(_make_channel)
    close_channel = staticmethod(_close_channel)
    connect_channel = staticmethod(_connect)

    unary_unary = method_of("unary_unary", Blocking)
    stream_unary = method_of("stream_unary", Blocking)
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
