"""A fixed-size ring of time slots per series: request count, errors, latency sum and histogram buckets.

Memory is fixed per series (compact ``array``s, about 7 KB with buckets), so the control plane's memory is bounded
by its series cap, however many instances report or for how long."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from ..telemetry.metrics import LATENCY_BUCKETS

#: Seconds per slot, and slots kept: 15 minutes of history at 10 s resolution.
SLOT_SECONDS = 10.0
SLOTS = 90
N_BUCKETS = len(LATENCY_BUCKETS) + 1


@dataclass(slots=True)
class Window:
    """Figures summed over some slots."""

    count: float = 0.0
    errors: float = 0.0
    total: float = 0.0
    buckets: list[float] | None = None

    def add(self, other: Window) -> None:
        self.count += other.count
        self.errors += other.errors
        self.total += other.total
        if other.buckets is not None:
            if self.buckets is None:
                self.buckets = [0.0] * N_BUCKETS
            for i, c in enumerate(other.buckets):
                self.buckets[i] += c

    def success(self) -> float | None:
        return None if self.count <= 0 else 1.0 - self.errors / self.count

    def quantile_ms(self, q: float) -> float | None:
        return None if self.buckets is None else quantile(self.buckets, q) * 1000


def quantile(buckets: Sequence[float], q: float) -> float:
    """Seconds, interpolated within the bucket holding rank ``q`` (as Prometheus' ``histogram_quantile``); the
    +Inf bucket answers with the highest finite bound."""
    total = sum(buckets)
    if total <= 0:
        return math.nan
    rank = q * total
    seen = 0.0
    lower = 0.0
    for i, c in enumerate(buckets):
        if i == len(LATENCY_BUCKETS):
            return LATENCY_BUCKETS[-1]
        upper = LATENCY_BUCKETS[i]
        if c > 0 and seen + c >= rank:
            return lower + (upper - lower) * (rank - seen) / c
        seen += c
        lower = upper
    return LATENCY_BUCKETS[-1]


def slot_of(now: float) -> int:
    return int(now // SLOT_SECONDS)


class Ring:
    __slots__ = ("buckets", "count", "errors", "slots", "total")

    def __init__(self, with_buckets: bool) -> None:
        self.slots = array("q", [-1]) * SLOTS
        self.count = array("d", [0.0]) * SLOTS
        self.errors = array("d", [0.0]) * SLOTS
        self.total = array("d", [0.0]) * SLOTS
        self.buckets = array("I", [0]) * (SLOTS * N_BUCKETS) if with_buckets else None

    def _slot(self, slot: int) -> int:
        i = slot % SLOTS
        if self.slots[i] != slot:
            self.slots[i] = slot
            self.count[i] = self.errors[i] = self.total[i] = 0.0
            if self.buckets is not None:
                base = i * N_BUCKETS
                for j in range(base, base + N_BUCKETS):
                    self.buckets[j] = 0
        return i

    def add(
        self, now: float, count: float, errors: float, total: float = 0.0, buckets: Sequence[int] | None = None
    ) -> None:
        i = self._slot(slot_of(now))
        self.count[i] += count
        self.errors[i] += errors
        self.total[i] += total
        if buckets is not None and self.buckets is not None:
            base = i * N_BUCKETS
            for j, c in enumerate(buckets):
                self.buckets[base + j] = min(self.buckets[base + j] + c, 0xFFFFFFFF)

    def slot(self, slot: int) -> Window | None:
        i = slot % SLOTS
        if self.slots[i] != slot:
            return None
        buckets = None
        if self.buckets is not None:
            base = i * N_BUCKETS
            buckets = [float(c) for c in self.buckets[base : base + N_BUCKETS]]
        return Window(self.count[i], self.errors[i], self.total[i], buckets)

    def window(self, now: float, seconds: float) -> Window:
        """The figures of the slots that overlap the last ``seconds``."""
        out = Window()
        last = slot_of(now)
        for slot in range(last - math.ceil(seconds / SLOT_SECONDS), last + 1):
            w = self.slot(slot)
            if w is not None:
                out.add(w)
        return out


def covered(now: float, seconds: float, since: float) -> float:
    """Seconds that ``Ring.window(now, seconds)`` spans, no longer than figures have been collected (``since``):
    the same for every series, so a young control plane's edge and node rates agree."""
    start = (slot_of(now) - math.ceil(seconds / SLOT_SECONDS)) * SLOT_SECONDS
    return max(min(now - start, now - since), 1.0)
