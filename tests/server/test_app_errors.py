"""An app that raises after its response went out whole (Starlette sends its 500, then re-raises): the server
must keep the connection, or the client's next request on it is reset, and a reset POST cannot be retried.
Real uvicorn, a real socket, a Starlette app behind MeshMiddleware."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery

pytestmark = pytest.mark.e2e  # its tests start servers


async def work(request: Request) -> PlainTextResponse:
    if request.query_params.get("fail"):
        raise RuntimeError("boom in the handler")
    return PlainTextResponse("ok")


def _exchange(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: work\r\ncontent-length: 1\r\n\r\nx".encode())
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {data!r}")
        data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def server() -> Any:
    mesh = meshlib.Mesh(service="work", discovery=StaticDiscovery({}), control_plane="")
    app = MeshMiddleware(Starlette(routes=[Route("/work", work, methods=["POST"])]), mesh)
    running = ThreadedServer(app)
    yield running
    running.stop()
    mesh.close()


def test_the_connection_is_kept_after_a_500_sent_whole(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="uvicorn.error"),
        socket.create_connection(("127.0.0.1", server.port)) as s,
    ):
        s.settimeout(10)
        assert _exchange(s, "/work?fail=1").startswith(b"HTTP/1.1 500")
        for _ in range(3):  # the same connection goes on serving
            answer = _exchange(s, "/work")
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    assert any("boom in the handler" in (r.exc_text or "") or r.exc_info for r in caplog.records)  # not lost
