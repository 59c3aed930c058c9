"""Retry decisions: tenacity's stop/wait strategies used as pure functions of the attempt number (never a shared
``Retrying`` object), jitter from the injected random source, and a Finagle-style retry budget."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from .classify import Kind, Verdict
from .config import IDEMPOTENT_METHODS, RetryBudgetPolicy, RetryPolicy


@dataclass(slots=True)
class _AttemptState:
    """The part of tenacity's ``RetryCallState`` its stop/wait strategies read."""

    attempt_number: int


class RetryBudget:
    """Retries allowed: ``ratio`` x requests + ``min_per_second`` x window, counted over a sliding window of
    one-second buckets. Shared by all calls to one service, so a dead service never gets a retry storm."""

    __slots__ = ("_requests", "_retries", "_stamps", "policy", "slots")

    def __init__(self, policy: RetryBudgetPolicy) -> None:
        self.policy = policy
        self.slots = max(1, round(policy.window))
        self._stamps = [-1] * self.slots
        self._requests = [0] * self.slots
        self._retries = [0] * self.slots

    def _slot(self, now: float) -> int:
        second = int(now)
        i = second % self.slots
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def deposit(self, now: float) -> None:
        """Count one new request (first attempts only)."""
        self._requests[self._slot(now)] += 1

    def _totals(self, now: float) -> tuple[int, int]:
        oldest = int(now) - self.slots + 1
        requests = retries = 0
        for i, stamp in enumerate(self._stamps):
            if stamp >= oldest:
                requests += self._requests[i]
                retries += self._retries[i]
        return requests, retries

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget, or say no."""
        i = self._slot(now)
        requests, retries = self._totals(now)
        allowed = self.policy.ratio * requests + self.policy.min_per_second * self.slots
        if retries + 1 > allowed:
            return False
        self._retries[i] += 1
        return True

    def allowance(self, now: float) -> tuple[float, float]:
        """Retries left and the budget's size now (the decision log's "budget 19/20 left")."""
        requests, retries = self._totals(now)
        total = self.policy.ratio * requests + self.policy.min_per_second * self.slots
        return total - retries, total

    def balance(self, now: float) -> float:
        requests, retries = self._totals(now)
        return self.policy.ratio * requests + self.policy.min_per_second * self.slots - retries


class Stop(enum.Enum):
    """Why a call is not retried (the flow branches on these, never on message text)."""

    RETRYING = "retrying"
    SUCCESS = "success"
    NOT_ON = "outcome not in retries.on"
    ATTEMPTS_USED = "attempts used"
    NOT_IDEMPOTENT = "not idempotent"
    NOT_REPLAYABLE = "body not replayable"
    NO_TIME = "no time left before the deadline"
    BUDGET = "retry budget exhausted"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    #: Why not (for logs and error messages), or "" when retrying.
    reason: str = ""
    delay: float = 0.0
    stop: Stop = Stop.RETRYING

    @property
    def budget_exhausted(self) -> bool:
        """The retry was warranted but the budget said no."""
        return self.stop is Stop.BUDGET


NO_RETRY_NOT_ON = RetryDecision(False, Stop.NOT_ON.value, stop=Stop.NOT_ON)
NO_RETRY_SUCCESS = RetryDecision(False, Stop.SUCCESS.value, stop=Stop.SUCCESS)


class RetryStrategy:
    """One per (service, policy); holds only immutable tenacity strategies, so it is safe to share."""

    __slots__ = ("_stop", "_wait", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._stop = tenacity.stop_after_attempt(max(1, policy.attempts))
        self._wait = tenacity.wait_exponential(multiplier=policy.backoff_base, max=policy.backoff_max)

    def decide(
        self,
        verdict: Verdict,
        attempt: int,
        *,
        method: str,
        replayable: bool,
        remaining: float | None,
        budget: RetryBudget,
        now: float,
        rand: Callable[[], float],
        retry_non_idempotent: bool | None = None,
    ) -> RetryDecision:
        kind = verdict.kind
        if kind is Kind.SUCCESS or kind is Kind.CLIENT_ERROR:
            return NO_RETRY_SUCCESS
        policy = self.policy
        if not policy.retries_outcome(verdict.key, verdict.status):
            return NO_RETRY_NOT_ON
        if self._stop(_AttemptState(attempt)):  # type: ignore[arg-type]
            return RetryDecision(False, f"{attempt} of {policy.attempts} attempts used", stop=Stop.ATTEMPTS_USED)
        if retry_non_idempotent is None:
            retry_non_idempotent = policy.retry_non_idempotent
        if verdict.reached_server and method not in IDEMPOTENT_METHODS and not retry_non_idempotent:
            why = f"{method} is not idempotent and the request may have reached the server"
            return RetryDecision(False, why, stop=Stop.NOT_IDEMPOTENT)
        if not replayable:
            why = "the request body is a stream that cannot be replayed"
            return RetryDecision(False, why, stop=Stop.NOT_REPLAYABLE)
        base = self._wait(_AttemptState(attempt))  # type: ignore[arg-type]
        delay = base / 2 + rand() * base / 2  # "equal jitter": never zero, never in lock-step
        if remaining is not None and remaining <= delay:
            return RetryDecision(False, Stop.NO_TIME.value, stop=Stop.NO_TIME)
        if not budget.try_withdraw(now):
            return RetryDecision(False, Stop.BUDGET.value, stop=Stop.BUDGET)
        return RetryDecision(True, delay=delay)
