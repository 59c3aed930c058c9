"""Routing: which route a request takes (first match wins) and which subset it lands on (weighted, optionally
sticky per user so an A/B user keeps seeing one version). Pure: headers come in as a lookup function."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .rules import Destination, Route, ServiceRules

HeaderLookup = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class RouteChoice:
    route: Route | None
    subset: str | None
    #: The route label in metrics and spans when not the route's own name (``mirror:<subset>`` for copies).
    name: str | None = None
    #: The route label in metrics and spans (read by every call's metrics: made once, not a property).
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = self.name if self.name is not None else self.route.name if self.route is not None else "default"
        object.__setattr__(self, "label", label)


DEFAULT_CHOICE = RouteChoice(None, None)


def _matches(route: Route, method: str, path: str, header: HeaderLookup) -> bool:
    if route.methods is not None and method not in route.methods:
        return False
    if route.path_prefix is not None and not path.startswith(route.path_prefix):
        return False
    return all(m.matches(header(m.name)) for m in route.headers)


def _position(route: Route, header: HeaderLookup, rand: Callable[[], float]) -> float:
    """A point in [0, 100): from the sticky header's hash when there is one (stable across processes and
    restarts, unlike ``hash()``), else random."""
    if route.sticky_header is not None:
        value = header(route.sticky_header)
        if value is not None:
            return (zlib.crc32(value.encode()) % 10000) / 100.0
    return rand() * 100.0


def _weighted(to: tuple[Destination, ...], point: float) -> Destination:
    upto = 0.0
    for dest in to:
        upto += dest.weight
        if point < upto:
            return dest
    return to[-1]


def choose(rules: ServiceRules, method: str, path: str, header: HeaderLookup, rand: Callable[[], float]) -> RouteChoice:
    for route in rules.routes:
        if _matches(route, method, path, header):
            to = route.to
            dest = to[0] if len(to) == 1 else _weighted(to, _position(route, header, rand))
            return RouteChoice(route, dest.subset)
    return DEFAULT_CHOICE
