"""A gRPC instance's ``/-/mesh/health`` and ``/-/mesh/metrics``, on a small HTTP side port.

A gRPC port cannot also answer plain HTTP, and the mesh's tools (``meshctl status``, the demo's live view, a
Prometheus scrape) read every instance's metrics over HTTP. The side port is advertised in discovery as
``meta.metrics_port`` and speaks the instance's mesh TLS (strict: client certificate required).
"""

from __future__ import annotations

import http.server
import socket
import threading
from typing import Any

from ..inbound import mesh_endpoint
from ..runtime import Runtime


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # a silent or slow peer (or TLS handshake) holds a thread for at most this long
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        reply = mesh_endpoint(self.server.mesh, path, self.server.draining)
        if reply is None:
            self.send_error(404, "only /-/mesh/health and /-/mesh/metrics here")
            return
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], mesh: Runtime) -> None:
        self.mesh = mesh
        self.draining = False
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        identity = mesh.identity
        if identity is not None:
            context = identity.server_strict if mesh.settings.tls == "strict" else identity.server_permissive
            # the handshake runs in the request's thread (first read), not in the accept loop
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


class SidePort:
    def __init__(self, mesh: Runtime, host: str, port: int = 0) -> None:
        self._server = _Server((host, port), mesh)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"meshlib-grpc-side-{self.port}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        self._server.draining = True

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
