"""The whole per-call policy as one generator, driven by every transport shell (sync httpx, async httpx, grpc).

It yields actions — ``Send`` an attempt to an endpoint, ``Sleep`` before retrying — and receives each attempt's
``Result``; it returns ``Done``. It never does I/O, never sleeps and never reads the time itself: the clock and
the random source come in, so the core is tested with tables of outcomes and a fake clock.

The stack, in Finagle's order (outermost first):
  deadline → retries + retry budget (a retry goes to *another* instance) → balancer (P2C over non-ejected
  endpoints) → per-endpoint: circuit breaker, peak-EWMA load, per-try timeout → the attempt itself.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

# Plain (not frozen) slotted dataclasses: a frozen one costs ~1 us more to build, and these are built per attempt.
from ..endpoints import Endpoint
from ..errors import (
    DeadlineExceededError,
    MeshError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from .balancer import FAILURE_PENALTY
from .classify import Kind, Verdict
from .service import DEFAULT_PLAN, CallPlan, EndpointHandle, ServiceState


@dataclass(slots=True)
class Send:
    """Make one attempt at ``endpoint``; ``timeout`` (seconds, or None) bounds this try."""

    endpoint: Endpoint
    timeout: float | None
    attempt: int
    breaker_state: str = "closed"


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Result:
    """What the shell observed for one attempt: a verdict, plus the exception when there was no response."""

    verdict: Verdict
    error: BaseException | None = None


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


Action = Send | Sleep
CallFlow = Generator[Action, Result | None, Done]


def _describe(handle: EndpointHandle, result: Result) -> str:
    line = f"{handle.label} {result.verdict.key}"
    if result.error is not None:
        line += f" ({type(result.error).__name__}: {result.error})"
    return line


def call_flow(
    service: ServiceState,
    *,
    method: str,
    replayable: bool,
    deadline: float | None,
    clock: Callable[[], float],
    rand: Callable[[], float],
    plan: CallPlan = DEFAULT_PLAN,
) -> CallFlow:
    now = clock()
    faults = plan.faults
    if faults is not None:  # injected by the rules, before anything else, as a real failure would be
        if faults.delay_percent and rand() * 100 < faults.delay_percent:
            delay = faults.delay if deadline is None else min(faults.delay, max(0.0, deadline - now))
            yield Sleep(delay)
            now = clock()
        if faults.abort_percent and rand() * 100 < faults.abort_percent:
            return Done(None, None, 0, abort_status=faults.abort_status)
    service.budget.deposit(now)
    retry = service.retry
    pool = plan.pool
    subset = plan.choice.subset
    non_idempotent = plan.retry_non_idempotent
    per_try = retry.policy.per_try_timeout
    tried: list[EndpointHandle] = []
    log: list[str] = []
    last: Result | None = None
    attempt = 0
    while True:
        remaining = None if deadline is None else deadline - now
        if remaining is not None and remaining <= 0:
            return Done(last, _deadline_error(service.name, log), attempt)
        try:
            pick = service.pick(now, rand, tried, pool, subset)
        except MeshError as exc:
            return Done(last, exc, attempt)
        if pick is None:  # a retry with nowhere left to go: report what the last attempt got
            return Done(last, _final_error(service.name, last, log, "no endpoint left to retry on"), attempt)

        handle = pick.handle
        attempt += 1
        timeout = per_try if remaining is None else (remaining if per_try is None else min(per_try, remaining))
        load = handle.load
        load.outstanding += 1
        started = now
        answered = False
        try:
            result = yield Send(handle.endpoint, timeout, attempt, handle.breaker.state)
            answered = result is not None
        finally:
            load.outstanding -= 1
            if pick.trial and not answered:
                handle.breaker.release()
        assert result is not None
        now = clock()
        verdict = result.verdict
        if verdict.kind is Kind.LOCAL_ERROR:
            # Our own side failed (bad body, protocol misuse): not the endpoint's fault, not retryable.
            if pick.trial:
                handle.breaker.release()
            return Done(result, result.error, attempt)
        rtt = now - started
        if verdict.is_failure:
            load.observe(max(rtt, FAILURE_PENALTY), now)
        elif pick.trial:
            load.revive(rtt, now)  # the probe that closes the breaker: the endpoint starts afresh
        else:
            load.observe(rtt, now)
        handle.breaker.record(verdict.is_failure, pick.trial)
        tried.append(handle)
        last = result
        if verdict.is_failure:
            log.append(_describe(handle, result))

        decision = retry.decide(
            verdict,
            attempt,
            method=method,
            replayable=replayable,
            remaining=None if deadline is None else deadline - now,
            budget=service.budget,
            now=now,
            rand=rand,
            retry_non_idempotent=non_idempotent,
        )
        if not decision.retry:
            if not verdict.is_error:
                return Done(result, None, attempt, budget_exhausted=decision.budget_exhausted)
            if decision.budget_exhausted:
                return Done(result, _budget_error(service.name, log), attempt, budget_exhausted=True)
            if deadline is not None and (deadline - now <= 0 or decision.reason.startswith("no time")):
                return Done(result, _deadline_error(service.name, log), attempt)
            return Done(result, _final_error(service.name, result, log, decision.reason), attempt)
        yield Sleep(decision.delay)
        now = clock()


def _attempts_text(log: list[str]) -> str:
    return "; ".join(log) if log else "no attempt made"


def _deadline_error(service: str, log: list[str]) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"{service}: deadline exceeded after {len(log)} failed attempt(s): {_attempts_text(log)}",
        service=service,
        attempts=log,
    )


def _budget_error(service: str, log: list[str]) -> RetryBudgetExhaustedError:
    return RetryBudgetExhaustedError(
        f"{service}: retry budget exhausted, not retrying: {_attempts_text(log)}",
        service=service,
        attempts=log,
    )


def _final_error(service: str, result: Result | None, log: list[str], reason: str) -> BaseException | None:
    if result is not None and not result.verdict.is_error:
        return None  # the last attempt got a response (say a 503): the caller gets that response
    return UnavailableError(
        f"{service}: {len(log)} attempt(s) failed ({reason}): {_attempts_text(log)}",
        service=service,
        attempts=log,
    )
