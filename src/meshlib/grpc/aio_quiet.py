"""A quiet grpc.aio unary call as grpc.aio's own call object: a subclass of grpc.aio's ``UnaryUnaryCall`` whose
invocation also does the mesh's part.

grpc.aio runs every unary call as a task of its own (the call's ``_invoke``) that the caller's ``await`` waits on.
A quiet call (``quiet.py``) needs one thing more once its first attempt's RPC is over: that attempt judged (its
endpoint's load and breaker, its duration) and, when it did not answer OK, the rest of the policy (a retry on
another instance). Done in that same task, the call needs no object, coroutine or done-callback of the mesh's
around grpc's, which cost as much again as the mesh's whole work: the caller awaits grpc's own call, and a call
nobody awaits is judged all the same. A call that goes on past its first attempt hands over to the mesh's own
call object (``aio_calls.UnaryCall``, driven inside this task), and from then every ``grpc.aio.Call`` method is
that object's: the status, details and metadata of the attempt that answered, or the mesh's own error.

This subclasses a class of grpc's private module ``grpc.aio._call`` and reads private attributes of grpc.aio's
multicallable. ``parts_of`` checks what it relies on, once per endpoint channel and method; where a grpc release
differs, it answers None and the call takes the mesh's own call object from the start (``aio_unary.Unary``),
as it does for every call that is not quiet.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from ..policy.flow import Attempts, Send
from ..policy.service import ServiceState
from .aio_calls import UnaryCall
from .call import RpcAnswer
from .endpoints import EndpointChannel
from .quiet import judged_quietly
from .status import result_of

if TYPE_CHECKING:
    from .aio_unary import Unary

try:  # what the subclass stands on (see the module); any of it missing: no quiet grpc calls
    from grpc._cython import cygrpc
    from grpc.aio import _call as _grpc_call
    from grpc.aio import _channel as _grpc_channel

    _EOF: Any = cygrpc.EOF
    _GrpcUnaryUnaryCall: Any = _grpc_call.UnaryUnaryCall
    _GrpcMultiCallable: Any = _grpc_channel.UnaryUnaryMultiCallable
except (ImportError, AttributeError):  # pragma: no cover - a grpc release without them
    _EOF = _GrpcUnaryUnaryCall = _GrpcMultiCallable = None

#: ``UnaryUnaryCall.__init__``'s parameters, as this module calls it
_INIT = (
    "self",
    "request",
    "deadline",
    "metadata",
    "credentials",
    "wait_for_ready",
    "channel",
    "method",
    "request_serializer",
    "response_deserializer",
    "loop",
    "registered_call_handle",
)
_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
#: what grpc.aio's own calls say of a call the application cancelled
_CANCELLED_DETAILS = "Locally cancelled by application!"


def _grpc_fits() -> bool:
    if _GrpcUnaryUnaryCall is None:
        return False
    try:
        names = tuple(inspect.signature(_GrpcUnaryUnaryCall.__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return names == _INIT and inspect.iscoroutinefunction(getattr(_GrpcUnaryUnaryCall, "_invoke", None))


#: Whether this grpc release has what the quiet grpc call stands on (see the module).
FITS = _grpc_fits()

#: What a quiet call is made of on one endpoint channel's multicallable: grpc's channel, the method's name, the
#: (de)serializers, the loop, the registered-call handle, and the set of calls ``Channel.close()`` cancels.
Parts = tuple[Any, bytes, Any, Any, asyncio.AbstractEventLoop, int, Any]


def parts_of(real: Any) -> Parts | None:
    """What a quiet call on ``real`` (grpc.aio's multicallable) is made of, or None where it cannot be made so
    (an interceptor on the channel, or a grpc release whose multicallable differs)."""
    if not FITS or type(real) is not _GrpcMultiCallable:
        return None
    try:
        if real._interceptors:
            return None
        active = real._python_channel._active_calls
        parts: Parts = (
            real._channel,
            real._method,
            real._request_serializer,
            real._response_deserializer,
            real._loop,
            real._registered_call_handle,
            active,
        )
    except AttributeError:
        return None
    if not callable(getattr(active, "add", None)) or not callable(getattr(active, "discard", None)):
        return None
    return parts


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A call that failed and that nobody awaited: its error is the call's to tell (``code()``), not asyncio's
    "exception never retrieved" to log."""
    if not task.cancelled():
        task.exception()


class QuietUnaryCall(_GrpcUnaryUnaryCall or object):  # type: ignore[misc]
    """grpc.aio's own unary call (see the module), whose invocation judges its attempt and carries the call on
    when it must. Until then every method is grpc's; the waiting ones (``code()``, ``details()``, the metadata)
    wait for the whole call, its judgement included, so that they never tell of a first attempt that a retry
    replaced."""

    def __init__(
        self,
        parts: Parts,
        request: Any,
        timeout: float | None,
        metadata: Any,
        stub_method: Unary,
        state: ServiceState,
        steps: Attempts,
        send: Send,
        record: EndpointChannel[aio.Channel],
    ) -> None:
        # set before grpc's part, which starts the invocation (a loop may run a new task's first step at once)
        self._mesh: tuple[Unary, ServiceState, Attempts, Send, EndpointChannel[aio.Channel], Any] | None = (
            stub_method,
            state,
            steps,
            send,
            record,
            request,
        )
        self._carried: UnaryCall | None = None
        self._cancel_asked = False
        channel, method, serializer, deserializer, loop, handle, active = parts
        self._active = active
        super().__init__(
            request,
            None if timeout is None else time.time() + timeout,
            metadata,
            None,
            None,
            channel,
            method,
            serializer,
            deserializer,
            loop,
            handle,
        )
        active.add(self)  # as grpc.aio's channel does: Channel.close() cancels the calls still in flight
        self._invocation_task.add_done_callback(self._never_ran)

    def _never_ran(self, _task: asyncio.Task[Any]) -> None:
        """The invocation cancelled before its first step (a ``cancel()`` at once, the loop shutting down): what
        ``_invoke`` would have done for a call cancelled in its first attempt."""
        made = self._mesh
        if made is not None:
            self._mesh = None
            stub_method, state, steps, _send, record, _request = made
            stub_method.facade.endpoints.release(record)
            self._active.discard(self)
            steps.unanswered()
            stub_method.record_cancelled(state, steps)

    async def _invoke(self) -> Any:
        made = self._mesh
        assert made is not None
        self._mesh = None
        stub_method, state, steps, send, record, request = made
        facade = stub_method.facade
        try:
            response = await _GrpcUnaryUnaryCall._invoke(self)
        except BaseException:  # not sent (a request that does not serialize): ended as the driver ends it
            steps.unanswered()
            stub_method.record_cancelled(state, steps)
            raise
        finally:
            facade.endpoints.release(record)
            self._active.discard(self)
        if response is not _EOF:  # answered OK: an OK answer always ends the call (success is never retried)
            judged_quietly(facade, steps, result_of(_OK, send.attempt), _OK)
            return response
        if self._cython_call.is_locally_cancelled() or self._cancel_asked:  # (cancel() came before it resumed)
            return self._cancelled(stub_method, state, steps)
        code = await _GrpcUnaryUnaryCall.code(self)
        error = aio.AioRpcError(
            code,
            await _GrpcUnaryUnaryCall.initial_metadata(self),
            await _GrpcUnaryUnaryCall.trailing_metadata(self),
            await _GrpcUnaryUnaryCall.details(self),
            await _GrpcUnaryUnaryCall.debug_error_string(self),
        )
        result = result_of(code, send.attempt)
        then = judged_quietly(facade, steps, result, code)
        assert then is not None  # (only an OK answer ends a call quietly)
        link = self._carried = UnaryCall(None)
        link.last = error
        first = (result, RpcAnswer(None, error, error, code, record.label))
        try:
            return await link.run_here(stub_method.carry_on(state, steps, then, request, link, first))
        except asyncio.CancelledError:
            raise
        except BaseException:
            current = asyncio.current_task()
            if current is not None:
                current.add_done_callback(_retrieved)
            raise

    def _cancelled(self, stub_method: Unary, state: ServiceState, steps: Attempts) -> Any:
        """Cancelled in its first attempt: recorded as the driver records it, and told as grpc.aio tells it."""
        steps.unanswered()
        stub_method.record_cancelled(state, steps)
        if self._cancel_asked and not self._cython_call.is_locally_cancelled():
            raise asyncio.CancelledError()
        return _EOF

    async def _ended(self) -> UnaryCall | None:
        """The whole call over (its judgement and any retry too): the mesh's call object it went on as, if any."""
        task = self._invocation_task
        if not task.done():
            await asyncio.wait((task,))
        return self._carried

    # -- grpc.aio.Call, told of the whole call --------------------------------------------------------------

    def cancel(self) -> bool:
        link = self._carried
        if link is not None:
            return link.cancel()
        if bool(_GrpcUnaryUnaryCall.cancel(self)):  # its first attempt's RPC not over: grpc's own cancel
            return True
        if self._invocation_task.done():
            return False
        self._cancel_asked = True  # its first attempt is over, not yet judged: the call ends there, cancelled
        return True

    def cancelled(self) -> bool:
        link = self._carried
        if link is not None:
            return link.cancelled()
        return self._cancel_asked or bool(_GrpcUnaryUnaryCall.cancelled(self))

    def done(self) -> bool:
        return bool(self._invocation_task.done())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        task = self._invocation_task
        if task.done():
            callback(self)
        else:
            task.add_done_callback(lambda _task: callback(self))

    def time_remaining(self) -> float | None:
        link = self._carried
        if link is not None:
            return link.time_remaining()
        remaining: float | None = _GrpcUnaryUnaryCall.time_remaining(self)
        return remaining

    async def code(self) -> grpc.StatusCode:
        link = await self._ended()
        if link is not None:
            return await link.code()
        if self._cancel_asked:
            return _CANCELLED
        status: grpc.StatusCode = await _GrpcUnaryUnaryCall.code(self)
        return status

    async def details(self) -> str:
        link = await self._ended()
        if link is not None:
            return await link.details()
        if self._cancel_asked:
            return _CANCELLED_DETAILS
        return await _GrpcUnaryUnaryCall.details(self)  # type: ignore[no-any-return]

    async def debug_error_string(self) -> str:
        link = await self._ended()
        if link is not None:
            return await link.debug_error_string()
        return await _GrpcUnaryUnaryCall.debug_error_string(self)  # type: ignore[no-any-return]

    async def initial_metadata(self) -> Any:
        link = await self._ended()
        if link is not None:
            return await link.initial_metadata()
        return await _GrpcUnaryUnaryCall.initial_metadata(self)

    async def trailing_metadata(self) -> Any:
        link = await self._ended()
        if link is not None:
            return await link.trailing_metadata()
        return await _GrpcUnaryUnaryCall.trailing_metadata(self)

    async def wait_for_connection(self) -> None:
        link = await self._ended()
        if link is not None:
            await link.wait_for_connection()
        else:
            await _GrpcUnaryUnaryCall.wait_for_connection(self)
