"""OTLP as the OTel SDK's variables say: ``OTEL_TRACES_EXPORTER=otlp`` exported nothing, silently (``otlp`` is no
package's entry point), and ``OTEL_EXPORTER_OTLP_PROTOCOL`` was not read. A real mesh call in a subprocess exports
its spans and metrics to a collector stand-in: a real gRPC server or a real HTTP server speaking OTLP's protobuf
messages. A protocol or exporter that cannot work is said in one line, and the call still works."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from meshlib.telemetry.exporters import resolve

pytestmark = pytest.mark.e2e  # its tests start processes

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the [otlp] extra is not installed")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the [otlp] extra is not installed")

from opentelemetry.proto.collector.metrics.v1 import (  # noqa: E402
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

CALLER = """
import http.server, threading
import meshlib

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"hi")
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=server.serve_forever, daemon=True).start()
mesh = meshlib.Mesh(service="caller", discovery=f"static:hello=127.0.0.1:{server.server_port}", control_plane="")
with mesh, mesh.client() as client:
    assert client.get("http://hello/").text == "hi"
print("called")
"""


class Collector:
    """What a collector received: (resource service.name, span name) pairs and metric names."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict[str, str]]] = []
        self.metrics: set[str] = set()
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def traces(self, request: Any) -> None:
        with self.lock:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {a.key: a.value.string_value for a in span.attributes}
                        self.spans.append((service, span.name, attrs))

    def metric_batch(self, request: Any) -> None:
        with self.lock:
            for rm in request.resource_metrics:
                self.services.update(a.value.string_value for a in rm.resource.attributes if a.key == "service.name")
                for sm in rm.scope_metrics:
                    self.metrics.update(m.name for m in sm.metrics)


@pytest.fixture
def grpc_collector() -> Iterator[tuple[str, Collector]]:
    import grpc

    got = Collector()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            got.traces(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            got.metric_batch(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", got
    finally:
        server.stop(None)


@pytest.fixture
def http_collector() -> Iterator[tuple[str, Collector]]:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from harness import ThreadedServer

    got = Collector()

    async def traces(request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        got.traces(trace_service_pb2.ExportTraceServiceRequest.FromString(await request.body()))
        return Response(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    async def metrics(request: Request) -> Response:
        got.metric_batch(metrics_service_pb2.ExportMetricsServiceRequest.FromString(await request.body()))
        return Response(metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString())

    routes = [Route("/v1/traces", traces, methods=["POST"]), Route("/v1/metrics", metrics, methods=["POST"])]
    server = ThreadedServer(Starlette(routes=routes))
    try:
        yield server.url, got
    finally:
        server.stop()


def _call(tmp_path: Path, **otel: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "OTEL_"))}
    env.update(otel, MESH_STATE_DIR=str(tmp_path / "state"), OTEL_METRIC_EXPORT_INTERVAL="200")
    done = subprocess.run([sys.executable, "-c", CALLER], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "called" in done.stdout, done.stderr[-3000:]
    return done


def _check(got: Collector, done: subprocess.CompletedProcess[str]) -> None:
    client_spans = [s for s in got.spans if s[0] == "caller" and s[2].get("server.address") == "hello"]
    assert client_spans, f"no span of the mesh call reached the collector: {got.spans} {done.stderr[-2000:]}"
    assert got.services == {"caller"}
    assert "http.client.request.duration" in got.metrics, got.metrics
    assert "meshlib" not in done.stderr, done.stderr  # nothing to warn about


@pytest.mark.timeout(90)
@pytest.mark.parametrize("protocol", ["grpc", None], ids=["grpc", "no-protocol-set"])
def test_otlp_over_grpc_reaches_a_collector(grpc_collector, tmp_path: Path, protocol: str | None) -> None:
    endpoint, got = grpc_collector
    otel = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if protocol:
        otel["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    _check(got, _call(tmp_path, **otel))


@pytest.mark.timeout(90)
def test_otlp_over_http_reaches_a_collector(http_collector, tmp_path: Path) -> None:
    endpoint, got = http_collector
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
    }
    _check(got, _call(tmp_path, **otel))


@pytest.mark.timeout(90)
def test_the_per_signal_protocol_wins(grpc_collector, http_collector, tmp_path: Path) -> None:
    """The SDK's order: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL over OTEL_EXPORTER_OTLP_PROTOCOL."""
    grpc_endpoint, over_grpc = grpc_collector
    http_endpoint, over_http = http_collector
    _call(
        tmp_path,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http_endpoint + "/v1/traces",
        OTEL_EXPORTER_OTLP_ENDPOINT=grpc_endpoint,
    )
    assert over_http.spans and not over_grpc.spans


def test_an_unusable_protocol_is_said_and_the_call_still_works(tmp_path: Path) -> None:
    done = _call(tmp_path, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/json")
    lines = [line for line in done.stderr.splitlines() if "meshlib" in line]
    assert len(lines) == 1, done.stderr
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'" in lines[0] and "grpc or http/protobuf" in lines[0]


def test_an_exporter_that_is_not_installed_is_said_with_the_package(tmp_path: Path) -> None:
    done = _call(tmp_path, OTEL_TRACES_EXPORTER="zipkin_json")
    assert "OTEL_TRACES_EXPORTER names 'zipkin_json': that exporter is not installed" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("names", "protocol", "installed", "chosen", "warned"),
    [
        (["otlp"], "", {"otlp_proto_grpc", "otlp_proto_http"}, ["otlp_proto_grpc"], ""),
        (["otlp"], "", {"otlp_proto_http"}, ["otlp_proto_http"], ""),  # only HTTP installed: HTTP, not nothing
        (["otlp"], "", set(), [], "pip install 'meshlib[otlp]'"),
        (["otlp"], "http/protobuf", {"otlp_proto_grpc"}, [], "pip install opentelemetry-exporter-otlp-proto-http"),
        (["otlp"], "grpc", {"otlp_proto_http"}, [], "OTEL_TRACES_EXPORTER=otlp over grpc"),
        (["otlp", "console"], "grpc", {"otlp_proto_grpc", "console"}, ["otlp_proto_grpc", "console"], ""),
        (["otlp_proto_http"], "grpc", {"otlp_proto_http"}, ["otlp_proto_http"], ""),  # a named one is taken as named
    ],
)
def test_which_exporter_otlp_means(names, protocol, installed, chosen, warned) -> None:
    got, warnings = resolve("traces", names, protocol, installed)
    assert got == chosen
    assert (warned in " ".join(warnings)) if warned else warnings == []


def test_an_exporter_broken_by_xds_protos_says_how_to_repair_it():
    """xds-protos (the xDS server's protos) ships an old copy of OpenTelemetry's OTLP protos; installed after
    opentelemetry-proto, it breaks every OTLP exporter with this ImportError (grpc/grpc#42926)."""
    from importlib.metadata import version

    from meshlib.telemetry.exporters import proto_conflict_hint

    broken = ImportError("cannot import name 'InstrumentationScope' from 'opentelemetry.proto.common.v1.common_pb2'")
    hint = proto_conflict_hint(broken)
    assert f"pip install --force-reinstall --no-deps opentelemetry-proto=={version('opentelemetry-proto')}" in hint
    assert proto_conflict_hint(ValueError("bad endpoint")) == ""
