"""Graceful shutdown of a ``meshlib.serve`` instance: under strict mTLS, idle keep-alive connections must not hold
the process past Kubernetes' grace period (asyncio waits 30 s for a TLS peer's close_notify that an idle client
never sends), and requests in flight still finish. Real processes, real TLS."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import meshlib
from harness import Upstream, wait_for
from meshlib.settings import MeshSettings, registry_of

pytestmark = pytest.mark.e2e  # its tests start processes (a control plane, instances)

BOOT = "shutdown-boot-token"


def _strict_env(cp: Any, state: Path) -> dict[str, str]:
    return {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_BOOTSTRAP_TOKEN": BOOT,
        "MESH_TLS": "strict",
        "MESH_STATE_DIR": str(state),
    }


def _caller(cp: Any, state: Path) -> meshlib.Mesh:
    settings = MeshSettings(
        service="caller",
        control_plane=cp.url,
        discovery=registry_of(cp.url),
        tls="strict",
        bootstrap_token=BOOT,
        state_dir=str(state),
    ).validated()
    return meshlib.Mesh(settings=settings)


def test_sigterm_under_strict_mtls_with_idle_keepalive_clients_exits_within_two_seconds(
    control_plane: Any, tmp_path: Path
) -> None:
    cp = control_plane(bootstrap_token=BOOT)
    instance = Upstream("s0", mesh_service="served", env=_strict_env(cp, tmp_path / "served")).wait_listening()
    with _caller(cp, tmp_path / "caller") as mesh:
        clients = [mesh.client(timeout=5.0) for _ in range(4)]  # four pools, each keeping a connection open
        try:
            for client in clients:
                assert client.get("http://served/hello").status_code == 200
            started = time.monotonic()
            instance.proc.send_signal(signal.SIGTERM)
            instance.proc.wait(30)
            took = time.monotonic() - started
        finally:
            for client in clients:
                client.close()
    assert took <= 2.0, f"shutdown took {took:.1f}s with idle mTLS keep-alive clients"


def test_a_request_in_flight_at_sigterm_still_finishes_under_strict_mtls(control_plane: Any, tmp_path: Path) -> None:
    cp = control_plane(bootstrap_token=BOOT)
    instance = Upstream("s1", mesh_service="served", env=_strict_env(cp, tmp_path / "served")).wait_listening()
    with _caller(cp, tmp_path / "caller") as mesh, mesh.client(timeout=10.0) as client, mesh.client() as idle:
        idle.get("http://served/-/behave", params={"delay": "1.5"})  # a keep-alive connection, idle from now on
        answers: list[int] = []
        worker = threading.Thread(target=lambda: answers.append(client.post("http://served/slow").status_code))
        worker.start()
        wait_for(lambda: idle.get("http://served/-/count").json().get("POST") == 1, what="the request in the handler")
        started = time.monotonic()
        instance.proc.send_signal(signal.SIGTERM)
        worker.join(15)
        instance.proc.wait(30)
        took = time.monotonic() - started
    assert answers == [200]
    assert took <= 3.5, f"shutdown took {took:.1f}s: 1.5 s for the request in flight, then the idle ones at once"
