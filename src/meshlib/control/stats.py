"""The control plane's book of golden signals: reports from instances in, per-edge and per-service figures out.

Instances push cumulative figures (see ``meshlib.telemetry.report``); the book keeps each instance's previous
report to turn them into increments, and adds those into one ``Ring`` per series, where a series is a direction,
a service, its peer and a route, summed over instances. Everything is bounded: instances, series, rows per report,
and how long a silent instance is remembered. Only the event loop touches the book (no lock needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .stats_report import Report, Row
from .stats_ring import SLOT_SECONDS, SLOTS, Ring, Window, covered, slot_of

MAX_INSTANCES = 5000
MAX_SERIES = 2000
#: Rows (histograms, counters, open breakers) kept over all instances' last reports: the book's memory is bounded
#: by this whatever the number of reporters (a full report is 8,000 rows; an ordinary instance's a few dozen).
MAX_BOOK_ROWS = 120_000
#: An instance is "silent" when three of its report intervals (at least this long) pass without a report; after
#: FORGET_AFTER it is dropped.
SILENT_AFTER = 1.5
FORGET_AFTER = 600.0
WINDOW = 60.0
OUTSIDE = "(outside the mesh)"
#: The peer of inbound figures from a side that cannot tell its callers apart (an Envoy sidecar's inbound
#: listener): in the service's figures, never an edge (its callers report their own).
ANY_CALLER = "(any caller)"

#: (direction, service, peer, route); direction is "in", "out", "mirror" or a counter name.
SeriesKey = tuple[str, str, str, str]


def _failed(direction: str, row: Row) -> bool:
    status, extra = row.key[2], row.key[3]
    if direction == "out":
        return extra not in ("success", "client-error", "cancelled")
    return status in ("5xx", "error")


@dataclass(slots=True)
class InstanceState:
    report: Report
    last_seen: float  # wall clock of the last report
    rps: float = 0.0
    errors_per_s: float = 0.0
    first_seen: float = field(default_factory=time.time)
    #: Each estimate's share of the attempts its caller sent to that destination since the previous report (aligned
    #: with ``report.estimates``; over all attempts so far for a first report).
    shares: tuple[float, ...] = ()


class StatsBook:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.instances: dict[str, InstanceState] = {}
        self.series: dict[SeriesKey, Ring] = {}
        self.dropped_series = 0
        self.reports = 0
        #: Rows held in the kept reports (see MAX_BOOK_ROWS).
        self.rows = 0
        #: Since when figures are collected (rates over a young book divide by its age, not a full minute).
        self.since: float | None = None

    # -- ingestion ----------------------------------------------------------------------------------

    def ingest(self, report: Report) -> bool:
        """Add one report; False when the instance cap is reached (the report is not kept)."""
        now = self.clock()
        self.forget(now)
        previous = self.instances.get(report.instance)
        if previous is None and len(self.instances) >= MAX_INSTANCES:
            return False
        held = previous.report.size() if previous is not None else 0
        if self.rows - held + report.size() > MAX_BOOK_ROWS:
            return False
        self.rows += report.size() - held
        if previous is not None and (
            previous.report.started != report.started or previous.report.service != report.service
        ):
            previous = None  # a restart (or a reused id): its counts began again from zero
        old = previous.report if previous is not None else None
        state = InstanceState(report, now)
        if previous is None and now - report.started > 2 * report.interval + 2:
            # first heard of long after it started (a restarted control plane, a forgotten instance): when its
            # counts accrued is unknown, so this report is only the baseline the next one is measured from
            self.instances[report.instance] = state
            self.reports += 1
            return True
        if self.since is None:
            self.since = max(report.started, now - 60.0) if previous is None else previous.last_seen
        inbound = self._add_rows("in", report, report.inbound, old.inbound if old else (), now)
        self._add_rows("out", report, report.outbound, old.outbound if old else (), now)
        for (name, peer), value in report.counters.items():
            before = old.counters.get((name, peer), 0.0) if old else 0.0
            delta = value - before if value >= before else value
            if delta > 0:
                ring = self._ring((name, report.service, peer, ""), False)
                if ring is not None:
                    ring.add(now, delta, 0.0)
        state.shares = _shares(report, old, previous.shares if previous is not None else ())
        if previous is not None:
            state.first_seen = previous.first_seen
            elapsed = max(now - previous.last_seen, 0.001)
            state.rps = inbound[0] / elapsed
            state.errors_per_s = inbound[1] / elapsed
        self.instances[report.instance] = state
        self.reports += 1
        return True

    def _add_rows(
        self,
        direction: str,
        report: Report,
        rows: tuple[Row, ...],
        old_rows: tuple[Row, ...],
        now: float,
    ) -> tuple[float, float]:
        before = {r.key: r for r in old_rows}
        added = failed = 0.0
        for row in rows:
            prev = before.get(row.key)
            if prev is not None and row.count >= prev.count:
                count = row.count - prev.count
                total = max(row.total - prev.total, 0.0)
                buckets = [max(a - b, 0) for a, b in zip(row.buckets, prev.buckets, strict=True)]
            else:
                count, total, buckets = row.count, row.total, list(row.buckets)
            if count <= 0:
                continue
            kind = "mirror" if direction == "in" and row.key[3] == "1" else direction
            ring = self._ring((kind, report.service, row.key[0], row.key[1]), True)
            errors = count if _failed(direction, row) else 0
            if ring is not None:
                ring.add(now, count, errors, total, buckets)
            if kind == "in":
                added += count
                failed += errors
        return added, failed

    def _ring(self, key: SeriesKey, with_buckets: bool) -> Ring | None:
        ring = self.series.get(key)
        if ring is None:
            if len(self.series) >= MAX_SERIES:
                self.dropped_series += 1
                return None
            ring = self.series[key] = Ring(with_buckets)
        return ring

    def forget(self, now: float) -> None:
        """Drop instances silent for FORGET_AFTER, and series with nothing in their 15 minutes."""
        for instance_id in [i for i, s in self.instances.items() if now - s.last_seen > FORGET_AFTER]:
            self.rows -= self.instances.pop(instance_id).report.size()
        oldest = slot_of(now) - SLOTS
        if len(self.series) >= MAX_SERIES:
            for key in [k for k, r in self.series.items() if max(r.slots) <= oldest]:
                del self.series[key]

    # -- queries ------------------------------------------------------------------------------------

    @staticmethod
    def figures_empty() -> dict[str, Any]:
        return {"requests": 0, "rps": 0.0, "success": None, "p50_ms": None, "p99_ms": None, "denied": 0}

    @staticmethod
    def figures(window: Window, covered: float, denied: float = 0.0) -> dict[str, Any]:
        """The golden signals of a window: None where there is no data yet (the page says so). ``denied``: the
        requests among them refused by authorization (403 from the callee's strict rule), which are no success."""
        if window.count <= 0:
            return StatsBook.figures_empty()
        p50, p99 = window.quantile_ms(0.5), window.quantile_ms(0.99)
        denied = min(denied, window.count - window.errors)
        return {
            "requests": int(window.count),
            "rps": round(window.count / covered, 3),
            "success": round(max(window.count - window.errors - denied, 0.0) / window.count, 5),
            "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3),
            "denied": int(denied),
        }

    def refused(self, now: float, group: Callable[[str, str], Any]) -> dict[Any, float]:
        """Requests refused by authorization over the last minute, summed per ``group(callee, caller)``."""
        out: dict[Any, float] = {}
        for key, ring in self.series.items():
            if key[0] == "authz_refused":
                g = group(key[1], key[2])
                out[g] = out.get(g, 0.0) + ring.window(now, WINDOW).count
        return out

    def _timeline(
        self, match: Callable[[SeriesKey], bool], now: float, refused: Callable[[SeriesKey], bool] | None = None
    ) -> list[dict[str, Any]]:
        """One point per whole slot over the 15 minutes (oldest first); slots without data have zero requests.
        The slot in progress is left out: it holds only the reports that arrived so far (instances report every
        few seconds), so drawing it dropped every chart's right edge towards 0 after each slot boundary.
        ``refused`` picks the authorization-refusal counters that come off each point's success."""
        current = slot_of(now)
        points = []
        rings = [r for k, r in self.series.items() if match(k)]
        refusals = [r for k, r in self.series.items() if refused is not None and refused(k)]
        for slot in range(current - SLOTS + 1, current):
            w = Window()
            for ring in rings:
                s = ring.slot(slot)
                if s is not None:
                    w.add(s)
            denied = sum(r.count for ring in refusals if (r := ring.slot(slot)) is not None)
            point = self.figures(w, SLOT_SECONDS, denied)
            point["t"] = slot * SLOT_SECONDS
            points.append(point)
        return points

    @staticmethod
    def status(state: InstanceState, now: float) -> str:
        """``silent`` once three of the instance's own report intervals passed without a report."""
        return "reporting" if now - state.last_seen <= max(SILENT_AFTER, 3 * state.report.interval) else "silent"

    def reporters(self, service: str) -> list[InstanceState]:
        return [s for s in self.instances.values() if s.report.service == service]

    def services(self) -> set[str]:
        names = {s.report.service for s in self.instances.values()}
        names |= {k[1] for k in self.series}
        names |= {k[2] for k in self.series if k[0] == "out" and k[2]}
        return names

    def _grouped(self, now: float, group: Callable[[SeriesKey], Any]) -> dict[Any, tuple[Window, float]]:
        """One pass over the series: the last minute's figures summed per ``group(key)`` (None: left out)."""
        out: dict[Any, tuple[Window, float]] = {}
        seconds = covered(now, WINDOW, self.since if self.since is not None else now)
        for key, ring in self.series.items():
            g = group(key)
            if g is None:
                continue
            window = out[g][0] if g in out else Window()
            window.add(ring.window(now, WINDOW))
            out[g] = (window, seconds)
        return out

    def edges(self, now: float) -> list[dict[str, Any]]:
        """caller -> callee over the last minute: the caller's view where it reports, else the callee's."""
        outbound = self._grouped(now, lambda k: (k[1], k[2]) if k[0] == "out" else None)
        inbound = self._grouped(now, lambda k: (k[2], k[1]) if k[0] == "in" and k[2] != ANY_CALLER else None)
        views = {pair: ("caller", figures) for pair, figures in outbound.items()}
        for pair, figures in inbound.items():
            views.setdefault(pair, ("callee", figures))
        identities: dict[str, set[str]] = {}
        verified: dict[tuple[str, str], set[str]] = {}
        for state in self.instances.values():
            r = state.report
            if r.identity:
                identities.setdefault(r.service, set()).add(r.identity)
            for peer, uri in r.verified_peers.items():
                verified.setdefault((peer, r.service), set()).add(uri)
        refused = self.refused(now, lambda callee, caller: (caller, callee))
        edges = []
        for (source, destination), (seen_by, (window, seconds)) in sorted(views.items()):
            if window.count <= 0:
                continue
            source_ids = sorted(verified.get((source, destination), ()))
            callee_ids = sorted(identities.get(destination, ()))
            edges.append(
                {
                    "source": source or OUTSIDE,
                    "destination": destination,
                    "seen_by": seen_by,
                    "mtls": bool(source_ids),
                    "source_identity": source_ids[0] if source_ids else None,
                    "destination_identity": callee_ids[0] if callee_ids else None,
                    **self.figures(window, seconds, refused.get((source, destination), 0.0)),
                }
            )
        return edges

    def service_figures(self, now: float) -> dict[str, dict[str, Any]]:
        """Every service's inbound golden signals over the last minute (mirrored copies left out)."""
        grouped = self._grouped(now, lambda k: k[1] if k[0] == "in" else None)
        refused = self.refused(now, lambda callee, caller: callee)
        return {name: self.figures(w, c, refused.get(name, 0.0)) for name, (w, c) in grouped.items()}

    def routes(self, direction: str, service: str, now: float) -> list[dict[str, Any]]:
        """Per (peer, route) figures of one service's inbound, outbound or mirrored traffic."""
        grouped = self._grouped(now, lambda k: k[2:] if k[0] == direction and k[1] == service else None)
        return [
            {"peer": peer or OUTSIDE, "route": route or "/", **self.figures(w, c)}
            for (peer, route), (w, c) in sorted(grouped.items())
            if w.count > 0
        ]

    def counters(self, service: str, now: float) -> dict[str, dict[str, float]]:
        """Counter name -> peer -> count over the last minute and the last 15 (``*_15m``)."""
        out: dict[str, dict[str, float]] = {}
        for key, ring in self.series.items():
            if key[1] != service or key[0] in ("in", "out", "mirror"):
                continue
            minute = ring.window(now, WINDOW).count
            quarter = ring.window(now, SLOTS * SLOT_SECONDS).count
            out.setdefault(key[0], {})[key[2] or OUTSIDE] = minute
            out.setdefault(key[0] + "_15m", {})[key[2] or OUTSIDE] = quarter
        return out

    def timeline(self, direction: str, service: str, now: float) -> list[dict[str, Any]]:
        refused = (lambda k: k[0] == "authz_refused" and k[1] == service) if direction == "in" else None
        return self._timeline(lambda k: k[0] == direction and k[1] == service, now, refused)

    def estimates(self, service: str) -> list[dict[str, Any]]:
        """What every caller's balancer sees of ``service``'s endpoints: latency estimate, attempts in flight,
        breaker state and the caller's share of attempts sent to each (``meshctl diagnostics endpoints``)."""
        rows = []
        for state in self.instances.values():
            report = state.report
            for i, (destination, authority, breaker, latency, outstanding, _) in enumerate(report.estimates):
                if destination == service:
                    share = state.shares[i] if i < len(state.shares) else 0.0
                    rows.append(
                        {
                            "caller": report.instance,
                            "caller_service": report.service,
                            "endpoint": authority,
                            "latency_ms": latency,
                            "outstanding": outstanding,
                            "breaker": breaker,
                            "share": round(share, 4),
                        }
                    )
        rows.sort(key=lambda r: (r["caller"], r["endpoint"]))
        return rows

    def breaker_views(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, str]]]:
        """For each (service, ``address:port``) in ``wanted``: which callers see its breaker not closed. One pass
        over the rows, keeping only the endpoints asked about (reports may name any number of others)."""
        views: dict[tuple[str, str], list[dict[str, str]]] = {}
        for state in self.instances.values():
            caller = state.report.instance
            for destination, authority, breaker in state.report.endpoints:
                key = (destination, authority)
                if key in wanted:
                    views.setdefault(key, []).append({"caller": caller, "state": breaker})
        return views


def _shares(report: Report, old: Report | None, old_shares: tuple[float, ...]) -> tuple[float, ...]:
    """Each estimate's share of its destination's attempts between ``old`` and ``report`` (counts that went
    down, a restart, count from zero). A destination not called since ``old`` keeps the shares it had then, so the
    view shows the last traffic it saw rather than zeros."""
    if not report.estimates:
        return ()
    before = {(e[0], e[1]): e[5] for e in old.estimates} if old is not None else {}
    kept = {(e[0], e[1]): s for e, s in zip(old.estimates, old_shares, strict=False)} if old is not None else {}
    deltas = []
    totals: dict[str, int] = {}
    for destination, authority, _, _, _, sent in report.estimates:
        prior = before.get((destination, authority), 0)
        delta = sent - prior if sent >= prior else sent
        deltas.append(delta)
        totals[destination] = totals.get(destination, 0) + delta
    return tuple(
        d / totals[e[0]] if totals[e[0]] else kept.get((e[0], e[1]), 0.0)
        for d, e in zip(deltas, report.estimates, strict=True)
    )
