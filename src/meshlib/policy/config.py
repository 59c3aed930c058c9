"""Per-service policy settings: what the rules document's ``services.<name>`` block turns into.

Frozen, so a rule change swaps a whole new object in and a call in flight keeps the one it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: ``unavailable`` is gRPC's UNAVAILABLE (the only status gRPC's retry design calls safe to repeat).
DEFAULT_RETRY_ON = frozenset({"connect-failure", "reset", "timeout", "unavailable", "502", "503", "504"})
#: Outcome names ``retries.on`` accepts, besides three-digit status codes.
RETRY_ON_NAMES = frozenset({"connect-failure", "reset", "timeout", "unavailable", "5xx", "gateway-error"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
LOAD_BALANCERS = ("p2c_ewma", "round_robin", "least_request")


@dataclass(frozen=True, slots=True)
class RetryBudgetPolicy:
    """Retries may be at most ``ratio`` of requests plus ``min_per_second`` over a ``window`` (Finagle's budget)."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    per_try_timeout: float | None = None
    on: frozenset[str] = DEFAULT_RETRY_ON
    budget: RetryBudgetPolicy = field(default_factory=RetryBudgetPolicy)
    backoff_base: float = 0.01
    backoff_max: float = 0.25
    retry_non_idempotent: bool = False

    def retries_outcome(self, outcome_key: str, status: int | None) -> bool:
        """Whether ``retries.on`` names this outcome (``"503"``, ``"5xx"``, ``"gateway-error"``, ``"reset"``...)."""
        on = self.on
        if outcome_key in on:
            return True
        if status is not None and status >= 500:
            return "5xx" in on or (status in (502, 503, 504) and "gateway-error" in on)
        return False


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    open_for: float = 30.0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Everything the call path needs to know about one destination service."""

    #: Whole-call timeout, all tries included; None means "the client's own httpx timeout".
    timeout: float | None = None
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    load_balancer: str = "p2c_ewma"


DEFAULT_POLICY = ServicePolicy()
