"""Load balancing: power-of-two-choices over peak-EWMA latency x outstanding requests (Finagle/Linkerd's default),
plus round robin and least-request (P2C over outstanding, as Envoy does it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

#: Decay time constant of the latency estimate: an idle slow endpoint is forgiven over tens of seconds.
DEFAULT_DECAY = 10.0
#: Cost charged to an endpoint with requests outstanding but no latency measured yet, so a cold instance
#: does not swallow a burst before its first answer comes back (Finagle's ``Penalty``).
COLD_PENALTY = 1e3
#: Latency an attempt that failed is recorded as, so a fast-failing instance does not look like a fast one.
FAILURE_PENALTY = 1.0


class LoadStats:
    """Peak-EWMA latency and outstanding count of one endpoint. Shared by every call; updated without locks
    (a lost update under thread contention only blurs an estimate)."""

    __slots__ = ("ewma", "outstanding", "stamp", "tau")

    def __init__(self, now: float, tau: float = DEFAULT_DECAY) -> None:
        self.ewma = 0.0
        self.stamp = now
        self.outstanding = 0
        self.tau = tau

    def observe(self, rtt: float, now: float) -> None:
        """Peak-sensitive: a slower sample replaces the estimate at once; faster ones pull it down with a weight
        that grows with the time since the last sample."""
        if rtt >= self.ewma:
            self.ewma = rtt
        else:
            elapsed = now - self.stamp
            w = math.exp(-elapsed / self.tau) if elapsed > 0 else 1.0
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.stamp = now

    def revive(self, rtt: float, now: float) -> None:
        """Start afresh from one measured sample: a probe that closed the breaker revives the endpoint with what it
        measured (as Finagle's failure accrual does). Otherwise the failure penalty recorded while it was ejected
        would outlive the ejection: nobody picks an endpoint that looks 1 s slow, so its estimate never meets a
        real sample and it starves while slower ones take traffic."""
        self.ewma = rtt
        self.stamp = now

    def latency(self, now: float) -> float:
        """The estimate decayed to ``now``, so an endpoint nobody picks is forgiven and probed again."""
        elapsed = now - self.stamp
        if elapsed <= 0:
            return self.ewma
        return self.ewma * math.exp(-elapsed / self.tau)

    def cost(self, now: float) -> float:
        latency = self.latency(now)
        if latency == 0.0 and self.outstanding:
            return COLD_PENALTY + self.outstanding
        return latency * (self.outstanding + 1)


class Balanced(Protocol):
    @property
    def load(self) -> LoadStats: ...


Random = Callable[[], float]


class Balancer(Protocol):
    name: str

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        """Index of the chosen candidate. ``candidates`` is never empty."""
        ...


def _two_indices(n: int, rand: Random) -> tuple[int, int]:
    a = int(rand() * n)
    b = int(rand() * (n - 1))
    if b >= a:
        b += 1
    return a, b


class P2CPeakEwma:
    name = "p2c_ewma"

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        n = len(candidates)
        if n == 1:
            return 0
        a, b = _two_indices(n, rand)
        return a if candidates[a].load.cost(now) <= candidates[b].load.cost(now) else b


class LeastRequest:
    name = "least_request"

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        n = len(candidates)
        if n == 1:
            return 0
        a, b = _two_indices(n, rand)
        return a if candidates[a].load.outstanding <= candidates[b].load.outstanding else b


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        i = self._next % len(candidates)
        self._next = i + 1
        return i


def make_balancer(name: str) -> Balancer:
    if name == "p2c_ewma":
        return P2CPeakEwma()
    if name == "round_robin":
        return RoundRobin()
    if name == "least_request":
        return LeastRequest()
    raise ValueError(f"unknown load_balancer {name!r}: expected p2c_ewma, round_robin or least_request")
