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
    #: At most this share of a service's endpoints is ejected at once (Envoy's ``max_ejection_percent``; at least
    #: one may always be): past it, an endpoint that keeps failing stays in rotation, so a correlated failure cannot
    #: pile the whole load onto the few endpoints left.
    max_ejection_percent: float = 50.0
    #: When fewer than this share of a pool's endpoints is closed, balance over all of them, ejected ones included
    #: (Envoy's panic threshold, and its default of 50%). It protects a one-instance service, and the last
    #: instances of a pool, from being ejected into a total outage by a burst of errors: traffic keeps flowing to
    #: them and fails (or succeeds) on its merits. 0 turns it off: a pool whose endpoints are all ejected then
    #: fails fast with CircuitOpenError.
    panic_threshold_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class HedgingPolicy:
    """Backup requests (Finagle) / gRPC's hedging: when a replayable call's attempt has not answered after the
    delay, send one more to another instance; the first answer wins."""

    #: A fixed delay in seconds, or None for an adaptive one (``percentile`` of the service's recent latency).
    delay: float | None = None
    percentile: float | None = 95.0
    #: Attempts in flight at most, the first one included.
    max_attempts: int = 2
    #: Hedges may be at most this share of requests (a budget of its own, apart from the retry budget).
    budget_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Everything the call path needs to know about one destination service."""

    #: Whole-call timeout, all tries included; None means "the client's own httpx timeout".
    timeout: float | None = None
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    load_balancer: str = "p2c_ewma"
    #: None: no hedging (the default).
    hedging: HedgingPolicy | None = None


DEFAULT_POLICY = ServicePolicy()
