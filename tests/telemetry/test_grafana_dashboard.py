"""The Grafana dashboard in docs/observability.md: valid JSON, and every metric it queries is one meshlib exports
(a renamed metric would otherwise leave a panel silently empty)."""

from __future__ import annotations

import json
import re

from harness import ROOT
from meshlib.telemetry.metrics import MeshMetrics

DOC = ROOT / "docs" / "observability.md"


def exported_names() -> set[str]:
    metrics = MeshMetrics("catalog")
    metrics.client_duration.record(0.01, metrics.client_labels("payments", "/", "GET", "2xx", "success"))
    metrics.server_duration.record(0.01, metrics.server_labels("frontend", "/", "GET", "2xx"))
    for counter in metrics.counters:
        counter.add(1, (("mesh.service", "catalog"),))
    metrics.rules_version.set(1, ())
    metrics.cert_expiry.set(60, ())
    return {line.split("{")[0].split()[0] for line in metrics.prometheus().splitlines() if not line.startswith("#")}


def test_the_grafana_dashboard_queries_only_exported_metrics():
    block = re.search(r"```json\n(.*?)\n```", DOC.read_text(), re.S)
    assert block, "no JSON block in docs/observability.md"
    dashboard = json.loads(block.group(1))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    names = exported_names()
    functions = {
        "sum",
        "by",
        "rate",
        "increase",
        "histogram_quantile",
        "min",
        "max",
        "or",
        "le",
        "mesh_service",
        "mesh_peer_service",
        "mesh_endpoint",
        "mesh_outcome",
        "instance",
        "http_response_status_class",
    }
    used = {m for e in exprs for m in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?=\s*[{\[(]|\s*\))?", e)}
    queried = {m for m in used if m.endswith(("_total", "_seconds", "_count", "_bucket", "_version"))}
    queried -= functions
    assert queried, exprs
    unknown = queried - names
    assert not unknown, f"the dashboard queries metrics meshlib does not export: {sorted(unknown)}"
    assert {"http_server_request_duration_seconds_bucket", "http_client_request_duration_seconds_count"} <= queried
