"""The driver's effects carried out, once per concurrency model: ``run_blocking`` (the caller's thread, worker
threads for hedged attempts, ``time.sleep``), ``run_async`` (the caller's task, tasks for hedged attempts,
``await``; ``start_async`` takes a call to its first attempt's start without awaiting, for grpc.aio calls that
start at once) and ``run_by_callbacks`` (no thread waits: each attempt started, the call resumed by its
completion, for the sync gRPC ``.future()``). They serve HTTP and gRPC alike: a protocol gives its ``Shell``,
which makes one attempt.

A hedged attempt is prepared in the caller's thread or task (its endpoint request or metadata, its span: the
caller's trace context) and run beside the others. When the call is over the losers are told to stop
(``Cancel``; a thread blocked in a socket cannot be, so its answer is dropped when it ends) and answers nobody
will read are dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Protocol, TypeVar

import anyio

from ..policy.flow import Result, Send
from ..workers import worker_pool
from .driver import Alongside, Drop, NextDone, Pause, Recorder, drive

A = TypeVar("A")
P = TypeVar("P")  # a prepared attempt


class Cancel:
    """Told when a hedged attempt lost or the caller cancelled: what can stop an attempt early registers here."""

    __slots__ = ("callbacks", "lock", "stopped")

    def __init__(self) -> None:
        self.stopped = False
        self.callbacks: list[Callable[[], Any]] = []
        self.lock = threading.Lock()

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        with self.lock:
            if not self.stopped:
                self.callbacks.append(callback)
                return
        callback()

    def forget(self) -> None:
        """The call is over: let go of what would have stopped it (its RPC objects and their answers)."""
        with self.lock:
            self.callbacks = []

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


class Shell(Protocol[P, A]):
    """How one protocol makes an attempt, for the blocking executor."""

    def prepare(self, send: Send) -> P:
        """In the caller's thread: the attempt's request for the chosen endpoint (its span starts here)."""

    def run(self, prepared: P, cancel: Cancel | None) -> tuple[Result, A | None]:
        """Make the attempt (``cancel``: set when it runs beside others, hedged)."""

    def discard(self, answer: A, read_small: bool) -> None:
        """Let go of an answer nobody will read."""


class AsyncShell(Protocol[P, A]):
    """How one protocol makes an attempt, for the async executor."""

    def prepare(self, send: Send) -> P: ...

    async def arun(self, prepared: P) -> tuple[Result, A | None]:
        """Make the attempt; a hedged attempt that lost is cancelled (its answer closed, never reused half-read)."""

    async def adiscard(self, answer: A, read_small: bool) -> None: ...


class CallbackShell(Protocol[P, A]):
    """How one protocol starts an attempt without waiting for it, for the callback executor."""

    def prepare(self, send: Send) -> P: ...

    def start(self, prepared: P, on_done: Callable[[tuple[Result, A | None]], None]) -> None:
        """Start the attempt; ``on_done`` gets its outcome when it ends (from any thread, or at once)."""

    def discard(self, answer: A, read_small: bool) -> None: ...


def run_by_callbacks(
    call: Recorder[A],
    shell: CallbackShell[Any, A],
    finished: Callable[[A | None, BaseException | None], None],
    first: tuple[Result, A | None] | None = None,
) -> None:
    """Drive ``call`` with no thread waiting on it: the first attempt starts in the caller's thread, each next
    step runs where the previous attempt's completion is reported, pauses run on a timer; ``finished`` gets what
    the caller gets (an answer, or the error to raise). Only for flows that never hedge (``hedging=False``): a
    hedged call waits on several attempts at once, which ``run_blocking`` does. ``first``: see ``drive``."""
    _ByCallbacks(drive(call, first), shell, finished).step(None, None, first=True)


class _ByCallbacks(Generic[A]):
    """``run_by_callbacks``' state: an object, not closures that name each other, so that a finished call holds
    no reference cycle and its answer is freed at once instead of by the garbage collector (a large response
    kept to the next collection costs more than the call)."""

    __slots__ = ("driver", "finished", "shell")

    def __init__(
        self,
        driver: Generator[Any, Any, A],
        shell: CallbackShell[Any, A],
        finished: Callable[[A | None, BaseException | None], None],
    ) -> None:
        self.driver = driver
        self.shell = shell
        self.finished = finished

    def step(self, out: Any, error: BaseException | None, first: bool = False) -> None:
        driver, shell = self.driver, self.shell
        while True:
            try:
                if first:
                    first = False
                    effect = next(driver)
                elif error is not None:
                    failure, error = error, None
                    effect = driver.throw(failure)
                else:
                    effect = driver.send(out)
            except StopIteration as stop:
                self.finished(stop.value, None)
                return
            except BaseException as exc:
                self.finished(None, exc)
                return
            out = None
            try:
                if isinstance(effect, Send):
                    shell.start(shell.prepare(effect), self.resume)
                    return
                if isinstance(effect, Pause):
                    timer = threading.Timer(effect.seconds, self.step, (None, None))
                    timer.daemon = True
                    timer.start()
                    return
                if isinstance(effect, Drop):
                    shell.discard(effect.answer, effect.read_small)
                else:
                    raise RuntimeError("a hedged call cannot be driven by callbacks: use run_blocking")
            except BaseException as exc:  # the attempt could not start: the call ends through the driver
                error = exc

    def resume(self, outcome: tuple[Result, A | None]) -> None:
        self.step(outcome, None)


def run_blocking(call: Recorder[A], shell: Shell[Any, A], first: tuple[Result, A | None] | None = None) -> A:
    """Drive ``call`` to its end in this thread (``first``: see ``drive``)."""
    driver = drive(call, first)
    side: _Threads[A] | None = None
    try:
        effect = next(driver)
        while True:
            try:
                out: Any = None
                if isinstance(effect, Send):
                    out = shell.run(shell.prepare(effect), None)
                elif isinstance(effect, Pause):
                    time.sleep(effect.seconds)
                elif isinstance(effect, Drop):
                    shell.discard(effect.answer, effect.read_small)
                else:
                    side = side or _Threads(call, shell)
                    if isinstance(effect, Alongside):
                        side.start(effect.send)
                    elif isinstance(effect, NextDone):
                        out = side.next(effect.timeout)
                    else:
                        out = side.settle(effect.winner)
            except BaseException as exc:  # interrupted: the call ends the same way, through the driver
                effect = driver.throw(exc)
                continue
            effect = driver.send(out)
    except StopIteration as stop:
        answer: A = stop.value
        return answer


class _Threads(Generic[A]):
    """The attempts of one hedged call, each on a worker thread (the caller's thread waits for the first to end)."""

    def __init__(self, call: Recorder[A], shell: Shell[Any, A]) -> None:
        self.call = call
        self.shell = shell
        self.ended: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.running: dict[int, tuple[concurrent.futures.Future[tuple[Result, A | None]], Any, Cancel]] = {}
        self.answered: dict[int, A | None] = {}

    def start(self, send: Send) -> None:
        prepared = self.shell.prepare(send)  # in the caller's thread: its trace context
        span = self.call.take_attempt_span()
        attempt = send.attempt
        cancel = Cancel()
        # in the caller's context (client.stream()'s "hand it over unread", its trace context), as the first attempt
        context = contextvars.copy_context()
        future = worker_pool().submit(context.run, self.shell.run, prepared, cancel)
        future.add_done_callback(lambda _: self.ended.put(attempt))
        self.running[attempt] = (future, span, cancel)

    def next(self, hedge_after: float | None) -> Result | None:
        try:
            attempt = self.ended.get(timeout=hedge_after)
        except queue.Empty:
            return None
        future, span, _ = self.running.pop(attempt)
        result, answer = future.result()
        self.answered[attempt] = answer
        self.call.attempt_done(result, answer, span)
        return result

    def settle(self, winner: int | None) -> A | None:
        for future, span, cancel in self.running.values():
            if span is not None:
                span.end()
            cancel.stop()
            future.add_done_callback(self._drop_late)
        self.running.clear()
        kept = self.answered.pop(winner, None) if winner is not None else None
        for answer in self.answered.values():
            if answer is not None:
                self.shell.discard(answer, True)
        self.answered.clear()
        return kept

    def _drop_late(self, future: concurrent.futures.Future[tuple[Result, A | None]]) -> None:
        """A losing attempt that ended after the call did: its answer is nobody's."""
        if future.cancelled() or future.exception() is not None:
            return
        _, answer = future.result()
        if answer is not None:
            self.shell.discard(answer, True)


class StartingShell(AsyncShell[P, A], Protocol[P, A]):
    """An async shell whose attempt can be begun without awaiting (its RPC then runs on its own), for
    ``start_async``."""

    def begin_attempt(self, prepared: P) -> Any:
        """Start the attempt's I/O now, in the caller's frame; what ``finish_attempt`` is given."""

    async def finish_attempt(self, begun: Any) -> tuple[Result, A | None]:
        """Wait for a begun attempt's outcome."""


class Started(Generic[A]):
    """A call driven to its first effect in the caller's frame (``start_async``), for ``run_async`` to go on from:
    the driver and that effect, the attempt it began (or the error beginning it raised), or, when the call was
    over at once, its outcome."""

    __slots__ = ("begun", "driver", "effect", "error", "outcome")

    def __init__(
        self,
        driver: Generator[Any, Any, A] | None,
        effect: Any = None,
        begun: Any = None,
        error: BaseException | None = None,
        outcome: A | None = None,
    ) -> None:
        self.driver = driver
        self.effect = effect
        self.begun = begun
        self.error = error
        self.outcome = outcome


def start_async(call: Recorder[A], shell: StartingShell[Any, A]) -> Started[A]:
    """Drive ``call`` to its first effect now, without awaiting; a first attempt is begun (``begin_attempt``), so
    its RPC starts as the protocol's own calls start, at once. ``run_async(call, shell, started)`` goes on from it.
    (``error`` set and no driver: the call was over before any attempt, and that is what the caller gets.)"""
    driver = drive(call)
    try:
        effect = next(driver)
    except StopIteration as stop:
        return Started(None, outcome=stop.value)
    except BaseException as exc:
        return Started(None, error=exc)
    if not isinstance(effect, Send):
        return Started(driver, effect)
    try:
        return Started(driver, effect, shell.begin_attempt(shell.prepare(effect)))
    except BaseException as exc:  # thrown into the driver by run_async: the call ends the usual way
        return Started(driver, effect, error=exc)


async def run_async(
    call: Recorder[A],
    shell: AsyncShell[Any, A],
    started: Started[A] | None = None,
    first: tuple[Result, A | None] | None = None,
) -> A:
    """Drive ``call`` to its end in this task (from where ``start_async`` left it, when ``started`` is given;
    ``first``: see ``drive``)."""
    side: _Tasks[A] | None = None
    begun: Any = None
    error: BaseException | None = None
    if started is None:
        driver = drive(call, first)
    elif started.driver is None:  # over before any attempt
        if started.error is not None:
            raise started.error
        return started.outcome  # type: ignore[return-value]  # the flow ended without an error
    else:
        driver, begun, error = started.driver, started.begun, started.error
    try:
        effect = next(driver) if started is None else started.effect
        while True:
            try:
                out: Any = None
                if error is not None:
                    failure, error = error, None
                    raise failure
                if begun is not None:  # the attempt start_async began
                    starting: StartingShell[Any, A] = shell  # type: ignore[assignment]  # (no runtime cast)
                    out = await starting.finish_attempt(begun)
                    begun = None
                elif isinstance(effect, Send):
                    out = await shell.arun(shell.prepare(effect))
                elif isinstance(effect, Pause):
                    await anyio.sleep(effect.seconds)
                elif isinstance(effect, Drop):
                    await shell.adiscard(effect.answer, effect.read_small)
                else:
                    side = side or _Tasks(call, shell)
                    if isinstance(effect, Alongside):
                        side.start(effect.send)
                    elif isinstance(effect, NextDone):
                        out = await side.next(effect.timeout)
                    else:
                        out = await side.settle(effect.winner)
            except BaseException as exc:  # cancelled: the call ends the same way, through the driver
                begun = None
                effect = driver.throw(exc)
                continue
            effect = driver.send(out)
    except StopIteration as stop:
        answer: A = stop.value
        return answer


class _Tasks(Generic[A]):
    """The attempts of one hedged call in flight together, as asyncio tasks: the first to finish is handed to the
    flow; when the call is done the winner's answer is kept, every other attempt is cancelled or, if it already
    finished, its answer dropped."""

    __slots__ = ("answered", "call", "shell", "tasks")

    def __init__(self, call: Recorder[A], shell: AsyncShell[Any, A]) -> None:
        self.call = call
        self.shell = shell
        self.tasks: dict[asyncio.Task[tuple[Result, A | None]], tuple[int, Any]] = {}
        self.answered: dict[int, A | None] = {}

    def start(self, send: Send) -> None:
        prepared = self.shell.prepare(send)
        span = self.call.take_attempt_span()
        work: Coroutine[Any, Any, tuple[Result, A | None]] = self.shell.arun(prepared)
        self.tasks[asyncio.ensure_future(work)] = (send.attempt, span)

    async def next(self, hedge_after: float | None) -> Result | None:
        """The next attempt to finish, or None when ``hedge_after`` passes first."""
        finished, _ = await asyncio.wait(self.tasks, timeout=hedge_after, return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            return None
        task = finished.pop()
        attempt, span = self.tasks.pop(task)
        result, answer = task.result()
        self.answered[attempt] = answer
        self.call.attempt_done(result, answer, span)
        return result

    async def settle(self, winner: int | None) -> A | None:
        for task, (_, span) in self.tasks.items():
            task.cancel()
            if span is not None:
                span.end()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        self.tasks.clear()
        kept = self.answered.pop(winner, None) if winner is not None else None
        for answer in self.answered.values():
            if answer is not None:
                await self.shell.adiscard(answer, True)
        self.answered.clear()
        return kept
