"""Attack: hold a server's memory or connections with slow or huge requests, or abandoned long-polls. Run against a
real ``meshctl serve`` and a real ``meshlib.serve`` process."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from harness import Upstream, served_instance, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (recv gives EOF or a reset)."""
    sock.settimeout(0.05)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4")


def send_huge_header(port: int) -> tuple[int, bytes]:
    """Stream a header of up to 100 MB; returns how much was sent before the server stopped it, and its answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    sent = 0
    answer = b""
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-big: ")
        chunk = b"a" * 65536
        while sent < 100 << 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        answer = sock.recv(4096)
    sock.close()
    return sent, answer


@pytest.fixture
def cp(control_plane):
    return control_plane(extra_args=("--header-timeout", "1", "--max-connections", "64"))


@pytest.fixture
def served(cp, tmp_path) -> Iterator[Upstream]:
    upstream = served_instance(cp, tmp_path / "served", header_timeout=1)
    yield upstream
    upstream.stop()


@pytest.mark.parametrize("target", ["control-plane", "meshlib.serve"])
def test_huge_headers_are_refused_early(target, cp, served):
    port = cp.port if target == "control-plane" else served.port
    sent, answer = send_huge_header(port)
    assert sent < 16 << 20, f"the server read {sent} bytes of one header"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    url = cp.url if target == "control-plane" else served.url
    assert httpx.get(url + ("/healthz" if target == "control-plane" else "/-/mesh/health")).status_code == 200


@pytest.mark.parametrize("target", ["control-plane", "meshlib.serve"])
def test_large_bodies_never_count_as_headers(target, cp, served):
    """The header limit counts header bytes only: a body whose last chunk is bigger than the limit is a body (a
    chunk that completed a request once counted as the next request's headers, and large uploads got a 431)."""
    url = cp.url + "/v1/stats/report" if target == "control-plane" else served.url + "/upload"
    for size in (70_000, 100_000, 200_000):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0]))) as sock:
                path = "/" + url.split("/", 3)[3]
                sock.sendall(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {size}\r\n\r\n".encode())
                time.sleep(0.01)  # headers first, as clients send them: the body then arrives in chunks of its own
                sock.sendall(b"a" * size)
                sock.settimeout(10)
                answer = sock.recv(64)
            assert answer.startswith(b"HTTP/1.1 "), answer
            assert not answer.startswith(b"HTTP/1.1 431"), f"a body of {size} bytes was taken for headers"


@pytest.mark.parametrize("target", ["control-plane", "meshlib.serve"])
@pytest.mark.parametrize("behaviour", ["silent", "one byte", "a byte at a time"])
def test_slow_or_silent_connections_are_closed(target, behaviour, cp, served):
    port = cp.port if target == "control-plane" else served.port
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        if behaviour == "one byte":
            sock.sendall(b"G")
        started = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n"
        position = 0

        def closed() -> bool:
            nonlocal position
            if behaviour == "a byte at a time" and position < len(request):
                try:
                    sock.sendall(request[position : position + 1])
                except OSError:
                    return True
                position += 1
            return closed_by_peer(sock)

        wait_for(closed, timeout=15, interval=0.1, what="the server to close a connection whose headers never end")
        assert time.monotonic() - started >= 0.5  # closed by the header timeout, not at once
    finally:
        sock.close()


def _hold_long_polls(cp, path: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", cp.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())
        socks.append(s)
    return socks


@pytest.mark.parametrize(
    ("path", "gauge"),
    [
        ("/v1/rules?index=0&wait=300s", "meshcp_rules_watchers"),
        ("/v1/registry/services/nobody?index=5&wait=300s", "meshcp_registry_watchers"),
    ],
)
def test_abandoned_long_polls_are_released(control_plane, path, gauge):
    cp = control_plane()
    socks = _hold_long_polls(cp, path, 40)
    wait_for(lambda: metric(cp.url, gauge) == 40, what=f"{gauge} to count 40 waiting long-polls")
    for s in socks:
        s.close()
    wait_for(lambda: metric(cp.url, gauge) == 0, timeout=10, what="abandoned long-polls to be released")


def test_connection_limit_answers_503_beyond_it(cp):
    socks = _hold_long_polls(cp, "/v1/rules?index=0&wait=300s", 64)
    try:
        wait_for(lambda: metric_via_socket(cp.port) == 503, what="a 503 once the connection limit is reached")
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: httpx.get(cp.url + "/healthz").status_code == 200, what="service after the load is gone")


def metric_via_socket(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        s.settimeout(5)
        status = s.recv(100).split(b" ", 2)[1]
    return int(status)
