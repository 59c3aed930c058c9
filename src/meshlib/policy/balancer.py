"""Load balancing: power-of-two-choices over peak-EWMA latency x outstanding requests (Finagle/Linkerd's default),
plus round robin and least-request (P2C over outstanding, as Envoy does it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

#: Decay time constant of the latency estimate: an idle slow endpoint is forgiven over tens of seconds.
DEFAULT_DECAY = 10.0
#: Cost charged to an endpoint with requests outstanding but no latency measured yet, so a cold instance
#: does not swallow a burst before its first answer comes back (Finagle's ``Penalty``).
COLD_PENALTY = 1e3
#: Latency an attempt that failed is recorded as, so a fast-failing instance does not look like a fast one.
FAILURE_PENALTY = 1.0
#: Each time power-of-two-choices passes an endpoint over, its estimate is multiplied by this. Time alone forgives
#: too slowly: a cold first sample (connect + first request, 18.6 ms against 0.2 ms steady) decayed with tau = 10 s
#: kept an equal instance from ever being picked by a sequential caller for ~45 s. Counted in comparisons lost, an
#: endpoint left out is probed again after a few dozen picks (18 for a 60x worse estimate, 28 for a 500x one), so a
#: cold, recovered or once-slow endpoint is re-measured within a fraction of a second at any rate, and a truly slow
#: one is probed about once every 40 calls (~2.5% of the traffic) instead of being trusted forever.
LOSS_DECAY = 0.8


class LoadStats:
    """Peak-EWMA latency and outstanding count of one endpoint. Shared by every call; updated without locks
    (a lost update under thread contention only blurs an estimate)."""

    __slots__ = ("ewma", "outstanding", "sent", "stamp", "tau")

    def __init__(self, now: float, tau: float = DEFAULT_DECAY) -> None:
        self.ewma = 0.0
        self.stamp = now
        self.outstanding = 0
        #: Attempts sent to this endpoint so far (the control plane turns two reports' counts into shares).
        self.sent = 0
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

    def passed_over(self) -> None:
        """Power-of-two-choices chose the other endpoint: trust this estimate a little less (see LOSS_DECAY)."""
        self.ewma *= LOSS_DECAY

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


#: A balancer's choice: the chosen index, the index it was weighed against (-1: none), and both their costs (what
#: the decision log shows).
Choice = tuple[int, int, float, float]


class Balancer(Protocol):
    name: str

    def choose(self, candidates: Sequence[Balanced], now: float, rand: Random) -> Choice:
        """The chosen candidate and what it was weighed against. ``candidates`` is never empty."""
        ...

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        """Index of the chosen candidate."""
        ...


def _two_indices(n: int, rand: Random) -> tuple[int, int]:
    a = int(rand() * n)
    b = int(rand() * (n - 1))
    if b >= a:
        b += 1
    return a, b


class P2CPeakEwma:
    name = "p2c_ewma"

    def choose(self, candidates: Sequence[Balanced], now: float, rand: Random) -> Choice:
        n = len(candidates)
        if n == 1:
            return 0, -1, candidates[0].load.cost(now), 0.0
        a, b = _two_indices(n, rand)
        load_a, load_b = candidates[a].load, candidates[b].load
        cost_a, cost_b = load_a.cost(now), load_b.cost(now)
        if cost_a <= cost_b:
            load_b.passed_over()
            return a, b, cost_a, cost_b
        load_a.passed_over()
        return b, a, cost_b, cost_a

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        return self.choose(candidates, now, rand)[0]


class LeastRequest:
    """P2C over outstanding requests; the costs it reports are the outstanding counts."""

    name = "least_request"

    def choose(self, candidates: Sequence[Balanced], now: float, rand: Random) -> Choice:
        n = len(candidates)
        if n == 1:
            return 0, -1, float(candidates[0].load.outstanding), 0.0
        a, b = _two_indices(n, rand)
        out_a, out_b = candidates[a].load.outstanding, candidates[b].load.outstanding
        return (a, b, float(out_a), float(out_b)) if out_a <= out_b else (b, a, float(out_b), float(out_a))

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        return self.choose(candidates, now, rand)[0]


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Balanced], now: float, rand: Random) -> Choice:
        i = self.pick(candidates, now, rand)
        return i, -1, candidates[i].load.cost(now), 0.0

    def pick(self, candidates: Sequence[Balanced], now: float, rand: Random) -> int:
        i = self._next % len(candidates)
        self._next = i + 1
        return i


class Weighted(Protocol):
    @property
    def weight(self) -> int: ...


W = TypeVar("W", bound=Weighted)


def weight_class(candidates: Sequence[W], rand: Random) -> Sequence[W]:
    """The candidates of one weight, drawn with probability weight x their number (Finagle's traffic distributor):
    each endpoint's share of the calls is its weight's share of the total, at any load, and the balancer then
    weighs like against like (power-of-two-choices across weights would let the heavier win every comparison)."""
    classes: dict[int, list[W]] = {}
    for candidate in candidates:
        classes.setdefault(candidate.weight, []).append(candidate)
    if len(classes) == 1:
        return candidates
    point = rand() * sum(weight * len(members) for weight, members in classes.items())
    for weight, members in classes.items():
        point -= weight * len(members)
        if point < 0:
            return members
    return members


def make_balancer(name: str) -> Balancer:
    if name == "p2c_ewma":
        return P2CPeakEwma()
    if name == "round_robin":
        return RoundRobin()
    if name == "least_request":
        return LeastRequest()
    raise ValueError(f"unknown load_balancer {name!r}: expected p2c_ewma, round_robin or least_request")
