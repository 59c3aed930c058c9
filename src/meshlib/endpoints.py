"""Endpoints (one instance of a service) and immutable snapshots of a service's endpoints."""

from __future__ import annotations

import ipaddress
import logging
import re
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


class SnapshotError(ValueError):
    """A discovery answer (or a cached one) is not a valid list of instances; the last good snapshot stays."""


#: Most instances one snapshot may list; a larger answer is refused rather than held.
MAX_INSTANCES = 10_000
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def valid_address(address: object) -> bool:
    """An IP address or a DNS host name."""
    if not isinstance(address, str):
        return False
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return _HOSTNAME.match(address) is not None


def endpoint_from_fields(address: object, port: object, tags: object, meta: object, instance_id: object) -> Endpoint:
    """One instance, validated field by field; SnapshotError naming the bad field."""
    if not valid_address(address):
        raise SnapshotError(f"address {str(address)[:80]!r} is neither an IP address nor a host name")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SnapshotError(f"port {str(port)[:20]!r} is not an integer from 1 to 65535")
    tags = [] if tags is None else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise SnapshotError("tags must be a list of strings")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SnapshotError("meta must be an object of strings")
    if instance_id is None:
        instance_id = ""
    if not isinstance(instance_id, str):
        raise SnapshotError("id must be a string")
    assert isinstance(address, str)
    return Endpoint(address, port, frozenset(tags), dict(meta), id=instance_id)


def parse_snapshot(service: str, payload: object, index: int) -> EndpointSet:
    """The registry's answer (or the saved form) as a snapshot, validated whole: SnapshotError, saying what is
    wrong, rather than a partial or surprising list."""
    if not isinstance(payload, Mapping):
        raise SnapshotError(f"expected a JSON object with instances, got {type(payload).__name__}")
    instances = payload.get("instances", [])
    if not isinstance(instances, list):
        raise SnapshotError(f"instances must be a list, got {type(instances).__name__}")
    if len(instances) > MAX_INSTANCES:
        raise SnapshotError(f"{len(instances)} instances is over the limit of {MAX_INSTANCES}")
    endpoints = []
    for i, item in enumerate(instances):
        if not isinstance(item, Mapping):
            raise SnapshotError(f"instances[{i}] is not an object")
        try:
            endpoints.append(
                endpoint_from_fields(item.get("address"), item.get("port"), item.get("tags"), item.get("meta"),
                                     item.get("id"))
            )
        except SnapshotError as exc:
            raise SnapshotError(f"instances[{i}]: {exc}") from None
    return EndpointSet.of(service, endpoints, index)
