"""The decision log from real calls: every attempt's entry (where it went, what the balancer weighed, the breaker,
the verdict, the retry decision and its reason, the backoff and the budget's answer) on the call's span as events,
in the access log line, and at DEBUG on ``meshlib.policy``; and errors carry a typed reason."""

from __future__ import annotations

import json
import logging
import re

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer, free_port
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import ServicePolicy


def app() -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return Starlette(routes=[Route("/hello", hello)])


def test_a_retried_call_tells_why_on_its_span_in_the_access_log_and_at_debug(caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    live = ThreadedServer(app())
    dead = free_port()
    discovery = StaticDiscovery({"beta": [Endpoint("127.0.0.1", dead), Endpoint("127.0.0.1", live.port)]})
    tester = meshlib.Mesh(
        service="tester",
        discovery=discovery,
        control_plane="",
        tracer_provider=provider,
        access_log=True,
        policies={"beta": ServicePolicy(load_balancer="round_robin")},
    )
    caplog.set_level(logging.INFO, logger="meshlib.access")
    caplog.set_level(logging.DEBUG, logger="meshlib.policy")
    # (the last set_level also sets the capture handler's level: DEBUG last)
    try:
        with tester, tester.client() as client:
            # round robin over [dead, live]: one of two calls starts at the dead one
            assert [client.get("http://beta/hello").status_code for _ in range(2)] == [200, 200]
    finally:
        live.stop()
    dead_label = f"127.0.0.1:{dead}"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    retried = next(line for line in lines if line["kind"] == "client" and line["attempts"] == 2)
    first, second = retried["decisions"]
    assert first.startswith(f"attempt 1 -> {dead_label} (cost "), first
    assert "breaker closed): connect-failure; retried because connect-failure, backoff " in first, first
    assert re.search(r", budget \d+/\d+ left$", first), first
    assert second.startswith(f"attempt 2 -> 127.0.0.1:{live.port} ") and second.endswith(": 200"), second

    debug = [r.getMessage() for r in caplog.records if r.name == "meshlib.policy"]
    assert f"beta: {first}" in debug and f"beta: {second}" in debug

    call = next(
        s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT and s.attributes.get("mesh.attempts") == 2
    )
    events = [e for e in call.events if e.name == "mesh.decision"]
    assert [e.attributes["mesh.endpoint"] for e in events] == [dead_label, f"127.0.0.1:{live.port}"]
    assert events[0].attributes["mesh.verdict"] == "connect-failure"
    assert events[0].attributes["mesh.retry"] is True
    assert events[0].attributes["mesh.decision"] == first
    assert events[1].attributes["mesh.verdict"] == "200"


def test_the_budget_answer_is_in_the_entry_of_a_retried_attempt():
    dead = [free_port() for _ in range(2)]
    discovery = StaticDiscovery({"beta": [Endpoint("127.0.0.1", p) for p in dead]})
    tester = meshlib.Mesh(service="tester", discovery=discovery, control_plane="", telemetry=False)
    with tester, tester.client() as client, pytest.raises(meshlib.UnavailableError) as info:
        client.get("http://beta/hello")
    error = info.value
    assert error.reason == "attempts used", error.reason
    texts = [d.text() for d in error.decisions]
    assert len(texts) == 3, texts  # the default: 3 attempts
    left, total = tester.service_state("beta").budget.allowance(tester.clock())
    # the first retry left one more than the budget has now, the second as many
    assert "retried because connect-failure, backoff " in texts[0], texts[0]
    assert texts[0].endswith(f"budget {int(left) + 1}/{int(total)} left"), (texts[0], left, total)
    assert texts[1].endswith(f"budget {int(left)}/{int(total)} left"), (texts[1], left, total)
    assert texts[2].endswith("connect-failure; not retried: 3 of 3 attempts used"), texts[2]


def test_no_endpoints_errors_say_why_as_a_typed_reason():
    tester = meshlib.Mesh(service="tester", discovery=StaticDiscovery({"beta": []}), control_plane="", telemetry=False)
    with tester, tester.client() as client, pytest.raises(meshlib.NoEndpointsError) as info:
        client.get("http://beta/hello")
    assert info.value.reason == meshlib.NoEndpointsError.NONE_LISTED
    assert "discovery lists none" in str(info.value)
