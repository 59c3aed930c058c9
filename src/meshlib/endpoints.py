"""Endpoints (one instance of a service) and immutable snapshots of a service's endpoints."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .addresses import UnsafeAddress, is_hostname, normalised, numeric_ip
from .logsafe import Throttle, printable

log = logging.getLogger("meshlib.discovery")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One reachable instance. Equality is by identity of the instance (id, address, port), not by tags."""

    address: str
    port: int
    tags: frozenset[str] = frozenset()
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    weight: int = 1
    id: str = ""
    #: The instance's zone (its ``zone`` meta; "" when it names none): callers in the same zone prefer it.
    zone: str = field(default="", compare=False, hash=False)
    #: (address, port, id): what channels and balancer state are kept by. Made once, not on every call that looks
    #: its endpoint's channel up.
    key: tuple[str, int, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("endpoint address is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint port {self.port!r} is out of range 1-65535")
        object.__setattr__(self, "key", (self.address, self.port, self.id))

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
            {
                "id": e.id,
                "address": e.address,
                "port": e.port,
                "tags": sorted(e.tags),
                "meta": dict(e.meta),
                "weight": e.weight,
            }
            for e in snapshot.endpoints
        ],
    }


class SnapshotError(ValueError):
    """A discovery answer (or a cached one) is not a valid list of instances; the last good snapshot stays."""


class UnsafeEndpoint(SnapshotError):
    """An instance listed at an address that is never dialed (unspecified, link-local, multicast): that instance is
    left out, the rest of the answer is used."""


#: Most instances one snapshot may list; a larger answer is refused rather than held.
MAX_INSTANCES = 10_000
#: The meta keys an instance's zone and load-balancing weight are read from (Consul's ``Weights.Passing`` too).
ZONE_META = "zone"
WEIGHT_META = "weight"
#: Largest weight an instance may have (Envoy's and the mesh's balancers take it as a relative share).
MAX_WEIGHT = 10_000
_ZONE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})")


def zone_problem(zone: str) -> str | None:
    """Why ``zone`` is not a zone name (1-63 letters, digits, ``.``, ``_``, ``-``), or None."""
    if _ZONE.fullmatch(zone) is None:
        return f"zone {zone[:80]!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def as_weight(value: object) -> int:
    """``value`` (an int, or its decimal string as meta holds it) as a weight from 1 to MAX_WEIGHT; ValueError
    saying what is wrong."""
    weight = value
    if isinstance(weight, str) and weight.isascii() and weight.isdigit() and len(weight) <= 6:
        weight = int(weight)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= MAX_WEIGHT:
        raise ValueError(f"weight {str(value)[:20]!r} must be an integer from 1 to {MAX_WEIGHT}")
    return weight


def valid_address(address: object) -> bool:
    """An IP address (in any numeric spelling) or a DNS host name."""
    return isinstance(address, str) and (numeric_ip(address) is not None or is_hostname(address))


def endpoint_from_fields(
    address: object, port: object, tags: object, meta: object, instance_id: object, weight: object = None
) -> Endpoint:
    """One instance, validated field by field; SnapshotError naming the bad field (UnsafeEndpoint for an address
    that must not be dialed). ``weight`` (Consul's ``Weights.Passing``) else the ``weight`` meta, else 1; a zone or
    weight that is not valid is ignored (the instance still counts, as a zoneless one of weight 1) and logged."""
    if not isinstance(address, str):
        raise SnapshotError(f"address {str(address)[:80]!r} is neither an IP address nor a host name")
    try:
        address = normalised(address)
    except UnsafeAddress as exc:
        raise UnsafeEndpoint(f"address {exc}: left out") from None
    except ValueError as exc:
        raise SnapshotError(f"address {exc}") from None
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
    zone = meta.get(ZONE_META, "")
    if zone and (problem := zone_problem(zone)) is not None:
        _bad_placement(instance_id or f"{address}:{port}", problem)
        zone = ""
    try:
        share = as_weight(meta.get(WEIGHT_META, 1) if weight is None else weight)
    except ValueError as exc:
        _bad_placement(instance_id or f"{address}:{port}", str(exc))
        share = 1
    return Endpoint(address, port, frozenset(tags), dict(meta), share, instance_id, zone)


_BAD_PLACEMENT = Throttle(60.0)


def _bad_placement(instance: str, problem: str) -> None:
    held = _BAD_PLACEMENT.allow(instance)
    if held is not None:
        log.warning("discovery: instance %s: %s; ignored", printable(instance), printable(problem))


_SKIPPED = Throttle(60.0)


def skip_unsafe(service: str, where: str, exc: UnsafeEndpoint) -> None:
    """Log (once a minute per service) an instance left out of a discovery answer for its address."""
    held = _SKIPPED.allow(service)
    if held is not None:
        log.warning(
            "discovery: %s of %s: %s%s",
            where,
            service,
            printable(str(exc)),
            f" ({held} more since the last line)" if held else "",
        )


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
                endpoint_from_fields(
                    item.get("address"),
                    item.get("port"),
                    item.get("tags"),
                    item.get("meta"),
                    item.get("id"),
                    item.get("weight"),
                )
            )
        except UnsafeEndpoint as exc:
            skip_unsafe(service, f"instances[{i}]", exc)
        except SnapshotError as exc:
            raise SnapshotError(f"instances[{i}]: {exc}") from None
    return EndpointSet.of(service, endpoints, index)
