"""The meshlib gRPC channel against a plain grpc channel to the same server, side by side in one run (not a CI
test).

    python bench/grpc_overhead.py [--rounds 7] [--calls 2000] [--block 100]

The server is a plain ``grpc.server`` (no mesh on it) in its own process, so the client process's CPU is the
client's alone. For sync stubs and for grpc.aio stubs, each round makes ``--calls`` sequential unary calls on each
side, in blocks of ``--block`` calls that alternate plain, mesh, mesh, plain, ... so that drift (CPU frequency,
the other process, the machine's neighbours) hits both sides alike within the round, not only across rounds.
Reported: median over rounds of the mean time per call and of client CPU per call, p50 and p99 of single-call
latency, and the mesh/plain ratios; and, as a check on the machine's noise, the median mesh/plain ratio of each two
adjacent blocks (one of each side, back to back: a burst from a neighbour spoils one pair, not a round).
Last, the share of the machine's CPU time the hypervisor stole during the run: above 5%, rerun on a quiet
machine (on a shared VM, neighbours' load makes a plain call's time swing 2-3x and the ratios noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


Round = tuple[float, float, list[float]]  # (wall seconds per call, client CPU seconds per call, latencies)


def _order(calls: int, block: int) -> list[tuple[str, int]]:
    """The blocks of one round, (side, calls), alternating plain, mesh, mesh, plain, ..."""
    blocks, left, n = [], calls, 0
    while left > 0:
        size = min(block, left)
        first, second = ("plain", "mesh") if n % 2 == 0 else ("mesh", "plain")
        blocks += [(first, size), (second, size)]
        left -= size
        n += 1
    return blocks


def _totals(
    spent: dict[str, list[float]], latencies: dict[str, list[float]], calls: int, blocks: list[tuple[str, float]]
) -> dict[str, Round]:
    """Each side's (wall, CPU per call, latencies); and under ``"pairs"``, the mesh/plain ratio of each two
    adjacent blocks (one of each side, run back to back) in the latencies' place."""
    totals = {side: (spent[side][0] / calls, spent[side][1] / calls, latencies[side]) for side in spent}
    pairs = []
    for (side_a, wall_a), (_, wall_b) in zip(blocks[0::2], blocks[1::2], strict=True):
        pairs.append(wall_b / wall_a if side_a == "plain" else wall_a / wall_b)
    totals["pairs"] = (0.0, 0.0, pairs)
    return totals


def timed(calls: int, block: int, ones: dict[str, Callable[[], Any]]) -> dict[str, Round]:
    """One round: ``calls`` calls on each side, in alternating blocks."""
    spent = {side: [0.0, 0.0] for side in ones}
    latencies: dict[str, list[float]] = {side: [] for side in ones}
    blocks: list[tuple[str, float]] = []
    for side, size in _order(calls, block):
        one, lat = ones[side], latencies[side]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(size):
            t = time.perf_counter()
            one()
            lat.append(time.perf_counter() - t)
        spent[side][0] += time.perf_counter() - wall0
        spent[side][1] += time.process_time() - cpu0
        blocks.append((side, (time.perf_counter() - wall0) / size))
    return _totals(spent, latencies, calls, blocks)


async def atimed(calls: int, block: int, ones: dict[str, Callable[[], Any]]) -> dict[str, Round]:
    spent = {side: [0.0, 0.0] for side in ones}
    latencies: dict[str, list[float]] = {side: [] for side in ones}
    blocks: list[tuple[str, float]] = []
    for side, size in _order(calls, block):
        one, lat = ones[side], latencies[side]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(size):
            t = time.perf_counter()
            await one()
            lat.append(time.perf_counter() - t)
        spent[side][0] += time.perf_counter() - wall0
        spent[side][1] += time.process_time() - cpu0
        blocks.append((side, (time.perf_counter() - wall0) / size))
    return _totals(spent, latencies, calls, blocks)


def summarize(name: str, results: dict[str, list[Round]]) -> None:
    rows = {}
    pairs = sorted(ratio for r in results.pop("pairs", []) for ratio in r[2])
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
    if pairs:  # each mesh block against the plain block run next to it: a burst on the machine hits one pair only
        quarter, three = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
        print(f"{'paired':8} {statistics.median(pairs):9.3f}x  (median of {len(pairs)} adjacent block pairs,")
        print(f"{'':8} {'':10}  middle half {quarter:.3f}x-{three:.3f}x)")


#: (name, request text, share of --calls): grpc's interop size for the large call (a 271,828-byte payload)
PAYLOADS = (("empty", "", 1.0), ("small", "x" * 64, 1.0), ("large", "x" * 271_828, 0.25))


def _form(stub: Any, form: str, hello: Any) -> Callable[[], Any]:
    if form == "future":
        return lambda: stub.Say.future(hello).result()
    return lambda: stub.Say(hello)


def bench_sync(port: int, rounds: int, calls: int, block: int) -> None:
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
            results: dict[str, list[Round]] = {"plain": [], "mesh": [], "pairs": []}
            ones = {"plain": _form(plain, form, hello), "mesh": _form(meshed, form, hello)}
            for _ in range(rounds):
                for side, measured in timed(n, block, ones).items():
                    results[side].append(measured)
            summarize(f"sync {name} unary, {form}, {rounds} rounds x {n} calls", results)
    mesh.close()


def bench_aio(port: int, rounds: int, calls: int, block: int) -> None:
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
            results: dict[str, list[Round]] = {"plain": [], "mesh": [], "pairs": []}
            ones = {"plain": lambda: plain.Say(hello), "mesh": lambda: meshed.Say(hello)}  # noqa: B023
            for _ in range(rounds):
                for side, measured in (await atimed(n, block, ones)).items():
                    results[side].append(measured)
            summarize(f"grpc.aio {name} unary, {rounds} rounds x {n} calls", results)
        mesh.close()

    asyncio.run(run())


def _cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``: user .. steal), or None where there are none (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return [int(field) for field in fields[1:9]]


#: Above this share of the machine's CPU time taken by the hypervisor, a run's ratios are the neighbours' noise
STEAL_LIMIT = 0.05


@contextlib.contextmanager
def steal_watch() -> Iterator[None]:
    """Report, when the block ends, how much of the machine's CPU time the hypervisor gave to other guests
    (``steal``) meanwhile. A few percent is a quiet machine; at 40% (seen on a shared VM) both sides' calls stall
    at random, a plain call's time swings 2-3x between blocks, and no ratio of that run means anything."""
    before = _cpu_times()
    try:
        yield
    finally:
        after = _cpu_times()
        if before is not None and after is not None:
            spent = [b - a for a, b in zip(before, after, strict=True)]
            share = spent[7] / max(1, sum(spent))
            verdict = "quiet enough" if share <= STEAL_LIMIT else "too noisy: run again when the machine is quiet"
            print(f"\nmachine: {share:.1%} of CPU time stolen by the hypervisor during the run ({verdict})")


@contextlib.contextmanager
def bench_server() -> Iterator[tuple[int, int]]:
    """The plain bench server (``serve``) in its own process while the block runs: (its port, its pid)."""
    port_file = Path(f"/tmp/meshlib-grpc-bench-{time.time_ns()}")
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the bench server did not start")
            time.sleep(0.05)
        yield int(port_file.read_text()), server.pid
    finally:
        server.terminate()
        server.wait(10)
        port_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100, help="calls per block; blocks alternate sides")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with steal_watch(), bench_server() as (port, pid):
        print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, server pid {pid} on :{port}")
        bench_sync(port, args.rounds, args.calls, args.block)
        bench_aio(port, args.rounds, args.calls, args.block)


if __name__ == "__main__":
    main()
