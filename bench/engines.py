"""The candidate HTTP/1.1 engines for meshlib.AsyncClient's mesh hops, side by side in one run (not a CI test).

    pip install -e '.[bench]'
    python bench/engines.py [--rounds 5] [--requests 2000] [--concurrency 16,64]

Against the same two loopback upstreams (uvicorn), in interleaved rounds, client CPU per request of:
  aiohttp               the reference: aiohttp's own client (C parser, its own connector)
  httpx2                httpx2.AsyncClient on httpcore2 (the fork whose pool was rewritten), as shipped
  httpx-on-aiohttp      httpx.AsyncClient over a transport that hands each request to an aiohttp session
                        (headers converted both ways, a second request object): the adapter route
  meshlib-httpcore      meshlib.AsyncClient, per-endpoint stacks of httpcore 1.0 connections (h11)
  meshlib-h1            meshlib.AsyncClient, per-endpoint stacks of client/async_h1.py (asyncio Protocol + httptools)
The meshlib rows include the whole mesh (policy, balancer, telemetry); the others are plain clients.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from concurrency import Get, interleaved  # noqa: E402

import meshlib  # noqa: E402
from harness import Upstream  # noqa: E402
from meshlib.client.async_pools import AsyncEndpointPools  # noqa: E402
from meshlib.client.async_transport import AsyncMeshTransport  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface on an aiohttp session: what an adapter costs."""

    def __init__(self, session: Any) -> None:
        self.session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        response = await self.session.request(
            request.method, str(request.url), headers=list(request.headers.multi_items()), data=body or None
        )

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for part in response.content.iter_any():
                    yield part
            finally:
                response.release()

        return httpx.Response(response.status, headers=list(response.raw_headers), stream=_Stream(stream()))


class _Stream(httpx.AsyncByteStream):
    def __init__(self, parts: AsyncIterator[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.parts:
            yield part


async def clients(ports: list[int], concurrency: int) -> tuple[dict[str, Get], list[Any]]:
    import aiohttp
    import httpx2

    urls = itertools.cycle([f"http://127.0.0.1:{p}/-/ok" for p in ports])
    limit = max(concurrency, 10)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    bridge_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), auto_decompress=False)
    modern = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=limit, max_keepalive_connections=limit))
    bridged = httpx.AsyncClient(transport=AiohttpTransport(bridge_session))
    discovery = StaticDiscovery({"svc": [Endpoint("127.0.0.1", p) for p in ports]})
    mesh = meshlib.Mesh(service="bench", control_plane="", discovery=discovery)
    options = {"max_connections": limit, "max_keepalive_connections": limit}
    on_httpcore = meshlib.AsyncClient(
        mesh=mesh, transport=AsyncMeshTransport(mesh, pool=AsyncEndpointPools(lean=False, **options))
    )  # type: ignore[arg-type]
    on_h1 = meshlib.AsyncClient(
        mesh=mesh, transport=AsyncMeshTransport(mesh, pool=AsyncEndpointPools(lean=True, **options))
    )  # type: ignore[arg-type]

    async def via_aiohttp() -> None:
        async with session.get(next(urls)) as response:
            await response.read()
            assert response.status == 200

    async def via_httpx2() -> None:
        (await modern.get(next(urls))).raise_for_status()

    async def via_bridge() -> None:
        (await bridged.get(next(urls))).raise_for_status()

    async def via_mesh_httpcore() -> None:
        (await on_httpcore.get("http://svc/-/ok")).raise_for_status()

    async def via_mesh_h1() -> None:
        (await on_h1.get("http://svc/-/ok")).raise_for_status()

    gets = {
        "aiohttp": via_aiohttp,
        "httpx2": via_httpx2,
        "httpx-on-aiohttp": via_bridge,
        "meshlib-httpcore": via_mesh_httpcore,
        "meshlib-h1": via_mesh_h1,
    }
    return gets, [session, bridge_session, modern, bridged, on_httpcore, on_h1, mesh]


async def run(ports: list[int], concurrency: int, rounds: int, requests: int) -> dict[str, float]:
    gets, closers = await clients(ports, concurrency)
    try:
        figures = await interleaved(gets, concurrency, rounds, requests)
        return {name: cpu for name, (cpu, _) in figures.items()}
    finally:
        session, bridge_session, modern, bridged, on_httpcore, on_h1, mesh = closers
        await session.close()
        await bridge_session.close()
        await modern.aclose()
        await bridged.aclose()
        await on_httpcore.aclose()
        await on_h1.aclose()
        mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="16,64")
    args = parser.parse_args()
    upstreams = [Upstream(name).wait_listening() for name in ("a", "b")]
    try:
        ports = [u.port for u in upstreams]
        print(f"{'conc':>5} {'engine':18} {'CPU/req':>10} {'x aiohttp':>10}")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            figures = asyncio.run(run(ports, concurrency, args.rounds, args.requests))
            for name, cpu in figures.items():
                print(f"{concurrency:5d} {name:18} {cpu * 1e6:8.1f}us {cpu / figures['aiohttp']:9.2f}x", flush=True)
    finally:
        for u in upstreams:
            u.stop()


if __name__ == "__main__":
    main()
