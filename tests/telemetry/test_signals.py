"""Golden signals parsed from the Prometheus text instances serve (route templates hold braces)."""

from __future__ import annotations

import pytest

from meshlib.control.stats_ring import quantile
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.signals import between, parse, per_instance_delta


def test_signals_from_rendered_metrics():
    metrics = MeshMetrics("catalog")
    labels = metrics.server_labels("frontend", "/items/{item_id}", "GET", "2xx")
    errors = metrics.server_labels("frontend", "/items/{item_id}", "GET", "5xx")
    before = parse(metrics.prometheus())
    for _ in range(98):
        metrics.server_duration.record(0.004, labels)
    for _ in range(2):
        metrics.server_duration.record(0.2, errors)
    after = parse(metrics.prometheus())
    (row,) = between(before, after, 2.0)
    assert row.service == "catalog" and row.requests == 100 and row.rate == 50.0
    assert row.success == 0.98
    # the same figures the dashboard shows for these requests (interpolated within the bucket, as Prometheus'
    # histogram_quantile): the demo's text once printed the buckets' upper bounds, 5 and 250 ms here
    per_bucket = [sum(c) for c in zip(*(p.bucket_counts for p in metrics.server_duration.points()), strict=True)]
    assert row.p50_ms == pytest.approx(quantile(per_bucket, 0.5) * 1000)
    assert row.p99_ms == pytest.approx(quantile(per_bucket, 0.99) * 1000)
    assert 2.5 < row.p50_ms < 5.0 and 100.0 < row.p99_ms < 250.0


def test_a_killed_instance_leaving_the_sum_is_not_negative_traffic():
    """The demo's live view once showed negative req/s after a kill: its cumulative counts left the sum."""
    alive, killed = MeshMetrics("catalog"), MeshMetrics("catalog")
    labels = alive.server_labels("frontend", "/", "GET", "2xx")
    for _ in range(100):
        alive.server_duration.record(0.002, labels)
        killed.server_duration.record(0.002, labels)
    before = {"a:1": parse(alive.prometheus()), "k:2": parse(killed.prometheus())}
    for _ in range(10):
        alive.server_duration.record(0.002, labels)
    after = {"a:1": parse(alive.prometheus())}
    (row,) = between({}, per_instance_delta(before, after), 1.0)
    assert row.requests == 10 and row.rate == 10.0 and row.success == 1.0
    born = {**after, "n:3": parse(alive.prometheus())}  # a new instance's counts are not traffic of this interval
    (row,) = between({}, per_instance_delta(after, born), 1.0)
    assert row.requests == 0


def test_a_quantile_past_the_last_bound_is_the_last_bound_and_an_empty_one_is_zero():
    metrics = MeshMetrics("catalog")
    labels = metrics.server_labels("frontend", "/", "GET", "2xx")
    metrics.server_duration.record(999.0, labels)  # past every finite bucket: +Inf
    (row,) = between({}, parse(metrics.prometheus()), 1.0)
    assert row.p50_ms == quantile([0] * len(metrics.server_duration.bounds) + [1], 0.5) * 1000
    (empty,) = between(parse(metrics.prometheus()), parse(metrics.prometheus()), 1.0)
    assert empty.requests == 0 and empty.p50_ms == 0.0
