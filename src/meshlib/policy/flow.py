"""The whole per-call policy as one generator, driven by every transport shell (sync httpx, async httpx, grpc).

It yields actions — ``Send`` an attempt to an endpoint, ``Sleep`` before retrying — and receives each attempt's
``Result``; it returns ``Done``. It never does I/O, never sleeps and never reads the time itself: the clock and
the random source come in, so the core is tested with tables of outcomes and a fake clock.

The stack, in Finagle's order (outermost first):
  deadline → retries + retry budget (a retry goes to *another* instance) → balancer (P2C over non-ejected
  endpoints) → per-endpoint: circuit breaker, peak-EWMA load, per-try timeout → the attempt itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import MeshError
from .classify import Kind
from .config import IDEMPOTENT_METHODS
from .decisions import Decision
from .hedged import hedged_flow
from .service import DEFAULT_PLAN, CallPlan, EndpointHandle, Pick, ServiceState
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

__all__ = [
    "HEDGE_DUE",
    "Action",
    "Attempts",
    "CallFlow",
    "Done",
    "HedgeDue",
    "Result",
    "Send",
    "Sleep",
    "Wait",
    "attempts_flow",
    "call_flow",
]


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
    it: no span, no access log, no DEBUG logging) leaves a call tried one attempt at a time without one.
    A call tried one attempt at a time starts when the flow is made (its clock read, its retry budget credited)."""
    if plan.faults is None and (
        service.hedger is None or not _hedged(service, plan, method, replayable, hedgeable, hedging)
    ):
        # the common call: the sequential loop alone, no generator around it
        steps = Attempts(
            service, method, replayable, deadline, clock(), clock, rand, paused, plan, record, attempt_timeout
        )
        if explain:
            steps.decisions = []
        return attempts_flow(steps)
    return _flow_with_extras(
        service, method, replayable, deadline, clock, rand, paused, plan, hedgeable, hedging, record,
        attempt_timeout, explain,
    )  # fmt: skip


def _hedged(
    service: ServiceState, plan: CallPlan, method: str, replayable: bool, hedgeable: bool, hedging: bool
) -> bool:
    """Whether the call goes the hedged way (see ``call_flow``)."""
    return (
        service.hedger is not None
        and hedging
        and replayable
        and (hedgeable or method in IDEMPOTENT_METHODS or bool(plan.retry_non_idempotent))
    )


def _flow_with_extras(
    service: ServiceState,
    method: str,
    replayable: bool,
    deadline: float | None,
    clock: Callable[[], float],
    rand: Callable[[], float],
    paused: Callable[[], float],
    plan: CallPlan,
    hedgeable: bool,
    hedging: bool,
    record: bool,
    attempt_timeout: float | None,
    explain: bool,
) -> CallFlow:
    """A call with faults injected by the rules, or hedged: the extras first, then the hedged flow or the loop."""
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
    if hedger is not None and _hedged(service, plan, method, replayable, hedgeable, hedging):
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
    steps = Attempts(service, method, replayable, deadline, now, clock, rand, paused, plan, record, attempt_timeout)
    if explain:
        steps.decisions = decisions
    return (yield from attempts_flow(steps))


def attempts_flow(steps: Attempts, then: Sleep | Done | None = None) -> CallFlow:
    """The sequential flow's one loop: the next attempt, its result judged, a pause, again. ``then`` given: the
    call's first steps were taken outside the loop (a quiet gRPC call, ``grpc/quiet.py``), and this is what they
    came to: the ``Done`` that ends the call, or the ``Sleep`` before its next attempt."""
    if then is not None:
        if isinstance(then, Done):
            return then
        yield then
        steps.slept()
    while True:
        action = steps.next_attempt()
        if isinstance(action, Done):
            return action
        answered = False
        try:
            sent = yield action
            answered = sent is not None
        finally:
            if not answered:
                steps.unanswered()
        result: Result = sent  # type: ignore[assignment]  # a plain (unhedged) attempt is answered with its Result
        judged = steps.judge(result)
        if judged is None:  # (``steps.finished``, inline: every call ends here)
            return Done(result, None, steps.attempt, decisions=steps.decisions)
        if isinstance(judged, Done):
            return judged
        yield judged
        steps.slept()


_NOTHING: tuple[()] = ()


class Attempts:
    """A sequential call between its attempts, as two plain steps: ``next_attempt`` (the deadline checked, an
    endpoint picked, its load counted, the try's timeout: a ``Send``, or the ``Done`` that ends the call) and
    ``judge`` (the attempt's outcome charged to its endpoint, the retry decided: ``None`` when the call is over
    with this result as its answer, a ``Done`` that ends it otherwise, or the ``Sleep`` before the next attempt).
    ``attempts_flow`` runs them in its loop; a shell may run the first attempt with them directly and hand the
    rest to the loop (a gRPC call with nothing to trace or log makes no generator at all when it succeeds).
    ``decisions`` is the decision log, handed back in every ``Done``: None (the default) when nobody will read it,
    a list to fill otherwise. Made once a call, so it sets little: the endpoints tried and the failures' log
    start as a shared empty tuple."""

    __slots__ = (
        "allowed",
        "attempt",
        "attempt_started",
        "attempt_timeout",
        "clock",
        "deadline",
        "decisions",
        "entry",
        "last",
        "log",
        "method",
        "now",
        "paused",
        "pick",
        "plan",
        "rand",
        "record",
        "replayable",
        "service",
        "started",
        "tried",
    )

    pick: Pick
    allowed: float | None
    attempt_started: float
    entry: Decision | None

    def __init__(
        self,
        service: ServiceState,
        method: str,
        replayable: bool,
        deadline: float | None,
        now: float,
        clock: Callable[[], float],
        rand: Callable[[], float],
        paused: Callable[[], float] = no_pauses,
        plan: CallPlan = DEFAULT_PLAN,
        record: bool = True,
        attempt_timeout: float | None = None,
    ) -> None:
        service.budget.deposit(now)
        self.service = service
        self.method = method
        self.replayable = replayable
        self.deadline = deadline
        #: when the call began (``now`` moves on with every step)
        self.started = self.now = now
        self.clock = clock
        self.rand = rand
        self.paused = paused
        self.plan = plan
        self.record = record
        self.attempt_timeout = attempt_timeout
        self.decisions: list[Decision] | None = None
        self.tried: Sequence[EndpointHandle] = _NOTHING
        self.log: Sequence[str] = _NOTHING
        self.last: Result | None = None
        self.attempt = 0

    def finished(self, result: Result) -> Done:
        """The call is over with ``result`` as its answer (what ``judge`` returning None means)."""
        return Done(result, None, self.attempt, decisions=self.decisions)

    def _done(self, result: Result | None, error: BaseException | None) -> Done:
        return Done(result, error, self.attempt, decisions=self.decisions)

    def failures(self) -> list[str]:
        """Each failed attempt, described (for the error that ends the call)."""
        log = self.log
        return log if isinstance(log, list) else []

    def next_attempt(self) -> Send | Done:
        now, deadline = self.now, self.deadline
        remaining = None if deadline is None else deadline - now
        if remaining is not None and remaining <= 0:
            return self._done(self.last, deadline_error(self.service.name, self.failures()))
        plan = self.plan
        try:
            pick = self.service.pick(now, self.rand, self.tried, plan.pool, plan.choice.subset)
        except MeshError as exc:
            return self._done(self.last, exc)
        if pick is None:  # a retry with nowhere left to go: report what the last attempt got
            return self._done(
                self.last, final_error(self.service.name, self.last, self.failures(), "no endpoint left to retry on")
            )
        handle = pick.handle
        attempt = self.attempt = self.attempt + 1
        breaker_state = handle.breaker.state
        decisions = self.decisions
        if decisions is not None:
            entry = self.entry = decision_for(pick, attempt, breaker_state)
            decisions.append(entry)
        per_try = self.service.retry.policy.per_try_timeout
        timeout = per_try if remaining is None else (remaining if per_try is None else min(per_try, remaining))
        self.allowed = timeout
        load = handle.load
        load.outstanding += 1
        load.sent += 1
        self.pick = pick
        self.attempt_started = now - self.paused()
        return Send(handle.endpoint, timeout, attempt, breaker_state)

    def unanswered(self) -> None:
        """The attempt ``next_attempt`` sent ends with no result (the call was interrupted)."""
        pick = self.pick
        pick.handle.load.outstanding -= 1
        if pick.trial:
            pick.handle.breaker.release()

    def judge(self, result: Result) -> Sleep | Done | None:
        pick = self.pick
        handle = pick.handle
        handle.load.outstanding -= 1
        now = self.now = self.clock()
        verdict = result.verdict
        kind = verdict.kind
        if kind is _LOCAL_ERROR:
            # Our own side failed (bad body, protocol misuse): not the endpoint's fault, not retryable.
            if pick.trial:
                handle.breaker.release()
            return self._done(result, result.error)
        entry = self.entry if self.decisions is not None else None
        service = self.service
        if self.record:
            attempt_timeout = self.attempt_timeout
            allowed = self.allowed if attempt_timeout is None else allowed_time(self.allowed, attempt_timeout)
            rtt = max(0.0, now - self.paused() - self.attempt_started)
            blamed = record_outcome(service, pick, result, rtt, now, allowed)
            if entry is not None:
                note_outcome(entry, result, blamed)
        elif entry is not None:
            note_outcome(entry, result, True)
        if kind is _SUCCESS or kind is _CLIENT_ERROR:  # never retried (what retry.decide says): done
            return None
        tried = self.tried
        if not isinstance(tried, list):
            tried = self.tried = []
        tried.append(handle)
        self.last = result
        if verdict.is_failure:
            log = self.failures()
            log.append(describe(handle, result))
            self.log = log
        deadline = self.deadline
        decision = service.retry.decide(
            verdict,
            self.attempt,
            method=self.method,
            replayable=self.replayable,
            remaining=None if deadline is None else deadline - now,
            budget=service.budget,
            now=now,
            rand=self.rand,
            retry_non_idempotent=self.plan.retry_non_idempotent,
        )
        if entry is not None:
            note_decision(entry, decision, service, now)
        if not decision.retry:
            done = stop_call(service, result, decision, self.failures(), self.attempt, deadline, now)
            done.decisions = self.decisions
            return done
        return Sleep(decision.delay)

    def slept(self) -> None:
        """The pause ``judge`` asked for is over."""
        self.now = self.clock()
