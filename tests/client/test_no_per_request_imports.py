"""No import machinery on the request path. httpcore 1.0 imports ``sniffio`` inside every async lock it makes; when
sniffio is missing (current anyio no longer installs it) that is a failing import (a scan of sys.path) on every
request, about 650 µs each. meshlib declares sniffio; this test fails if any import is attempted while mesh
requests run, sync or async, whatever the module."""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from harness import Upstream
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


class _Recorder(importlib.abc.MetaPathFinder):
    """Sees every import that is not already in sys.modules (a cached import never reaches the finders)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        self.names.append(name)
        return None


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream("a")
    try:
        yield u.wait_listening()
    finally:
        u.stop()


def recording(work: Any) -> list[str]:
    recorder = _Recorder()
    sys.meta_path.insert(0, recorder)
    try:
        work()
    finally:
        sys.meta_path.remove(recorder)
    return recorder.names


def test_sniffio_is_installed_so_httpcore_does_not_fail_an_import_per_lock():
    import sniffio  # noqa: F401  (declared in meshlib's dependencies)


def test_mesh_requests_attempt_no_import(upstream):
    mesh = meshlib.Mesh(
        service="tester", discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", upstream.port)]}), control_plane=""
    )

    async def calls(client: meshlib.AsyncClient, n: int) -> None:
        for _ in range(n):
            (await client.get("http://svc/x")).raise_for_status()

    async def run_async() -> list[str]:
        async with mesh.async_client() as client:
            await calls(client, 20)  # warm-up: first-use imports are fine
            recorder = _Recorder()
            sys.meta_path.insert(0, recorder)
            try:
                await asyncio.gather(*(calls(client, 20) for _ in range(4)))
            finally:
                sys.meta_path.remove(recorder)
            return recorder.names

    with mesh, mesh.client() as client:
        for _ in range(20):
            client.get("http://svc/x").raise_for_status()
        sync_imports = recording(lambda: [client.get("http://svc/x").raise_for_status() for _ in range(50)])
        async_imports = asyncio.run(run_async())
    assert sync_imports == []
    assert async_imports == [], f"imports attempted per request: {sorted(set(async_imports))}"
