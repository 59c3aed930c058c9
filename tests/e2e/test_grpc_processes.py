"""gRPC instances as real processes: registered in the control plane's registry by ``meshlib.grpc.server``,
certificates from its CA by CSR, strict mTLS; instances killed and stopped under load."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import grpc
import meshlib
from grpc_support import GrpcUpstream, stubs
from harness import ControlPlaneProcess, wait_for

pb2, pb2_grpc = stubs()
TOKEN = "grpc-bootstrap"


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "cp", bootstrap_token=TOKEN)
    yield cp
    cp.stop()


def instance_env(cp: ControlPlaneProcess, tmp: Path, name: str) -> dict[str, str]:
    return {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_TLS": "strict",
        "MESH_BOOTSTRAP_TOKEN": TOKEN,
        "MESH_STATE_DIR": str(tmp / name),
        "MESH_SERVICE": "echo",
    }


def test_killed_and_stopped_instances_under_load_fail_no_unary_call(control_plane, tmp_path, monkeypatch):
    upstreams = [GrpcUpstream(n, env=instance_env(control_plane, tmp_path, n), aio=(n == "c")) for n in "abc"]
    try:
        for u in upstreams:
            u.wait_listening()
        monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", TOKEN)
        mesh = meshlib.Mesh(
            service="front",
            control_plane=control_plane.url,
            tls="strict",
            state_dir=str(tmp_path / "front"),
            telemetry=False,
        )
        wait_for(lambda: len(mesh.service_state("echo").handles) == 3, timeout=20, what="three instances listed")
        stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
        seen: Counter[str] = Counter()
        errors: list[BaseException] = []
        stop = threading.Event()
        lock = threading.Lock()

        def load() -> None:
            while not stop.is_set():
                try:
                    reply = stub.Say(pb2.Hello(text="hi"), timeout=10)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(exc)
                else:
                    with lock:
                        seen[reply.instance] += 1
                    assert reply.peer == "spiffe://mesh.local/ns/default/sa/front"

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            wait_for(lambda: len(seen) == 3 and min(seen.values()) >= 10, timeout=30, what="load on all three")
            upstreams[0].kill()  # SIGKILL: no deregistration, calls in flight cut
            before = sum(seen.values())
            wait_for(lambda: sum(seen.values()) >= before + 200, timeout=30, what="load to go on")
            upstreams[1].stop()  # SIGTERM: deregisters first, drains, then stops
            wait_for(
                lambda: [h.endpoint.port for h in mesh.service_state("echo").handles] == [upstreams[2].port],
                timeout=20,
                what="only c listed",
            )
            after_stop = seen["c"]
            wait_for(lambda: seen["c"] >= after_stop + 200, timeout=30, what="load on c")
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert errors == [], f"{len(errors)} failed calls, first: {errors[:1]}"
        assert upstreams[1].proc.returncode == 0
        mesh.close()
    finally:
        for u in upstreams:
            u.stop()


def test_a_grpc_instance_registers_as_grpc_and_tls_only(control_plane, tmp_path):
    upstream = GrpcUpstream("a", env=instance_env(control_plane, tmp_path, "a")).wait_listening()
    try:
        import httpx

        listed: Any = httpx.get(f"{control_plane.url}/v1/registry/services/echo", timeout=5).json()
        instance = listed["instances"][0] if "instances" in listed else listed[0]
        assert instance["meta"]["protocol"] == "grpc"
        assert instance["meta"]["mesh_tls"] == "strict"
        assert instance["port"] == upstream.port
    finally:
        upstream.stop()
