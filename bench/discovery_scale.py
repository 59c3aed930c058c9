"""Discovery at scale against one ``meshctl serve`` (by hand, not CI).

    python bench/discovery_scale.py [--services 10 100 1000] [--clients 1000] [--per-client 100]

1. One client process watching N services through the embedded registry (one multiplexed long-poll): its added RSS,
   its meshlib threads, its connections to the control plane, its own CPU and the control plane's CPU over 5 s idle.
   Each N runs in a fresh child process, so RSS is that process's own (``VmRSS``), not the parent's.
2. ``--clients`` simulated clients (raw asyncio sockets), each watching ``--per-client`` services on one multiplexed
   long-poll (all include the service ``hot``). Once all are waiting, ``hot`` gets a new instance and every client's
   answer is timed: fan-out p50 / p99 / max, with the control plane's RSS and the CPU it spent on the fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from control_plane import read_response, rss_mb  # noqa: E402

from harness import connections_to  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(n: int, url: str, port: int) -> None:
    """Runs in a fresh process: watch svc0000..svc{n-1} and report."""
    import meshlib
    from meshlib.discovery.registry import RegistryDiscovery

    discovery = RegistryDiscovery(url, wait=30.0)
    mesh = meshlib.Mesh(service="gateway", discovery=discovery, control_plane="", state_dir=tempfile.mkdtemp())
    before = rss_mb(os.getpid())
    for i in range(n):
        mesh.service_state(f"svc{i:04d}")
    after = rss_mb(os.getpid())
    threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("meshlib-"))
    cpu0 = cpu_seconds(os.getpid())
    print(json.dumps({"ready": True}), flush=True)
    time.sleep(5.0)
    idle_cpu = cpu_seconds(os.getpid()) - cpu0
    print(
        json.dumps(
            {
                "n": n,
                "rss_added_mb": after - before,
                "threads": threads,
                "connections": connections_to(os.getpid(), port),
                "idle_cpu_s": idle_cpu,
            }
        ),
        flush=True,
    )
    mesh.close()


def one_client(cp, n: int) -> dict[str, object]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(n), cp.url, str(cp.port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["ready"]
    cp0 = cpu_seconds(cp.proc.pid)
    result = json.loads(proc.stdout.readline())
    result["cp_idle_cpu_s"] = cpu_seconds(cp.proc.pid) - cp0
    proc.wait(30)
    return result


async def simulated_client(port: int, names: list[str], index: int, session: str, arrived: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"services": names}).encode()
    writer.write(
        f"POST /v1/registry/watch?index={index}&wait=120s&session={session} HTTP/1.1\r\nhost: cp\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    answer = json.loads(await read_response(reader))
    arrived.append(time.perf_counter())
    assert "hot" in answer["services"], answer["index"]
    writer.close()


def registry_waiters(url: str) -> int:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("meshcp_registry_watchers "):
            return int(line.split()[1])
    return 0


async def fan_out(cp, clients: int, per_client: int, total: int) -> dict[str, float]:
    index = int(httpx.get(cp.url + "/v1/registry/services").json()["index"])
    rng = random.Random(7)
    arrived: list[float] = []
    tasks = []
    for i in range(clients):
        names = ["hot", *rng.sample([f"svc{k:04d}" for k in range(total)], per_client - 1)]
        tasks.append(asyncio.create_task(simulated_client(cp.port, names, index, f"c{i}", arrived)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while await asyncio.to_thread(registry_waiters, cp.url) < clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {registry_waiters(cp.url)} of {clients} clients got to wait")
        await asyncio.sleep(0.2)
    rss = rss_mb(cp.proc.pid)
    cpu0 = cpu_seconds(cp.proc.pid)
    sent = time.perf_counter()
    await asyncio.to_thread(
        httpx.put,
        cp.url + "/v1/registry/register",
        json={"service": "hot", "address": "127.0.0.1", "port": 9, "ttl": "1h"},
    )
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    delays = sorted(t - sent for t in arrived)
    return {
        "clients": clients,
        "p50": statistics.median(delays),
        "p99": delays[int(len(delays) * 0.99) - 1],
        "max": delays[-1],
        "rss": rss,
        "cpu": cpu_seconds(cp.proc.pid) - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_args[0], int(args.child_args[1]))
        return
    from harness import ControlPlaneProcess

    total = max(max(args.services), args.per_client)
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneProcess(Path(tmp))
        try:
            with httpx.Client(base_url=cp.url) as admin:
                for i in range(total):
                    admin.put(
                        "/v1/registry/register",
                        json={"service": f"svc{i:04d}", "address": "127.0.0.1", "port": 10000 + i, "ttl": "1h"},
                    ).raise_for_status()
            print(
                f"{'services':>8}  {'client +RSS':>11}  {'threads':>7}  {'conns':>5}  {'client CPU/5s':>13}  "
                f"{'cp CPU/5s':>9}"
            )
            for n in args.services:
                r = one_client(cp, n)
                print(
                    f"{n:>8}  {r['rss_added_mb']:8.1f} MB  {len(r['threads']):>7}  {r['connections']:>5}  "
                    f"{r['idle_cpu_s']:11.3f} s  {r['cp_idle_cpu_s']:7.3f} s   {', '.join(r['threads'])}",
                    flush=True,
                )
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            f = runner(fan_out(cp, args.clients, args.per_client, total))
            print(f"\n{f['clients']} clients x {args.per_client} services, one change to a service all watch:")
            print(
                f"fan-out p50 {f['p50']:.3f} s, p99 {f['p99']:.3f} s, max {f['max']:.3f} s; control plane RSS "
                f"{f['rss']:.0f} MB, CPU for the fan-out {f['cpu']:.2f} s"
            )
        finally:
            cp.stop()


if __name__ == "__main__":
    main()
