"""The strict-mode server's TLS writes (``meshlib.security.server_tls.CorkedTransport``), in process on uvicorn with
uvloop and with asyncio's own loop, over real mTLS: a response's headers and body leave as one record, yet headers
of a streamed response are never held back behind a body that is not ready, and every response shape arrives whole."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvloop

import meshlib
from harness import ThreadedServer
from meshlib.contrib.asgi import MeshMiddleware
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.security.server_tls import CorkedTransport
from meshlib.server import mesh_uvicorn_config

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

BOOTSTRAP = "test-bootstrap-token"


class App:
    """/sized?n=N (N bytes, Content-Length), /empty (204), /stream (headers, then the body once released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.streaming = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, query = scope["path"], scope["query_string"].decode()
        if path == "/sized":
            n = int(query.partition("=")[2])
            body = bytes(i % 251 for i in range(n))
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % n)]})
            await send({"type": "http.response.body", "body": body})
        elif path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            self.streaming.set()
            while not self.release.is_set():  # poll: the test thread releases it
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"first,", "more_body": True})
            await send({"type": "http.response.body", "body": b"last"})


@pytest.fixture
def identities(control_plane, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(tmp_path / "cp", bootstrap_token=BOOTSTRAP)

    def mesh(service: str, port: int = 0) -> meshlib.Mesh:
        return meshlib.Mesh(
            service=service,
            discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", port)]} if port else {}),
            control_plane=cp.url,
            tls="strict",
            state_dir=str(tmp_path / service),
        )

    return mesh


@pytest.fixture(params=["uvloop", "asyncio"])
def strict_server(request, identities) -> Iterator[tuple[App, ThreadedServer, meshlib.Mesh]]:
    app = App()
    server_mesh = identities("svc")
    config = mesh_uvicorn_config(MeshMiddleware(app, server_mesh), server_mesh, log_level="warning", lifespan="off")
    loop_factory = uvloop.new_event_loop if request.param == "uvloop" else None
    server = ThreadedServer(app, config_object=config, loop_factory=loop_factory)
    client_mesh = identities("caller", server.port)
    yield app, server, client_mesh
    app.release.set()
    server.stop()
    client_mesh.close()
    server_mesh.close()


def test_every_response_shape_arrives_whole_on_one_connection(strict_server):
    _, _, mesh = strict_server
    with mesh.client() as client:
        for n in (0, 1, 100, 16383, 16384, 70000, 3 * 1024 * 1024):
            r = client.get(f"http://svc/sized?n={n}")
            assert r.status_code == 200
            assert r.content == bytes(i % 251 for i in range(n)), n
        r = client.get("http://svc/empty")
        assert (r.status_code, r.content) == (204, b"")
        r = client.head("http://svc/sized?n=10")
        assert (r.status_code, r.headers["content-length"], r.content) == (200, "10", b"")
        assert client.get("http://svc/sized?n=5").content == bytes(range(5))


def test_streamed_headers_are_not_held_behind_a_body_that_is_not_ready(strict_server):
    app, _, mesh = strict_server
    with mesh.client() as client, client.stream("GET", "http://svc/stream") as response:
        # the headers came while the app is still waiting to write its body
        assert response.status_code == 200
        assert app.streaming.is_set() and not app.release.is_set()
        app.release.set()
        assert response.read() == b"first,last"


def test_connection_close_sends_the_whole_response_before_closing(strict_server):
    """With ``Connection: close`` uvicorn closes the transport right after the response: what the transport holds
    must go out first."""
    _, server, mesh = strict_server
    assert mesh.identity is not None
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        tls = mesh.identity.client.wrap_socket(raw, server_hostname="svc.default.mesh")
        tls.sendall(b"GET /sized?n=1000 HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == bytes(i % 251 for i in range(1000))


def test_a_slow_reader_of_a_large_closing_response_gets_all_of_it(strict_server):
    """A closed connection's socket is dropped when the peer does not answer close_notify (so that idle keep-alive
    clients cannot hold a shutdown), but never before what was written has left: a reader slower than the drop's
    wait still gets every byte."""
    _, server, mesh = strict_server
    assert mesh.identity is not None
    n = 24 * 1024 * 1024  # more than the kernel's socket buffers hold: most of it waits in the server's
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        tls = mesh.identity.client.wrap_socket(raw, server_hostname="svc.default.mesh")
        tls.sendall(f"GET /sized?n={n} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n".encode())
        data = bytearray(tls.recv(65536))
        wait = threading.Event()
        wait.wait(CorkedTransport.CLOSE_NOTIFY_WAIT * 3)  # slower than the drop's wait, on purpose
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == n and body == bytes(i % 251 for i in range(n))


def test_corked_transport_holds_only_the_first_small_write_of_a_response():
    """The write pattern itself, on a recording transport: headers + body become one write; large writes and writes
    after the first pass straight through; the end of a response re-arms it; close flushes first."""

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            assert not self.closed
            self.writes.append(bytes(data))

        def close(self) -> None:
            self.closed = True

        def get_write_buffer_size(self) -> int:
            return 0

    loop = asyncio.new_event_loop()
    try:
        rec = Recorder()
        cork = CorkedTransport(rec, loop)  # type: ignore[arg-type]
        cork.write(b"head1")
        assert rec.writes == [] and cork.get_write_buffer_size() == 5
        cork.write(b"body1")
        cork.write(b"more1")
        assert rec.writes == [b"head1body1", b"more1"]
        cork.response_complete()
        cork.write(b"head2")
        cork.write(b"x" * CorkedTransport.PASS_THROUGH)
        assert rec.writes[2:] == [b"head2", b"x" * CorkedTransport.PASS_THROUGH]
        cork.response_complete()
        cork.write(b"head3")  # a streamed response: the body is not ready; the next loop turn sends the headers
        loop.run_until_complete(asyncio.sleep(0))
        assert rec.writes[4:] == [b"head3"]
        cork.response_complete()
        cork.write(b"head4")
        cork.close()
        assert rec.writes[5:] == [b"head4"] and rec.closed
        loop.run_until_complete(asyncio.sleep(0))  # the scheduled flush finds nothing left to send
        assert len(rec.writes) == 6
    finally:
        loop.close()


def test_server_and_client_agree_under_concurrent_load(strict_server):
    """Eight threads, one client: responses never mix between connections or requests."""
    _, _, mesh = strict_server
    errors: list[BaseException] = []
    with mesh.client() as client:

        def worker(k: int) -> None:
            try:
                for i in range(40):
                    n = (k * 977 + i * 131) % 5000
                    assert client.get(f"http://svc/sized?n={n}").content == bytes(j % 251 for j in range(n))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[0]


def test_a_small_response_is_one_tls_record(strict_server):
    """One record = one read for the client (``SSLSocket.recv`` never returns more than one record)."""
    _, server, mesh = strict_server
    assert mesh.identity is not None
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        tls = mesh.identity.client.wrap_socket(raw, server_hostname="svc.default.mesh")
        for _ in range(3):
            tls.sendall(b"GET /sized?n=100 HTTP/1.1\r\nhost: svc\r\n\r\n")
            head, _, body = tls.recv(65536).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == bytes(range(100))


def test_client_tls_reads_take_every_record_on_the_socket(strict_server, monkeypatch):
    """``SSLSocket.recv`` gives one 16 KiB record per call; the client takes the records already there with it, so a
    1 MiB answer reaches httpx in about as many parts as in plaintext (64 KiB each), not 64+. Both sync engines:
    the lean one (``h1.py``) and httpcore's pool (HTTP/2 allowed, which falls back to HTTP/1.1 here)."""
    from meshlib.client import tls_reads
    from meshlib.client.h1 import SyncBody
    from meshlib.client.transport import MeshTransport

    _, _, mesh = strict_server
    reads: list[int] = []
    original_read = tls_reads._TLSStream.read
    original_iter = SyncBody.__iter__

    def counted(self: Any, max_bytes: int, timeout: float | None = None) -> bytes:
        data = original_read(self, max_bytes, timeout)
        reads.append(len(data))
        return data

    def counted_parts(self: Any) -> Any:
        for part in original_iter(self):
            reads.append(len(part))
            yield part

    monkeypatch.setattr(tls_reads._TLSStream, "read", counted)
    monkeypatch.setattr(SyncBody, "__iter__", counted_parts)
    lean = mesh.client()
    # HTTP/2 allowed: httpcore's pool (the server's ALPN answer is HTTP/1.1, so h2 is never imported)
    pooled = httpx.Client(transport=MeshTransport(mesh, passthrough=httpx.HTTPTransport(), http2=True))
    for engine, client in (("lean", lean), ("httpcore", pooled)):
        with client:
            client.get("http://svc/sized?n=10")  # connect first: only the big answer's reads are counted below
            reads.clear()
            r = client.get(f"http://svc/sized?n={1 << 20}")
        assert r.content == bytes(i % 251 for i in range(1 << 20))
        assert len(reads) <= 40, f"{engine}: {len(reads)} reads for 1 MiB: {reads[:8]}..."
        assert max(reads) > 16384, engine  # records were coalesced


def test_a_hops_network_stream_shows_the_verified_peer_as_httpcore_streams_do(strict_server):
    """``response.extensions["network_stream"].get_extra_info(...)`` on both lean engines: the peer certificate the
    mesh verified (its SPIFFE ID), the addresses and the socket; None for a name httpcore does not answer either."""
    _, server, mesh = strict_server

    def check(response: httpx.Response) -> None:
        stream = response.extensions["network_stream"]
        cert = stream.get_extra_info("ssl_object").getpeercert()
        assert ("URI", "spiffe://mesh.local/ns/default/sa/svc") in cert["subjectAltName"]
        assert stream.get_extra_info("server_addr")[:2] == ("127.0.0.1", server.port)
        assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"
        assert stream.get_extra_info("socket") is not None
        assert stream.get_extra_info("no-such-thing") is None

    with mesh.client() as client:
        check(client.get("http://svc/sized?n=10"))

    async def main() -> None:
        async with mesh.async_client() as client:
            check(await client.get("http://svc/sized?n=10"))

    asyncio.run(main())
