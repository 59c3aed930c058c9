"""Golden-signal summaries pushed to the control plane for its dashboard and ``/v1/stats``.

Why push, not pull: the control plane then never needs a client identity for strict-mTLS instances, works the
same whatever the discovery backend (Consul instances never heartbeat to it), and sees client-only processes
(scripts, workers) that serve no ``/-/mesh/metrics``. Each report is the instance's *cumulative* figures, so a
lost report loses nothing: the control plane takes the difference between two reports itself.

The report is built from what the request path already records (the in-process histograms and counters); the
request path pays nothing for it but one set lookup per inbound request that proves its caller's identity.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ..randomness import uniform
from ..settings import split_urls
from ..wire import refusal_text

if TYPE_CHECKING:
    from ..discovery.base import Registration
    from ..runtime import Runtime

log = logging.getLogger("meshlib.stats")

#: What the control plane accepts; bump when the layout changes.
REPORT_VERSION = 1
#: Counters reported by name: (report name, the MeshMetrics attribute).
COUNTERS = (
    ("retries", "retries"),
    ("budget_exhausted", "budget_exhausted"),
    ("ejections", "ejections"),
    ("authz_denied", "authz_denied"),
    ("mirror_dropped", "mirror_dropped"),
    ("mirror_skipped", "mirror_skipped"),
)
#: Endpoints reported per destination service (breaker states), and destinations per report.
MAX_ENDPOINTS = 256
MAX_DESTINATIONS = 128


def build_report(
    mesh: Runtime, instance: str, address: str | None, port: int | None, started: float, interval: float
) -> dict[str, Any]:
    """One instance's cumulative figures, merged over HTTP methods (the dashboard shows routes)."""
    tel = mesh.telemetry
    assert tel is not None
    metrics = tel.metrics
    inbound: dict[tuple[str, str, str, int], list[Any]] = {}
    for point in metrics.server_duration.points():
        a = point.attributes
        in_key = (
            a.get("mesh.peer_service", ""),
            a.get("http.route", ""),
            a.get("http.response.status_class", ""),
            1 if a.get("mesh.mirror") == "1" else 0,
        )
        _merge(inbound, in_key, point.count, point.sum, point.bucket_counts)
    outbound: dict[tuple[str, str, str, str], list[Any]] = {}
    for point in metrics.client_duration.points():
        a = point.attributes
        out_key = (
            a.get("mesh.peer_service", ""),
            a.get("mesh.route", ""),
            a.get("http.response.status_class", ""),
            a.get("mesh.outcome", ""),
        )
        _merge(outbound, out_key, point.count, point.sum, point.bucket_counts)
    counters: dict[tuple[str, str], float] = {}
    for name, attr in COUNTERS:
        for attrs, value in getattr(metrics, attr).points():
            counter_key = (name, attrs.get("mesh.peer_service", ""))
            counters[counter_key] = counters.get(counter_key, 0.0) + value
            if name == "authz_denied" and attrs.get("mesh.authz_mode") == "strict":
                # the requests answered 403 (permissive mode only logs what it would deny): the dashboard counts
                # them against the edge's success, which showed 100% for a caller refused every time
                refused = ("authz_refused", counter_key[1])
                counters[refused] = counters.get(refused, 0.0) + value
    endpoints = []
    now = mesh.clock()
    for destination, state in list(mesh.services.items())[:MAX_DESTINATIONS]:
        for handle in state.handles[:MAX_ENDPOINTS]:
            load = handle.load
            # what the balancer sees: breaker, latency estimate now (ms), attempts in flight, attempts sent so far
            endpoints.append(
                [
                    destination,
                    handle.label,
                    handle.breaker.state,
                    round(load.latency(now) * 1000, 3),
                    load.outstanding,
                    load.sent,
                ]
            )
    identity = mesh.identity
    return {
        "v": REPORT_VERSION,
        "instance": instance,
        "service": mesh.service,
        "address": address,
        "port": port,
        "started": started,
        "interval": interval,
        "tls": mesh.settings.tls,
        "identity": identity.id.uri if identity is not None else None,
        "rules_version": mesh.rules.version,
        "buckets": list(metrics.server_duration.bounds),
        "inbound": [[*k, *v] for k, v in inbound.items()],
        "outbound": [[*k, *v] for k, v in outbound.items()],
        "counters": [[name, peer, value] for (name, peer), value in counters.items()],
        "verified_peers": dict(metrics.verified_peers),
        "endpoints": endpoints,
    }


def _merge(into: dict[Any, list[Any]], key: Any, count: int, total: float, buckets: list[int]) -> None:
    row = into.get(key)
    if row is None:
        into[key] = [count, total, list(buckets)]
        return
    row[0] += count
    row[1] += total
    row[2] = [a + b for a, b in zip(row[2], buckets, strict=True)]


@dataclass(slots=True)
class _Target:
    """One replica reports go to, with its own back-off."""

    http: httpx.Client
    failures: int = 0
    next_at: float = 0.0


class StatsReporter:
    """A daemon thread that posts this process's report every ``interval`` seconds; failures back off (to 30 s)
    quietly: the dashboard is not worth a log line per attempt, and the data plane never waits on it."""

    def __init__(
        self,
        mesh: Runtime,
        control_plane: str,
        interval: float,
        token: str = "",
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.mesh = mesh
        self.interval = interval
        self.started = time.time()
        self.instance = f"{mesh.service}@{socket.gethostname()}:{os.getpid()}"
        self.address: str | None = None
        self.port: int | None = None
        self.registration: Registration | None = None
        self.sent = 0
        self.failures = 0
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # Several replicas each get every report (figures are per replica, in memory): the dashboard of any of them
        # shows every instance, and one that restarts is complete again within a report. Each replica backs off on
        # its own, so a dead one costs the others nothing.
        self._targets = [
            _Target(
                httpx.Client(
                    base_url=url,
                    headers=headers,
                    timeout=httpx.Timeout(3.0),
                    trust_env=False,
                    verify=verify,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )
            )
            for url in split_urls(control_plane) or (control_plane.rstrip("/"),)
        ]
        self._stop = threading.Event()
        self._warned = False
        self._refused_quiet_until = 0.0
        self._thread = threading.Thread(target=self._run, name="meshlib-stats", daemon=True)

    def start(self) -> StatsReporter:
        self._thread.start()
        return self

    def serving(self, registration: Registration, address: str, port: int) -> None:
        """This process serves as a registered instance: report under the registration's id and address."""
        self.registration = registration
        self.address = address
        self.port = port

    def report(self) -> dict[str, Any]:
        instance = self.registration.id if self.registration is not None and self.registration.id else self.instance
        return build_report(self.mesh, instance, self.address, self.port, self.started, self.interval)

    def send_once(self) -> bool:
        """Send this report to every replica that is not backing off; True when one of them took it."""
        now = time.monotonic()
        due = [t for t in self._targets if t.next_at <= now] or self._targets
        credentials = self.registration.credentials() if self.registration is not None else {}
        body = json.dumps(self.report(), separators=(",", ":")).encode()
        delivered = False
        for target in due:
            if self._send(target, body, credentials):
                delivered = True
                target.failures = 0
                target.next_at = 0.0
            else:
                target.failures += 1
                target.next_at = now + min(30.0, self.interval * 2 ** min(target.failures, 5))
        if delivered:
            self.sent += 1
        return delivered

    def _send(self, target: _Target, body: bytes, credentials: dict[str, str]) -> bool:
        http = target.http
        try:
            r = http.post("/v1/stats/report", content=body, headers={"content-type": "application/json", **credentials})
        except httpx.HTTPError as exc:
            log.debug("stats report to %s failed: %s", http.base_url, exc)
            return False
        if r.status_code >= 400:
            if r.status_code in (401, 403) and not self._warned:
                self._warned = True  # once: a wrong token is worth saying, not every two seconds
                log.warning("the control plane refused this instance's stats report: %s", refusal_text(r))
            return False
        if r.status_code == 200:
            self._log_refused(r)
        return True

    def _log_refused(self, r: httpx.Response) -> None:
        """The control plane kept the report but refused some rows: said at most every 10 minutes."""
        try:
            refused = r.json().get("refused")
        except (ValueError, AttributeError):
            return
        now = time.monotonic()
        if refused and now >= self._refused_quiet_until:
            self._refused_quiet_until = now + 600.0
            shown = "; ".join(str(x)[:200] for x in list(refused)[:5])
            log.warning("the control plane refused part of this instance's stats report: %s", shown)

    def _run(self) -> None:
        delay = self.interval
        jitter: Callable[[], float] = uniform
        while not self._stop.wait(delay * (0.9 + 0.2 * jitter())):
            if self.send_once():
                self.failures = 0
                delay = self.interval
            else:
                self.failures += 1
                delay = min(30.0, self.interval * 2 ** min(self.failures, 5))

    def close(self) -> None:
        self._stop.set()
        for target in self._targets:
            target.http.close()
