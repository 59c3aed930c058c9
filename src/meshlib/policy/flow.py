"""The whole per-call policy as one generator, driven by every transport shell (sync httpx, async httpx, grpc).

It yields actions — ``Send`` an attempt to an endpoint, ``Sleep`` before retrying — and receives each attempt's
``Result``; it returns ``Done``. It never does I/O, never sleeps and never reads the time itself: the clock and
the random source come in, so the core is tested with tables of outcomes and a fake clock.

The stack, in Finagle's order (outermost first):
  deadline → retries + retry budget (a retry goes to *another* instance) → balancer (P2C over non-ejected
  endpoints) → per-endpoint: circuit breaker, peak-EWMA load, per-try timeout → the attempt itself.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import MeshError
from .classify import Kind
from .config import IDEMPOTENT_METHODS
from .decisions import Decision
from .hedged import hedged_flow
from .service import DEFAULT_PLAN, CallPlan, EndpointHandle, ServiceState
from .steps import (
    HEDGE_DUE,
    Action,
    CallFlow,
    Done,
    HedgeDue,
    Result,
    Send,
    Sleep,
    Wait,
    allowed_time,
    deadline_error,
    decision_for,
    describe,
    final_error,
    no_pauses,
    note_decision,
    note_outcome,
    record_outcome,
    stop_call,
)

#: Enum members read once: ``Kind.X`` goes through the enum's class machinery on every read (~45 ns a time).
_LOCAL_ERROR, _SUCCESS, _CLIENT_ERROR = Kind.LOCAL_ERROR, Kind.SUCCESS, Kind.CLIENT_ERROR

__all__ = ["HEDGE_DUE", "Action", "CallFlow", "Done", "HedgeDue", "Result", "Send", "Sleep", "Wait", "call_flow"]


def call_flow(
    service: ServiceState,
    *,
    method: str,
    replayable: bool,
    deadline: float | None,
    clock: Callable[[], float],
    rand: Callable[[], float],
    paused: Callable[[], float] = no_pauses,
    plan: CallPlan = DEFAULT_PLAN,
    hedgeable: bool = False,
    hedging: bool = True,
    record: bool = True,
    attempt_timeout: float | None = None,
    explain: bool = True,
) -> CallFlow:
    """One call's policy. Replayable calls to a service with ``hedging`` go the hedged way (``hedged.py``) when
    they are idempotent (or ``hedgeable``: gRPC, whose hedging is itself the caller's statement that a call may
    run twice); every other call is tried, then retried, one attempt at a time. A shell that cannot run attempts
    side by side passes ``hedging=False``. ``record=False`` (a mirrored copy) leaves the endpoints' breakers and
    latency estimates alone: a copy measures its target, it does not steer the real traffic. ``paused`` is the
    seconds this process has stood still in garbage collection so far (``meshlib/gc_pauses.py``): an attempt's recorded
    latency leaves out the pauses during it. ``attempt_timeout`` is the caller's own limit on every attempt (httpx's
    timeouts apply per try): a timeout under it is not held against the endpoint (``steps.blames_endpoint``).
    The returned ``Done`` carries the call's decision log (``decisions.py``); ``explain=False`` (nobody will read
    it: no span, no access log, no DEBUG logging) leaves a call tried one attempt at a time without one."""
    decisions: list[Decision] = []
    now = clock()
    faults = plan.faults
    if faults is not None:  # injected by the rules, before anything else, as a real failure would be
        if faults.delay_percent and rand() * 100 < faults.delay_percent:
            delay = faults.delay if deadline is None else min(faults.delay, max(0.0, deadline - now))
            yield Sleep(delay)
            now = clock()
        if faults.abort_percent and rand() * 100 < faults.abort_percent:
            return Done(None, None, 0, abort_status=faults.abort_status, decisions=decisions)
    hedger = service.hedger
    if (
        hedger is not None
        and hedging
        and replayable
        and (hedgeable or method in IDEMPOTENT_METHODS or plan.retry_non_idempotent)
    ):
        done = yield from hedged_flow(
            service,
            hedger,
            method=method,
            deadline=deadline,
            now=now,
            clock=clock,
            rand=rand,
            plan=plan,
            paused=paused,
            attempt_timeout=attempt_timeout,
            decisions=decisions,
        )
        done.decisions = decisions
        return done
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
            return Done(last, deadline_error(service.name, log), attempt, decisions=decisions)
        try:
            pick = service.pick(now, rand, tried, pool, subset)
        except MeshError as exc:
            return Done(last, exc, attempt, decisions=decisions)
        if pick is None:  # a retry with nowhere left to go: report what the last attempt got
            error = final_error(service.name, last, log, "no endpoint left to retry on")
            return Done(last, error, attempt, decisions=decisions)

        handle = pick.handle
        attempt += 1
        breaker_state = handle.breaker.state
        entry = decision_for(pick, attempt, breaker_state) if explain else None
        if entry is not None:
            decisions.append(entry)
        timeout = per_try if remaining is None else (remaining if per_try is None else min(per_try, remaining))
        load = handle.load
        load.outstanding += 1
        load.sent += 1
        started = now - paused()
        answered = False
        try:
            sent = yield Send(handle.endpoint, timeout, attempt, breaker_state)
            answered = sent is not None
        finally:
            load.outstanding -= 1
            if pick.trial and not answered:
                handle.breaker.release()
        result: Result = sent  # type: ignore[assignment]  # a plain (unhedged) attempt is answered with its Result
        now = clock()
        verdict = result.verdict
        kind = verdict.kind
        if kind is _LOCAL_ERROR:
            # Our own side failed (bad body, protocol misuse): not the endpoint's fault, not retryable.
            if pick.trial:
                handle.breaker.release()
            return Done(result, result.error, attempt, decisions=decisions)
        if record:
            allowed = timeout if attempt_timeout is None else allowed_time(timeout, attempt_timeout)
            blamed = record_outcome(service, pick, result, max(0.0, now - paused() - started), now, allowed)
            if entry is not None:
                note_outcome(entry, result, blamed)
        elif entry is not None:
            note_outcome(entry, result, True)
        if kind is _SUCCESS or kind is _CLIENT_ERROR:  # never retried (what retry.decide says): done
            return Done(result, None, attempt, decisions=decisions)
        tried.append(handle)
        last = result
        if verdict.is_failure:
            log.append(describe(handle, result))

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
        if entry is not None:
            note_decision(entry, decision, service, now)
        if not decision.retry:
            done = stop_call(service, result, decision, log, attempt, deadline, now)
            done.decisions = decisions
            return done
        yield Sleep(decision.delay)
        now = clock()
