"""Envoy sidecars' golden signals for the dashboard: Envoy's OpenTelemetry stats sink exports its stats (as
deltas, every ``FLUSH_SECONDS``) to the ADS port, and this turns each export into the same cumulative ``Report``
a meshlib instance sends, so an Envoy-fronted service shows up with its edges like any other.

What Envoy measures and what the report needs do not line up one to one: Envoy counts responses per status class
(``cluster.upstream_rq_xx``) and times them all in one histogram (``cluster.upstream_rq_time``) per cluster. Each
export's observations are split over the status classes in proportion to their counts (so a service's or an edge's
totals, success rate and percentiles are Envoy's own; only the latency of one class alone is not known). The
inbound side cannot tell its callers apart: its rows carry ``ANY_CALLER``, counted in the service's figures and
never drawn as an edge (each meshlib caller reports its own edge)."""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..settings import validate_service_name
from ..telemetry.metrics import LATENCY_BUCKETS
from .stats import ANY_CALLER
from .stats_report import MAX_ROWS, Report, Row
from .xds_names import INBOUND_APP, XDS_CLUSTER

#: How often the bootstrap has Envoy export its stats.
FLUSH_SECONDS = 2.0
#: The histogram bounds the bootstrap gives Envoy: the mesh's latency buckets, in milliseconds.
ENVOY_BUCKETS_MS = [round(b * 1000, 3) for b in LATENCY_BUCKETS]
#: Envoy nodes whose figures are kept, and how long a node that stopped exporting is remembered.
MAX_NODES = 5000
FORGET_AFTER = 600.0

_OUTCOMES = {"1": "success", "2": "success", "3": "success", "4": "client-error", "5": "server-error"}


@dataclass
class _Histogram:
    count: int = 0
    total_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


@dataclass
class _Node:
    service: str
    started: float
    last: float
    #: Cumulative (count, total seconds, buckets) per row key, built up from the deltas.
    inbound: dict[tuple[str, str, str, str], list[Any]] = field(default_factory=dict)
    outbound: dict[tuple[str, str, str, str], list[Any]] = field(default_factory=dict)


def _attributes(point: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in point.attributes}


def _rebin(bounds: Iterable[float], counts: Iterable[int]) -> list[int]:
    """Envoy's bucket counts (bounds in ms) in the mesh's buckets: each Envoy bucket goes to the mesh bucket that
    holds its upper bound (exact when the bounds are the bootstrap's)."""
    out = [0] * (len(LATENCY_BUCKETS) + 1)
    limits = list(bounds)
    for i, n in enumerate(counts):
        upper = limits[i] / 1000 if i < len(limits) else math.inf
        out[min(bisect.bisect_left(LATENCY_BUCKETS, upper - 1e-12), len(LATENCY_BUCKETS))] += int(n)
    return out


def _service_of(cluster: str) -> str | None:
    """The mesh service a cluster name (``S`` or ``S/<subset>``) is of; None for Envoy's own clusters."""
    if cluster in (XDS_CLUSTER, INBOUND_APP):
        return None
    service = cluster.partition("/")[0]
    try:
        validate_service_name(service)
    except ValueError:
        return None
    return service


def _split(classes: dict[str, int], histogram: _Histogram) -> list[tuple[str, int, float, list[int]]]:
    """(status class digit, count, total ms, buckets) per class: the histogram's observations shared out in
    proportion to the class counts (largest remainder), the buckets handed out in order."""
    n = histogram.count
    if n <= 0:
        return []
    weights = {c: k for c, k in sorted(classes.items()) if k > 0} or {"2": 1}
    whole = sum(weights.values())
    exact = {c: n * k / whole for c, k in weights.items()}
    shares = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - shares[c], reverse=True)[: n - sum(shares.values())]:
        shares[c] += 1
    remaining = list(histogram.buckets)
    out = []
    index = 0
    for c, share in shares.items():
        buckets = [0] * len(remaining)
        need = share
        while need > 0 and index < len(remaining):
            take = min(need, remaining[index])
            buckets[index] += take
            remaining[index] -= take
            need -= take
            if remaining[index] == 0:
                index += 1
        out.append((c, share - need, histogram.total_ms * share / n, buckets))
    return out


class EnvoyStats:
    """Each Envoy node's figures, accumulated from its exports; ``export`` returns the node's report."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.nodes: dict[str, _Node] = {}

    def export(self, node_id: str, service: str, identity: str | None, request: Any) -> Report | None:
        """One ``ExportMetricsServiceRequest`` from ``node_id``; None when the node cap is reached."""
        now = self.clock()
        for gone in [n for n, node in self.nodes.items() if now - node.last > FORGET_AFTER]:
            del self.nodes[gone]
        node = self.nodes.get(node_id)
        if node is None or node.service != service:
            if node is None and len(self.nodes) >= MAX_NODES:
                return None
            node = self.nodes[node_id] = _Node(service, now, now)
        node.last = now
        out_classes: dict[str, dict[str, int]] = {}
        out_times: dict[str, _Histogram] = {}
        in_classes: dict[str, int] = {}
        in_time = _Histogram()
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    self._take(metric, out_classes, out_times, in_classes, in_time)
        for destination, histogram in out_times.items():
            for c, count, total_ms, buckets in _split(out_classes.get(destination, {}), histogram):
                key = (destination, "", f"{c}xx", _OUTCOMES.get(c, "server-error"))
                _add(node.outbound, key, count, total_ms, buckets)
        for c, count, total_ms, buckets in _split(in_classes, in_time):
            _add(node.inbound, (ANY_CALLER, "", f"{c}xx", "0"), count, total_ms, buckets)
        return Report(
            instance=node_id,
            service=service,
            address=None,
            port=None,
            started=node.started,
            tls="strict" if identity else "off",
            identity=identity,
            rules_version=0,
            interval=FLUSH_SECONDS,
            inbound=_rows(node.inbound),
            outbound=_rows(node.outbound),
            counters={},
            verified_peers={},
            endpoints=(),
        )

    @staticmethod
    def _take(
        metric: Any,
        out_classes: dict[str, dict[str, int]],
        out_times: dict[str, _Histogram],
        in_classes: dict[str, int],
        in_time: _Histogram,
    ) -> None:
        name = metric.name
        if name in ("cluster.upstream_rq_xx", "http.downstream_rq_xx"):
            for point in metric.sum.data_points:
                attributes = _attributes(point)
                c = attributes.get("envoy.response_code_class", "")
                if c not in _OUTCOMES or point.as_int <= 0:
                    continue
                if name == "http.downstream_rq_xx":
                    if attributes.get("envoy.http_conn_manager_prefix") == "mesh_inbound":
                        in_classes[c] = in_classes.get(c, 0) + point.as_int
                    continue
                destination = _service_of(attributes.get("envoy.cluster_name", ""))
                if destination is not None:
                    per = out_classes.setdefault(destination, {})
                    per[c] = per.get(c, 0) + point.as_int
        elif name in ("cluster.upstream_rq_time", "http.downstream_rq_time"):
            for point in metric.histogram.data_points:
                attributes = _attributes(point)
                if name == "http.downstream_rq_time":
                    if attributes.get("envoy.http_conn_manager_prefix") != "mesh_inbound":
                        continue
                    histogram = in_time
                else:
                    destination = _service_of(attributes.get("envoy.cluster_name", ""))
                    if destination is None:
                        continue
                    if destination not in out_times and len(out_times) >= MAX_ROWS // 8:
                        continue
                    histogram = out_times.setdefault(destination, _Histogram())
                buckets = _rebin(point.explicit_bounds, point.bucket_counts)
                if sum(buckets) != point.count or not math.isfinite(point.sum) or point.sum < 0:
                    continue  # a malformed point: left out, not trusted
                histogram.count += point.count
                histogram.total_ms += point.sum
                histogram.buckets = [a + b for a, b in zip(histogram.buckets, buckets, strict=True)]


def _add(
    rows: dict[tuple[str, str, str, str], list[Any]], key: Any, count: int, total_ms: float, buckets: list[int]
) -> None:
    if count <= 0 or (key not in rows and len(rows) >= MAX_ROWS):
        return
    row = rows.setdefault(key, [0, 0.0, [0] * len(buckets)])
    row[0] += count
    row[1] += total_ms / 1000
    row[2] = [a + b for a, b in zip(row[2], buckets, strict=True)]


def _rows(rows: dict[tuple[str, str, str, str], list[Any]]) -> tuple[Row, ...]:
    return tuple(Row(key, count, total, tuple(buckets)) for key, (count, total, buckets) in rows.items())
