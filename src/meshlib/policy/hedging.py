"""Hedged requests: when to send a backup attempt, and how many the budget allows. Pure: samples and times come
in from the flow.

The adaptive delay is a percentile of the service's recent successful attempt latencies (a ring of the last 256,
the percentile recomputed every 32 samples): a backup goes out only when the first attempt is already slower
than, say, 95% of recent ones, so it costs about 5% more requests and cuts the tail those 5% would have had.
"""

from __future__ import annotations

from .config import HedgingPolicy, RetryBudgetPolicy
from .retry import RetryBudget

WINDOW = 256
RECOMPUTE_EVERY = 32
#: No adaptive delay before this many samples: too few to know what is slow.
MIN_SAMPLES = 20


class LatencyWindow:
    """Recent latencies of one service, for a percentile."""

    __slots__ = ("_cached", "_count", "_next", "_samples", "_since")

    def __init__(self) -> None:
        self._samples = [0.0] * WINDOW
        self._next = 0
        self._count = 0
        self._since = 0
        self._cached: dict[float, float] = {}

    def add(self, seconds: float) -> None:
        self._samples[self._next] = seconds
        self._next = (self._next + 1) % WINDOW
        if self._count < WINDOW:
            self._count += 1
        self._since += 1
        if self._since >= RECOMPUTE_EVERY:
            self._cached = {}
            self._since = 0

    def percentile(self, p: float) -> float | None:
        if self._count < MIN_SAMPLES:
            return None
        value = self._cached.get(p)
        if value is None:
            ordered = sorted(self._samples[: self._count])
            value = ordered[min(self._count - 1, int(self._count * p / 100.0))]
            self._cached[p] = value
        return value


class Hedger:
    """One service's hedging state: its policy, its latency window and its budget (shared by all its calls)."""

    __slots__ = ("budget", "latencies", "policy")

    def __init__(self, policy: HedgingPolicy) -> None:
        self.policy = policy
        self.latencies = LatencyWindow()
        # no floor (min_per_second=0): hedges are earned by requests, so they can never double the load
        self.budget = RetryBudget(RetryBudgetPolicy(ratio=policy.budget_percent / 100.0, min_per_second=0.0))

    def delay(self) -> float | None:
        """How long the first attempt may take before a backup goes out; None: no hedging for this call (no
        basis for an adaptive delay yet)."""
        policy = self.policy
        if policy.delay is not None:
            return policy.delay
        assert policy.percentile is not None
        return self.latencies.percentile(policy.percentile)
