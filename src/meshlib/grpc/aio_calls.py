"""The call objects the grpc.aio facade returns: awaitable (unary) or async-iterable (streaming), with the
``grpc.aio.Call`` methods, delegating to the real call on the chosen endpoint's channel."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import grpc
from grpc import aio

from .call import code_of


class MeshAioRpcError(aio.AioRpcError):  # type: ignore[misc]
    """A call the mesh ended itself, or whose every attempt failed, as grpc.aio raises it: an
    ``grpc.aio.AioRpcError`` (so ``except grpc.aio.AioRpcError`` catches it), with the fitting code and details
    that name the service and each endpoint tried. The mesh's own exception, when there is one, is
    ``mesh_error``."""

    def __init__(self, error: BaseException) -> None:
        code = code_of(error)
        details = error.details() if hasattr(error, "details") else str(error)
        initial = error.initial_metadata() if hasattr(error, "initial_metadata") else ()
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
        super().__init__(
            code,
            _metadata(initial),
            _metadata(trailing),
            details,
            error.debug_error_string() if hasattr(error, "debug_error_string") else details,
        )
        self.mesh_error: BaseException | None = getattr(error, "mesh_error", None)


def _metadata(pairs: Any) -> aio.Metadata:
    if isinstance(pairs, aio.Metadata):
        return pairs
    return aio.Metadata(*tuple(pairs or ()))


def as_aio_error(error: BaseException) -> BaseException:
    """``error`` as grpc.aio raises it: an ``AioRpcError`` stays, the mesh's own ``RpcError`` becomes one."""
    if isinstance(error, aio.AioRpcError) or not isinstance(error, grpc.RpcError):
        return error
    made = MeshAioRpcError(error)
    made.__cause__ = error.__cause__ or error
    return made


_END = object()

#: A unary call's outcome (``UnaryCall._state``)
_PENDING, _SUCCEEDED, _FAILED, _CANCELLED = 0, 1, 2, 3


def _settle_future(future: asyncio.Future[Any], state: int, response: Any, error: BaseException | None) -> None:
    if state == _CANCELLED:
        future.cancel()
    elif state == _FAILED:
        assert error is not None
        future.set_exception(error)
        future.exception()  # delivered (or readable from the call): never logged as unretrieved
    else:
        future.set_result(response)


class RequestWriter:
    """The requests of a client-streaming call made without an iterator (``call = stub.Upload()``, then
    ``await call.write(r)`` and ``await call.done_writing()``), as one async iterator the real call reads. A
    write waits while the previous request is not yet taken (grpc.aio's flow control, one message deep)."""

    __slots__ = ("closed", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.closed = False

    async def write(self, request: Any) -> None:
        if self.closed:
            raise aio.UsageError("write() after done_writing() on a client-streaming call")
        await self.queue.put(request)

    async def done_writing(self) -> None:
        if not self.closed:
            self.closed = True
            await self.queue.put(_END)

    async def requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            yield item


class UnaryCall:
    """What a mesh unary or client-streaming call returns: awaitable for the response, with the
    ``grpc.aio.Call`` methods of the attempt that answered (or of the mesh's own error).

    Its first attempt's RPC is begun when the call is made, as grpc.aio's own calls start. No task of its own when
    awaited at once (the usual ``await stub.Method(request)``): the rest of the call (its recording, any retry)
    runs in the awaiting task, so its answer wakes the caller directly. A call nobody awaits goes on as a task of
    its own when that RPC ends (or from the next turn of the loop, when no RPC could be begun at once: discovery
    still to answer, a hedged or delayed first attempt), and awaiting it waits for that. The call's coroutine
    (``start``) answers an ``RpcAnswer``, and the call settles itself with what came of it. The coroutine is
    given the call: it sets ``last`` (the real call that answered last) and reads ``cancel_asked`` (an attempt not
    yet started honours the caller's ``cancel()``). The outcome is kept in plain attributes; an ``asyncio.Future``
    is made only for what waits on a call beside its awaiter (``code()``, ``add_done_callback``, a second
    ``await``)."""

    __slots__ = (
        "_coro",
        "_error",
        "_future",
        "_loop",
        "_response",
        "_started",
        "_state",
        "_task",
        "_writer",
        "cancel_asked",
        "last",
    )

    def __init__(self, writer: RequestWriter | None = None) -> None:
        self.last: Any = None
        self.cancel_asked = False
        self._writer = writer
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._state = _PENDING
        self._response: Any = None
        self._error: BaseException | None = None
        self._future: asyncio.Future[Any] | None = None

    def start(self, coro: Coroutine[Any, Any, Any], begun: bool = False) -> None:
        """The call's coroutine (made with this call as its link): run by its awaiter; else as a task, from the
        next turn of the loop, or, when ``begun`` (its first attempt's RPC, ``last``, already runs on its own),
        from the end of that RPC (nothing is scheduled for a call awaited at once)."""
        self._coro = coro
        if begun:
            self.last.add_done_callback(self._real_done)
        else:
            self._loop.call_soon(self._start_unawaited)

    def _real_done(self, _real: Any) -> None:
        self._start_unawaited()

    def _run(self) -> Generator[Any, None, Any]:
        """The call's coroutine run (in its awaiter, or in its own task), and the call settled with what came of
        it: the response, or the error as grpc.aio raises it."""
        assert self._coro is not None
        try:
            answer = yield from self._coro.__await__()
        except grpc.RpcError as failure:
            error = as_aio_error(failure)
            self.last = error
            self._settle(_FAILED, None, error)
            raise error from error.__cause__
        except asyncio.CancelledError:
            self._settle(_CANCELLED, None, None)
            raise
        except BaseException as exc:
            self._settle(_FAILED, None, exc)
            raise
        self.last = answer.call
        response = answer.response
        self._settle(_SUCCEEDED, response, None)
        return response

    def _settle(self, state: int, response: Any, error: BaseException | None) -> None:
        if self._state != _PENDING:
            return
        self._state, self._response, self._error = state, response, error
        if self._future is not None:
            _settle_future(self._future, state, response, error)

    def _outcome(self) -> asyncio.Future[Any]:
        """The outcome as a future (made the first time something waits on it)."""
        future = self._future
        if future is None:
            future = self._future = self._loop.create_future()
            if self._state != _PENDING:
                _settle_future(future, self._state, self._response, self._error)
        return future

    def _start_unawaited(self) -> None:
        if not self._started:
            self._started = True
            self._task = self._loop.create_task(self._unawaited())

    async def _unawaited(self) -> None:
        if self._coro is not None:
            with contextlib.suppress(BaseException):  # the outcome is the call's, read from it (never logged here)
                await self._run_in_task()

    @types.coroutine
    def _run_in_task(self) -> Generator[Any, None, Any]:
        return (yield from self._run())

    @types.coroutine
    def run_here(self, coro: Coroutine[Any, Any, Any]) -> Generator[Any, None, Any]:
        """The call's coroutine run by whatever awaits this (a quiet grpc call's own task: ``aio_quiet.py``), the
        call settled with what came of it."""
        self._coro = coro
        self._started = True
        return (yield from self._run())

    def __await__(self) -> Generator[Any, None, Any]:
        """(Not a generator itself: the iterator it returns is what the awaiter drives, one frame fewer.)"""
        if not self._started:
            self._started = True
            return self._run()
        return self._outcome().__await__()

    async def _settled(self) -> Any:
        if self._state == _PENDING:
            with contextlib.suppress(BaseException):  # the outcome is read from the call below, not raised here
                await asyncio.shield(self._outcome())
        return self.last

    async def write(self, request: Any) -> None:
        """(Client-streaming calls made without an iterator.) Send one request."""
        if self._writer is None:
            raise aio.UsageError("write() on a call made with a request iterator (or on a unary call)")
        await self._writer.write(request)

    async def done_writing(self) -> None:
        """(Client-streaming calls made without an iterator.) No more requests."""
        if self._writer is None:
            raise aio.UsageError("done_writing() on a call made with a request iterator (or on a unary call)")
        await self._writer.done_writing()

    async def code(self) -> grpc.StatusCode:
        last = await self._settled()
        if last is None or self._state == _CANCELLED:
            return grpc.StatusCode.CANCELLED
        value = last.code()
        return await value if asyncio.iscoroutine(value) else value

    async def details(self) -> str:
        last = await self._settled()
        if last is None or self._state == _CANCELLED:
            return _CANCELLED_DETAILS
        value = last.details()
        return str(await value if asyncio.iscoroutine(value) else value)

    async def debug_error_string(self) -> str:
        last = await self._settled()
        if last is None or self._state == _CANCELLED or not hasattr(last, "debug_error_string"):
            return ""
        value = last.debug_error_string()
        return str((await value if asyncio.iscoroutine(value) else value) or "")

    async def initial_metadata(self) -> Any:
        last = await self._settled()
        value = last.initial_metadata() if last is not None else ()
        return await value if asyncio.iscoroutine(value) else value

    async def trailing_metadata(self) -> Any:
        last = await self._settled()
        value = last.trailing_metadata() if last is not None else ()
        return await value if asyncio.iscoroutine(value) else value

    def cancel(self) -> bool:
        if self._state != _PENDING:
            return False
        self.cancel_asked = True
        if not self._started and self.last is not None:  # its first RPC runs: cancel it, and end the call as usual
            self.last.cancel()
            self._start_unawaited()
        elif not self._started:  # never ran: nothing was sent
            self._started = True
            if self._coro is not None:
                self._coro.close()
            self._settle(_CANCELLED, None, None)
        elif self._task is not None:
            self._task.cancel()
        elif self.last is not None and hasattr(self.last, "cancel"):
            self.last.cancel()  # driven in its awaiter: stop the attempt in flight; none is started after this
        return True

    def cancelled(self) -> bool:
        """True from the moment ``cancel()`` was accepted, as grpc.aio's calls say."""
        return self._state == _CANCELLED or (self.cancel_asked and self._state == _PENDING)

    def done(self) -> bool:
        return self._state != _PENDING

    def add_done_callback(self, callback: Callable[[UnaryCall], None]) -> None:
        self._outcome().add_done_callback(lambda _: callback(self))

    def time_remaining(self) -> float | None:
        last = self.last
        return last.time_remaining() if last is not None and hasattr(last, "time_remaining") else None

    async def wait_for_connection(self) -> None:
        await self._settled()


#: what grpc.aio's own calls say of a call the application cancelled
_CANCELLED_DETAILS = "Locally cancelled by application!"


class StreamCall:
    """A streaming call whose endpoint is being chosen; then every method is the real call's."""

    __slots__ = ("_real",)

    def __init__(self, real: asyncio.Future[Any]) -> None:
        self._real = real

    async def _call(self) -> Any:
        return await asyncio.shield(self._real)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        real = await self._call()
        async for item in real:
            yield item

    async def read(self) -> Any:
        return await (await self._call()).read()

    async def write(self, request: Any) -> None:
        await (await self._call()).write(request)

    async def done_writing(self) -> None:
        await (await self._call()).done_writing()

    async def code(self) -> grpc.StatusCode:
        try:
            real = await self._call()
        except grpc.RpcError as exc:
            return code_of(exc)
        except asyncio.CancelledError:
            if not self._real.cancelled():  # the caller's own task was cancelled, not this call
                raise
            return grpc.StatusCode.CANCELLED
        return await real.code()

    async def details(self) -> str:
        try:
            real = await self._call()
        except grpc.RpcError as exc:
            return str(exc.details()) if hasattr(exc, "details") else str(exc)
        except asyncio.CancelledError:
            if not self._real.cancelled():
                raise
            return _CANCELLED_DETAILS
        return await real.details()  # type: ignore[no-any-return]

    async def initial_metadata(self) -> Any:
        return await (await self._call()).initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await (await self._call()).trailing_metadata()

    async def wait_for_connection(self) -> None:
        await (await self._call()).wait_for_connection()

    def cancel(self) -> bool:
        if self._real.done() and not self._real.cancelled() and self._real.exception() is None:
            return bool(self._real.result().cancel())
        return self._real.cancel()

    def cancelled(self) -> bool:
        if self._real.done() and not self._real.cancelled() and self._real.exception() is None:
            return bool(self._real.result().cancelled())
        return self._real.cancelled()

    def done(self) -> bool:
        if self._real.done() and not self._real.cancelled() and self._real.exception() is None:
            return bool(self._real.result().done())
        return self._real.done() and (self._real.cancelled() or self._real.exception() is not None)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        def relay(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                callback(self)
            else:
                future.result().add_done_callback(lambda _: callback(self))

        self._real.add_done_callback(relay)

    def time_remaining(self) -> float | None:
        if self._real.done() and not self._real.cancelled() and self._real.exception() is None:
            return self._real.result().time_remaining()  # type: ignore[no-any-return]
        return None
