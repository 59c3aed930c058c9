"""The sync unary and client-streaming multicallables (``stub.Method(request)``, ``with_call``, ``future``) and
the call they drive: each attempt is grpc's own call on the chosen endpoint's channel, quietly when the call can go
so (``quiet.py``), else through the driver (``calls/executors.py``: ``run_blocking``, ``run_by_callbacks`` for a
future, a thread of its own for a hedged future). ``SyncMethod`` is what every sync stub method shares (the
streaming ones in ``channel.py`` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ..calls.executors import Cancel, run_blocking, run_by_callbacks
from ..calls.recorder import count_unresolved
from ..errors import MeshError
from ..policy.flow import Attempts, Done, Result, Send, Sleep
from ..policy.service import ServiceState
from ..workers import on_own_thread
from .call import Metadata, RpcAnswer, RpcCall, code_of, kept, mesh_failure
from .endpoints import EndpointChannel, EndpointChannels
from .facade import Method
from .future import UnaryFuture
from .quiet import judged_quietly, quiet_metadata, quiet_steps
from .status import result_of

R = TypeVar("R", bound=RpcCall)


class SyncMethod(Method[grpc.Channel]):
    __slots__ = ()

    def begin(
        self,
        state: ServiceState,
        make: type[R],
        metadata: Metadata | None,
        timeout: float | None,
        replayable: bool,
        hedging: bool | None = None,
    ) -> R:
        """The call (a ``make``) on ``state`` (``self.state()``), its flow not started. ``hedging`` None: hedged
        where the service's policy hedges, decided as the flow starts; a bool decides it now (``.future()`` picks
        its executor by it)."""
        facade = self.facade
        return make(
            facade.mesh,
            state,
            facade.service,
            self.method,
            metadata,
            timeout,
            replayable=replayable,
            hedging=replayable if hedging is None else hedging and replayable and state.hedger is not None,
        )

    def state(self) -> ServiceState:
        """The service's state, or the RpcError a call to it raises (discovery has no answer for it)."""
        facade = self.facade
        mesh = facade.mesh
        try:
            state: ServiceState = mesh.service_state(facade.service)
        except MeshError as exc:
            raise self.unresolved(exc) from exc
        return state

    def unresolved(self, error: MeshError) -> grpc.RpcError:
        """What a call raises when discovery has no answer for its service (and it is counted)."""
        facade = self.facade
        count_unresolved(facade.mesh, facade.service, "POST")
        return mesh_failure(facade.mesh, error)


class Blocking(SyncMethod, grpc.UnaryUnaryMultiCallable, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
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
        if metadata or credentials is not None or wait_for_ready is not None or compression is not None:
            call = self.begin(self.state(), _UnaryCall, metadata, timeout, self.kind == "unary_unary")
            call.made_by(self, request, credentials, wait_for_ready, compression, False, None)
            return run_blocking(call, call).response
        return self._blocking(request, timeout, False)[0]

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Future:
        future = UnaryFuture()  # also the Cancel of the call: the caller's cancel() reaches the RPC in flight
        replayable = self.kind == "unary_unary"
        try:
            state = self.state()
        except grpc.RpcError as failure:  # no service to call: the future fails, as grpc's own do
            future.settle(None, failure)
            return future
        if metadata or credentials is not None or wait_for_ready is not None or compression is not None:
            steps = None
        else:
            steps = quiet_steps(self.facade, state, timeout, replayable)
        if steps is not None:
            self._future_quietly(state, steps, request, future)
            return future
        call = self.begin(state, _UnaryCall, metadata, timeout, replayable, hedging=True)
        call.made_by(self, request, credentials, wait_for_ready, compression, True, future)
        if call.hedging:
            # hedged attempts are waited on together, on a thread of its own (never one other calls wait for)
            on_own_thread(run_blocking, call, call).add_done_callback(future.settle_from)
        else:
            # no thread waits: each attempt is grpc's own future, and its completion drives the call on
            run_by_callbacks(call, call, future.settle)
        return future

    def _future_quietly(self, state: ServiceState, steps: Attempts, request: Any, future: UnaryFuture) -> None:
        """``.future()`` of a quiet call (``quiet.py``): its first attempt is grpc's own future, judged when it
        ends (in the caller's thread when it waits in ``result()``, as every attempt's end is: ``deliver``);
        anything but an OK answer is handed to the callback executor from where it stands."""
        mesh = self.facade.mesh
        send = steps.next_attempt()
        if isinstance(send, Done):  # over before an attempt (no endpoint to call, the deadline already past)
            self._callbacks_on(state, steps, send, request, future, None)
            return
        endpoints = self.facade.endpoints
        record = endpoints.acquire(send.endpoint, state)
        try:
            real = self.on(record).future(request, send.timeout, quiet_metadata(mesh, send))
        except BaseException as exc:  # could not start: the future fails with it, as the driver would end it
            endpoints.release(record)
            steps.unanswered()
            _UnaryCall.carrying_on(mesh, state, self.method, steps, None).finish(None, None)
            future.settle(None, exc)
            return

        def judged(outcome: tuple[Result, RpcAnswer]) -> None:
            result, answer = outcome
            assert answer.code is not None
            then = judged_quietly(self.facade, steps, result, answer.code)
            if then is None:
                future.settle(answer, None)
            else:
                self._callbacks_on(state, steps, then, request, future, outcome)

        def ended(real: grpc.Future) -> None:
            future.deliver(judged, _future_outcome(real, send, endpoints, record), not record.users)

        future.watch(real)
        real.add_done_callback(ended)

    def _callbacks_on(
        self,
        state: ServiceState,
        steps: Attempts,
        then: Sleep | Done,
        request: Any,
        future: UnaryFuture,
        first: tuple[Result, RpcAnswer] | None,
    ) -> None:
        """A quiet ``.future()`` that needs the whole machinery after all: the call object made now, driven on by
        its attempts' completions."""
        call = _UnaryCall.carrying_on(self.facade.mesh, state, self.method, steps, then)
        call.made_by(self, request, None, None, None, True, future)
        run_by_callbacks(call, call, future.settle, first)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        if metadata or credentials is not None or wait_for_ready is not None or compression is not None:
            call = self.begin(self.state(), _UnaryCall, metadata, timeout, self.kind == "unary_unary")
            call.made_by(self, request, credentials, wait_for_ready, compression, True, None)
            answer = run_blocking(call, call)
            return answer.response, answer.call
        return self._blocking(request, timeout, True)

    def _blocking(self, request: Any, timeout: float | None, want_call: bool) -> tuple[Any, grpc.Call]:
        """A call with no metadata or options of its own, in this thread: quietly when it can be (``quiet.py``),
        its first attempt made here with the flow's steps; handed to the driver from where it stands otherwise.
        The response and (``want_call``) the answering attempt's call object."""
        facade = self.facade
        mesh = facade.mesh
        try:
            state: ServiceState = mesh.service_state(facade.service)
        except MeshError as exc:
            raise self.unresolved(exc) from exc
        replayable = self.kind == "unary_unary"
        steps = quiet_steps(facade, state, timeout, replayable)
        if steps is None:
            call = self.begin(state, _UnaryCall, None, timeout, replayable)
            call.made_by(self, request, None, None, None, want_call, None)
            answer = run_blocking(call, call)
            return answer.response, answer.call
        send = steps.next_attempt()
        if isinstance(send, Done):  # over before an attempt (no endpoint to call, the deadline already past)
            return self._carry_on(state, steps, send, request, want_call, None)
        endpoints = facade.endpoints
        record = endpoints.acquire(send.endpoint, state)
        real = self.on(record)
        try:
            if want_call:
                response, last = real.with_call(request, send.timeout, quiet_metadata(mesh, send))
            else:
                response, last = real(request, send.timeout, quiet_metadata(mesh, send)), None
            error, code = None, _OK
        except grpc.RpcError as exc:
            response, last, error, code = None, exc, kept(exc), code_of(exc)
        except BaseException:  # interrupted: the call is recorded as cancelled, as the driver would
            endpoints.release(record)
            steps.unanswered()
            _UnaryCall.carrying_on(mesh, state, self.method, steps, None).finish(None, None)
            raise
        endpoints.release(record)
        result = result_of(code, send.attempt)
        then = judged_quietly(facade, steps, result, code)
        if then is None:
            return response, last
        answer = RpcAnswer(response, last, error, code, record.label)
        return self._carry_on(state, steps, then, request, want_call, (result, answer))

    def _carry_on(
        self,
        state: ServiceState,
        steps: Attempts,
        then: Sleep | Done,
        request: Any,
        want_call: bool,
        first: tuple[Result, RpcAnswer] | None,
    ) -> tuple[Any, grpc.Call]:
        """A quiet call that needs the whole machinery after all: the call object made now, driven from there."""
        call = _UnaryCall.carrying_on(self.facade.mesh, state, self.method, steps, then)
        call.made_by(self, request, None, None, None, want_call, None)
        answer = run_blocking(call, call, first)
        return answer.response, answer.call


#: Status codes read once (an enum member read costs ~45 ns a time)
_OK, _CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.CANCELLED
#: A call's own (credentials, wait_for_ready, compression) when it sets none: grpc's defaults.
_NO_OPTIONS: tuple[Any, Any, Any] = (None, None, None)


def _future_outcome(
    real: grpc.Future, send: Send, endpoints: EndpointChannels[grpc.Channel], record: EndpointChannel[grpc.Channel]
) -> tuple[Result, RpcAnswer]:
    """What an attempt made as grpc's own future came to, once it is done; its endpoint channel let go of."""
    try:
        response, error, code = real.result(), None, _OK
        last: Any = real
    except grpc.RpcError as exc:
        response, last, error, code = None, exc, kept(exc), code_of(exc)
    except grpc.FutureCancelledError as exc:  # the caller's cancel()
        response, last, error, code = None, None, kept(exc), _CANCELLED
    endpoints.release(record)
    return result_of(code, send.attempt), RpcAnswer(response, last, error, code, record.label)


class _UnaryCall(RpcCall):
    """One unary call: the call between its attempts (``RpcCall``) and how each attempt is made on an endpoint
    channel, the shell ``calls.executors.run_blocking`` runs (and ``run_by_callbacks`` for a ``.future()``). One
    object a call, not a call and a shell."""

    __slots__ = ("endpoints", "options", "request", "stop", "stub_method", "want_call")

    stop: UnaryFuture | None

    def made_by(
        self,
        stub_method: SyncMethod,
        request: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        want_call: bool,
        stop: UnaryFuture | None,
    ) -> None:
        """What the caller asked for (``want_call``: the answering attempt's call object is wanted; ``stop``, for
        ``.future()`` calls: the caller's cancel, which every attempt's RPC listens to)."""
        self.stub_method = stub_method
        self.endpoints = stub_method.facade.endpoints
        self.request = request
        if credentials is None and wait_for_ready is None and compression is None:
            self.options = _NO_OPTIONS
        else:
            self.options = (credentials, wait_for_ready, compression)
        self.want_call = want_call
        self.stop = stop

    def prepare(self, send: Send) -> tuple[Send, EndpointChannel[grpc.Channel], Metadata]:
        record = self.endpoints.acquire(send.endpoint, self.state)
        return send, record, self.attempt_metadata(send, record.label)

    def run(
        self, prepared: tuple[Send, EndpointChannel[grpc.Channel], Metadata], cancel: Cancel | None
    ) -> tuple[Result, RpcAnswer]:
        send, record, metadata = prepared
        real = self.stub_method.on(record)
        last: Any = None
        try:
            if cancel is not None or self.stop is not None:  # a future, so that cancelling reaches the RPC
                future = self._send(real.future, send, metadata)
                for token in (cancel, self.stop):  # a hedge that lost; the caller's own cancel()
                    if token is not None:
                        token.on_cancel(future.cancel)
                response, last = future.result(), future
            elif self.want_call:
                response, last = self._send(real.with_call, send, metadata)
            elif self.options is _NO_OPTIONS:  # the common call, positionally: no call object nobody will see
                response = real(self.request, send.timeout, metadata)
            else:
                response = self._send(real, send, metadata)
            error, code = None, _OK
        except grpc.RpcError as exc:
            response, last, error, code = None, exc, kept(exc), code_of(exc)
        except grpc.FutureCancelledError as exc:  # a hedge that lost
            response, last, error, code = None, None, kept(exc), _CANCELLED
        finally:
            self.endpoints.release(record)
        return result_of(code, send.attempt), RpcAnswer(response, last, error, code, record.label)

    def _send(self, call: Callable[..., Any], send: Send, metadata: Metadata) -> Any:
        """One attempt's RPC through ``call``: the real multicallable, its ``future`` or its ``with_call``."""
        if self.options is _NO_OPTIONS:
            return call(self.request, send.timeout, metadata)
        credentials, wait_for_ready, compression = self.options
        return call(
            self.request,
            timeout=send.timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )

    def start(
        self,
        prepared: tuple[Send, EndpointChannel[grpc.Channel], Metadata],
        on_done: Callable[[tuple[Result, RpcAnswer]], None],
    ) -> None:
        """(``run_by_callbacks``) The attempt as grpc's own future; its completion reports the outcome."""
        send, record, metadata = prepared
        endpoints, stop = self.endpoints, self.stop
        try:
            future = self._send(self.stub_method.on(record).future, send, metadata)
        except BaseException:
            endpoints.release(record)
            raise

        def ended(real: grpc.Future) -> None:
            outcome = _future_outcome(real, send, endpoints, record)
            if stop is not None:  # a caller waiting for the call carries it on in its own thread
                stop.deliver(on_done, outcome, not record.users)
            else:
                on_done(outcome)

        if stop is not None:
            stop.watch(future)
        future.add_done_callback(ended)

    def discard(self, answer: RpcAnswer, read_small: bool) -> None:
        pass  # nothing to close: a unary answer is read whole
