"""What ``.future()`` of a sync mesh unary call returns: grpc's own contract (a ``grpc.Future`` that is also a
``grpc.Call``), over the call driven by its attempts' completions (or, hedged, by a thread of its own)."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..calls.executors import Cancel
from ..policy.flow import Result
from .call import RpcAnswer, code_of

logger = logging.getLogger(__name__)

#: Let another thread take the GIL now (``time.sleep(0)`` releases it)
_yield = functools.partial(time.sleep, 0)

#: An attempt's end, as the callback executor resumes the call with it
Outcome = tuple[Result, RpcAnswer]


class UnaryFuture(Cancel, grpc.Future, grpc.Call):  # type: ignore[misc]
    """What ``.future()`` of a mesh unary call returns: a ``grpc.Future`` and a ``grpc.Call``, as grpc's own. The
    call runs without a thread waiting on it; ``cancel()`` reaches the RPC in flight (and any retry or hedge not
    yet sent is not sent); once done, ``code()``, ``details()`` and the metadata are those of the attempt that
    answered, or of the error.

    It is itself the ``Cancel`` every attempt's RPC registers with (no second object a call), and its lock guards
    its done-callbacks too. Its own completion is a held lock released once (``settle``), not a
    ``concurrent.futures.Future``: waiting and waking are then one C call each, where a Future's condition
    variable costs a dozen Python calls a call.

    A thread waiting in ``result()`` (or ``exception()``, ``code()``...) without a timeout offers to carry the call
    on itself (``deliver``): an attempt's end, reported on grpc's channel thread, is handed to it, and the rest of
    the call (its recording, a retry) runs in the caller's thread, where the call's objects were made, instead of
    on grpc's thread before waking the caller (measured: ~15-20 us less per call, most of it cross-thread cache
    traffic). With nobody waiting, grpc's thread carries it on, as before.

    Having handed an attempt's end over on a channel with no other call in flight, grpc's thread lets go of the
    GIL at once (``deliver``). The woken caller then runs on while that thread is still inside grpc's
    done-callbacks, which is before grpc counts the call out of the channel's managed calls. A next ``.future()``
    made from there finds a call still counted in, so it reuses the thread. A plain grpc channel starts a new
    thread for every future that follows another (measured: 1000 sequential futures started 1000 channel threads,
    through the mesh 3)."""

    def __init__(self) -> None:
        Cancel.__init__(self)
        #: the attempt in flight, when attempts run one at a time (``watch``)
        self._current: grpc.Future | None = None
        self._cancelled = False
        self._finished = False
        self._answer: RpcAnswer | None = None
        self._error: BaseException | None = None
        self._done_callbacks: list[Callable[[Any], None]] | None = []
        #: held until the call is over, for waiters other than the volunteer (made when one waits)
        self._latch: threading.Lock | None = None
        #: a waiter offers to carry the call on: it blocks on ``_wake`` (``_blocked``) until ``deliver`` hands it
        #: an attempt's end (``_handoff``) or ``settle`` says the call is over
        self._volunteer = False
        self._blocked = False
        self._handoff: tuple[Callable[[Outcome], None], Outcome] | None = None
        self._wake: threading.Lock | None = None  # made, held, by the volunteer

    def settle(self, answer: RpcAnswer | None, error: BaseException | None) -> None:
        """The call is over with ``answer`` or ``error`` (from whichever thread ended it); once only."""
        with self.lock:
            if self._finished:
                return
            self._answer, self._error = answer, error
            self._finished = True
            callbacks, self._done_callbacks = self._done_callbacks or [], None
            self.callbacks = []  # nothing left to cancel: let go of the attempts' RPC objects
            self._current = None
            if self._blocked:  # the volunteer waits for a handoff that will not come
                self._blocked = False
                assert self._wake is not None
                self._wake.release()
            latch = self._latch
        if latch is not None:
            latch.release()
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # a caller's callback must not break the call, nor the other callbacks
                logger.exception("a done-callback of a gRPC future raised")

    def watch(self, real: grpc.Future) -> None:
        """(Attempts one at a time.) ``real`` is the attempt in flight now: the caller's ``cancel()`` reaches it.
        Cheaper than ``on_cancel`` (no lock, no list): whichever of this and ``cancel()`` comes second sees what
        the other wrote, so the RPC is cancelled either way (at worst twice, which grpc ignores)."""
        self._current = real
        if self.stopped:
            real.cancel()

    def deliver(self, resume: Callable[[Outcome], None], outcome: Outcome, idle: bool = False) -> None:
        """An attempt ended (on grpc's thread, usually): ``resume(outcome)`` carries the call on. Handed to the
        caller's thread when it waits for the call, else run here. Handed over on a channel left ``idle`` (no
        other call of the mesh's in flight on it), this thread then yields the GIL to that caller (see the class).
        With other calls in flight grpc's thread lives on anyway, and yielding would only keep it from their ends
        (measured ungated: 16 threads of sequential futures, 15-22% fewer calls a second)."""
        with self.lock:
            handed = self._blocked
            if handed:
                self._blocked = False
                self._handoff = (resume, outcome)
                assert self._wake is not None
                self._wake.release()
        if not handed:
            resume(outcome)
        elif idle:
            _yield()

    def _carry(self) -> None:
        """(The volunteer, in ``result()``.) Carry the call on from each attempt's end, until it is over. An
        interrupted wait (KeyboardInterrupt) withdraws the offer and leaves nothing undelivered."""
        pending: tuple[Callable[[Outcome], None], Outcome] | None = None
        wake = self._wake
        assert wake is not None
        try:
            while True:
                with self.lock:
                    if self._finished:
                        self._volunteer = False
                        return
                    pending, self._handoff = self._handoff, None
                    if pending is None:
                        self._blocked = True
                if pending is None:
                    wake.acquire()
                else:
                    resume, outcome, pending = pending[0], pending[1], None
                    resume(outcome)
        except BaseException:
            with self.lock:
                self._volunteer = self._blocked = False
                left, self._handoff = self._handoff, None
            for handoff in (pending, left):
                if handoff is not None:
                    handoff[0](handoff[1])  # never blocks: it records the attempt, or starts the next one
            raise

    def settle_from(self, future: concurrent.futures.Future[RpcAnswer]) -> None:
        """(A hedged call, driven on a thread of its own.) Settle with that thread's outcome."""
        error = future.exception()
        self.settle(None if error is not None else future.result(), error)

    # -- grpc.Future -------------------------------------------------------------------------------------------

    def cancel(self) -> bool:
        if self._finished:
            return False
        self._cancelled = True
        self.stop()  # its RPC, and any attempt not yet sent
        real = self._current
        if real is not None:
            real.cancel()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def running(self) -> bool:
        return not self._finished

    def done(self) -> bool:
        return self._cancelled or self._finished

    def result(self, timeout: float | None = None) -> Any:
        answer = self._outcome(timeout)
        return answer.response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self._outcome(timeout)
        except grpc.FutureCancelledError:
            raise
        except grpc.FutureTimeoutError:
            raise
        except grpc.RpcError as exc:
            error: BaseException = exc
            return error
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return error.__traceback__ if error is not None else None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self.lock:
            if self._done_callbacks is not None:
                self._done_callbacks.append(fn)
                return
        fn(self)

    def _wait(self, timeout: float | None) -> bool:
        if self._finished:
            return True
        with self.lock:
            if self._finished:
                return True
            volunteer = timeout is None and not self._volunteer
            latch = self._latch
            if volunteer:
                self._volunteer = True
                if self._wake is None:
                    self._wake = threading.Lock()
                    self._wake.acquire()
            elif latch is None:
                latch = self._latch = threading.Lock()
                latch.acquire()
        if volunteer:
            self._carry()
            return True
        assert latch is not None
        if latch.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            latch.release()  # the next waiter through
            return True
        return False

    def _outcome(self, timeout: float | None) -> RpcAnswer:
        finished = self._wait(timeout)
        if self._cancelled:
            raise grpc.FutureCancelledError()
        if not finished:
            raise grpc.FutureTimeoutError()
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

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
        with self.lock:
            if self._done_callbacks is None or self._cancelled:
                return False
            self._done_callbacks.append(lambda _: callback())
        return True

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("a unary call's future is not iterable")
