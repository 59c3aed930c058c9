"""The meshlib gRPC channel against a plain grpc channel to the same server, side by side in one run (not a CI
test).

    python bench/grpc_overhead.py [--rounds 7] [--calls 2000]

The server is a plain ``grpc.server`` (no mesh on it) in its own process, so the client process's CPU is the
client's alone. For sync stubs and for grpc.aio stubs, rounds alternate plain, mesh, plain, mesh, ... (drift hits
both alike); each round makes ``--calls`` sequential unary calls. Reported: median over rounds of the mean time
per call and of client CPU per call, p99 of single-call latency, and the mesh/plain ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import grpc  # noqa: E402
import meshlib  # noqa: E402
import meshlib.grpc  # noqa: E402
from grpc_support import Behaviour, make_servicer, stubs  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402

pb2, pb2_grpc = stubs()


def serve(port_file: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb2_grpc.add_EchoServicer_to_server(make_servicer(Behaviour("bench")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def timed(calls: int, one: Callable[[], Any]) -> tuple[float, float, list[float]]:
    """(wall seconds per call, client CPU seconds per call, single-call latencies)."""
    latencies = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - t)
    return (time.perf_counter() - wall0) / calls, (time.process_time() - cpu0) / calls, latencies


async def atimed(calls: int, one: Callable[[], Any]) -> tuple[float, float, list[float]]:
    latencies = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        await one()
        latencies.append(time.perf_counter() - t)
    return (time.perf_counter() - wall0) / calls, (time.process_time() - cpu0) / calls, latencies


def summarize(name: str, results: dict[str, list[tuple[float, float, list[float]]]]) -> None:
    rows = {}
    for side, rounds in results.items():
        wall = statistics.median(r[0] for r in rounds)
        cpu = statistics.median(r[1] for r in rounds)
        lat = sorted(x for r in rounds for x in r[2])
        rows[side] = (wall, cpu, lat[len(lat) // 2], lat[int(len(lat) * 0.99)])
    print(f"\n{name}")
    print(f"{'':8} {'per call':>10} {'client CPU':>11} {'p50':>9} {'p99':>9}")
    for side, (wall, cpu, p50, p99) in rows.items():
        print(f"{side:8} {wall * 1e6:8.1f}us {cpu * 1e6:9.1f}us {p50 * 1e6:7.1f}us {p99 * 1e6:7.1f}us")
    (pw, pc, p50p, p99p), (mw, mc, p50m, p99m) = rows["plain"], rows["mesh"]
    print(f"{'ratio':8} {mw / pw:9.3f}x {mc / pc:10.3f}x {p50m / p50p:8.3f}x {p99m / p99p:8.3f}x")


#: (name, request text, share of --calls): grpc's interop size for the large call (a 271,828-byte payload)
PAYLOADS = (("empty", "", 1.0), ("small", "x" * 64, 1.0), ("large", "x" * 271_828, 0.25))


def _form(stub: Any, form: str, hello: Any) -> Callable[[], Any]:
    if form == "future":
        return lambda: stub.Say.future(hello).result()
    return lambda: stub.Say(hello)


def bench_sync(port: int, rounds: int, calls: int) -> None:
    mesh = meshlib.Mesh(
        service="bench", discovery=StaticDiscovery({"echo": [Endpoint("127.0.0.1", port)]}), control_plane=""
    )
    plain = pb2_grpc.EchoStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    meshed = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    for name, text, share in PAYLOADS:
        hello = pb2.Hello(text=text)
        n = max(1, int(calls * share))
        for form in ("__call__", "future"):
            for stub in (plain, meshed):  # warm-up: connections, first-call costs
                call = _form(stub, form, hello)
                for _ in range(200):
                    call()
            results: dict[str, list[tuple[float, float, list[float]]]] = {"plain": [], "mesh": []}
            for _ in range(rounds):
                results["plain"].append(timed(n, _form(plain, form, hello)))
                results["mesh"].append(timed(n, _form(meshed, form, hello)))
            summarize(f"sync {name} unary, {form}, {rounds} rounds x {n} calls", results)
    mesh.close()


def bench_aio(port: int, rounds: int, calls: int) -> None:
    async def run() -> None:
        mesh = meshlib.Mesh(
            service="bench", discovery=StaticDiscovery({"echo": [Endpoint("127.0.0.1", port)]}), control_plane=""
        )
        plain = pb2_grpc.EchoStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        meshed = pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
        for name, text, share in PAYLOADS:
            hello = pb2.Hello(text=text)
            n = max(1, int(calls * share))
            for stub in (plain, meshed):
                for _ in range(200):
                    await stub.Say(hello)
            results: dict[str, list[tuple[float, float, list[float]]]] = {"plain": [], "mesh": []}
            for _ in range(rounds):
                results["plain"].append(await atimed(n, lambda: plain.Say(hello)))  # noqa: B023
                results["mesh"].append(await atimed(n, lambda: meshed.Say(hello)))  # noqa: B023
            summarize(f"grpc.aio {name} unary, {rounds} rounds x {n} calls", results)
        mesh.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port_file = Path(f"/tmp/meshlib-grpc-bench-{time.time_ns()}")
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the bench server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, server pid {server.pid} on :{port}")
        bench_sync(port, args.rounds, args.calls)
        bench_aio(port, args.rounds, args.calls)
    finally:
        server.terminate()
        server.wait(10)
        port_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
