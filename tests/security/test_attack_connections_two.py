"""Attack, round two: hold a server's memory, worker threads or connection slots without credentials, against real
``meshctl serve`` and ``meshlib.serve`` processes: a pipelining flood that never reads an answer, request bodies
sent a byte every few seconds (a Flask app under ``meshlib.serve``), idle keep-alive connections filling the
connection cap, and 100 KB of headers in one write."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import httpx
import pytest

from harness import Upstream, rss_mb, served_instance, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


@pytest.fixture
def cp(control_plane):
    return control_plane(extra_args=("--header-timeout", "1", "--max-connections", "40"))


@pytest.fixture
def served(cp, tmp_path) -> Iterator[Upstream]:
    upstream = served_instance(cp, tmp_path / "served", header_timeout=1)
    yield upstream
    upstream.stop()


def flood(port: int, path: str, megabytes: int) -> tuple[int, bool]:
    """Pipelined GETs on one connection that never reads an answer; returns bytes sent and whether the server
    closed the connection."""
    request = f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode()
    chunk = request * (65536 // len(request))
    sent = 0
    closed = False
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read: answers pile up server-side
        sock.settimeout(5)
        try:
            while sent < megabytes << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            closed = True  # refused by the server (a reset), or it stopped reading
    return sent, closed


@pytest.mark.parametrize("target", ["control-plane", "meshlib.serve"])
def test_a_pipelining_flood_cannot_grow_the_server(target, cp, served):
    pid, port, path = (
        (cp.proc.pid, cp.port, "/healthz")
        if target == "control-plane"
        else (served.proc.pid, served.port, "/-/mesh/health")
    )
    before = rss_mb(pid)
    for _ in range(3):
        flood(port, path, 5)
    growth = rss_mb(pid) - before
    assert growth < 50, f"{target} grew by {growth:.0f} MB under 15 MB of pipelined requests"
    health = cp.url + "/healthz" if target == "control-plane" else served.url + "/-/mesh/health"
    assert httpx.get(health, timeout=5).status_code == 200
    # a few pipelined requests, read as they come, are still answered (pipelining itself is allowed)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode() * 4)
        sock.settimeout(5)
        got = b""
        while got.count(b"HTTP/1.1 200") < 4:
            data = sock.recv(65536)
            assert data, f"closed after {got.count(b'HTTP/1.1 200')} of 4 pipelined answers"
            got += data


FLASK_APP = """
import sys
import flask
import meshlib

app = flask.Flask("slowbody")

@app.post("/upload")
def upload():
    return {"size": len(flask.request.get_data())}

@app.get("/hello")
def hello():
    return {"hello": "world"}

meshlib.serve(app, service="slowbody", port=0, log_level="warning", wsgi_workers=4, header_timeout=1,
              on_ready=lambda port: print(f"LISTENING {port}", flush=True))
"""


def test_slow_request_bodies_cannot_take_a_flask_app_down(tmp_path):
    script = tmp_path / "slowbody.py"
    script.write_text(textwrap.dedent(FLASK_APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_DISCOVERY="static:", MESH_CONTROL_PLANE="", MESH_STATE_DIR=str(tmp_path / "s"), MESH_STATS_INTERVAL="0"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        assert proc.stdout is not None
        line = wait_for(proc.stdout.readline, timeout=30, what="the Flask app to listen")
        port = int(line.split()[1])
        url = f"http://127.0.0.1:{port}"
        # 12 connections (3x the worker threads), each a declared 100 kB body sent a byte every 0.5 s
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n")
            socks.append(s)

        rounds = [0]

        def trickle() -> None:
            while not stop.wait(0.5):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"a")
                rounds[0] += 1

        threading.Thread(target=trickle, daemon=True).start()
        wait_for(lambda: rounds[0] >= 2, what="the slow bodies to be under way")
        for _ in range(5):
            r = httpx.get(url + "/hello", timeout=3)
            assert r.status_code == 200 and r.json() == {"hello": "world"}
            r = httpx.post(url + "/upload", content=b"x" * 50_000, timeout=3)
            assert r.json() == {"size": 50_000}

        def all_closed() -> bool:
            closed = 0
            for s in socks:
                s.settimeout(0.01)
                try:
                    if s.recv(1) == b"":
                        closed += 1
                except TimeoutError:
                    pass
                except OSError:
                    closed += 1
            return closed == len(socks)

        wait_for(all_closed, timeout=15, interval=0.2, what="the slow bodies to be cut off by the body-rate bound")
    finally:
        stop.set()
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)


def test_idle_keep_alive_connections_do_not_hold_the_slots(cp):
    """40 slots, 40 idle keep-alive clients: a real registration and /healthz are still answered."""
    idle = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", cp.port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            idle.append(s)
        for attempt in range(3):
            body = {"id": f"web-{attempt}", "service": "web", "address": "127.0.0.1", "port": 9000 + attempt}
            r = httpx.put(cp.url + "/v1/registry/register", timeout=5, json=body)
            assert r.status_code == 200, r.text
            assert httpx.get(cp.url + "/healthz", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("target", ["control-plane", "meshlib.serve"])
def test_a_large_head_in_one_write_is_refused(target, cp, served):
    port = cp.port if target == "control-plane" else served.port
    path = "/healthz" if target == "control-plane" else "/-/mesh/health"
    headers = "".join(f"x-h{i}: {'v' * 1000}\r\n" for i in range(100))  # 100 KB, one write, complete head
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n{headers}\r\n".encode())
        sock.settimeout(5)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_one_client_cannot_keep_more_than_its_share_of_idle_connections(served):
    from meshlib.security.connection_limits import MAX_IDLE_PER_CLIENT

    socks = []
    try:
        for _ in range(MAX_IDLE_PER_CLIENT + 10):
            s = socket.create_connection(("127.0.0.1", served.port))
            s.sendall(b"GET /-/mesh/health HTTP/1.1\r\nhost: localhost\r\n\r\n")
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            socks.append(s)

        def closed(s: socket.socket) -> bool:
            s.settimeout(0.01)
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        wait_for(
            lambda: sum(closed(s) for s in socks[MAX_IDLE_PER_CLIENT:]) == 10,
            timeout=10,
            what="the idle connections past the per-client cap to be closed",
        )
        # closed for the cap, not by keep-alive expiry (which would have closed the older ones first, and all)
        assert not all(closed(s) for s in socks[:MAX_IDLE_PER_CLIENT])
    finally:
        for s in socks:
            s.close()
