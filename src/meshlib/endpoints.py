"""Endpoints (one instance of a service) and immutable snapshots of a service's endpoints."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("meshlib.discovery")


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


def snapshot_to_json(snapshot: EndpointSet) -> dict[str, Any]:
    """The form last-known endpoints are saved in (and the embedded registry's watch answer)."""
    return {
        "index": snapshot.index,
        "instances": [
            {"id": e.id, "address": e.address, "port": e.port, "tags": sorted(e.tags), "meta": dict(e.meta)}
            for e in snapshot.endpoints
        ],
    }


def snapshot_from_json(service: str, payload: Mapping[str, Any], index: int) -> EndpointSet:
    """Instances as the registry answers them (or as saved); malformed ones are skipped with a warning."""
    endpoints = []
    for item in payload.get("instances", []):
        try:
            endpoints.append(
                Endpoint(
                    str(item["address"]),
                    int(item["port"]),
                    frozenset(item.get("tags") or ()),
                    dict(item.get("meta") or {}),
                    id=str(item.get("id", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            _log.warning("ignoring malformed instance of %s: %r (%s)", service, item, exc)
    return EndpointSet.of(service, endpoints, index)
