"""The server half's cheaper paths decide as the general ones did: only the headers the mesh reads are decoded
(propagated names included, whatever their first letter), the deadline still cuts a handler short with a 504
(and a handler's own TimeoutError is not taken for it), and the trace context is what OTel's propagator gives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery
from meshlib.inbound import incoming_trace
from meshlib.propagation import incoming_deadline, propagated_headers

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _app() -> Any:
    async def seen(request: Request) -> JSONResponse:
        context = trace.get_current_span().get_span_context()
        return JSONResponse(
            {
                "propagated": dict(propagated_headers.get()),
                "deadline": incoming_deadline.get(),
                "trace_id": f"{context.trace_id:032x}",
            }
        )

    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(5)
        return JSONResponse({"late": True})

    routed = Starlette(routes=[Route("/seen", seen), Route("/slow", slow)])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("path") == "/own-timeout":  # raised through the middleware (Starlette would answer 500 itself)
            raise TimeoutError("the handler's own")
        await routed(scope, receive, send)

    return app


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedServer]:
    monkeypatch.setenv("MESH_PROPAGATE_HEADERS", "region,x-user-id")
    mesh = meshlib.Mesh(service="inbound", discovery=StaticDiscovery({}), control_plane="")
    served = ThreadedServer(MeshMiddleware(_app(), mesh))
    yield served
    served.stop()
    mesh.close()


def _deadline(seconds: float) -> str:
    return str(int((time.time() + seconds) * 1000))


def test_mesh_headers_reach_the_handler_and_others_are_left_alone(server: ThreadedServer) -> None:
    headers = {
        "Region": "eu",
        "x-user-id": "u7",
        "user-agent": "test",
        "x-mesh-deadline": _deadline(30),
        "traceparent": TRACE,
        "accept": "*/*",
    }
    seen = httpx.get(server.url + "/seen", headers=headers, timeout=10).json()
    assert seen["propagated"] == {"region": "eu", "x-user-id": "u7"}
    assert seen["deadline"] == pytest.approx(time.time() + 30, abs=5)
    assert seen["trace_id"] == TRACE.split("-")[1]


def test_a_handler_past_the_deadline_is_cut_short_with_a_504(server: ThreadedServer) -> None:
    started = time.monotonic()
    late = httpx.get(server.url + "/slow", headers={"x-mesh-deadline": _deadline(0.3)}, timeout=10)
    assert late.status_code == 504 and "while handling" in late.json()["error"]
    assert time.monotonic() - started < 4, "the handler ran to its end"
    own = httpx.get(server.url + "/own-timeout", headers={"x-mesh-deadline": _deadline(30)}, timeout=10)
    assert own.status_code == 500  # the handler's own TimeoutError is its error, not the deadline


_PROPAGATOR = TraceContextTextMapPropagator()
HEX = "0123456789abcdef"


@settings(max_examples=400, deadline=None)
@given(
    traceparent=st.none()
    | st.text(max_size=70)
    | st.from_regex(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?", fullmatch=True)
    | st.builds(
        lambda t, s, f: f"00-{t}-{s}-{f}",
        st.sampled_from(["0" * 32, "4bf92f3577b34da6a3ce929d0e0e4736"]),
        st.sampled_from(["0" * 16, "00f067aa0ba902b7"]),
        st.text(HEX, min_size=2, max_size=2),
    ),
    tracestate=st.none() | st.sampled_from(["", "vendor=1", "a=b,c=d", "bad state"]),
)
def test_the_trace_context_is_the_one_otel_extracts(traceparent: str | None, tracestate: str | None) -> None:
    carrier = {k: v for k, v in {"traceparent": traceparent, "tracestate": tracestate}.items() if v is not None}
    ours = trace.get_current_span(incoming_trace(carrier)).get_span_context()
    theirs = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    assert ours == theirs
    assert (ours.trace_state, ours.is_remote) == (theirs.trace_state, theirs.is_remote)
