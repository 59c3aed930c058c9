"""Balancing quality under the anchors' scenarios, for each balancer side by side (by hand, not CI).

    python bench/balancing.py [--calls 1500] [--rounds 3]

Three instances of tests/upstream.py (uvicorn processes), one fresh meshlib.Client per balancer and round, the
balancers interleaved round by round. Scenarios, as tower/Finagle/Envoy test theirs:
  equal    three equal instances
  slow     one instance answers 10 ms late
  cold     two instances warmed up, the third added to discovery at run time (its share of what follows)
  errors   one instance answers 503 to every 20th request (5%); GETs are retried on 503 by default
Each scenario runs sequentially (one call at a time, the shape that starved instances) and with 8 threads.
Reported: each instance's share (median over rounds), the sick or new instance's share, calls that failed, and
the p50/p99 latency of the calls in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import meshlib
from harness import Upstream
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import ServicePolicy

BALANCERS = ("p2c_ewma", "least_request", "round_robin")
SCENARIOS = ("equal", "slow", "cold", "errors")


def run_once(ups: list[Upstream], balancer: str, scenario: str, calls: int, threads: int) -> dict[str, Any]:
    for u in ups:
        u.behave(status=200, delay=0, fail_every=0)
    sick = ups[2]
    if scenario == "slow":
        sick.behave(delay=0.010)
    elif scenario == "errors":
        sick.behave(fail_every=20)
    first = ups[:2] if scenario == "cold" else ups
    discovery = StaticDiscovery({"svc": [Endpoint("127.0.0.1", u.port) for u in first]})
    mesh = meshlib.Mesh(
        service="bench",
        discovery=discovery,
        control_plane="",
        telemetry=False,
        policies={"svc": ServicePolicy(load_balancer=balancer)},
    )
    seen: Counter[str] = Counter()
    latencies: list[float] = []
    failed = 0
    lock = threading.Lock()
    with mesh, mesh.client(timeout=5) as client:
        if scenario == "cold":
            for _ in range(200):
                client.get("http://svc/x")
            discovery.set("svc", [Endpoint("127.0.0.1", u.port) for u in ups])
            while len(mesh.service_state("svc").handles) < 3:
                time.sleep(0.01)

        def work(n: int) -> None:
            nonlocal failed
            mine: Counter[str] = Counter()
            times = []
            bad = 0
            for _ in range(n):
                started = time.perf_counter()
                try:
                    r = client.get("http://svc/x")
                    mine[r.json()["instance"]] += 1
                    bad += r.status_code >= 500
                except meshlib.MeshError:
                    bad += 1
                times.append(time.perf_counter() - started)
            with lock:
                seen.update(mine)
                latencies.extend(times)
                failed += bad

        workers = [threading.Thread(target=work, args=(calls // threads,)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    total = sum(seen.values()) or 1
    latencies.sort()
    return {
        "shares": {u.name: seen[u.name] / total for u in ups},
        "failed": failed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ups = [Upstream(name) for name in "abc"]
    try:
        for u in ups:
            u.wait_listening()
        print(
            f"{'scenario':8} {'callers':8} {'balancer':14} {'a':>6} {'b':>6} {'c (sick/new)':>12} "
            f"{'failed':>7} {'p50 ms':>7} {'p99 ms':>7}"
        )
        for scenario in SCENARIOS:
            for threads in (1, 8):
                results: dict[str, list[dict[str, Any]]] = {b: [] for b in BALANCERS}
                for _ in range(args.rounds):
                    for balancer in BALANCERS:  # interleaved: each round runs every balancer once
                        results[balancer].append(run_once(ups, balancer, scenario, args.calls, threads))
                for balancer in BALANCERS:
                    runs = results[balancer]

                    def med(pick: Any, runs: list[dict[str, Any]] = runs) -> float:
                        return statistics.median(pick(r) for r in runs)

                    shares = [med(lambda r, n=n: r["shares"][n]) for n in "abc"]
                    print(
                        f"{scenario:8} {threads:>7}  {balancer:14} {shares[0]:>6.1%} {shares[1]:>6.1%} "
                        f"{shares[2]:>12.1%} {med(lambda r: r['failed']):>7.0f} {med(lambda r: r['p50']):>7.2f} "
                        f"{med(lambda r: r['p99']):>7.2f}",
                        flush=True,
                    )
    finally:
        for u in ups:
            u.stop()


if __name__ == "__main__":
    main()
