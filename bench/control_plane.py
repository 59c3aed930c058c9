"""How fast one ``meshctl serve`` fans a rules change out to N long-polling watchers (not a CI test).

    python bench/control_plane.py [--watchers 1000 5000 10000]

For each N: opens N keep-alive connections, each long-polling ``GET /v1/rules?index=V&wait=120s``; once the server
reports all N waiting, applies a new version and times, per watcher, from the moment the PUT is sent until that
watcher has the new version. Prints p50 / p99 / max and the server's RSS at that moment. Watchers are raw asyncio
sockets (uvloop when installed) so the client's own cost stays small; it runs on the same 2 cores as the server,
so the figures include the client's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


async def watcher(port: int, index: int, arrived: list[float], ready: asyncio.Event, opened: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.append(1)
    request = f"GET /v1/rules?index={index}&wait=120s HTTP/1.1\r\nhost: cp\r\n\r\n".encode()
    writer.write(request)
    await writer.drain()
    body = await read_response(reader)
    arrived.append(time.perf_counter())
    assert json.loads(body)["version"] > index
    writer.close()


def waiting(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("meshcp_rules_watchers "):
            return int(line.split()[1])
    return 0


async def one_round(cp, n: int) -> dict[str, float]:
    index = cp.apply({"services": {"payments": {"timeout": f"{n}ms"}}})
    arrived: list[float] = []
    opened: list[int] = []
    ready = asyncio.Event()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(watcher(cp.port, index, arrived, ready, opened)))
        if i % 200 == 199:
            await asyncio.sleep(0.02)  # let the server accept: no SYN-flood-style burst
    deadline = time.monotonic() + 120
    while await asyncio.to_thread(waiting, cp.url) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {waiting(cp.url)} of {n} watchers got to wait")
        await asyncio.sleep(0.2)
    rss = rss_mb(cp.proc.pid)
    sent = time.perf_counter()
    await asyncio.to_thread(cp.apply, {"services": {"payments": {"timeout": f"{n + 1}ms"}}})
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    delays = sorted(t - sent for t in arrived)
    return {
        "n": n,
        "p50": statistics.median(delays),
        "p99": delays[int(len(delays) * 0.99) - 1],
        "max": delays[-1],
        "rss": rss,
    }


async def main_async(counts: list[int]) -> None:
    from harness import ControlPlaneProcess

    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneProcess(Path(tmp))
        try:
            print(f"{'watchers':>8}  {'p50 s':>7}  {'p99 s':>7}  {'max s':>7}  {'server RSS':>10}")
            for n in counts:
                r = await one_round(cp, n)
                print(f"{r['n']:>8}  {r['p50']:7.3f}  {r['p99']:7.3f}  {r['max']:7.3f}  {r['rss']:7.0f} MB", flush=True)
        finally:
            cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, nargs="+", default=[1000, 5000, 10000])
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args.watchers))


if __name__ == "__main__":
    main()
