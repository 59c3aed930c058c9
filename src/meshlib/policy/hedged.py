"""The hedged call flow (Finagle's backup requests, gRPC's hedging policy): an attempt that has not answered
after the hedging delay gets a backup on *another* instance, running alongside it; the first answer wins and the
shell cancels the rest. Backups come out of a budget of their own (a share of requests), so hedging can never
double the load; an attempt that fails while another is still in flight does not end the call (the other may
still answer); when every attempt has failed, retries follow as in the plain flow.

The shell's side: on ``Send(..., hedge_after=d)`` or ``Wait(d)``, answer with the first ``Result`` (naming its
``attempt``) of any attempt in flight, or with ``HEDGE_DUE`` once ``d`` seconds pass with no answer.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import MeshError
from .classify import Kind
from .decisions import Decision
from .hedging import Hedger
from .service import CallPlan, EndpointHandle, Pick, ServiceState
from .steps import (
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


def hedged_flow(
    service: ServiceState,
    hedger: Hedger,
    *,
    method: str,
    deadline: float | None,
    now: float,
    clock: Callable[[], float],
    rand: Callable[[], float],
    plan: CallPlan,
    paused: Callable[[], float] = no_pauses,
    attempt_timeout: float | None = None,
    decisions: list[Decision] | None = None,
) -> CallFlow:
    service.budget.deposit(now)
    hedger.budget.deposit(now)
    delay = hedger.delay()
    retry = service.retry
    per_try = retry.policy.per_try_timeout
    hedges_left = hedger.policy.max_attempts - 1 if delay is not None else 0
    tried: list[EndpointHandle] = []
    log: list[str] = []
    # attempt -> (its pick, when it started less the pauses so far: ``now - paused() - started`` is its latency)
    flights: dict[int, tuple[Pick, float]] = {}
    allowed: dict[int, float | None] = {}  # the time each attempt was given
    entries: dict[int, Decision] = {}
    log_to = decisions if decisions is not None else []
    last: Result | None = None
    attempt = hedges = 0
    send = True  # a first attempt, a backup or a retry is due
    try:
        while True:
            message: Result | HedgeDue | None
            if send:
                send = False
                remaining = None if deadline is None else deadline - now
                pick: Pick | None = None
                if remaining is None or remaining > 0:
                    busy = tried + [p.handle for p, _ in flights.values()]
                    try:
                        pick = service.pick(now, rand, busy, plan.pool, plan.choice.subset)
                    except MeshError as exc:
                        if not flights:
                            return Done(last, exc, attempt, hedges=hedges)
                    if pick is not None and flights and pick.handle in busy:
                        pick = None  # a backup must go to another instance
                elif not flights:
                    return Done(last, deadline_error(service.name, log), attempt, hedges=hedges)
                if pick is None:
                    if not flights:
                        error = final_error(service.name, last, log, "no endpoint left to retry on")
                        return Done(last, error, attempt, hedges=hedges)
                    hedges_left = 0  # nowhere to hedge to: wait for what is in flight
                    message = yield Wait(None)
                else:
                    attempt += 1
                    handle = pick.handle
                    breaker_state = handle.breaker.state
                    entry = decision_for(pick, attempt, breaker_state, hedge=bool(flights))
                    entries[attempt] = entry
                    log_to.append(entry)
                    handle.load.outstanding += 1
                    handle.load.sent += 1
                    flights[attempt] = (pick, now - paused())
                    timeout = (
                        per_try if remaining is None else (remaining if per_try is None else min(per_try, remaining))
                    )
                    allowed[attempt] = allowed_time(timeout, attempt_timeout)
                    after = delay if hedges_left > 0 else None
                    message = yield Send(handle.endpoint, timeout, attempt, breaker_state, hedge_after=after)
            else:
                message = yield Wait(delay if hedges_left > 0 else None)
            assert message is not None
            now = clock()
            if isinstance(message, HedgeDue):
                if hedges_left > 0 and hedger.budget.try_withdraw(now):
                    hedges_left -= 1
                    hedges += 1
                    send = True
                else:
                    if hedges_left > 0 and log_to:
                        log_to[-1].hedge_refused = "refused: the hedge budget is spent"
                    hedges_left = 0  # the budget says no: this call waits for what it has
                continue

            result = message
            # a shell that only ever has one attempt out may leave ``attempt`` unset
            key = result.attempt if result.attempt in flights or len(flights) != 1 else next(iter(flights))
            pick, started = flights.pop(key)
            handle = pick.handle
            handle.load.outstanding -= 1
            verdict = result.verdict
            if verdict.kind is Kind.LOCAL_ERROR:  # our side's fault: not the endpoint's, not retryable
                if pick.trial:
                    handle.breaker.release()
                return Done(result, result.error, attempt, winner=key, hedges=hedges)
            blamed = record_outcome(
                service, pick, result, max(0.0, now - paused() - started), now, allowed.pop(key, None)
            )
            entry = entries.pop(key)
            note_outcome(entry, result, blamed)
            tried.append(handle)
            last = result
            if verdict.is_failure:
                log.append(describe(handle, result))
                if flights:
                    continue  # another attempt is still out: it may yet answer
            decision = retry.decide(
                verdict,
                attempt,
                method=method,
                replayable=True,
                remaining=None if deadline is None else deadline - now,
                budget=service.budget,
                now=now,
                rand=rand,
                retry_non_idempotent=True,  # hedged calls are idempotent by construction
            )
            note_decision(entry, decision, service, now)
            if not decision.retry:
                return stop_call(service, result, decision, log, attempt, deadline, now, winner=key, hedges=hedges)
            yield Sleep(decision.delay)
            now = clock()
            send = True
    finally:
        if flights:
            end = clock()
            spent = end - paused()
            for pick, started in flights.values():  # the losers, cancelled by the shell
                load = pick.handle.load
                load.outstanding -= 1
                # what a loser took is at least this long: a lower bound keeps its endpoint's estimate honest
                # (else a slow endpoint whose attempts always lose would never show it, and keep its share)
                load.observe(max(0.0, spent - started), end)
                if pick.trial:
                    pick.handle.breaker.release()
