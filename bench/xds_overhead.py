"""A proxyless gRPC call's cost: an ``xds:///`` channel configured by ``meshctl serve --xds-port`` against a plain
channel to the same server, side by side in one process (not a CI test).

    python bench/xds_overhead.py [--calls 2000] [--rounds 5]

One real gRPC server (one instance of ``inventory``, registered in a real control plane), two channels from this
process: ``grpc.insecure_channel("127.0.0.1:PORT")`` and ``grpc.insecure_channel("xds:///inventory")`` with the
bootstrap ``meshctl xds bootstrap`` writes. Rounds alternate which channel goes first; per round, the median and
p99 of each channel's unary call latency, then the ratios (xDS / plain) over all rounds, and the CPU per call (of
this process, which also runs the server: both channels pay the same server share).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import grpc  # noqa: E402
from harness import ControlPlaneProcess, wait_for  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(call: object, n: int) -> tuple[list[float], float]:
    latencies = []
    cpu = time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        call(b"", timeout=5)  # type: ignore[operator]
        latencies.append(time.perf_counter() - started)
    return latencies, (time.process_time() - cpu) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xds-overhead-"))
    cp = ControlPlaneProcess(work / "cp", extra_args=("--xds-port", "0"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshtest.Who", {"Name": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        body = {"id": "inv-1", "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
        assert httpx.put(cp.url + "/v1/registry/register", json=body).status_code == 200
        bootstrap = work / "bootstrap.json"
        meshctl = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap"]
        subprocess.run([*meshctl, "--service", "bench", "-o", str(bootstrap)], check=True, capture_output=True)
        os.environ["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
        plain = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/meshtest.Who/Name")
        xds = grpc.insecure_channel("xds:///inventory").unary_unary("/meshtest.Who/Name")
        wait_for(lambda: xds(b"", timeout=5) == b"ok", timeout=20, what="the xDS channel to be configured")
        measure(plain, 200)
        measure(xds, 200)
        p50s, p99s, cpus = [], [], []
        for round_ in range(args.rounds):
            order = [("plain", plain), ("xds", xds)]
            if round_ % 2:
                order.reverse()
            got = {name: measure(call, args.calls) for name, call in order}
            (pl, pc), (xl, xc) = got["plain"], got["xds"]
            p50s.append(statistics.median(xl) / statistics.median(pl))
            p99s.append(percentile(xl, 0.99) / percentile(pl, 0.99))
            cpus.append(xc / pc)
            figures = [
                f"{name} p50 {statistics.median(lat) * 1e6:.0f} us p99 {percentile(lat, 0.99) * 1e6:.0f} us "
                f"cpu {cpu * 1e6:.0f} us"
                for name, (lat, cpu) in (("plain", got["plain"]), ("xds", got["xds"]))
            ]
            print(f"round {round_ + 1}: " + " | ".join(figures))
        print()
        print(f"xDS / plain, median over {args.rounds} rounds of {args.calls} calls:")
        print(f"  p50 latency {statistics.median(p50s):.3f}x   p99 latency {statistics.median(p99s):.3f}x")
        print(f"  CPU per call {statistics.median(cpus):.3f}x")
    finally:
        server.stop(0)
        cp.stop()


if __name__ == "__main__":
    main()
