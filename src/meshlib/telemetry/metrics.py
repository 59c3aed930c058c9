"""Golden-signal metrics with OpenTelemetry's names, units and buckets, aggregated in-process.

Why not record through the OTel SDK on the hot path: one SDK ``Histogram.record`` costs 18-28 us here (it sorts
and hashes the attribute set on every call), more than all of meshlib's own per-request work. So a request does one
cached-key lookup and a deque append (samples are sorted into buckets in batches); ``/-/mesh/metrics`` renders
Prometheus text from that; and when ``OTEL_METRICS_EXPORTER`` names an exporter, an SDK MeterProvider is fed off
the request path: counters and gauges through observable callbacks, histogram samples through a queue drained by a
background thread.
"""

from __future__ import annotations

import bisect
import collections
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .exporters import exporters, requested

#: Seconds. OTel's HTTP advisory buckets, with sub-millisecond ones added: a mesh hop lives there.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
#: A hard cap on label combinations per instrument.
MAX_SERIES = 10_000
#: The peer label of a caller that proved no identity: what it claims (``x-mesh-caller``) is never a label, so it
#: can neither forge an edge, blow up the series, nor make a report unacceptable.
UNVERIFIED_PEER = "(unverified)"


_STATUS_CLASSES = {status: f"{status // 100}xx" for status in range(100, 600)}


def status_class(status: int | None) -> str:
    """``2xx``...; ``error`` for no status (no response at all)."""
    if status is None:
        return "error"
    named = _STATUS_CLASSES.get(status)
    return named if named is not None else f"{status // 100}xx"


Labels = tuple[tuple[str, str], ...]


class HistogramSeries:
    """One label set's buckets (changed only under its histogram's lock)."""

    __slots__ = ("count", "counts", "labels", "sum")

    def __init__(self, labels: Labels, n_buckets: int) -> None:
        self.labels = labels
        self.counts = [0] * (n_buckets + 1)
        self.sum = 0.0
        self.count = 0


@dataclass
class HistogramPoint:
    attributes: dict[str, str]
    bounds: tuple[float, ...]
    bucket_counts: list[int]  # per bucket, last is +Inf
    sum: float
    count: int

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (what Prometheus' histogram_quantile approximates)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, c in zip((*self.bounds, math.inf), self.bucket_counts, strict=True):
            seen += c
            if seen >= rank:
                return bound
        return math.inf


#: Samples a histogram takes before it sorts them into buckets (and on every read): one deque append per request.
FLUSH_AT = 256


class Histogram:
    """A histogram per label set. A sample is appended to a pending deque (thread-safe, no lock, no bucket search
    on the request path) and sorted into its series' buckets in batches, under the histogram's lock: when
    ``FLUSH_AT`` have piled up, and before every read, so a read always sees every sample recorded before it."""

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = bounds
        self._series: dict[Labels, HistogramSeries] = {}
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[float, Labels]] = collections.deque()
        self.sink: queue.SimpleQueue[tuple[str, float, Labels]] | None = None

    def record(self, value: float, labels: Labels) -> None:
        pending = self._pending
        pending.append((value, labels))
        if len(pending) >= FLUSH_AT:
            self.flush()
        if self.sink is not None:
            self.sink.put((self.name, value, labels))

    def flush(self) -> None:
        """Sort the pending samples into their series (those appended meanwhile wait for the next flush)."""
        pending = self._pending
        bounds = self.bounds
        with self._lock:
            series_of = self._series
            for _ in range(len(pending)):
                value, labels = pending.popleft()
                series = series_of.get(labels)
                if series is None:
                    if len(series_of) >= MAX_SERIES:
                        continue
                    series = series_of[labels] = HistogramSeries(labels, len(bounds))
                series.counts[bisect.bisect_left(bounds, value)] += 1
                series.sum += value
                series.count += 1

    def points(self) -> list[HistogramPoint]:
        self.flush()
        with self._lock:
            return [
                HistogramPoint(dict(series.labels), self.bounds, list(series.counts), series.sum, series.count)
                for series in self._series.values()
            ]


class Counter:
    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def add(self, amount: float, labels: Labels) -> None:
        with self._lock:
            if labels in self._values or len(self._values) < MAX_SERIES:
                self._values[labels] = self._values.get(labels, 0.0) + amount

    def points(self) -> list[tuple[dict[str, str], float]]:
        with self._lock:
            return [(dict(k), v) for k, v in self._values.items()]


class Gauge:
    def __init__(self, name: str, unit: str, description: str, read: Callable[[], float | None] | None = None):
        self.name = name
        self.unit = unit
        self.description = description
        self._values: dict[Labels, float] = {}
        self.read = read

    def set(self, value: float, labels: Labels) -> None:
        self._values[labels] = value

    def points(self) -> list[tuple[dict[str, str], float]]:
        out = [(dict(k), v) for k, v in list(self._values.items())]
        if self.read is not None:
            value = self.read()
            if value is not None:
                out.append(({}, value))
        return out


class MeshMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.client_duration = Histogram(
            "http.client.request.duration", "s", "Duration of mesh calls as the caller saw them, all attempts included."
        )
        self.server_duration = Histogram(
            "http.server.request.duration", "s", "Duration of inbound requests served by this instance."
        )
        self.retries = Counter("mesh.client.retries", "Retried attempts.")
        self.budget_exhausted = Counter("mesh.client.retry_budget_exhausted", "Retries refused by the retry budget.")
        self.breaker_transitions = Counter("mesh.client.breaker_transitions", "Circuit breaker state changes.")
        self.ejections = Counter("mesh.client.ejections", "Endpoints ejected by their circuit breaker.")
        self.authz_denied = Counter("mesh.server.authz_denied", "Inbound requests denied (or, permissive, would be).")
        self.mirror_dropped = Counter(
            "mesh.client.mirror_dropped", "Mirrored copies dropped: the mirror queue was full."
        )
        self.mirror_skipped = Counter(
            "mesh.client.mirror_skipped", "Requests a route would mirror but could not: a streamed (unreplayable) body."
        )
        self.rules_version = Gauge("mesh.rules.version", "", "Rules version applied.")
        self.cert_expiry = Gauge(
            "mesh.certificate.time_to_expiry", "s", "Seconds until this instance's certificate expires."
        )
        self.histograms = (self.client_duration, self.server_duration)
        self.counters = (
            self.retries,
            self.budget_exhausted,
            self.breaker_transitions,
            self.ejections,
            self.authz_denied,
            self.mirror_dropped,
            self.mirror_skipped,
        )
        self.gauges = (self.rules_version, self.cert_expiry)
        #: Callers whose certificate proved their identity: peer service -> SPIFFE ID (for the dashboard's mTLS
        #: edges). Bounded; written once per new caller, read by the stats reporter.
        self.verified_peers: dict[str, str] = {}
        self._client_labels: dict[tuple[str, str, str, str, str], Labels] = {}
        self._server_labels: dict[tuple[str, str, str, str, bool], Labels] = {}
        self._exporter: _OtelExport | None = None
        if requested("metrics"):
            made = exporters("metrics")
            if made:
                self._exporter = _OtelExport(self, made)

    def client_labels(self, peer: str, route: str, method: str, status: str, outcome: str) -> Labels:
        key = (peer, route, method, status, outcome)
        labels = self._client_labels.get(key)
        if labels is None:
            labels = (
                ("mesh.service", self.service),
                ("mesh.peer_service", peer),
                ("mesh.route", route),
                ("http.request.method", method),
                ("http.response.status_class", status),
                ("mesh.outcome", outcome),
            )
            if len(self._client_labels) < MAX_SERIES:
                self._client_labels[key] = labels
        return labels

    def server_labels(self, peer: str, route: str, method: str, status: str, mirrored: bool = False) -> Labels:
        key = (peer, route, method, status, mirrored)
        labels = self._server_labels.get(key)
        if labels is None:
            labels = (
                ("mesh.service", self.service),
                ("mesh.peer_service", peer),
                ("http.route", route),
                ("http.request.method", method),
                ("http.response.status_class", status),
            )
            if mirrored:  # a copy sent by a route's mirror: counted apart from the real traffic
                labels += (("mesh.mirror", "1"),)
            if len(self._server_labels) < MAX_SERIES:
                self._server_labels[key] = labels
        return labels

    def note_verified_peer(self, service: str, uri: str) -> None:
        if service not in self.verified_peers and len(self.verified_peers) < 1000:
            self.verified_peers[service] = uri

    def prometheus(self) -> str:
        return render_prometheus(self)

    def shutdown(self) -> None:
        if self._exporter is not None:
            self._exporter.shutdown()


# -- export to the OpenTelemetry SDK, off the request path -----------------------------------------


class _OtelExport:
    def __init__(self, metrics: MeshMetrics, made: list[Any]) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        readers: list[MetricReader] = [PeriodicExportingMetricReader(exporter) for exporter in made]
        self.provider = MeterProvider(
            metric_readers=readers, resource=Resource.create({"service.name": metrics.service})
        )
        meter = self.provider.get_meter("meshlib")

        def observe(
            points: Callable[[], list[tuple[dict[str, str], float]]],
        ) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(v, attrs) for attrs, v in points()]

            return callback

        for c in metrics.counters:
            meter.create_observable_counter(c.name, callbacks=[observe(c.points)], description=c.description)
        for g in metrics.gauges:
            meter.create_observable_gauge(g.name, callbacks=[observe(g.points)], unit=g.unit, description=g.description)
        self.queue: queue.SimpleQueue[tuple[str, float, Labels]] = queue.SimpleQueue()
        self.sdk_histograms = {}
        for h in metrics.histograms:
            h.sink = self.queue
            self.sdk_histograms[h.name] = meter.create_histogram(
                h.name, unit=h.unit, description=h.description, explicit_bucket_boundaries_advisory=h.bounds
            )
        self._running = True
        self._lock = threading.Lock()
        self._flushing = threading.Event()
        threading.Thread(target=self._drain, name="meshlib-otel-metrics", daemon=True).start()

    def _drain(self) -> None:
        while self._running:
            if self._flushing.is_set():  # let flush() have the lock (locks are not fair)
                time.sleep(0.01)
                continue
            # the lock is held while waiting, so a sample is never out of the queue but not yet recorded when
            # flush() runs (flush waits at most one wait; the request path never takes this lock)
            with self._lock:
                try:
                    name, value, labels = self.queue.get(timeout=0.25)
                except queue.Empty:
                    continue
                self.sdk_histograms[name].record(value, dict(labels))

    def _record_queued(self) -> None:
        self._flushing.set()
        try:
            with self._lock:
                while True:
                    try:
                        name, value, labels = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    self.sdk_histograms[name].record(value, dict(labels))
        finally:
            self._flushing.clear()

    def flush(self) -> None:
        """Record every queued sample, then have the SDK export now."""
        self._record_queued()
        self.provider.force_flush()

    def shutdown(self) -> None:
        """The last samples too: a process that makes its calls and exits exported no duration at all."""
        self._running = False
        self._record_queued()
        self.provider.shutdown()


# -- Prometheus text format -----------------------------------------------------------------------

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_UNIT_SUFFIX = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes"}


def _metric_name(name: str, unit: str) -> str:
    base = _INVALID.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not base.endswith(suffix):
        base += suffix
    return base


def _labels(attributes: dict[str, str], extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = [(_INVALID.sub("_", str(k)), str(v)) for k, v in attributes.items()] + list(extra)
    if not items:
        return ""
    return (
        "{"
        + ",".join(
            '{}="{}"'.format(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in items
        )
        + "}"
    )


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_prometheus(metrics: MeshMetrics) -> str:
    lines: list[str] = []
    for h in metrics.histograms:
        name = _metric_name(h.name, h.unit)
        lines += [f"# HELP {name} {h.description}", f"# TYPE {name} histogram"]
        for p in h.points():
            cumulative = 0
            for bound, count in zip(p.bounds, p.bucket_counts, strict=False):
                cumulative += count
                lines.append(f"{name}_bucket{_labels(p.attributes, (('le', _num(bound)),))} {cumulative}")
            lines.append(f"{name}_bucket{_labels(p.attributes, (('le', '+Inf'),))} {p.count}")
            lines.append(f"{name}_sum{_labels(p.attributes)} {_num(p.sum)}")
            lines.append(f"{name}_count{_labels(p.attributes)} {p.count}")
    for c in metrics.counters:
        name = _metric_name(c.name, "")
        lines += [f"# HELP {name}_total {c.description}", f"# TYPE {name}_total counter"]
        lines += [f"{name}_total{_labels(attrs)} {_num(v)}" for attrs, v in c.points()]
    for g in metrics.gauges:
        name = _metric_name(g.name, g.unit)
        lines += [f"# HELP {name} {g.description}", f"# TYPE {name} gauge"]
        lines += [f"{name}{_labels(attrs)} {_num(v)}" for attrs, v in g.points()]
    return "\n".join(lines) + "\n"
