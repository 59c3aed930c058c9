"""Rule-to-client latency over xDS for many proxyless gRPC clients (not a CI test).

    python bench/xds_fanout.py [--clients 1000] [--rounds 5] [--channels 10]

A real ``meshctl serve --xds-port`` with one service of three instances; ``--clients`` ADS streams (spread over
``--channels`` HTTP/2 connections from this process) each subscribe to its route configuration and ACK what they
get, as gRPC's xDS client does. Each round applies a rules change (a 90/10 split, then back) and measures, per
stream, the time from the write's answer to that stream receiving the new version (p50, p99, slowest), then the
control plane's RSS and the CPU it spent on the round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402

import grpc  # noqa: E402
from harness import ControlPlaneProcess  # noqa: E402
from meshlib.control.xds_resources import ROUTE  # noqa: E402

SUBSETS = {"stable": {"meta": {"version": "v1"}}, "canary": {"meta": {"version": "v2"}}}


def rules(canary: int) -> dict[str, object]:
    split = [{"subset": "stable", "weight": 100 - canary}, {"subset": "canary", "weight": canary}]
    return {"services": {"inventory": {"subsets": SUBSETS, "routes": [{"to": [d for d in split if d["weight"]]}]}}}


def proc_figures(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds so far) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


class Stream:
    """One ADS stream subscribed to the route configuration of ``inventory``; it ACKs every response."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, n: int) -> None:
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.call = stub.StreamAggregatedResources(self._requests())
        self.node = f"bench~{n}"
        self.versions: dict[str, float] = {}
        self.task = asyncio.ensure_future(self._read())

    async def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            request = await self.outbox.get()
            if request is None:
                return
            yield request

    def send(self, version: str = "", nonce: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=ROUTE, resource_names=["inventory"], version_info=version, response_nonce=nonce
        )
        request.node.id = self.node
        self.outbox.put_nowait(request)

    async def _read(self) -> None:
        self.send()
        async for response in self.call:
            self.versions.setdefault(response.version_info, time.perf_counter())
            self.send(response.version_info, response.nonce)

    def close(self) -> None:
        self.outbox.put_nowait(None)
        self.task.cancel()


async def run(cp: ControlPlaneProcess, xds_port: int, clients: int, channels: int, rounds: int) -> None:
    options = [("grpc.max_concurrent_streams", clients)]
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}", options=options) for _ in range(channels)]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in chans]
    streams = [Stream(stubs[i % channels], i) for i in range(clients)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.versions for s in streams):
        await asyncio.sleep(0.05)
    connected = sum(1 for s in streams if s.versions)
    rss, cpu_before = proc_figures(cp.proc.pid)
    print(f"{connected}/{clients} streams have the first version; control plane RSS {rss:.1f} MB")
    async with httpx.AsyncClient() as http:
        for round_ in range(rounds):
            r = await http.put(
                cp.url + "/v1/rules", json=rules(10 if round_ % 2 == 0 else 0), headers=cp.admin(), timeout=30
            )
            r.raise_for_status()
            written = time.perf_counter()
            version_count = {len(s.versions) for s in streams}
            target = max(version_count) + 1
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(len(s.versions) >= target for s in streams):
                await asyncio.sleep(0.005)
            got = [max(s.versions.values()) - written for s in streams if len(s.versions) >= target]
            got.sort()
            rss, cpu = proc_figures(cp.proc.pid)
            p99 = got[min(len(got) - 1, int(len(got) * 0.99))] if got else float("nan")
            print(
                f"round {round_ + 1}: {len(got)}/{clients} streams got the change; p50 "
                f"{statistics.median(got) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, slowest {got[-1] * 1000:.1f} ms; "
                f"control plane RSS {rss:.1f} MB, CPU {cpu - cpu_before:.2f} s this round",
                flush=True,
            )
            cpu_before = cpu
    for s in streams:
        s.close()
    for c in chans:
        await c.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cp = ControlPlaneProcess(Path(tempfile.mkdtemp(prefix="bench-xds-")), extra_args=("--xds-port", "0"))
    try:
        for i, version in enumerate(("v1", "v1", "v2")):
            body = {"id": f"i{i}", "service": "inventory", "address": "127.0.0.1", "port": 50050 + i}
            body |= {"ttl": "3600s", "meta": {"version": version}}
            httpx.put(cp.url + "/v1/registry/register", json=body).raise_for_status()
        xds_port = httpx.get(cp.url + "/v1/xds/clients").json()["port"]
        print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, {args.clients} ADS streams")
        asyncio.run(run(cp, xds_port, args.clients, args.channels, args.rounds))
    finally:
        cp.stop()


if __name__ == "__main__":
    main()
