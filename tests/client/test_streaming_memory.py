"""50 MB up and 50 MB down through ``meshlib.AsyncClient`` and its lean engine, against a real uvicorn instance:
the bytes arrive whole and in order, and the client's memory stays flat (flow control both ways)."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import pytest

import meshlib
from harness import Upstream
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

SIZE = 50 * 1024 * 1024
FLAT = 8 * 1024 * 1024  # the most the client may hold at once while 50 MB go through it


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream("big").wait_listening()
    try:
        yield up
    finally:
        up.stop()


def client_for(up: Upstream) -> meshlib.AsyncClient:
    mesh = meshlib.Mesh(
        service="t",
        control_plane="",
        telemetry=False,
        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", up.port)]}),
    )
    return mesh.async_client(timeout=60)


def test_a_50_mb_download_streams_with_flat_memory(upstream):
    expected = hashlib.sha256((bytes(range(256)) * 256) * (SIZE // 65536)).hexdigest()

    async def main() -> tuple[int, str, int]:
        async with client_for(upstream) as client:
            await client.get("http://svc/-/ok")  # connection and first-use costs outside the measure
            digest, size = hashlib.sha256(), 0
            tracemalloc.start()
            try:
                async with client.stream("GET", f"http://svc/-/download?size={SIZE}") as response:
                    async for part in response.aiter_bytes():
                        if size // (2 << 20) != (size + len(part)) // (2 << 20):
                            await asyncio.sleep(0.02)  # a slow reader now and then: the socket must wait for it
                        size += len(part)
                        digest.update(part)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return size, digest.hexdigest(), peak

    size, digest, peak = asyncio.run(main())
    assert (size, digest) == (SIZE, expected)
    assert peak < FLAT, f"the client held {peak / 1e6:.1f} MB at once"


def test_a_50_mb_upload_streams_with_flat_memory(upstream):
    part = bytes(range(256)) * 256

    async def body() -> AsyncIterator[bytes]:
        for _ in range(SIZE // len(part)):
            yield part

    async def main() -> tuple[dict[str, object], int]:
        async with client_for(upstream) as client:
            await client.get("http://svc/-/ok")
            tracemalloc.start()
            try:
                response = await client.post("http://svc/-/upload", content=body())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return response.json(), peak

    answer, peak = asyncio.run(main())
    assert answer == {"bytes": SIZE, "sha256": hashlib.sha256(part * (SIZE // len(part))).hexdigest()}
    assert peak < FLAT, f"the client held {peak / 1e6:.1f} MB at once"
