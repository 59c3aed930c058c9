"""Envoy's stats exports turned into the mesh's reports: per-class counts and one latency histogram per cluster
become rows whose totals are Envoy's own, Envoy's clusters and malformed points are left out, and the book keeps
the inbound side out of the edges (it cannot tell callers apart)."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from meshlib.control.stats import ANY_CALLER, StatsBook
from meshlib.control.xds_stats import ENVOY_BUCKETS_MS, EnvoyStats, _rebin
from meshlib.telemetry.metrics import LATENCY_BUCKETS


def attrs(**values: str) -> list[KeyValue]:
    """Envoy's tag attributes: ``envoy_cluster_name`` is ``envoy.cluster_name``."""
    return [
        KeyValue(key="envoy." + k.removeprefix("envoy_"), value=AnyValue(string_value=v)) for k, v in values.items()
    ]


def export(classes: dict[tuple[str, str], int], times: dict[str, list[int]], inbound: dict[str, int] | None = None):
    """An export: ``classes`` (cluster, class digit) -> count; ``times`` cluster -> bucket counts (mesh bounds)."""
    request = ExportMetricsServiceRequest()
    metrics = request.resource_metrics.add().scope_metrics.add().metrics
    counts = metrics.add(name="cluster.upstream_rq_xx")
    for (cluster, digit), n in classes.items():
        point = counts.sum.data_points.add(as_int=n)
        point.attributes.extend(attrs(envoy_cluster_name=cluster, envoy_response_code_class=digit))
    if inbound:
        downstream = metrics.add(name="http.downstream_rq_xx")
        for digit, n in inbound.items():
            point = downstream.sum.data_points.add(as_int=n)
            point.attributes.extend(
                attrs(envoy_http_conn_manager_prefix="mesh_inbound", envoy_response_code_class=digit)
            )
        timing = metrics.add(name="http.downstream_rq_time")
        n = sum(inbound.values())
        point = timing.histogram.data_points.add(count=n, sum=3.0 * n, explicit_bounds=ENVOY_BUCKETS_MS)
        point.bucket_counts.extend([0, 0, 0, n] + [0] * (len(ENVOY_BUCKETS_MS) - 3))
        point.attributes.extend(attrs(envoy_http_conn_manager_prefix="mesh_inbound"))
    timing = metrics.add(name="cluster.upstream_rq_time")
    for cluster, buckets in times.items():
        point = timing.histogram.data_points.add(count=sum(buckets), sum=10.0, explicit_bounds=ENVOY_BUCKETS_MS)
        point.bucket_counts.extend(buckets)
        point.attributes.extend(attrs(envoy_cluster_name=cluster))
    return request


def buckets(**at: int) -> list[int]:
    out = [0] * (len(LATENCY_BUCKETS) + 1)
    for index, n in at.items():
        out[int(index[1:])] = n
    return out


def test_an_export_becomes_rows_whose_totals_are_envoy_s_own():
    stats = EnvoyStats(clock=lambda: 1000.0)
    request = export(
        {("ledger", "2"): 7, ("ledger/canary", "2"): 1, ("ledger", "5"): 2, ("meshlib-xds", "2"): 50},
        {"ledger": buckets(b2=6, b5=2), "ledger/canary": buckets(b9=2), "meshlib-xds": buckets(b1=50)},
    )
    report = stats.export("orders.1", "orders", None, request)
    assert report is not None
    rows = {row.key: row for row in report.outbound}
    assert set(rows) == {("ledger", "", "2xx", "success"), ("ledger", "", "5xx", "server-error")}  # no ADS cluster
    assert rows[("ledger", "", "2xx", "success")].count == 8 and rows[("ledger", "", "5xx", "server-error")].count == 2
    merged = [sum(r.buckets[i] for r in rows.values()) for i in range(len(LATENCY_BUCKETS) + 1)]
    assert merged == buckets(b2=6, b5=2, b9=2)  # the edge's percentiles are exactly Envoy's histogram
    assert all(sum(r.buckets) == r.count for r in rows.values())
    # deltas accumulate: the next export adds to the same cumulative rows
    again = stats.export("orders.1", "orders", None, export({("ledger", "2"): 3}, {"ledger": buckets(b0=3)}))
    assert again is not None
    assert {r.key: r.count for r in again.outbound}[("ledger", "", "2xx", "success")] == 11
    assert again.started == report.started


def test_malformed_points_and_foreign_clusters_are_left_out():
    stats = EnvoyStats()
    bad = export({("Bad Name", "2"): 4, ("ledger", "9"): 4}, {"ledger": buckets(b1=3)})
    bad.resource_metrics[0].scope_metrics[0].metrics[-1].histogram.data_points[0].count = 99  # buckets disagree
    report = stats.export("orders.1", "orders", None, bad)
    assert report is not None and report.outbound == ()


def test_the_inbound_side_counts_for_the_service_but_draws_no_edge():
    clock = [1000.0]
    stats, book = EnvoyStats(clock=lambda: clock[0]), StatsBook(clock=lambda: clock[0])
    for _ in range(3):
        report = stats.export("orders.1", "orders", None, export({}, {}, inbound={"2": 6, "5": 2}))
        assert report is not None and book.ingest(report)
        clock[0] += 2
    assert {r.key[0] for r in report.inbound} == {ANY_CALLER}
    figures = book.service_figures(clock[0])["orders"]
    assert figures["requests"] == 24 and figures["success"] == 0.75
    assert book.edges(clock[0]) == []


def test_buckets_from_other_bounds_land_in_the_mesh_bucket_holding_their_upper_bound():
    assert _rebin(ENVOY_BUCKETS_MS, list(range(len(LATENCY_BUCKETS) + 1))) == list(range(len(LATENCY_BUCKETS) + 1))
    # Envoy's default bounds: 0.5, 1, 5, 10, ... ms
    assert (
        _rebin([0.5, 1, 5, 10], [1, 2, 3, 4, 5])[:5] == [1, 2, 0, 3, 4]
        and _rebin([0.5, 1, 5, 10], [1, 2, 3, 4, 5])[-1] == 5
    )
