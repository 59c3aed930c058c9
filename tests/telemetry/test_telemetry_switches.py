"""Telemetry switches and the metrics nobody had looked at: ``MESH_TELEMETRY=off``, access-log sampling,
``OTEL_TRACES_EXPORTER``, the breaker / ejection / rules-version / retry-budget metrics, and ``http.route``
templates through the server middleware."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer, free_port, wait_for
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import BreakerPolicy, RetryBudgetPolicy, RetryPolicy, ServicePolicy
from meshlib.rules.model import validate_rules

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


def static(service: str, ports: list[int], **kwargs: object) -> meshlib.Mesh:
    discovery = StaticDiscovery({service: [Endpoint("127.0.0.1", p) for p in ports]})
    return meshlib.Mesh(service="tester", discovery=discovery, control_plane="", **kwargs)  # type: ignore[arg-type]


def items_app() -> Starlette:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["id"], "traceparent": request.headers.get("traceparent")})

    return Starlette(routes=[Route("/items/{id}", item)])


def test_route_templates_label_server_metrics_not_raw_paths():
    server_mesh = meshlib.Mesh(service="shop", discovery="static:", control_plane="")
    server = ThreadedServer(MeshMiddleware(items_app(), server_mesh))
    try:
        with static("shop", [server.port]) as mesh, mesh.client() as client:
            for i in range(5):
                assert client.get(f"http://shop/items/{i}").json()["id"] == str(i)
        text = server_mesh.telemetry.metrics.prometheus()  # type: ignore[union-attr]
        counts = samples(text, "http_server_request_duration_seconds_count")
        assert [(labels["http_route"], value) for labels, value in counts] == [("/items/{id}", 5.0)]
    finally:
        server.stop()
        server_mesh.close()


def test_telemetry_off_still_propagates_trace_context(upstreams, monkeypatch):
    (up,) = upstreams(1)
    monkeypatch.setenv("MESH_TELEMETRY", "off")
    incoming = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    with static("svc", [up.port]) as mesh, mesh.client() as client:
        assert mesh.telemetry is None
        with trace.use_span(NonRecordingSpan(incoming)):  # a request being handled, its trace context current
            seen = client.get("http://svc/x").json()["headers"]
        version, trace_id, span_id, flags = seen["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
        assert span_id != "b7ad6b7169203331"  # a new span id of the same trace
    server_mesh = meshlib.Mesh(service="quiet", discovery="static:", control_plane="")
    server = ThreadedServer(MeshMiddleware(items_app(), server_mesh))
    try:
        with static("quiet", [server.port]) as mesh, mesh.client() as client:
            assert client.get("http://quiet/items/1").status_code == 200
            assert client.get("http://quiet/-/mesh/metrics").text == ""  # nothing recorded, nothing to show
    finally:
        server.stop()
        server_mesh.close()


@pytest.mark.parametrize(("sample", "low", "high"), [(0.0, 0, 0), (0.25, 60, 140), (1.0, 400, 400)])
def test_access_log_sampling(upstreams, monkeypatch, caplog, sample, low, high):
    (up,) = upstreams(1)
    monkeypatch.setenv("MESH_ACCESS_LOG_SAMPLE", str(sample))
    caplog.set_level(logging.INFO, logger="meshlib.access")
    with static("svc", [up.port], access_log=True) as mesh, mesh.client() as client:
        for _ in range(400):
            client.get("http://svc/x")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    assert low <= len(lines) <= high, len(lines)  # 0.25 of 400: 100, and 4.6 standard deviations either side
    assert all(line["destination"] == "svc" and line["status"] == 200 for line in lines)


def test_otel_traces_exporter_console_exports_mesh_spans(upstreams, tmp_path):
    (up,) = upstreams(1)
    code = (
        "import meshlib;"
        f"m = meshlib.Mesh(service='exporter-test', discovery='static:svc=127.0.0.1:{up.port}', control_plane='');"
        "c = m.client(); c.get('http://svc/x'); c.close(); m.close();"
        "from opentelemetry import trace; getattr(trace.get_tracer_provider(), 'shutdown', lambda: None)()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "OTEL_"))}
    env.update({"OTEL_TRACES_EXPORTER": "console", "MESH_STATE_DIR": str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True)
    assert '"service.name": "exporter-test"' in out.stdout
    assert '"kind": "SpanKind.CLIENT"' in out.stdout and '"name": "GET attempt 1"' in out.stdout, out.stdout[:2000]
    env["OTEL_TRACES_EXPORTER"] = "none"
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    assert '"service.name"' not in quiet.stdout


def test_breaker_and_ejection_metrics(upstreams):
    (live,) = upstreams(1)
    dead = free_port()
    policy = ServicePolicy(load_balancer="round_robin", circuit_breaker=BreakerPolicy(consecutive_failures=2))
    with static("svc", [dead, live.port], policies={"svc": policy}) as mesh, mesh.client() as client:
        wait_for(lambda: client.get("http://svc/x").status_code == 200 and _opened(mesh), what="the dead one ejected")
        text = mesh.telemetry.metrics.prometheus()  # type: ignore[union-attr]
    transitions = samples(text, "mesh_client_breaker_transitions_total")
    opened = [(labels, v) for labels, v in transitions if labels["mesh_breaker_state"] == "open"]
    assert opened and all(labels["mesh_endpoint"] == f"127.0.0.1:{dead}" for labels, _ in opened)
    ejections = samples(text, "mesh_client_ejections_total")
    assert [(labels["mesh_endpoint"], v) for labels, v in ejections] == [(f"127.0.0.1:{dead}", 1.0)]


def _opened(mesh: meshlib.Mesh) -> bool:
    return any(h.breaker.state == "open" for h in mesh.service_state("svc").handles)


def test_rules_version_and_budget_exhausted_metrics(upstreams):
    """Found by this test: a retry refused by the budget after a 5xx *response* (handed back to the caller) was not
    counted; only refusals after connection errors were."""
    a, b = upstreams(2, status=503)
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=3, budget=RetryBudgetPolicy(ratio=0.0, min_per_second=0.0)),
        circuit_breaker=BreakerPolicy(consecutive_failures=10**6),
    )
    with static("svc", [a.port, b.port], policies={"svc": policy}) as mesh, mesh.client() as client:
        mesh.apply_rules(validate_rules({"services": {"other": {"timeout": "1s"}}}, 7))
        for _ in range(10):
            assert client.get("http://svc/x").status_code == 503
        text = mesh.telemetry.metrics.prometheus()  # type: ignore[union-attr]
    assert [v for _, v in samples(text, "mesh_rules_version")] == [7.0]
    exhausted = samples(text, "mesh_client_retry_budget_exhausted_total")
    assert [(labels["mesh_peer_service"], v) for labels, v in exhausted] == [("svc", 10.0)]
    assert samples(text, "mesh_client_retries_total") == []  # a budget of zero allowed none
