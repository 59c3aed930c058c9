"""The mesh's own extra time per gRPC unary call, in place (not a CI test).

    python bench/grpc_in_place.py [--blocks 50] [--block 100] [--size 0]

Against the plain bench server of bench/grpc_overhead.py, three sides in shuffled blocks of ``--block`` calls:
``plain`` (a plain channel), ``endpoint`` (the mesh's own channel to the endpoint, called directly with the
metadata the mesh sends: what grpc costs for the same wire) and ``mesh`` (the meshlib channel). Reported, for sync
stubs (``__call__``, then ``.future().result()``) and grpc.aio stubs: the median over blocks of mesh minus
endpoint (wall and client CPU per call: the mesh's own Python, between grpc's waits) and the mesh/plain ratio of
the medians. The per-block difference is steadier on a
noisy machine than a ratio of totals: both sides of one difference ran within a few hundred milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_overhead import bench_server, steal_watch  # noqa: E402

import grpc  # noqa: E402
import meshlib  # noqa: E402
import meshlib.grpc  # noqa: E402
from grpc_support import stubs  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402

pb2, pb2_grpc = stubs()
MESH_METADATA = (("x-mesh-caller", "bench"), ("x-mesh-attempt", "1"))
Samples = dict[str, list[tuple[float, float]]]  # side -> (wall, CPU) per call, one pair per block


def report(name: str, samples: Samples) -> None:
    wall = {side: [w for w, _ in got] for side, got in samples.items()}
    cpu = {side: [c for _, c in got] for side, got in samples.items()}
    extra_wall = statistics.median(m - e for m, e in zip(wall["mesh"], wall["endpoint"], strict=True))
    extra_cpu = statistics.median(m - e for m, e in zip(cpu["mesh"], cpu["endpoint"], strict=True))
    ratio = statistics.median(wall["mesh"]) / statistics.median(wall["plain"])
    wire = statistics.median(wall["endpoint"]) / statistics.median(wall["plain"])
    print(
        f"{name}: plain {statistics.median(wall['plain']) * 1e6:.0f} us a call; the mesh's own extra: "
        f"wall {extra_wall * 1e6:.1f} us, client CPU {extra_cpu * 1e6:.1f} us; mesh/plain {ratio:.3f}x "
        f"(endpoint/plain {wire:.3f}x)"
    )


def run_sync(sides: dict[str, Callable[[], Any]], blocks: int, block: int) -> Samples:
    for one in sides.values():
        for _ in range(300):
            one()
    samples: Samples = {side: [] for side in sides}
    for _ in range(blocks):
        order = list(sides)
        random.shuffle(order)
        for side in order:
            one = sides[side]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(block):
                one()
            samples[side].append(((time.perf_counter() - wall0) / block, (time.process_time() - cpu0) / block))
    return samples


async def run_aio(sides: dict[str, Callable[[], Awaitable[Any]]], blocks: int, block: int) -> Samples:
    for one in sides.values():
        for _ in range(300):
            await one()
    samples: Samples = {side: [] for side in sides}
    for _ in range(blocks):
        order = list(sides)
        random.shuffle(order)
        for side in order:
            one = sides[side]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(block):
                await one()
            samples[side].append(((time.perf_counter() - wall0) / block, (time.process_time() - cpu0) / block))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--size", type=int, default=0, help="request text length")
    args = parser.parse_args()
    hello = pb2.Hello(text="x" * args.size)
    with steal_watch(), bench_server() as (port, _):
        print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, request of {args.size} characters")
        discovery = StaticDiscovery({"echo": [Endpoint("127.0.0.1", port)]})
        mesh = meshlib.Mesh(service="bench", discovery=discovery, control_plane="")
        channel = mesh.grpc_channel("echo")
        meshed = pb2_grpc.EchoStub(channel)
        meshed.Say(hello)  # opens the endpoint's channel
        (record,) = channel.endpoints._live.values()
        endpoint = pb2_grpc.EchoStub(record.channel)
        plain = pb2_grpc.EchoStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        sides = {
            "plain": lambda: plain.Say(hello),
            "endpoint": lambda: endpoint.Say(hello, metadata=MESH_METADATA),
            "mesh": lambda: meshed.Say(hello),
        }
        report("sync", run_sync(sides, args.blocks, args.block))
        future_sides = {
            "plain": lambda: plain.Say.future(hello).result(),
            "endpoint": lambda: endpoint.Say.future(hello, metadata=MESH_METADATA).result(),
            "mesh": lambda: meshed.Say.future(hello).result(),
        }
        report("sync future", run_sync(future_sides, args.blocks, args.block))

        async def aio() -> None:
            aio_channel = mesh.grpc_aio_channel("echo")
            aio_meshed = pb2_grpc.EchoStub(aio_channel)
            await aio_meshed.Say(hello)
            (aio_record,) = aio_channel.endpoints._live.values()
            aio_endpoint = pb2_grpc.EchoStub(aio_record.channel)
            aio_plain = pb2_grpc.EchoStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            aio_sides = {
                "plain": lambda: aio_plain.Say(hello),
                "endpoint": lambda: aio_endpoint.Say(hello, metadata=MESH_METADATA),
                "mesh": lambda: aio_meshed.Say(hello),
            }
            report("aio ", await run_aio(aio_sides, args.blocks, args.block))

        asyncio.run(aio())
        mesh.close()


if __name__ == "__main__":
    main()
