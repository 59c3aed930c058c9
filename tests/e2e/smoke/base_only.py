"""Run in a venv with ``meshlib`` alone (no extra): a mesh client calls a loopback HTTP server by its mesh name."""

import http.server
import importlib.util
import logging
import os
import threading

import meshlib

for absent in ("grpc", "uvicorn", "starlette", "flask", "django", "consul"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed: this venv must hold meshlib only"


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello " + self.headers.get("x-mesh-caller", "").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Said(logging.Handler):
    lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


logging.getLogger("meshlib").addHandler(Said())
os.environ["OTEL_TRACES_EXPORTER"] = "otlp"  # no OTLP exporter here: said, with what to install, and calls work

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=server.serve_forever, daemon=True).start()
mesh = meshlib.Mesh(service="caller", discovery=f"static:hello=127.0.0.1:{server.server_port}", control_plane="")
with mesh.client() as client:
    answer = client.get("http://hello/")
assert answer.status_code == 200 and answer.text == "hello caller", answer.text
assert any("OTEL_TRACES_EXPORTER=otlp" in line and "meshlib[otlp]" in line for line in Said.lines), Said.lines
try:
    mesh.grpc_channel("hello")
except ImportError as exc:
    assert "meshlib[grpc]" in str(exc), exc
else:
    raise AssertionError("a gRPC channel without grpcio")
server.shutdown()
print("base smoke: ok")
