"""Traces, metrics and access logs, with the OpenTelemetry SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer, free_port
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint


@pytest.fixture
def tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def mesh(name: str, provider: TracerProvider, services: dict[str, list[int]], **kwargs: object) -> meshlib.Mesh:
    discovery = StaticDiscovery({s: [Endpoint("127.0.0.1", p) for p in ports] for s, ports in services.items()})
    return meshlib.Mesh(service=name, discovery=discovery, control_plane="", tracer_provider=provider, **kwargs)


def beta_app() -> Starlette:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"service": "beta", "traceparent": request.headers.get("traceparent")})

    return Starlette(routes=[Route("/hello", hello)])


def alpha_app(client_holder: dict[str, meshlib.AsyncClient]) -> Starlette:
    async def front(request: Request) -> JSONResponse:
        inner = await client_holder["client"].get("http://beta/hello")
        return JSONResponse({"service": "alpha", "inner": inner.json()})

    return Starlette(routes=[Route("/front", front)])


def test_two_hops_make_one_correctly_parented_trace(tracing):
    provider, exporter = tracing
    beta_mesh = mesh("beta", provider, {})
    beta = ThreadedServer(MeshMiddleware(beta_app(), beta_mesh))
    holder: dict[str, meshlib.AsyncClient] = {}
    alpha_mesh = mesh("alpha", provider, {"beta": [beta.port]})
    holder["client"] = alpha_mesh.async_client()
    alpha = ThreadedServer(MeshMiddleware(alpha_app(holder), alpha_mesh))
    tester = mesh("tester", provider, {"alpha": [alpha.port]})
    try:
        with tester.client() as client:
            r = client.get("http://alpha/front")
        assert r.status_code == 200
    finally:
        alpha.stop()
        beta.stop()
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1, "one trace"
    by_id = {s.context.span_id: s for s in spans}

    def parent(span):  # type: ignore[no-untyped-def]
        return by_id[span.parent.span_id] if span.parent is not None else None

    assert sum(1 for s in spans if s.kind is SpanKind.SERVER) == 2
    assert sum(1 for s in spans if s.kind is SpanKind.CLIENT) == 2
    beta_server = next(s for s in spans if s.kind is SpanKind.SERVER and s.attributes.get("mesh.service") == "beta")
    alpha_server = next(s for s in spans if s.kind is SpanKind.SERVER and s.attributes.get("mesh.service") == "alpha")
    # beta's SERVER span <- alpha's attempt span <- alpha's CLIENT call span <- alpha's SERVER span
    attempt = parent(beta_server)
    assert attempt.attributes["mesh.attempt"] == 1 and attempt.attributes["mesh.endpoint"] == f"127.0.0.1:{beta.port}"
    call = parent(attempt)
    assert call.kind is SpanKind.CLIENT and call.attributes["server.address"] == "beta"
    assert parent(call) is alpha_server
    # alpha's SERVER span <- the tester's attempt <- the tester's CLIENT call span (the root)
    tester_call = parent(parent(alpha_server))
    assert tester_call.kind is SpanKind.CLIENT and tester_call.parent is None
    assert tester_call.attributes["server.address"] == "alpha"
    assert alpha_server.attributes["http.response.status_code"] == 200
    assert beta_server.attributes["mesh.peer_service"] == "(unverified)"  # plaintext: what alpha claims is no label


def test_retried_call_shows_two_attempt_spans(tracing):
    provider, exporter = tracing
    beta = ThreadedServer(MeshMiddleware(beta_app(), mesh("beta", provider, {})))
    dead = free_port()
    policy = meshlib.policy.config.ServicePolicy(load_balancer="round_robin")  # dead port first, then beta
    tester = mesh("tester", provider, {"beta": [dead, beta.port]}, policies={"beta": policy})
    try:
        with tester.client() as client:
            # round robin over [dead, live] sorted by port: make sure one call starts at the dead one
            statuses = [client.get("http://beta/hello").status_code for _ in range(2)]
    finally:
        beta.stop()
    assert statuses == [200, 200]
    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert calls and {c.instrumentation_scope.name for c in calls} == {"meshlib"}  # the mesh's spans, not another's
    retried = [c for c in calls if c.attributes.get("mesh.attempts") == 2]
    assert len(retried) == 1
    attempts = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == retried[0].context.span_id),
        key=lambda s: s.attributes["mesh.attempt"],
    )
    assert [a.attributes["mesh.attempt"] for a in attempts] == [1, 2]
    assert attempts[0].attributes["error.type"] == "connect-failure"
    assert attempts[0].attributes["mesh.endpoint"] == f"127.0.0.1:{dead}"
    assert attempts[1].attributes["http.response.status_code"] == 200


def test_metrics_attributes_counts_and_prometheus_endpoint(tracing):
    provider, _ = tracing
    beta_mesh = mesh("beta", provider, {})
    beta = ThreadedServer(MeshMiddleware(beta_app(), beta_mesh))
    tester = mesh("tester", provider, {"beta": [beta.port], "down": [free_port()]})
    try:
        with tester.client() as client:
            for _ in range(7):
                assert client.get("http://beta/hello").status_code == 200
            with pytest.raises(meshlib.UnavailableError):
                client.get("http://down/x")
            text = httpx.get(beta.url + "/-/mesh/metrics").text
    finally:
        beta.stop()
    assert tester.telemetry is not None
    metrics = tester.telemetry.metrics
    points = metrics.client_duration.points()
    ok = next(p for p in points if p.attributes["mesh.peer_service"] == "beta")
    assert ok.count == 7 and sum(ok.bucket_counts) == 7
    assert ok.attributes == {
        "mesh.service": "tester",
        "mesh.peer_service": "beta",
        "mesh.route": "default",
        "http.request.method": "GET",
        "http.response.status_class": "2xx",
        "mesh.outcome": "success",
    }
    down = next(p for p in points if p.attributes["mesh.peer_service"] == "down")
    assert down.count == 1 and down.attributes["mesh.outcome"] == "unavailable"
    assert down.attributes["http.response.status_class"] == "error"
    retries = metrics.retries.points()
    assert sum(v for attrs, v in retries if attrs["mesh.peer_service"] == "down") == 2
    assert ok.quantile(0.5) <= ok.quantile(0.99) < 1.0

    families = {f.name: f for f in text_string_to_metric_families(text)}
    client_text = metrics.prometheus()
    client_families = {f.name: f for f in text_string_to_metric_families(client_text)}
    assert "mesh_client_retries" in client_families
    server = families["http_server_request_duration_seconds"]
    count = next(s for s in server.samples if s.name.endswith("_count"))
    assert count.value == 7 and count.labels["mesh_peer_service"] == "(unverified)"
    assert count.labels["http_response_status_class"] == "2xx"
    assert any(s.name.endswith("_bucket") and s.labels["le"] == "+Inf" for s in server.samples)


def test_access_log_lines_have_the_fields_and_no_secrets(tracing, caplog):
    provider, _ = tracing
    beta_mesh = mesh("beta", provider, {}, access_log=True)
    beta = ThreadedServer(MeshMiddleware(beta_app(), beta_mesh))
    tester = mesh("tester", provider, {"beta": [beta.port]}, access_log=True)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    try:
        with tester.client() as client:
            client.get("http://beta/hello?token=s3cret", headers={"authorization": "Bearer s3cret"})
    finally:
        beta.stop()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    client_line = next(line for line in lines if line["kind"] == "client")
    server_line = next(line for line in lines if line["kind"] == "server")
    for key in ("source", "destination", "method", "path", "status", "duration_ms", "attempts", "trace_id", "bytes"):
        assert key in client_line, key
    assert client_line["source"] == "tester" and client_line["destination"] == "beta"
    assert client_line["status"] == 200 and client_line["path"] == "/hello"
    assert server_line["source"] == "(unverified)" and server_line["destination"] == "beta"
    assert server_line["claimed_source"] == "tester"  # what x-mesh-caller said, a valid name, in the log only
    assert server_line["trace_id"] == client_line["trace_id"]
    assert "s3cret" not in json.dumps(lines)


def test_access_log_is_off_by_default(tracing, caplog):
    provider, _ = tracing
    beta = ThreadedServer(MeshMiddleware(beta_app(), mesh("beta", provider, {})))
    caplog.set_level(logging.INFO, logger="meshlib.access")
    try:
        with mesh("tester", provider, {"beta": [beta.port]}).client() as client:
            client.get("http://beta/hello")
    finally:
        beta.stop()
    assert [r for r in caplog.records if r.name == "meshlib.access"] == []


def test_no_duplicate_spans_with_httpx_instrumentation(tracing):
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    provider, exporter = tracing
    plain = ThreadedServer(beta_app())
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with mesh("tester", provider, {}).client() as client:
            assert client.get(plain.url + "/hello").status_code == 200  # an external host: passthrough
    finally:
        instrumentor.uninstrument()
        plain.stop()
    client_spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(client_spans) == 1


def test_trace_continues_without_an_sdk():
    """No tracer provider configured: nothing recorded, but the incoming trace id still flows downstream."""
    seen: dict[str, str] = {}

    async def hello(request: Request) -> JSONResponse:
        seen["traceparent"] = request.headers["traceparent"]
        return JSONResponse({})

    beta = ThreadedServer(Starlette(routes=[Route("/hello", hello)]))
    holder: dict[str, meshlib.AsyncClient] = {}
    alpha_mesh = meshlib.Mesh(
        service="alpha", discovery=StaticDiscovery({"beta": [Endpoint("127.0.0.1", beta.port)]}), control_plane=""
    )
    holder["client"] = alpha_mesh.async_client()
    alpha = ThreadedServer(MeshMiddleware(alpha_app(holder), alpha_mesh))
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        httpx.get(alpha.url + "/front", headers={"traceparent": incoming})
    finally:
        alpha.stop()
        beta.stop()
    assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert seen["traceparent"].split("-")[2] != "b7ad6b7169203331"


def test_deadline_past_is_504_and_malformed_is_400():
    import time

    beta = ThreadedServer(
        MeshMiddleware(beta_app(), meshlib.Mesh(service="beta", discovery="static:", control_plane=""))
    )
    try:
        past = str(int((time.time() - 1) * 1000))
        assert httpx.get(beta.url + "/hello", headers={"x-mesh-deadline": past}).status_code == 504
        bad = httpx.get(beta.url + "/hello", headers={"x-mesh-deadline": "tomorrow"})
        assert bad.status_code == 400 and "x-mesh-deadline" in bad.json()["error"]
        assert httpx.get(beta.url + "/-/mesh/health").json()["status"] == "ok"
    finally:
        beta.stop()


def test_async_client_telemetry_matches_sync(tracing):
    provider, exporter = tracing
    beta = ThreadedServer(beta_app())

    async def main() -> None:
        async with mesh("tester", provider, {"beta": [beta.port]}).async_client() as client:
            assert (await client.get("http://beta/hello")).status_code == 200

    try:
        asyncio.run(main())
    finally:
        beta.stop()
    spans = exporter.get_finished_spans()
    call = next(s for s in spans if s.kind is SpanKind.CLIENT)
    attempt = next(s for s in spans if s.parent is not None and s.parent.span_id == call.context.span_id)
    assert attempt.attributes["mesh.attempt"] == 1 and call.attributes["mesh.attempts"] == 1


def test_otel_metrics_exporter_gets_the_same_metrics(monkeypatch, capsys):
    """OTEL_METRICS_EXPORTER feeds an SDK MeterProvider off the request path (here: the SDK's console exporter)."""
    from meshlib.telemetry.metrics import MeshMetrics

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    metrics = MeshMetrics("exporter-test")
    assert metrics._exporter is not None
    labels = metrics.client_labels("beta", "default", "GET", "2xx", "success")
    for _ in range(3):
        metrics.client_duration.record(0.002, labels)
    metrics.retries.add(2, (("mesh.service", "exporter-test"), ("mesh.peer_service", "beta")))
    metrics._exporter.flush()
    metrics.shutdown()
    out = capsys.readouterr().out
    assert "http.client.request.duration" in out and "mesh.client.retries" in out
    assert '"count": 3' in out


def test_failed_requests_carry_error_type_on_every_path(tracing):
    """One recorder ends every span (telemetry/record.py): a 5xx is an error with ``error.type`` on the server span,
    on the mesh call's span, and on a call to a host outside the mesh."""
    from opentelemetry.trace import StatusCode

    provider, exporter = tracing

    async def boom(request: Request) -> JSONResponse:
        return JSONResponse({"error": "no"}, status_code=503)

    server_mesh = mesh("beta", provider, {})
    server = ThreadedServer(MeshMiddleware(Starlette(routes=[Route("/boom", boom)]), server_mesh))
    caller = mesh("tester", provider, {"beta": [server.port]})
    try:
        with caller.client() as client:
            assert client.get("http://beta/boom").status_code == 503  # retried, still 503
            assert client.get(f"http://127.0.0.1:{server.port}/boom").status_code == 503  # not a mesh host
    finally:
        server.stop()
        caller.close()
        server_mesh.close()
    spans = exporter.get_finished_spans()
    server_spans = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server_spans and all(s.attributes["error.type"] == "503" for s in server_spans)
    assert all(s.status.status_code is StatusCode.ERROR and s.name == "GET /boom" for s in server_spans)
    calls = [s for s in spans if s.kind is SpanKind.CLIENT and "mesh.attempts" in (s.attributes or {})]
    assert calls and calls[0].attributes["error.type"] and calls[0].status.status_code is StatusCode.ERROR
    external = [s for s in spans if s.kind is SpanKind.CLIENT and s.attributes.get("server.address") == "127.0.0.1"]
    assert external and external[0].attributes["error.type"] == "503"
    assert external[0].attributes["http.response.status_code"] == 503


def test_fastapi_makes_one_server_span_per_request_named_by_its_route(tracing):
    """The one-line FastAPI set-up (add_middleware) under a runner that wraps the app again (meshctl run,
    meshlib.serve): one SERVER span, named by the route template, whatever the FastAPI version."""
    from fastapi import FastAPI

    provider, exporter = tracing
    server_mesh = mesh("api", provider, {})
    app = FastAPI()
    app.add_middleware(MeshMiddleware, mesh=server_mesh)

    @app.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        return {"item": item}

    for wrapped in (app, MeshMiddleware(app, server_mesh)):
        exporter.clear()
        server = ThreadedServer(wrapped)
        caller = mesh("tester", TracerProvider(), {"api": [server.port]})
        try:
            with caller.client() as client:
                assert client.get("http://api/items/3").json() == {"item": 3}
                assert client.get("http://api/items/4").json() == {"item": 4}
        finally:
            server.stop()
            caller.close()
        spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
        assert [s.name for s in spans] == ["GET /items/{item}"] * 2
        assert all(s.attributes["http.route"] == "/items/{item}" for s in spans)
    server_mesh.close()
