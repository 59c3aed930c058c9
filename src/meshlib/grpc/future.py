"""What ``.future()`` of a sync mesh unary call returns: grpc's own contract (a ``grpc.Future`` that is also a
``grpc.Call``), over the call driven by its attempts' completions (or, hedged, by a thread of its own)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..calls.executors import Cancel
from .call import RpcAnswer, code_of


class UnaryFuture(grpc.Future, grpc.Call):  # type: ignore[misc]
    """What ``.future()`` of a mesh unary call returns: a ``grpc.Future`` and a ``grpc.Call``, as grpc's own. The
    call runs without a thread waiting on it; ``cancel()`` reaches the RPC in flight (and any retry or hedge not
    yet sent is not sent); once done, ``code()``, ``details()`` and the metadata are those of the attempt that
    answered, or of the error."""

    def __init__(self, future: concurrent.futures.Future[RpcAnswer], stop: Cancel) -> None:
        self._future = future
        self._stop = stop
        self._cancelled = False

    # -- grpc.Future -------------------------------------------------------------------------------------------

    def cancel(self) -> bool:
        if self._future.done():
            return False
        self._cancelled = True
        if not self._future.cancel():  # running: stop its RPC
            self._stop.cancel()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def running(self) -> bool:
        return not self._future.done()

    def done(self) -> bool:
        return self._cancelled or self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._outcome(timeout).response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self._outcome(timeout)
        except grpc.FutureCancelledError:
            raise
        except grpc.RpcError as exc:
            error: BaseException = exc
            return error
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return error.__traceback__ if error is not None else None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def _outcome(self, timeout: float | None) -> RpcAnswer:
        if self._cancelled:
            self._wait(timeout)
            raise grpc.FutureCancelledError()
        try:
            return self._future.result(timeout)
        except concurrent.futures.CancelledError:
            raise grpc.FutureCancelledError() from None
        except concurrent.futures.TimeoutError:
            raise grpc.FutureTimeoutError() from None

    def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(BaseException):
            self._future.exception(timeout)

    def _call(self) -> Any:
        """The finished call object: the attempt that answered, or the RpcError (itself a ``grpc.Call``)."""
        try:
            return self._outcome(None).call
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as exc:
            return exc

    # -- grpc.Call ---------------------------------------------------------------------------------------------

    def code(self) -> grpc.StatusCode:
        if self._cancelled:
            return grpc.StatusCode.CANCELLED
        call = self._call()
        return code_of(call) if call is not None else grpc.StatusCode.CANCELLED

    def details(self) -> str:
        if self._cancelled:
            return "Locally cancelled by application!"
        call = self._call()
        return str(call.details() or "") if call is not None else ""

    def initial_metadata(self) -> Any:
        call = self._call()
        return call.initial_metadata() if call is not None else ()

    def trailing_metadata(self) -> Any:
        call = self._call()
        return call.trailing_metadata() if call is not None else ()

    def debug_error_string(self) -> str:
        call = self._call()
        return str(call.debug_error_string()) if call is not None and hasattr(call, "debug_error_string") else ""

    def is_active(self) -> bool:
        return not self.done()

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self.done():
            return False
        self._future.add_done_callback(lambda _: callback())
        return True

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("a unary call's future is not iterable")
