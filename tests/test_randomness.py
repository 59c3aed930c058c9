"""meshlib draws from a random source of its own: an application that seeds the global ``random`` gets the same
sequence with mesh calls (HTTP and gRPC, balanced over two instances, traced, access-logged at a sample) running
as without; and a forked worker (a pre-fork server's) draws other numbers than its parent, as the global source
does after a fork."""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent import futures

import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.telemetry.tracing import random_traceparent

pytestmark = pytest.mark.e2e  # its tests start processes (upstreams)

pb2, pb2_grpc = stubs()


@pytest.fixture
def grpc_servers() -> list[int]:
    servers, ports = [], []
    for name in ("g1", "g2"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_EchoServicer_to_server(make_servicer(Behaviour(name)), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    yield ports
    for server in servers:
        server.stop(0)


def test_mesh_calls_leave_the_global_random_sequence_alone(upstreams, grpc_servers, monkeypatch):
    monkeypatch.setenv("MESH_ACCESS_LOG", "1")
    monkeypatch.setenv("MESH_ACCESS_LOG_SAMPLE", "0.5")
    http_ups = upstreams(2)
    discovery = StaticDiscovery(
        {
            "web": [Endpoint("127.0.0.1", u.port) for u in http_ups],
            "echo": [Endpoint("127.0.0.1", port) for port in grpc_servers],
        }
    )
    random.seed(1234)
    state = random.getstate()
    with meshlib.Mesh(service="seeded", discovery=discovery, control_plane="") as mesh:
        with mesh.client(timeout=5) as client:
            for _ in range(40):
                assert client.get("http://web/x").status_code == 200
        stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
        for _ in range(40):
            stub.Say(pb2.Hello(text="x"))
        random_traceparent()
        # two instances listed for each: every pick drew two numbers (power of two choices)
        assert len(mesh.service_state("web").handles) == len(mesh.service_state("echo").handles) == 2
        assert random.getstate() == state, "a mesh call drew from the application's global random"
    assert random.random() == random.Random(1234).random()


#: Run in a process of its own: forking the test worker, with grpc's threads in it, is not this test's business.
_FORKED = """
import os

from meshlib import randomness

read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, str(randomness.getrandbits(64)).encode())
    os._exit(0)
os.close(write)
child = int(os.read(read, 64).decode())
os.waitpid(pid, 0)
print(child, randomness.getrandbits(64))
"""


def test_a_forked_child_draws_other_numbers_than_its_parent():
    done = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=60, check=True)
    child, parent = done.stdout.split()
    assert child != parent, "a forked child repeats its parent's random sequence"
