from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meshlib
from harness import Upstream
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's MESH_* settings or writes into their home cache."""
    import os

    for var in list(os.environ):
        if var.startswith(("MESH_", "CONSUL_", "OTEL_")) or var.lower().endswith("_proxy"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path / "mesh-state"))
    meshlib.Mesh.set_default(None)


@pytest.fixture
def upstreams() -> Iterator[Callable[..., list[Upstream]]]:
    """``upstreams(3)`` starts three upstream processes (in parallel) and stops them after the test."""
    started: list[Upstream] = []

    def start(count: int, prefix: str = "i", **behaviour: object) -> list[Upstream]:
        batch = [Upstream(f"{prefix}{len(started) + i}", **behaviour) for i in range(count)]  # type: ignore[arg-type]
        started.extend(batch)
        return [u.wait_listening() for u in batch]

    yield start
    for upstream in started:
        upstream.stop()


def static_mesh(services: dict[str, list[int]], **kwargs: object) -> meshlib.Mesh:
    """A Mesh whose discovery is a fixed map of service → loopback ports."""
    discovery = StaticDiscovery({name: [Endpoint("127.0.0.1", p) for p in ports] for name, ports in services.items()})
    return meshlib.Mesh(service="tester", discovery=discovery, control_plane="", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``control_plane()`` starts a real ``meshctl serve``; every one started is stopped after the test."""
    from harness import ControlPlaneProcess

    started: list[ControlPlaneProcess] = []

    def start(state_dir: Path | None = None, **kwargs: object) -> ControlPlaneProcess:
        cp = ControlPlaneProcess(state_dir or tmp_path / "cp-state", **kwargs)  # type: ignore[arg-type]
        started.append(cp)
        return cp

    yield start
    for cp in started:
        cp.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """One upstream process shared by a module's tests (a module may define its own ``upstream``)."""
    up = Upstream("a").wait_listening()
    yield up
    up.stop()


@pytest.fixture
def bare_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods of the requests the mesh clients build the bare way (client/bare_request.py), as they are."""
    from meshlib.client import clients

    built: list[str] = []
    original = clients.bare_request

    def spy(method: str, *args: Any) -> Any:
        built.append(method)
        return original(method, *args)

    monkeypatch.setattr(clients, "bare_request", spy)
    return built


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is e2e (whole programs: the demo, meshctl, venvs, browsers); elsewhere a file
    whose tests start processes says so itself (``pytestmark = pytest.mark.e2e``), which test_import_contracts
    checks. ``pytest -m "not e2e"`` runs the in-process rest in seconds."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)
