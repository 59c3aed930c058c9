"""Golden signals parsed from the Prometheus text instances serve (route templates hold braces)."""

from __future__ import annotations

from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.signals import between, parse


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
    assert row.p50_ms == 5.0 and row.p99_ms == 250.0  # bucket upper bounds
