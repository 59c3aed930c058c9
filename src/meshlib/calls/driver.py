"""The one loop that carries a mesh call through its policy flow, for every client shell (HTTP sync and async,
gRPC sync and aio).

``drive`` is a generator of effects: it asks its executor to run an attempt (the flow's own ``Send``), pause,
start a hedged attempt alongside, wait for the next one to finish, settle the attempts still running, or drop an
answer, and it is sent back what came of it. The executors only carry effects out (threads and ``time.sleep`` in
one, tasks and ``await`` in the other: ``executors.py``) and each protocol only says how one attempt is made and
what a caller gets (its ``Recorder``), so every decision between the flow's actions (when the previous attempt's
answer is dropped, when an answer replaces a fault, what is closed when the call fails, when telemetry ends)
exists once.
An executor's own exception (cancellation) is thrown into the generator, so the call's end runs the same way.

Streaming calls, whose end comes later by callback, take the flow's first ``Send`` with ``begin_stream`` and
give its end back with ``end_stream``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from ..policy.flow import HEDGE_DUE, CallFlow, Done, Result, Send, Sleep

A = TypeVar("A")  # what one attempt answers (an httpx.Response; a gRPC attempt's outcome)
A_co = TypeVar("A_co", covariant=True)


class Recorder(Protocol[A]):
    """What a call is between its attempts, as the driver needs it (``recorder.CallRecorder`` for both
    protocols)."""

    flow: CallFlow

    def take_attempt_span(self) -> Any:
        """The span the last prepared attempt started, now the caller's to end (hedged attempts)."""

    def attempt_done(self, result: Result, answer: A | None, span: Any = None) -> None:
        """An attempt ended: end its span (``span``: one of several in flight, taken with
        ``take_attempt_span``)."""

    def fault_answer(self, done: Done) -> A:
        """The answer for a call that fault injection aborted (nobody was called)."""

    def conclude(self, done: Done, answer: A | None) -> A | BaseException:
        """What the caller gets: the answer, or the error to raise."""

    def finish(self, done: Done | None, outcome: A | BaseException | None) -> None:
        """The call is over (``done`` None: cancelled): end its span, record metrics and access log."""


class Pause(NamedTuple):
    """Sleep before the next attempt (backoff, an injected delay)."""

    seconds: float


class Alongside(NamedTuple):
    """Start a hedged attempt beside those in flight; send back nothing."""

    send: Send


class NextDone(NamedTuple):
    """Wait for the next attempt in flight to finish (at most ``timeout``); send back its Result, or None."""

    timeout: float | None


class Settle(NamedTuple):
    """The call is over: stop the attempts still in flight; send back the winner's answer (or None)."""

    winner: int | None


class Drop(NamedTuple, Generic[A_co]):
    """Let go of an answer nobody will read (a replaced attempt's; ``read_small``: read a small one first, so that
    its connection stays reusable)."""

    answer: A_co
    read_small: bool


#: ``Send``: run that attempt now, and send back ``(Result, answer or None)`` (the flow's action itself, no wrapper
#: made per attempt).
Effect = Send | Pause | Alongside | NextDone | Settle | Drop[Any]


def drive(call: Recorder[A], first: tuple[Result, A | None] | None = None) -> Generator[Effect, Any, A]:
    """Carry ``call`` through its flow; return what the caller gets, or raise it. ``first``: the call's first
    attempt was made before it was handed over (a quiet gRPC call, ``grpc/quiet.py``), and this is what came of
    it; its flow has judged it already."""
    flow = call.flow
    answer: A | None = None
    done: Done | None = None
    outcome: A | BaseException | None = None
    side_by_side = False
    result: Result
    try:
        if first is not None:
            result, answer = first
            call.attempt_done(result, answer)
        action = next(flow)
        while True:
            if isinstance(action, Send) and not side_by_side and action.hedge_after is None:
                if answer is not None:
                    yield Drop(answer, True)
                    answer = None
                result, answer = yield action
                call.attempt_done(result, answer)
                action = flow.send(result)
            elif isinstance(action, Sleep):
                yield Pause(action.seconds)
                action = next(flow)
            else:  # hedged: a backup alongside, or wait for the attempts in flight
                side_by_side = True
                if isinstance(action, Send):
                    yield Alongside(action)
                answered = yield NextDone(action.hedge_after)
                action = flow.send(HEDGE_DUE if answered is None else answered)
    except StopIteration as stop:
        done = stop.value
    finally:
        flow.close()
        if side_by_side:
            answer = yield Settle(done.winner if done is not None else None)
        if done is None or done.error is not None:
            if answer is not None:
                yield Drop(answer, False)
                answer = None
        elif answer is None and done.abort_status is not None:
            answer = call.fault_answer(done)
        if done is not None:
            outcome = call.conclude(done, answer)
        call.finish(done, outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[return-value]  # an answer: the flow ended without an error


def begin_stream(call: Recorder[A]) -> Generator[float, None, Send]:
    """A streaming call's start: yields the pauses to sleep (an injected delay) and returns the flow's one
    ``Send``; a call over before it started (no endpoint, fault abort, deadline) raises what the caller gets."""
    flow = call.flow
    try:
        action = next(flow)
        while not isinstance(action, Send):
            if isinstance(action, Sleep):
                yield action.seconds
            action = next(flow)
    except StopIteration as stop:
        done: Done = stop.value
        answer = call.fault_answer(done) if done.error is None and done.abort_status is not None else None
        outcome = call.conclude(done, answer)
        call.finish(done, outcome)
        if isinstance(outcome, BaseException):
            raise outcome from None
        raise AssertionError("a streaming call's flow ended without an attempt and without an error") from None
    except BaseException:
        flow.close()
        call.finish(None, None)
        raise
    return action


def end_stream(call: Recorder[A], result: Result | None, answer: A | None) -> None:
    """A streaming call's one attempt ended (``result`` None: it never started): the flow learns its verdict and
    the call is recorded."""
    flow = call.flow
    done: Done | None = None
    try:
        if result is not None:
            call.attempt_done(result, answer)
            flow.send(result)
    except StopIteration as stop:
        done = stop.value
    finally:
        flow.close()
    call.finish(done, answer)
