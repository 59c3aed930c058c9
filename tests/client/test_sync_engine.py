"""The sync client's lean engine (client/h1.py, client/pools.py) where the sync side differs from the
async one: what callers of ``meshlib.Client`` see, threads sharing one client under ``max_connections``, closing
a body half-read, and the fallback to httpcore's pool. The wire-level cases both engines share are in
``test_h1_conformance.py`` (run once per engine)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpcore
import httpx
import pytest

import meshlib
from harness import wait_for
from meshlib.client.h1 import H1Connection
from meshlib.client.pools import EndpointPools
from meshlib.client.transport import MeshTransport
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

Script = Callable[[socket.socket, "Served"], None]


class Served:
    """What a scripted server saw: connections accepted, request heads read, connections the client closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.heads: list[bytes] = []
        self.closed_by_client = 0
        self.lock = threading.Lock()

    def read_head(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                raise ConnectionError("closed")
            data += more
        head = data.split(b"\r\n\r\n", 1)[0]
        with self.lock:
            self.heads.append(head)
        return head


@contextmanager
def scripted(script: Script) -> Iterator[Served]:
    """A loopback server running ``script`` on a thread per connection (blocking sockets, byte for byte)."""
    listener = socket.create_server(("127.0.0.1", 0))
    served = Served(listener.getsockname()[1])
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, suppress(ConnectionError, OSError):
            script(conn, served)

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with served.lock:
                served.connections += 1
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def answering(body: bytes = b"ok", extra: bytes = b"", reason: bytes = b"OK") -> Script:
    def script(conn: socket.socket, served: Served) -> None:
        while True:
            served.read_head(conn)
            conn.sendall(b"HTTP/1.1 200 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (reason, len(body), extra, body))

    return script


def mesh_to(port: int) -> meshlib.Mesh:
    return meshlib.Mesh(
        service="t",
        control_plane="",
        telemetry=False,
        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", port)]}),
    )


def test_the_sync_client_uses_the_lean_engine_and_http2_keeps_httpcore():
    with scripted(answering()) as served:
        mesh = mesh_to(served.port)
        with mesh.client() as client:
            assert client.get("http://svc/x").text == "ok"
            pools = client.mesh_transport.pool_for("svc")
            assert type(pools) is EndpointPools
            assert all(type(c) is H1Connection for s in pools.stacks().values() for c in s.idle)
        transport = MeshTransport(mesh, passthrough=httpx.HTTPTransport(), http2=True)
        with httpx.Client(transport=transport) as client:
            assert client.get("http://svc/x").text == "ok"
            assert type(transport.pool_for("svc")) is httpcore.ConnectionPool
        mesh.close()


def test_callers_see_httpx_errors_and_complete_answers():
    def script(conn: socket.socket, served: Served) -> None:
        while True:
            head = served.read_head(conn)
            if b"/broken" in head:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok")
                return
            body = gzip.compress(b'{"hello": "mesh"}') if b"/gzip" in head else b"ok"
            encoding = b"content-encoding: gzip\r\n" if b"/gzip" in head else b""
            conn.sendall(b"HTTP/1.1 202 Taken Gladly\r\n%scontent-length: %d\r\n\r\n%s" % (encoding, len(body), body))

    with scripted(script) as served:
        mesh = mesh_to(served.port)
        with mesh.client(timeout=5) as client:
            response = client.post("http://svc/fine", content=b"{}")
            assert (response.status_code, response.reason_phrase, response.http_version, response.text) == (
                202,
                "Taken Gladly",
                "HTTP/1.1",
                "ok",
            )
            assert response.elapsed.total_seconds() > 0
            assert client.get("http://svc/gzip").json() == {"hello": "mesh"}, "encoded answers still decoded"
            with pytest.raises(httpx.TransportError, match="malformed HTTP response"):
                client.post("http://svc/broken", content=b"{}")
            with pytest.raises(httpx.TransportError, match="CR, LF or NUL"):
                client.post("http://svc/fine", content=b"{}", headers={"x-bad": "a\nb"})
        mesh.close()


def test_a_streamed_answer_closed_half_read_closes_its_connection():
    seen_close = threading.Event()

    def script(conn: socket.socket, served: Served) -> None:
        served.read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 100_000)
        conn.settimeout(10)
        while True:
            try:
                if not conn.recv(65536):
                    break
            except ConnectionResetError:
                break
        seen_close.set()

    with scripted(script) as served:
        mesh = mesh_to(served.port)
        with mesh.client(timeout=5) as client:
            with client.stream("GET", "http://svc/big") as response:
                first = next(response.iter_raw())
                assert first and set(first) == {ord("x")}
            assert seen_close.wait(5), "the server saw the connection close"
            assert client.mesh_transport.pool_for("svc").connections() == 0
        mesh.close()


def test_threads_share_connections_within_max_connections():
    with scripted(answering()) as served:
        pools = EndpointPools(max_connections=2)
        failures: list[BaseException] = []

        def worker() -> None:
            for _ in range(25):
                try:
                    answer = pools.send(outbound(served.port))
                    assert answer.stream == b"ok"
                except BaseException as exc:  # collected, and the test fails on them below
                    failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == []
        assert served.connections <= 2, "never more than max_connections to one endpoint"
        assert len(served.heads) == 200
        pools.close()


def test_a_full_pool_times_out_naming_the_endpoint_then_recovers():
    def script(conn: socket.socket, served: Served) -> None:
        while True:
            served.read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            time.sleep(0.3)  # the body stays open a while: the connection is busy
            conn.sendall(b"0\r\n\r\n")

    with scripted(script) as served:
        pools = EndpointPools(max_connections=1)
        held = pools.send(outbound(served.port))
        started = time.monotonic()
        with pytest.raises(httpcore.PoolTimeout, match=rf"127\.0\.0\.1:{served.port}.*0\.1s"):
            pools.send(outbound(served.port, pool_timeout=0.1))
        assert time.monotonic() - started < 2
        assert b"".join(held.stream) == b"hello"
        held.stream.close()  # returned: the next request gets the connection
        assert b"".join(pools.send(outbound(served.port)).stream) == b"hello"
        assert served.connections == 1
        pools.close()


def test_a_waiting_thread_gets_the_connection_a_release_frees():
    def script(conn: socket.socket, served: Served) -> None:
        while True:
            served.read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            time.sleep(0.2)
            conn.sendall(b"2\r\nok\r\n0\r\n\r\n")

    with scripted(script) as served:
        pools = EndpointPools(max_connections=1)
        results: list[bytes] = []

        def call() -> None:
            answer = pools.send(outbound(served.port, pool_timeout=10))
            results.append(b"".join(answer.stream))
            answer.stream.close()

        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == [b"ok"] * 3 and served.connections == 1
        pools.close()


def test_a_large_upload_goes_out_whole_and_the_connection_is_reused():
    received: list[int] = []

    def script(conn: socket.socket, served: Served) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                more = conn.recv(65536)
                if not more:
                    return
                buffer += more
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += conn.recv(1 << 20)
            received.append(len(buffer[:length]))
            buffer = buffer[length:]
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    with scripted(script) as served:
        mesh = mesh_to(served.port)
        with mesh.client(timeout=10) as client:
            for size in (10, 70_000, 3_000_000):
                assert client.post("http://svc/up", content=b"u" * size).text == "ok"
        assert received == [10, 70_000, 3_000_000] and served.connections == 1
        mesh.close()


def test_an_idle_connection_the_server_closed_is_not_used():
    def script(conn: socket.socket, served: Served) -> None:
        served.read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        # keep-alive by the protocol, then the server closes while the connection is idle

    with scripted(script) as served:
        pools = EndpointPools()
        assert pools.send(outbound(served.port)).stream == b"ok"
        stack = next(iter(pools.stacks().values()))
        wait_for(lambda: stack.idle and stack.idle[0]._poll.poll(0), what="the server's close to arrive")
        assert pools.send(outbound(served.port)).stream == b"ok", "a fresh connection, not an error"
        assert served.connections == 2
        pools.close()


def outbound(port: int, pool_timeout: float = 5.0) -> Any:
    from meshlib.client.outbound import Outbound

    timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": pool_timeout}
    return Outbound(
        b"GET", b"http", "127.0.0.1", port, b"/", [(b"host", b"svc")], httpx.ByteStream(b""), {"timeout": timeouts}
    )


def test_closing_the_pools_closes_connections_still_in_use_when_they_are_released():
    def script(conn: socket.socket, served: Served) -> None:
        served.read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
        time.sleep(0.2)
        conn.sendall(b"0\r\n\r\n")
        conn.settimeout(5)
        if not conn.recv(1):
            served.closed_by_client += 1

    with scripted(script) as served:
        pools = EndpointPools()
        answer = pools.send(outbound(served.port))
        stack = next(iter(pools.stacks().values()))
        pools.close()  # while the answer is still being read
        assert b"".join(answer.stream) == b"ok"
        answer.stream.close()
        assert stack.idle == [] and stack.active == 0, "not kept for reuse by a closed client"
        wait_for(lambda: served.closed_by_client == 1, what="the server to see the connection close")


def test_a_forked_child_never_uses_its_parent_s_connections():
    """A pre-forking server (gunicorn --preload) may make the client before it forks: a child that reused the
    parent's keep-alive connection would read the parent's answers."""
    import os

    with scripted(answering()) as served:
        mesh = mesh_to(served.port)
        client = mesh.client(timeout=5)
        assert client.get("http://svc/parent").text == "ok"
        pid = os.fork()
        if pid == 0:  # the child: one call, then out without running the test process's cleanup
            code = 1
            try:
                code = 0 if client.get("http://svc/child").text == "ok" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert served.connections == 2, "the child connected afresh"
        assert client.get("http://svc/parent-again").text == "ok"
        assert served.connections == 2, "the parent's connection is still open and reused"
        client.close()
        mesh.close()


def test_an_upload_whose_own_iterator_fails_raises_that_error_and_drops_the_connection():
    with scripted(answering()) as served:
        pools = EndpointPools()

        def parts() -> Iterator[bytes]:
            yield b"first part"
            raise OSError("the file being uploaded went away")

        request = outbound(served.port)
        request.method = b"POST"
        request.headers = [(b"host", b"svc"), (b"transfer-encoding", b"chunked")]
        request.stream = parts()
        with pytest.raises(OSError, match="went away"):
            pools.send(request)
        assert pools.connections() == 0, "a half-sent request's connection is never reused"
        assert pools.send(outbound(served.port)).stream == b"ok"
        pools.close()
