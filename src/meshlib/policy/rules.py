"""The compiled rules of one destination service, as the call path reads them: routes, subsets, faults,
authorization and the service's policy. Immutable; a rule change swaps in new objects.

These are the policy core's own types: ``rules/`` validates documents and builds them, and depends on ``policy/``,
never the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .config import ServicePolicy


class Matcher(Protocol):
    """A compiled header regex (RE2, from ``rules/regex.py``)."""

    def fullmatch(self, text: str) -> object | None: ...


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case
    exact: str | None = None
    prefix: str | None = None
    regex: Matcher | None = None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        assert self.regex is not None
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Destination:
    subset: str | None  # None: every endpoint of the service
    weight: int  # out of 100


@dataclass(frozen=True, slots=True)
class Mirror:
    """Send a copy of ``percent`` of a route's requests to ``subset`` (fire and forget)."""

    subset: str
    percent: float


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    headers: tuple[HeaderMatch, ...]
    path_prefix: str | None
    methods: frozenset[str] | None
    to: tuple[Destination, ...]
    sticky_header: str | None
    retry_non_idempotent: bool | None
    mirror: Mirror | None = None
    #: the rule's ``name:`` (what metrics and spans call the route); unnamed routes go by position
    given_name: str | None = None

    @property
    def name(self) -> str:
        return self.given_name or f"route[{self.index}]"


@dataclass(frozen=True, slots=True)
class Subset:
    tags: frozenset[str]
    meta: Mapping[str, str]

    def selects(self, tags: frozenset[str], meta: Mapping[str, str]) -> bool:
        return self.tags <= tags and all(meta.get(k) == v for k, v in self.meta.items())


@dataclass(frozen=True, slots=True)
class Faults:
    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_status: int = 503


@dataclass(frozen=True, slots=True)
class Authorization:
    mode: str = "off"  # strict | permissive | off
    allow: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ServiceRules:
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    subsets: Mapping[str, Subset] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    faults: Faults | None = None
    authorization: Authorization | None = None
