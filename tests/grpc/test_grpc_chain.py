"""HTTP → gRPC → HTTP through the mesh: one deadline and one trace across all the hops (real uvicorn and grpc
servers in this process, sharing an in-memory span exporter)."""

from __future__ import annotations

import json
import time
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from harness import ThreadedServer
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pb2, pb2_grpc = stubs()


def mesh(name: str, provider: TracerProvider, services: dict[str, int]) -> meshlib.Mesh:
    discovery = StaticDiscovery({s: [Endpoint("127.0.0.1", p)] for s, p in services.items()})
    return meshlib.Mesh(service=name, discovery=discovery, control_plane="", tracer_provider=provider)


def back_app() -> Starlette:
    async def deadline(request: Request) -> JSONResponse:
        header = request.headers.get("x-mesh-deadline")
        left = int(header) - time.time() * 1000 if header else None
        return JSONResponse({"remaining_ms": left, "traceparent": request.headers.get("traceparent")})

    return Starlette(routes=[Route("/deadline", deadline)])


def front_app(front_mesh: meshlib.Mesh) -> Starlette:
    holder: dict[str, Any] = {}

    async def front(request: Request) -> JSONResponse:
        if "stub" not in holder:  # a grpc.aio channel belongs to the loop that made it: this server's
            holder["stub"] = pb2_grpc.EchoStub(front_mesh.grpc_aio_channel("echo"))
        reply = await holder["stub"].Say(pb2.Hello(text="back", mode="call-http"))
        return JSONResponse(
            {"grpc_remaining_ms": reply.remaining_ms, "back": json.loads(reply.text), "grpc_trace_id": reply.trace_id}
        )

    return Starlette(routes=[Route("/front", front)])


def test_one_deadline_and_one_trace_across_http_grpc_http():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    back_mesh = mesh("back", provider, {})
    back = ThreadedServer(MeshMiddleware(back_app(), back_mesh))
    echo_mesh = mesh("echo", provider, {"back": back.port})
    behaviour = Behaviour("echo-1")
    behaviour.http_client = echo_mesh.client()
    echo = meshlib.grpc.server(mesh=echo_mesh, port=0, drain_delay=0)
    pb2_grpc.add_EchoServicer_to_server(make_servicer(behaviour), echo)
    echo.start()
    front_mesh = mesh("front", provider, {"echo": echo.port})
    front = ThreadedServer(MeshMiddleware(front_app(front_mesh), front_mesh))
    tester = mesh("tester", provider, {"front": front.port})
    try:
        with tester.client(timeout=2.0) as client:
            answer = client.get("http://front/front").json()
    finally:
        front.stop()
        echo.stop(0).wait(10)
        back.stop()

    # the tester's 2 s reached the gRPC handler as its gRPC deadline, and the HTTP hop after it as x-mesh-deadline
    assert 0 < answer["grpc_remaining_ms"] <= 2050
    assert 0 < answer["back"]["remaining_ms"] <= answer["grpc_remaining_ms"] + 50

    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1, "one trace"
    assert f"{spans[0].context.trace_id:032x}" == answer["grpc_trace_id"], "the handler ran in that trace"
    servers = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    grpc_server = servers["meshtest.Echo/Say"]
    assert grpc_server.attributes["rpc.system"] == "grpc"
    assert grpc_server.attributes["rpc.grpc.status_code"] == 0
    assert grpc_server.attributes["mesh.peer_service"] == "(unverified)"  # plaintext: x-mesh-caller is no label
    clients = [s for s in spans if s.kind is SpanKind.CLIENT]
    grpc_client = next(s for s in clients if s.name == "meshtest.Echo/Say")
    assert grpc_client.attributes["rpc.service"] == "meshtest.Echo"
    assert grpc_client.attributes["rpc.method"] == "Say"
    by_id = {s.context.span_id: s for s in spans}

    def ancestors(span: Any) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    back_server = next(s for s in spans if s.kind is SpanKind.SERVER and s.attributes.get("mesh.service") == "back")
    chain = ancestors(back_server)
    assert "meshtest.Echo/Say" in chain, f"the back hop is a descendant of the gRPC server span: {chain}"
    assert chain.count("meshtest.Echo/Say") == 2, "under both the gRPC server span and its client span"


def test_a_plain_grpc_callers_deadline_bounds_the_calls_its_handler_makes():
    """No x-mesh-deadline from a caller outside the mesh: gRPC's own deadline is the incoming one."""
    import grpc

    provider = TracerProvider()
    back_mesh = mesh("back", provider, {})
    back = ThreadedServer(MeshMiddleware(back_app(), back_mesh))
    echo_mesh = mesh("echo", provider, {"back": back.port})
    behaviour = Behaviour("echo-1")
    behaviour.http_client = echo_mesh.client()
    echo = meshlib.grpc.server(mesh=echo_mesh, port=0, drain_delay=0)
    pb2_grpc.add_EchoServicer_to_server(make_servicer(behaviour), echo)
    echo.start()
    try:
        stub = pb2_grpc.EchoStub(grpc.insecure_channel(f"127.0.0.1:{echo.port}"))
        reply = stub.Say(pb2.Hello(text="back", mode="call-http"), timeout=1.0)
        assert 0 < json.loads(reply.text)["remaining_ms"] <= 1050
        unbounded = stub.Say(pb2.Hello(text="back", mode="call-http"))
        # no deadline in: the HTTP call's own timeout (httpx's default 5 s) is all that bounds it
        assert 4000 < json.loads(unbounded.text)["remaining_ms"] <= 5050
    finally:
        echo.stop(0).wait(10)
        back.stop()
