"""Async clients at concurrency, side by side in one run (not a CI test): aiohttp, plain httpx.AsyncClient and
meshlib.AsyncClient against the same two loopback upstreams (uvicorn, uvloop + httptools when installed).

    pip install aiohttp   # or: pip install -e '.[bench]'
    python bench/concurrency.py [--rounds 5] [--requests 2000] [--concurrency 1,16,64,256]

For each concurrency, rounds interleave the three clients (A, B, C, A, B, C, ...). Each round sends ``--requests``
GETs of a tiny answer from that many tasks at once, spread over the two upstreams (round robin for aiohttp and
httpx, the mesh's balancer for meshlib). Reported: median over rounds of client CPU per request (the client
process's CPU, all threads) and of throughput, and meshlib's ratios to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import meshlib  # noqa: E402
from harness import Upstream  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402

Get = Callable[[], Awaitable[None]]


async def measure(get: Get, requests: int, concurrency: int) -> tuple[float, float]:
    """(client CPU seconds per request, requests per second)."""
    left = itertools.count()

    async def worker() -> None:
        while next(left) < requests:
            await get()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / requests, requests / (time.perf_counter() - wall)


async def clients(ports: list[int], concurrency: int) -> tuple[dict[str, Get], list[Any]]:
    import aiohttp

    urls = itertools.cycle([f"http://127.0.0.1:{p}/-/ok" for p in ports])
    limit = max(concurrency, 10)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    plain = httpx.AsyncClient(limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))
    mesh = meshlib.Mesh(service="bench", control_plane="",
                        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", p) for p in ports]}))
    meshed = mesh.async_client(limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))

    async def via_aiohttp() -> None:
        async with session.get(next(urls)) as response:
            await response.read()
            assert response.status == 200

    async def via_httpx() -> None:
        (await plain.get(next(urls))).raise_for_status()

    async def via_meshlib() -> None:
        (await meshed.get("http://svc/-/ok")).raise_for_status()

    return {"aiohttp": via_aiohttp, "httpx": via_httpx, "meshlib": via_meshlib}, [session, plain, meshed, mesh]


async def run(ports: list[int], concurrency: int, rounds: int, requests: int) -> dict[str, tuple[float, float]]:
    gets, closers = await clients(ports, concurrency)
    try:
        for get in gets.values():  # warm-up: connections, first-use costs
            await measure(get, min(requests, 500), concurrency)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in gets}
        for _ in range(rounds):
            for name, get in gets.items():
                results[name].append(await measure(get, requests, concurrency))
        return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                for name, rs in results.items()}
    finally:
        session, plain, meshed, mesh = closers
        await session.close()
        await plain.aclose()
        await meshed.aclose()
        mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16,64,256")
    args = parser.parse_args()
    upstreams = [Upstream(name).wait_listening() for name in ("a", "b")]
    try:
        ports = [u.port for u in upstreams]
        print(f"python {sys.version.split()[0]}, httpx {httpx.__version__}, {args.rounds} rounds x {args.requests}")
        print(f"{'conc':>5} {'client':8} {'CPU/req':>10} {'req/s':>8}   meshlib CPU ratio")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            figures = asyncio.run(run(ports, concurrency, args.rounds, args.requests))
            mesh_cpu = figures["meshlib"][0]
            for name, (cpu, rate) in figures.items():
                ratio = "" if name == "meshlib" else f"{mesh_cpu / cpu:6.2f}x of {name}"
                print(f"{concurrency:5d} {name:8} {cpu * 1e6:8.1f}us {rate:8.0f}   {ratio}")
    finally:
        for u in upstreams:
            u.stop()


if __name__ == "__main__":
    main()
