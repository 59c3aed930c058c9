"""One trace rule for every client shell (issue 30, item 9): a call that records no span of its own carries the
current trace on (same trace id, a new span id) and, outside a trace, sends no ``traceparent`` at all. Real
servers on loopback that report what they received."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import grpc
import meshlib
from harness import ThreadedServer
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

TRACE_ID, SPAN_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
INCOMING = SpanContext(TRACE_ID, SPAN_ID, True, TraceFlags(1))
SHELLS = ["http-sync", "http-async", "grpc-sync", "grpc-aio"]


def header_app(seen: list[str | None]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        seen.append(headers[b"traceparent"].decode() if b"traceparent" in headers else None)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


class MetadataServer:
    """A plain grpc server whose one method records the ``traceparent`` metadata it got."""

    def __init__(self, seen: list[str | None]) -> None:
        def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen.append(dict(context.invocation_metadata()).get("traceparent"))
            return b"ok"

        handler = grpc.method_handlers_generic_handler("t.T", {"M": grpc.unary_unary_rpc_method_handler(hello)})
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def call_twice(shell: str, mesh: meshlib.Mesh) -> None:
    """One call outside a trace, then one inside the incoming trace."""
    if shell == "http-sync":
        with mesh.client(timeout=5) as client:
            client.get("http://svc/")
            with trace.use_span(NonRecordingSpan(INCOMING)):
                client.get("http://svc/")
    elif shell == "http-async":

        async def main() -> None:
            async with mesh.async_client(timeout=5) as client:
                await client.get("http://svc/")
                with trace.use_span(NonRecordingSpan(INCOMING)):
                    await client.get("http://svc/")

        asyncio.run(main())
    elif shell == "grpc-sync":
        with mesh.grpc_channel("svc") as channel:
            method = channel.unary_unary("/t.T/M")
            method(b"x", timeout=5)
            with trace.use_span(NonRecordingSpan(INCOMING)):
                method(b"x", timeout=5)
    else:

        async def amain() -> None:
            async with mesh.grpc_aio_channel("svc") as channel:
                method = channel.unary_unary("/t.T/M")
                await method(b"x", timeout=5)
                with trace.use_span(NonRecordingSpan(INCOMING)):
                    await method(b"x", timeout=5)

        asyncio.run(amain())


@pytest.mark.parametrize("shell", SHELLS)
def test_one_trace_rule_for_every_shell(shell: str) -> None:
    seen: list[str | None] = []
    server: Any = ThreadedServer(header_app(seen)) if shell.startswith("http") else MetadataServer(seen)
    try:
        mesh = meshlib.Mesh(
            service="front",
            discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", server.port)]}),
            control_plane="",
            telemetry=False,
        )
        with mesh:
            call_twice(shell, mesh)
    finally:
        server.stop()
    outside, inside = seen
    assert outside is None, "outside a trace there is nothing to carry"
    assert inside is not None
    version, trace_id, span_id, flags = inside.split("-")
    assert (version, int(trace_id, 16), flags) == ("00", TRACE_ID, "01")
    assert int(span_id, 16) != SPAN_ID
