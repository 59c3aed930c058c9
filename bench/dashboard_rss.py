"""The control plane's memory and answer times with many instances reporting to its dashboard.

Starts a real ``meshctl serve``, then plays N instances (default 200: 20 services x 10 instances) that each post a
realistic cumulative report every 2 s for the given time (30 inbound and 20 outbound histogram rows, counters,
breaker states of 20 endpoints), growing counts as traffic would. Prints the control plane's RSS (idle, then
every 10 s, then the peak) and how long /v1/stats/topology and one service's page take to answer.

    python bench/dashboard_rss.py --instances 200 --seconds 120 [--wide]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from meshlib.telemetry.metrics import LATENCY_BUCKETS

N_BUCKETS = len(LATENCY_BUCKETS) + 1
WIDE = "--wide" in sys.argv


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class FakeInstance:
    def __init__(self, service: str, index: int, services: list[str], port: int) -> None:
        self.service = service
        self.id = f"{service}-10.0.{index // 250}.{index % 250}-{port}"
        self.port = port
        self.started = time.time()
        others = [s for s in services if s != service]
        # per service, as in a real mesh (--wide: per instance, to hit the series cap on purpose)
        pick = random if WIDE else random.Random(service)
        self.callers = pick.sample(others, 3)
        self.callees = pick.sample(others, 2)
        self.routes = [f"/api/v1/resource-{i}/{{id}}" for i in range(5)]
        self.inbound = {
            (c, r, s): [0, 0.0, [0] * N_BUCKETS] for c in self.callers for r in self.routes for s in ("2xx", "5xx")
        }
        self.outbound = {
            (c, r, o): [0, 0.0, [0] * N_BUCKETS]
            for c in self.callees
            for r in self.routes
            for o in ("success", "server-error")
        }
        self.counters = {"retries": 0.0, "authz_denied": 0.0}

    def tick(self) -> None:
        for rows in (self.inbound, self.outbound):
            for key, row in rows.items():
                n = random.randint(0, 40) if key[2] in ("2xx", "success") else random.randint(0, 1)
                for _ in range(n):
                    bucket = min(int(random.expovariate(0.6)), N_BUCKETS - 1)
                    row[2][bucket] += 1
                    row[1] += LATENCY_BUCKETS[min(bucket, len(LATENCY_BUCKETS) - 1)]
                row[0] += n
        self.counters["retries"] += random.randint(0, 3)

    def report(self) -> dict[str, Any]:
        return {
            "v": 1,
            "instance": self.id,
            "service": self.service,
            "address": "127.0.0.1",
            "port": self.port,
            "started": self.started,
            "interval": 2.0,
            "tls": "strict",
            "identity": f"spiffe://mesh.local/ns/default/sa/{self.service}",
            "rules_version": 1,
            "buckets": list(LATENCY_BUCKETS),
            "inbound": [[c, r, s, 0, row[0], row[1], row[2]] for (c, r, s), row in self.inbound.items()],
            "outbound": [
                [c, r, "2xx" if o == "success" else "5xx", o, row[0], row[1], row[2]]
                for (c, r, o), row in self.outbound.items()
            ],
            "counters": [[name, self.callees[0], value] for name, value in self.counters.items()],
            "verified_peers": {c: f"spiffe://mesh.local/ns/default/sa/{c}" for c in self.callers},
            "endpoints": [[c, f"10.1.0.{i}:8000", "closed"] for c in self.callees for i in range(10)],
        }


async def play(url: str, instances: list[FakeInstance], seconds: float, pid: int) -> dict[str, Any]:
    samples: list[float] = []
    topology_ms: list[float] = []
    service_ms: list[float] = []
    failures = 0
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": "Bearer bench"}, timeout=10, limits=httpx.Limits(max_connections=32)
    ) as client:
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < seconds:
            round_start = time.monotonic()
            for inst in instances:
                inst.tick()

            async def send(inst: FakeInstance) -> bool:
                r = await client.post("/v1/stats/report", json=inst.report())
                return r.status_code == 204

            results = await asyncio.gather(*(send(i) for i in instances))
            failures += results.count(False)
            t = time.perf_counter()
            await client.get("/v1/stats/topology")
            topology_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await client.get(f"/v1/stats/services/{instances[0].service}")
            service_ms.append((time.perf_counter() - t) * 1000)
            if time.monotonic() >= next_sample:
                samples.append(rss_mb(pid))
                print(f"  t={time.monotonic() - started:5.0f} s  RSS {samples[-1]:6.1f} MB", flush=True)
                next_sample += 10
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - round_start)))
        stats = (await client.get("/v1/stats")).json()
    return {"rss": samples, "topology_ms": topology_ms, "service_ms": service_ms, "failures": failures, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--wide", action="store_true", help="callers and callees chosen per instance: ~4,000 series")
    args = parser.parse_args()
    random.seed(7)
    state = tempfile.mkdtemp(prefix="bench-dashboard-")
    port = 7499
    env = {**os.environ, "MESH_BOOTSTRAP_TOKEN": "bench", "MESH_ADMIN_TOKEN": "admin"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "serve",
            "--port",
            str(port),
            "--state-dir",
            state,
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the control plane did not start")
            time.sleep(0.1)
        idle = rss_mb(proc.pid)
        services = [f"svc-{i:02d}" for i in range(args.services)]
        instances = [FakeInstance(services[i % len(services)], i, services, 8000 + i) for i in range(args.instances)]
        print(f"control plane idle: RSS {idle:.1f} MB; {len(instances)} instances reporting every 2 s")
        result = asyncio.run(play(url, instances, args.seconds, proc.pid))
        peak = max(result["rss"])
        print(
            f"\nRSS idle {idle:.1f} MB, peak {peak:.1f} MB, end {result['rss'][-1]:.1f} MB "
            f"(target: under 150 MB with 200 instances)"
        )
        print(
            f"series {result['stats']['series']}, reports {result['stats']['reports']}, "
            f"failed posts {result['failures']}"
        )
        for name in ("topology_ms", "service_ms"):
            values = sorted(result[name])
            print(f"{name}: median {statistics.median(values):.1f} ms, max {values[-1]:.1f} ms")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
