"""Async clients at concurrency, side by side in one run (not a CI test): aiohttp, plain httpx.AsyncClient and
meshlib.AsyncClient against the same two loopback upstreams (uvicorn, uvloop + httptools when installed),
plaintext and with mutual TLS.

    pip install -e '.[bench]'
    python bench/concurrency.py [--rounds 5] [--requests 2000] [--concurrency 1,16,64,256] [--modes plain,mtls]
        [--clients aiohttp,httpx,meshlib]

For each mode and concurrency, rounds interleave the three clients (A, B, C, A, B, C, ...). Each round sends
``--requests`` GETs of a tiny answer from that many tasks at once, spread over the two upstreams (round robin for
aiohttp and httpx, the mesh's balancer for meshlib). In ``mtls`` mode the upstreams require client certificates
from a meshlib CA; every client presents one (meshlib as its mesh identity, strict). Reported: median over rounds
of client CPU per request (the client process's CPU, all threads) and of throughput, and meshlib's ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from meshcerts import issue_files  # noqa: E402

import meshlib  # noqa: E402
from harness import Upstream  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402

Get = Callable[[], Awaitable[None]]
#: Upstreams keep idle connections longer than a round of the other clients takes at 256 in flight: with uvicorn's
#: 5 s, a client's idle connections could close under it between its rounds (plain httpx then failed a request).
KEEP_ALIVE = ("--keep-alive", "300")
IDLE = 60.0


async def measure(get: Get, requests: int, concurrency: int) -> tuple[float, float]:
    """(client CPU seconds per request, requests per second)."""
    left = itertools.count()

    async def worker() -> None:
        while next(left) < requests:
            await get()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / requests, requests / (time.perf_counter() - wall)


def certificates(tmp: Path) -> dict[str, dict[str, str]]:
    """A meshlib CA, a server certificate for ``svc`` and a client one for ``bench``."""
    return issue_files(tmp, ("svc", "bench"))


async def clients(ports: list[int], concurrency: int, tls: dict[str, str] | None) -> tuple[dict[str, Get], Any]:
    import aiohttp

    scheme = "https" if tls else "http"
    urls = itertools.cycle([f"{scheme}://127.0.0.1:{p}/-/ok" for p in ports])
    limit = max(concurrency, 10)
    context: ssl.SSLContext | None = None
    if tls:  # the chain is verified; the name is not (the certificate names svc.default.mesh, not 127.0.0.1)
        context = ssl.create_default_context(cafile=tls["ca"])
        context.check_hostname = False
        context.load_cert_chain(tls["cert"], tls["key"])
    # every client keeps idle connections 60 s: at 256 in flight a round of plain httpx takes about 5 s, httpx's
    # default expiry, and the next rounds then measured new TLS handshakes rather than requests
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=context or False, keepalive_timeout=IDLE)
    )
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=IDLE)
    plain = httpx.AsyncClient(verify=context or True, limits=limits)
    mesh = meshlib.Mesh(
        service="bench",
        control_plane="",
        tls="strict" if tls else "off",
        state_dir=tempfile.mkdtemp(prefix="bench-mesh-"),
        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", p) for p in ports]}),
    )
    meshed = mesh.async_client(limits=limits)

    async def via_aiohttp() -> None:
        async with session.get(next(urls)) as response:
            await response.read()
            assert response.status == 200

    async def via_httpx() -> None:
        (await plain.get(next(urls))).raise_for_status()

    async def via_meshlib() -> None:
        (await meshed.get("http://svc/-/ok")).raise_for_status()

    async def close() -> None:
        await session.close()
        await plain.aclose()
        await meshed.aclose()
        mesh.close()

    return {"aiohttp": via_aiohttp, "httpx": via_httpx, "meshlib": via_meshlib}, close


async def interleaved(
    gets: dict[str, Get], concurrency: int, rounds: int, requests: int
) -> dict[str, tuple[float, float]]:
    """A warm-up for each, then ``rounds`` rounds of A, B, C; B, C, A; C, A, B; ...: the median (CPU per request,
    req/s) of each. The order turns each round, so no client always runs right after the same other one (plain
    httpx at 64 in flight leaves the most garbage and the coldest caches behind it)."""
    for get in gets.values():  # connections, handshakes, first-use costs
        await measure(get, min(requests, 500), concurrency)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in gets}
    names = list(gets)
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            results[name].append(await measure(gets[name], requests, concurrency))
    return {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in results.items()
    }


async def run(
    ports: list[int], concurrency: int, rounds: int, requests: int, tls: dict[str, str] | None, only: list[str]
) -> dict[str, tuple[float, float]]:
    gets, close = await clients(ports, concurrency, tls)
    gets = {name: get for name, get in gets.items() if name in only}
    try:
        return await interleaved(gets, concurrency, rounds, requests)
    finally:
        await close()


async def tls_cost(
    plain_ports: list[int], tls_ports: list[int], concurrency: int, rounds: int, requests: int, tls: dict[str, str]
) -> dict[str, float]:
    """What mTLS adds on keep-alive connections, side by side: each client plain and with mTLS in the same
    interleaved rounds (the ``plain`` and ``mtls`` modes above run at different times, on different upstreams)."""
    plain_gets, close_plain = await clients(plain_ports, concurrency, None)
    tls_gets, close_tls = await clients(tls_ports, concurrency, tls)
    gets = {
        "aiohttp": plain_gets["aiohttp"],
        "aiohttp+mTLS": tls_gets["aiohttp"],
        "meshlib": plain_gets["meshlib"],
        "meshlib+mTLS": tls_gets["meshlib"],
    }
    try:
        figures = await interleaved(gets, concurrency, rounds, requests)
        return {name: cpu for name, (cpu, _) in figures.items()}
    finally:
        await close_plain()
        await close_tls()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--clients", default="aiohttp,httpx,meshlib", help="which of the three to run")
    parser.add_argument(
        "--modes",
        default="plain,mtls,tls-cost",
        help="plain, mtls: the three clients; tls-cost: plain and mTLS side by side",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    files = certificates(tmp)
    server = files["svc"]
    os.environ.update(
        MESH_TLS_CERT=files["bench"]["cert"], MESH_TLS_KEY=files["bench"]["key"], MESH_TLS_CA=files["bench"]["ca"]
    )
    print(f"python {sys.version.split()[0]}, httpx {httpx.__version__}, {args.rounds} rounds x {args.requests}")
    print(f"{'mode':5} {'conc':>5} {'client':8} {'CPU/req':>10} {'req/s':>8}   meshlib CPU ratio")
    modes = args.modes.split(",")
    if "tls-cost" in modes:
        modes.remove("tls-cost")
        print_tls_cost(args, files)
    for mode in modes:
        tls = files["bench"] if mode == "mtls" else None
        extra = KEEP_ALIVE + (("--tls", server["cert"], server["key"], server["ca"]) if tls else ())
        upstreams = [Upstream(name, extra_args=extra).wait_listening() for name in ("a", "b")]
        try:
            ports = [u.port for u in upstreams]
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                only = args.clients.split(",")
                figures = asyncio.run(run(ports, concurrency, args.rounds, args.requests, tls, only))
                mesh_cpu = figures["meshlib"][0]
                for name, (cpu, rate) in figures.items():
                    ratio = "" if name == "meshlib" else f"{mesh_cpu / cpu:6.2f}x of {name}"
                    print(f"{mode:5} {concurrency:5d} {name:8} {cpu * 1e6:8.1f}us {rate:8.0f}   {ratio}", flush=True)
        finally:
            for u in upstreams:
                u.stop()


def print_tls_cost(args: argparse.Namespace, files: dict[str, dict[str, str]]) -> None:
    server = files["svc"]
    plain_ups = [Upstream(name, extra_args=KEEP_ALIVE).wait_listening() for name in ("a", "b")]
    tls_ups = [
        Upstream(name, extra_args=(*KEEP_ALIVE, "--tls", server["cert"], server["key"], server["ca"])).wait_listening()
        for name in ("c", "d")
    ]
    try:
        print(f"{'tls-cost':8} {'conc':>5} {'client':13} {'CPU/req':>10} {'mTLS adds':>10}")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            figures = asyncio.run(
                tls_cost(
                    [u.port for u in plain_ups],
                    [u.port for u in tls_ups],
                    concurrency,
                    args.rounds,
                    args.requests,
                    files["bench"],
                )
            )
            for name, cpu in figures.items():
                added = f"{(cpu - figures[name.split('+')[0]]) * 1e6:+8.1f}us" if "+" in name else ""
                print(f"{'tls-cost':8} {concurrency:5d} {name:13} {cpu * 1e6:8.1f}us {added:>10}", flush=True)
    finally:
        for u in plain_ups + tls_ups:
            u.stop()


if __name__ == "__main__":
    main()
