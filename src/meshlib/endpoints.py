"""Endpoints (one instance of a service) and immutable snapshots of a service's endpoints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One reachable instance. Equality is by identity of the instance (id, address, port), not by tags."""

    address: str
    port: int
    tags: frozenset[str] = frozenset()
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    weight: int = 1
    id: str = ""

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("endpoint address is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint port {self.port!r} is out of range 1-65535")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.address, self.port, self.id)

    @property
    def authority(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.authority


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """A snapshot of one service's healthy endpoints, as discovery last reported them."""

    service: str
    endpoints: tuple[Endpoint, ...]
    #: Discovery's own version of this snapshot (Consul index, registry index); 0 when it has none.
    index: int = 0

    @classmethod
    def of(cls, service: str, endpoints: Iterable[Endpoint], index: int = 0) -> EndpointSet:
        return cls(service, tuple(sorted(set(endpoints), key=lambda e: e.key)), index)

    def same_members(self, other: EndpointSet | None) -> bool:
        """True when both hold the same instances with the same tags, meta and weight (index aside)."""
        if other is None or len(other.endpoints) != len(self.endpoints):
            return False
        return all(
            a == b and a.tags == b.tags and a.meta == b.meta and a.weight == b.weight
            for a, b in zip(self.endpoints, other.endpoints, strict=True)
        )
