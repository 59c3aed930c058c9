"""Validation of an instance's stats report (``POST /v1/stats/report``): untrusted input, checked for shape, types,
sizes and finiteness before any of it is kept. Errors name the field, so a mismatched meshlib version is easy to
spot. A bad *row* (a peer that is not a service name, a miscounted histogram) loses that row, not the report: the
answer lists what was refused, and the reporter logs it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..settings import validate_service_name
from ..telemetry.metrics import LATENCY_BUCKETS, UNVERIFIED_PEER

MAX_REPORT_BYTES = 256 << 10
MAX_ROWS = 2000
MAX_COUNTER_ROWS = 1000
MAX_ENDPOINT_ROWS = 4096
MAX_PEERS = 1000
TLS_MODES = ("off", "permissive", "strict")
COUNTER_NAMES = frozenset(
    ("retries", "budget_exhausted", "ejections", "authz_denied", "authz_refused", "mirror_dropped", "mirror_skipped")
)
BREAKER_STATES = frozenset(("closed", "open", "half-open"))
#: Refused rows named in the answer, at most.
MAX_REFUSED_LISTED = 10


class ReportError(ValueError):
    """The report is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Row:
    """One cumulative histogram: ``key`` is (peer, route, status class, mirrored or outcome)."""

    key: tuple[str, str, str, str]
    count: int
    total: float
    buckets: tuple[int, ...]


#: (destination service, address:port, breaker state, latency estimate in ms, attempts in flight, attempts sent).
Estimate = tuple[str, str, str, float, int, int]


@dataclass(frozen=True, slots=True)
class Report:
    instance: str
    service: str
    address: str | None
    port: int | None
    started: float
    tls: str
    identity: str | None
    rules_version: int
    #: Seconds between this instance's reports (it is "silent" after three missed ones).
    interval: float
    inbound: tuple[Row, ...]
    outbound: tuple[Row, ...]
    counters: dict[tuple[str, str], float]
    verified_peers: dict[str, str]
    #: (destination service, address:port, breaker state) for every breaker that is not closed.
    endpoints: tuple[tuple[str, str, str], ...]
    #: What was refused row by row (the first few), for the answer.
    refused: tuple[str, ...] = ()
    #: What this caller's balancer sees of each endpoint it calls.
    estimates: tuple[Estimate, ...] = ()

    def size(self) -> int:
        """Rows this report keeps, for the book's total budget."""
        return len(self.inbound) + len(self.outbound) + len(self.counters) + len(self.endpoints) + len(self.estimates)


def _text(value: Any, where: str, limit: int = 256, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ReportError(f"{where}: expected a string of at most {limit} characters")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ReportError(f"{where}: expected a whole number from 0 to 2^53")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ReportError(f"{where}: expected a finite number of at least 0")
    return float(value)


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise ReportError(f"{where}: expected a list of at most {limit} items")
    return value


def _peer(value: Any, where: str) -> str:
    """A row's peer: empty (no mesh caller), the unverified-caller label, or a valid service name; never free text."""
    if value == "" or value == UNVERIFIED_PEER:
        return str(value)
    if not isinstance(value, str):
        raise ReportError(f"{where}: expected a service name")
    try:
        return validate_service_name(value)
    except ConfigurationError:
        raise ReportError(f"{where}: {value[:80]!r} is not a service name") from None


class _Refusals:
    def __init__(self) -> None:
        self.count = 0
        self.listed: list[str] = []

    def add(self, exc: ReportError) -> None:
        self.count += 1
        if len(self.listed) < MAX_REFUSED_LISTED:
            self.listed.append(str(exc))

    def summary(self) -> tuple[str, ...]:
        more = self.count - len(self.listed)
        return (*self.listed, f"... and {more} more") if more > 0 else tuple(self.listed)


def _rows(value: Any, where: str, fourth: str, refusals: _Refusals) -> tuple[Row, ...]:
    rows = []
    for i, raw in enumerate(_list(value, where, MAX_ROWS)):
        try:
            rows.append(_row(raw, f"{where}[{i}]", fourth))
        except ReportError as exc:
            refusals.add(exc)
    return tuple(rows)


def _row(raw: Any, at: str, fourth: str) -> Row:
    n_buckets = len(LATENCY_BUCKETS) + 1
    if not isinstance(raw, list) or len(raw) != 7:
        raise ReportError(f"{at}: expected [peer, route, status class, {fourth}, count, sum, buckets]")
    peer, route, status, extra, count, total, buckets = raw
    if fourth == "mirrored":
        if extra not in (0, 1) or isinstance(extra, bool):
            raise ReportError(f"{at}: mirrored must be 0 or 1")
        extra = str(extra)
    bucket_list = _list(buckets, f"{at}.buckets", n_buckets)
    if len(bucket_list) != n_buckets:
        raise ReportError(f"{at}.buckets: expected {n_buckets} bucket counts")
    counts = tuple(_count(c, f"{at}.buckets") for c in bucket_list)
    n = _count(count, f"{at}.count")
    if sum(counts) != n:
        raise ReportError(f"{at}: bucket counts do not add up to count")
    return Row(
        (
            _peer(peer, f"{at}.peer"),
            _text(route, f"{at}.route", 512),
            _text(status, f"{at}.status", 16),
            _text(extra, f"{at}.{fourth}", 32),
        ),
        n,
        _number(total, f"{at}.sum"),
        counts,
    )


def parse_report(body: Any) -> Report:
    """A report from its decoded JSON, or ReportError naming what is wrong."""
    if not isinstance(body, dict):
        raise ReportError("expected a JSON object")
    if body.get("v") != 1:
        raise ReportError(f"v: report version {body.get('v')!r} is not understood here (expected 1)")
    service = _text(body.get("service"), "service")
    try:
        validate_service_name(service)
    except ConfigurationError as exc:
        raise ReportError(f"service: {exc}") from None
    port = body.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ReportError("port: expected a port number or null")
    tls = body.get("tls")
    if tls not in TLS_MODES:
        raise ReportError(f"tls: expected one of {', '.join(TLS_MODES)}")
    bounds = body.get("buckets")
    if bounds != list(LATENCY_BUCKETS):
        raise ReportError("buckets: latency bucket bounds differ from this control plane's (mixed meshlib versions?)")
    refusals = _Refusals()
    counters: dict[tuple[str, str], float] = {}
    for i, raw in enumerate(_list(body.get("counters", []), "counters", MAX_COUNTER_ROWS)):
        try:
            if not isinstance(raw, list) or len(raw) != 3 or raw[0] not in COUNTER_NAMES:
                raise ReportError(f"counters[{i}]: expected [name, peer, value] with a known name")
            counters[(raw[0], _peer(raw[1], f"counters[{i}].peer"))] = _number(raw[2], f"counters[{i}].value")
        except ReportError as exc:
            refusals.add(exc)
    peers = body.get("verified_peers", {})
    if not isinstance(peers, dict) or len(peers) > MAX_PEERS:
        raise ReportError(f"verified_peers: expected an object of at most {MAX_PEERS} entries")
    verified: dict[str, str] = {}
    for k, v in peers.items():
        try:
            verified[_peer(k, "verified_peers")] = _text(v, "verified_peers", 512)
        except ReportError as exc:
            refusals.add(exc)
    endpoints = []
    estimates: list[Estimate] = []
    for i, raw in enumerate(_list(body.get("endpoints", []), "endpoints", MAX_ENDPOINT_ROWS)):
        try:
            if not isinstance(raw, list) or len(raw) not in (3, 6) or raw[2] not in BREAKER_STATES:
                raise ReportError(
                    f"endpoints[{i}]: expected [service, address:port, breaker state, latency ms, outstanding, sent]"
                )
            destination = _peer(raw[0], f"endpoints[{i}]")
            authority = _text(raw[1], f"endpoints[{i}]", 300)
            if len(raw) == 6:
                latency = _number(raw[3], f"endpoints[{i}] latency")
                if not 0 <= latency <= 3.6e6:
                    raise ReportError(f"endpoints[{i}] latency: expected 0 to 3600000 ms")
                outstanding = _count(raw[4], f"endpoints[{i}] outstanding")
                sent = _count(raw[5], f"endpoints[{i}] sent")
                estimates.append((destination, authority, str(raw[2]), latency, outstanding, sent))
        except ReportError as exc:
            refusals.add(exc)
            continue
        if raw[2] != "closed":  # only open and half-open breakers are ever shown: closed ones are not kept
            endpoints.append((destination, authority, str(raw[2])))
    rules_version = body.get("rules_version", 0)
    interval = _number(body.get("interval", 2.0), "interval")
    if not 0.2 <= interval <= 3600:
        raise ReportError("interval: expected 0.2 to 3600 seconds")
    return Report(
        instance=_text(body.get("instance"), "instance"),
        service=service,
        address=_text(body.get("address"), "address", 255, optional=True),
        port=port,
        started=_number(body.get("started"), "started"),
        tls=str(tls),
        identity=_text(body.get("identity"), "identity", 512, optional=True),
        rules_version=_count(rules_version, "rules_version"),
        interval=interval,
        inbound=_rows(body.get("inbound", []), "inbound", "mirrored", refusals),
        outbound=_rows(body.get("outbound", []), "outbound", "outcome", refusals),
        counters=counters,
        verified_peers=verified,
        endpoints=tuple(endpoints),
        refused=refusals.summary(),
        estimates=tuple(estimates),
    )
