"""Run in a venv with ``meshlib[consul]``: discovery through py-consul, against a tiny loopback stand-in for the
catalog's health endpoint (the full double and the real-agent suite are in ``tests/``)."""

import http.server
import importlib.util
import json
import threading

import consul  # noqa: F401  (py-consul, the [consul] extra)

import meshlib

assert importlib.util.find_spec("grpc") is None and importlib.util.find_spec("uvicorn") is None


class Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/v1/health/service/hello"):
            entry = {
                "Node": {"Node": "n1", "Address": "127.0.0.1"},
                "Service": {
                    "ID": "hello-1",
                    "Service": "hello",
                    "Address": "127.0.0.1",
                    "Port": hello_port,
                    "Tags": [],
                    "Meta": {},
                },
                "Checks": [{"Status": "passing"}],
            }
            body = json.dumps([entry]).encode()
            self.send_response(200)
            self.send_header("X-Consul-Index", "7")
        elif self.path.startswith("/hello"):
            body = b"hello"
            self.send_response(200)
        else:
            body = b"[]"
            self.send_response(200)
            self.send_header("X-Consul-Index", "1")
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Service)
hello_port = server.server_port  # the stand-in also answers as the instance itself
threading.Thread(target=server.serve_forever, daemon=True).start()
mesh = meshlib.Mesh(service="caller", discovery=f"consul://127.0.0.1:{server.server_port}", control_plane="")
with mesh.client() as client:
    assert client.get("http://hello/hello").text == "hello"
print("consul smoke: ok")
