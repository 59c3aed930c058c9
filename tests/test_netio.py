"""The sync network backend of mesh hops (``meshlib.netio``) against real sockets and real TLS handshakes: a scripted
server in a thread answers each connection the way a test needs (records split or together, huge bodies, silence,
an abrupt close), and httpcore's own connection pool drives our streams exactly as it does in meshlib."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpcore
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.netio import MeshNetworkBackend
from meshlib.security.ca import CertificateAuthority
from meshlib.security.tls import client_context, server_context

Handler = Callable[[socket.socket], None]


class ScriptedServer:
    """Accepts connections on loopback; each one (wrapped in TLS when a context is given) is handed to
    ``handler`` in its own thread."""

    def __init__(self, handler: Handler, context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True) if self.context is not None else raw
            self.handler(conn)
        except (OSError, ValueError):
            pass  # the client gave up (a test of timeouts or refusals)
        finally:
            raw.close()

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 request with a Content-Length (or none)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client went away")
        body += chunk
    return head, body


def response_head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % length


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for ``svc``, client context for ``caller``), both from one mesh CA, client certs required."""
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("ca"))
    out = tmp_path_factory.mktemp("certs")

    def files(service: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        (out / f"{service}.crt").write_bytes(ca.issue(key.public_key(), service).pem())
        (out / f"{service}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return out / f"{service}.crt", out / f"{service}.key"

    server, client = server_context(require_client_cert=True), client_context()
    for ctx, service in ((server, "svc"), (client, "caller")):
        cert, key = files(service)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cadata=ca.roots_pem().decode())
    return server, client


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(handler: Handler, context: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(handler, context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def pool(client_ctx: ssl.SSLContext | None = None) -> httpcore.ConnectionPool:
    return httpcore.ConnectionPool(ssl_context=client_ctx, network_backend=MeshNetworkBackend())


def request(
    p: httpcore.ConnectionPool,
    server: ScriptedServer,
    tls: bool,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 5.0,
    sni: str = "svc.default.mesh",
) -> httpcore.Response:
    extensions: dict[str, object] = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": 5}}
    if tls:
        extensions["sni_hostname"] = sni
    headers = [(b"host", b"svc"), (b"content-length", str(len(body)).encode())] if body else [(b"host", b"svc")]
    return p.request(
        method,
        f"{'https' if tls else 'http'}://127.0.0.1:{server.port}/",
        headers=headers,
        content=body,
        extensions=extensions,
    )


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_keep_alive_requests_with_responses_split_any_way(pki, serve, tls):
    """Headers and body as separate writes (separate TLS records), as one write, and byte by byte: every response is
    whole, and all of them travel on one connection."""
    server_ctx, client_ctx = pki

    def handler(conn: socket.socket) -> None:
        n = 0
        while True:
            read_request(conn)
            body = b"response %d " % n * 10
            head = response_head(len(body))
            if n % 3 == 0:
                conn.sendall(head)
                conn.sendall(body)
            elif n % 3 == 1:
                conn.sendall(head + body)
            else:
                for i in range(len(head + body)):
                    conn.sendall((head + body)[i : i + 1])
            n += 1

    server = serve(handler, server_ctx if tls else None)
    with pool(client_ctx if tls else None) as p:
        for n in range(9):
            response = request(p, server, tls)
            assert response.status == 200
            assert response.content == b"response %d " % n * 10
    assert server.connections == 1


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_large_bodies_both_ways(pki, serve, tls):
    """A 3 MiB upload and a 5 MiB answer: many records, partial records per recv, full socket buffers on both
    sides."""
    server_ctx, client_ctx = pki
    upload = bytes(range(256)) * (3 * 4096)

    def handler(conn: socket.socket) -> None:
        _, body = read_request(conn)
        answer = body[::-1] + body[: 2 * 1024 * 1024]
        conn.sendall(response_head(len(answer)) + answer)

    server = serve(handler, server_ctx if tls else None)
    with pool(client_ctx if tls else None) as p:
        response = request(p, server, tls, "POST", upload)
    assert response.content == upload[::-1] + upload[: 2 * 1024 * 1024]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_a_silent_server_is_a_read_timeout(pki, serve, tls):
    server_ctx, client_ctx = pki
    release = threading.Event()

    def handler(conn: socket.socket) -> None:
        read_request(conn)
        release.wait(10)

    server = serve(handler, server_ctx if tls else None)
    try:
        with pool(client_ctx if tls else None) as p, pytest.raises(httpcore.ReadTimeout):
            request(p, server, tls, timeout=0.3)
    finally:
        release.set()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_a_server_that_stops_reading_is_a_write_timeout(pki, serve, tls):
    server_ctx, client_ctx = pki
    release = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.recv(1024)  # (completes the TLS handshake), then reads nothing more
        release.wait(10)

    server = serve(handler, server_ctx if tls else None)
    try:
        with pool(client_ctx if tls else None) as p, pytest.raises(httpcore.WriteTimeout):
            request(p, server, tls, "POST", b"x" * (64 * 1024 * 1024), timeout=0.5)
    finally:
        release.set()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_an_abrupt_close_mid_body_is_a_protocol_error_not_a_hang(pki, serve, tls):
    """The server closes the TCP connection (no TLS close_notify) ten bytes into a 100-byte body."""
    server_ctx, client_ctx = pki

    def handler(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(response_head(100) + b"x" * 10)

    server = serve(handler, server_ctx if tls else None)
    with pool(client_ctx if tls else None) as p, pytest.raises(httpcore.RemoteProtocolError):
        request(p, server, tls)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_an_idle_connection_the_server_closed_is_replaced(pki, serve, tls):
    """httpcore asks the stream whether an idle connection is readable before reusing it: one the server closed is
    dropped and the request goes on a new connection instead of failing."""
    server_ctx, client_ctx = pki
    closed = threading.Event()

    def handler(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(response_head(2) + b"ok")
        conn.close()  # as a server's keep-alive timeout does
        closed.set()

    server = serve(handler, server_ctx if tls else None)
    with pool(client_ctx if tls else None) as p:
        for _ in range(3):
            closed.clear()
            assert request(p, server, tls).content == b"ok"
            assert closed.wait(5)
    assert server.connections == 3


def test_tls_verification_failures_are_connect_errors_that_name_the_problem(pki, serve):
    server_ctx, client_ctx = pki
    served = threading.Event()

    def handler(conn: socket.socket) -> None:
        served.set()
        read_request(conn)
        conn.sendall(response_head(2) + b"ok")

    server = serve(handler, server_ctx)
    with pool(client_ctx) as p:
        with pytest.raises(httpcore.ConnectError, match=r"certificate verify failed|Hostname mismatch"):
            request(p, server, True, sni="ledger.default.mesh")  # the certificate is for svc
        assert not served.is_set()
        anonymous = client_context()
        anonymous.load_verify_locations(cadata=client_ctx.get_ca_certs(binary_form=True)[0])
    # no client certificate: TLS 1.3 reports the server's refusal on the first read, not in the handshake
    refused = (httpcore.ConnectError, httpcore.ReadError, httpcore.RemoteProtocolError)
    with pool(anonymous) as p, pytest.raises(refused):
        request(p, server, True)
    with pool(client_ctx) as p:
        assert request(p, server, True).content == b"ok"


def test_a_plaintext_server_is_a_connect_error_for_a_tls_client(pki, serve):
    _, client_ctx = pki

    def handler(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    server = serve(handler)
    with pool(client_ctx) as p, pytest.raises(httpcore.ConnectError):
        request(p, server, True)


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pool() as p, pytest.raises(httpcore.ConnectError):
        p.request("GET", f"http://127.0.0.1:{port}/", extensions={"timeout": {"connect": 2}})


def test_small_reads_drain_a_record_without_waiting_on_the_socket(pki, serve):
    """A reader asking for less than a record holds the rest in OpenSSL: the next reads return it at once (the
    socket has nothing more), and the stream reports itself readable meanwhile."""
    server_ctx, client_ctx = pki
    release = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"0123456789" * 10)  # one record
        release.wait(10)

    server = serve(handler, server_ctx)
    stream = MeshNetworkBackend().connect_tcp("127.0.0.1", server.port, timeout=5)
    stream = stream.start_tls(client_ctx, "svc.default.mesh", timeout=5)
    try:
        stream.write(b"hello", timeout=5)
        parts = [stream.read(30, timeout=5)]
        assert stream.get_extra_info("is_readable")
        while sum(map(len, parts)) < 100:
            parts.append(stream.read(30, timeout=0.5))
        assert b"".join(parts) == b"0123456789" * 10
        assert not stream.get_extra_info("is_readable")
        assert stream.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    finally:
        release.set()
        stream.close()
