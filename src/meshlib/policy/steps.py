"""The policy flow's vocabulary and bookkeeping, shared by the sequential flow (``flow.py``) and the hedged one
(``hedged.py``): the actions a flow yields, the results it is sent, ``Done``, what one attempt's outcome does to
its endpoint, and the error a finished call raises."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

# Plain (not frozen) slotted dataclasses: a frozen one costs ~1 us more to build, and these are built per attempt.
from ..endpoints import Endpoint
from ..errors import (
    DeadlineExceededError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from .balancer import FAILURE_PENALTY
from .classify import Verdict
from .decisions import Decision
from .retry import RetryDecision, Stop
from .service import EndpointHandle, Pick, ServiceState


@dataclass(slots=True)
class Send:
    """Make one attempt at ``endpoint``; ``timeout`` (seconds, or None) bounds this try.

    With ``hedge_after`` set (hedged calls only), the attempt runs alongside any already in flight: the shell
    answers with the first ``Result`` of any of them, or with ``HEDGE_DUE`` if none has answered after that many
    seconds."""

    endpoint: Endpoint
    timeout: float | None
    attempt: int
    breaker_state: str = "closed"
    hedge_after: float | None = None


@dataclass(slots=True)
class Wait:
    """(Hedged calls.) Send nothing new: answer with the next ``Result`` of the attempts in flight, or with
    ``HEDGE_DUE`` after ``hedge_after`` seconds if it is set and none has answered."""

    hedge_after: float | None = None


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Result:
    """What the shell observed for one attempt: a verdict, plus the exception when there was no response.
    ``attempt`` says which attempt it was when several are in flight (hedged calls)."""

    verdict: Verdict
    error: BaseException | None = None
    attempt: int = 0


class HedgeDue:
    """The shell's answer when no attempt in flight answered within ``hedge_after``."""

    __slots__ = ()


HEDGE_DUE = HedgeDue()


@dataclass(slots=True)
class Done:
    """The call is over. ``error`` set: raise it (from ``result.error``); else hand back the last response."""

    result: Result | None
    error: BaseException | None = None
    attempts: int = 0
    #: Fault injection aborted the call: answer with this status without calling anyone.
    abort_status: int | None = None
    #: A retry was warranted but the retry budget refused it (also when the last response is handed back).
    budget_exhausted: bool = False
    #: (Hedged calls.) The attempt whose result this is; every other attempt still in flight is to be cancelled.
    winner: int = 0
    #: (Hedged calls.) Backup attempts sent.
    hedges: int = 0
    #: One entry per attempt: where it went and why, what came of it, and what was decided next.
    decisions: list[Decision] | None = None


Action = Send | Sleep | Wait
CallFlow = Generator[Action, Result | HedgeDue | None, Done]


def describe(handle: EndpointHandle, result: Result) -> str:
    line = f"{handle.label} {result.verdict.key}"
    if result.error is not None:
        line += f" ({type(result.error).__name__}: {result.error})"
    return line


def no_pauses() -> float:
    """The garbage-collection pause meter of a flow that is given none (a fake clock has no pauses in it)."""
    return 0.0


#: A timeout of at least this many seconds counts against the endpoint even when it was the caller's (a hung
#: instance is still ejected by callers with ordinary timeouts); shorter ones count only when they were the
#: service's own per-try timeout.
BLAMED_TIMEOUT = 1.0


def blames_endpoint(verdict: Verdict, allowed: float | None, per_try: float | None) -> bool:
    """Whether a failed attempt counts against its endpoint. A timeout does only when the endpoint was given the
    service's own per-try timeout, or at least BLAMED_TIMEOUT: an attempt cut short by the caller's own tighter
    deadline (``timeout=1e-6``, a gRPC deadline shorter than the work) says nothing about the endpoint, and once
    opened the breakers of healthy instances. Every other failure does."""
    if not verdict.timed_out or allowed is None:
        return verdict.is_failure
    if per_try is not None and allowed >= per_try:
        return True
    return allowed >= BLAMED_TIMEOUT


def allowed_time(timeout: float | None, attempt_timeout: float | None) -> float | None:
    """The time an attempt really had: the flow's own bound on it, or the caller's per-try limit if shorter."""
    if attempt_timeout is None:
        return timeout
    return attempt_timeout if timeout is None else min(timeout, attempt_timeout)


def record_outcome(
    service: ServiceState, pick: Pick, result: Result, rtt: float, now: float, allowed: float | None = None
) -> bool:
    """One attempt's outcome, charged to its endpoint: the load estimate (a failure as at least the failure
    penalty; the probe that closes a breaker revives the endpoint afresh), the breaker (within the service's
    ejection cap), and the latency window hedging reads. ``allowed`` is the time the attempt was given: a timeout
    the caller's deadline imposed is only a lower bound on the endpoint's latency (``blames_endpoint``). Returns
    False for a failure not held against the endpoint."""
    handle = pick.handle
    load = handle.load
    verdict = result.verdict
    if verdict.is_failure and not blames_endpoint(verdict, allowed, service.policy.retries.per_try_timeout):
        if rtt > load.ewma:
            load.observe(rtt, now)  # at least this slow: the one thing the cut-short attempt says
        if pick.trial:
            handle.breaker.release()  # the trial proved nothing either way: the next call may try again
        return False
    if verdict.is_failure:
        load.observe(max(rtt, FAILURE_PENALTY), now)
    elif pick.trial:
        load.revive(rtt, now)  # the probe that closes the breaker: the endpoint starts afresh
    else:
        load.observe(rtt, now)
        hedger = service.hedger
        if hedger is not None:
            hedger.latencies.add(rtt)
    handle.breaker.record(verdict.is_failure, pick.trial, service.may_eject() if verdict.is_failure else True)
    return True


def decision_for(pick: Pick, attempt: int, breaker: str, hedge: bool = False) -> Decision:
    """The decision log's entry for an attempt about to be sent (``breaker``: its endpoint's breaker state now)."""
    rival = pick.rival
    if rival is None and breaker == "closed" and not pick.trial and not hedge:  # the common entry
        return Decision(attempt, pick.handle.label, pick.cost)
    return Decision(
        attempt,
        pick.handle.label,
        pick.cost,
        rival.label if rival is not None else None,
        pick.rival_cost,
        breaker,
        pick.trial,
        hedge,
    )


def note_outcome(entry: Decision, result: Result, blamed: bool) -> None:
    entry.verdict = result.verdict.key
    entry.unblamed = result.verdict.is_failure and not blamed


def note_decision(entry: Decision, decision: RetryDecision, service: ServiceState, now: float) -> None:
    """What was decided after the attempt: retry (and its backoff) or why not, and the budget's answer."""
    if decision.stop is Stop.SUCCESS:
        return
    entry.retry = decision.retry
    entry.reason = decision.reason
    entry.backoff = decision.delay
    if decision.retry or decision.budget_exhausted:
        entry.budget_left, entry.budget_total = service.budget.allowance(now)


def stop_call(
    service: ServiceState,
    result: Result,
    decision: RetryDecision,
    log: list[str],
    attempt: int,
    deadline: float | None,
    now: float,
    winner: int = 0,
    hedges: int = 0,
) -> Done:
    """The call ends with ``result`` (no retry): hand back its response, or the error that says why."""
    verdict = result.verdict
    error: BaseException | None = None
    if verdict.is_error:
        if decision.budget_exhausted:
            error = budget_error(service.name, log)
        elif deadline is not None and (deadline - now <= 0 or decision.stop is Stop.NO_TIME):
            error = deadline_error(service.name, log)
        else:
            error = final_error(service.name, result, log, decision.reason, decision.stop.value)
    return Done(result, error, attempt, budget_exhausted=decision.budget_exhausted, winner=winner, hedges=hedges)


def attempts_text(log: list[str]) -> str:
    return "; ".join(log) if log else "no attempt made"


def deadline_error(service: str, log: list[str]) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"{service}: deadline exceeded after {len(log)} failed attempt(s): {attempts_text(log)}",
        service=service,
        attempts=log,
        reason=Stop.NO_TIME.value,
    )


def budget_error(service: str, log: list[str]) -> RetryBudgetExhaustedError:
    return RetryBudgetExhaustedError(
        f"{service}: retry budget exhausted, not retrying: {attempts_text(log)}",
        service=service,
        attempts=log,
        reason=Stop.BUDGET.value,
    )


def final_error(
    service: str, result: Result | None, log: list[str], reason: str, why: str = "no endpoint left to retry on"
) -> BaseException | None:
    if result is not None and not result.verdict.is_error:
        return None  # the last attempt got a response (say a 503): the caller gets that response
    return UnavailableError(
        f"{service}: {len(log)} attempt(s) failed ({reason}): {attempts_text(log)}",
        service=service,
        attempts=log,
        reason=why,
    )
