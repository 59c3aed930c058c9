"""The call objects the grpc.aio facade returns: awaitable (unary) or async-iterable (streaming), with the
``grpc.aio.Call`` methods, delegating to the real call on the chosen endpoint's channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import grpc

from .call import code_of


class UnaryCall:
    """What a mesh unary call returns: awaitable for the response, with the ``grpc.aio.Call`` methods of the
    attempt that answered (or of the mesh's own error)."""

    __slots__ = ("_last", "_task")

    def __init__(self, task: asyncio.Future[Any], last: list[Any]) -> None:
        self._task = task
        self._last = last

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    async def _settled(self) -> Any:
        with contextlib.suppress(BaseException):  # the outcome is read from the call below, not raised here
            await asyncio.shield(self._task)
        return self._last[0]

    async def code(self) -> grpc.StatusCode:
        last = await self._settled()
        if last is None:
            return grpc.StatusCode.CANCELLED
        value = last.code()
        return await value if asyncio.iscoroutine(value) else value

    async def details(self) -> str:
        last = await self._settled()
        value = last.details() if last is not None else "cancelled"
        return await value if asyncio.iscoroutine(value) else value

    async def initial_metadata(self) -> Any:
        last = await self._settled()
        value = last.initial_metadata() if last is not None else ()
        return await value if asyncio.iscoroutine(value) else value

    async def trailing_metadata(self) -> Any:
        last = await self._settled()
        value = last.trailing_metadata() if last is not None else ()
        return await value if asyncio.iscoroutine(value) else value

    def cancel(self) -> bool:
        return self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def add_done_callback(self, callback: Callable[[UnaryCall], None]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    def time_remaining(self) -> float | None:
        last = self._last[0]
        return last.time_remaining() if last is not None and hasattr(last, "time_remaining") else None

    async def wait_for_connection(self) -> None:
        await self._settled()


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
        return await real.code()

    async def details(self) -> str:
        try:
            real = await self._call()
        except grpc.RpcError as exc:
            return str(exc.details()) if hasattr(exc, "details") else str(exc)
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
