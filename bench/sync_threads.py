"""meshlib.Client vs plain httpx.Client shared by many threads, side by side in one run (not a CI test): does the
sync client need the async client's per-endpoint connection stacks?

    python bench/sync_threads.py [--rounds 3] [--requests 1500] [--threads 1,16,64]

Two loopback upstreams (uvicorn); for each thread count, interleaved rounds of ``--requests`` GETs shared by that
many threads over one client; reported: median client CPU per request (the whole process, all threads).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import meshlib  # noqa: E402
from harness import Upstream  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402


def measure(get: Callable[[], None], requests: int, threads: int) -> float:
    left = itertools.count()

    def worker() -> None:
        while next(left) < requests:
            get()

    running = [threading.Thread(target=worker) for _ in range(threads)]
    cpu = time.process_time()
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return (time.process_time() - cpu) / requests


def getters(plain: httpx.Client, meshed: meshlib.Client, ports: list[int]) -> dict[str, Callable[[], None]]:
    urls = itertools.cycle([f"http://127.0.0.1:{p}/-/ok" for p in ports])

    def via_httpx() -> None:
        plain.get(next(urls)).raise_for_status()

    def via_meshlib() -> None:
        meshed.get("http://svc/-/ok").raise_for_status()

    return {"httpx": via_httpx, "meshlib": via_meshlib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--threads", default="1,16,64")
    args = parser.parse_args()
    upstreams = [Upstream(name).wait_listening() for name in ("a", "b")]
    try:
        ports = [u.port for u in upstreams]
        discovery = StaticDiscovery({"svc": [Endpoint("127.0.0.1", p) for p in ports]})
        mesh = meshlib.Mesh(service="bench", control_plane="", discovery=discovery)
        print(f"{'threads':>7} {'httpx':>10} {'meshlib':>10} {'difference':>11}")
        for threads in (int(t) for t in args.threads.split(",")):
            limits = httpx.Limits(max_connections=max(threads, 10), max_keepalive_connections=max(threads, 10))
            plain, meshed = httpx.Client(limits=limits), mesh.client(limits=limits)
            gets = getters(plain, meshed, ports)
            for get in gets.values():
                measure(get, 300, threads)
            results: dict[str, list[float]] = {name: [] for name in gets}
            for _ in range(args.rounds):
                for name, get in gets.items():
                    results[name].append(measure(get, args.requests, threads))
            h, m = (statistics.median(results[k]) * 1e6 for k in ("httpx", "meshlib"))
            print(f"{threads:7d} {h:8.1f}us {m:8.1f}us {m - h:+9.1f}us", flush=True)
            plain.close()
            meshed.close()
        mesh.close()
    finally:
        for u in upstreams:
            u.stop()


if __name__ == "__main__":
    main()
