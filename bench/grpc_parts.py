"""Where a meshlib sync unary gRPC call's extra time goes, side by side in one run (not a CI test).

    python bench/grpc_parts.py [--rounds 7] [--calls 2000]

Against the same plain ``grpc.server`` in its own process (bench/grpc_overhead.py's), four sides, each a sync
``Say`` with an empty message, in rounds whose order reverses every round:
  * ``plain``: a plain channel to the server's address;
  * ``authority``: a plain channel with the ``grpc.default_authority`` the mesh sets (the service's name);
  * ``endpoint``: the mesh's own channel to that endpoint, called directly with the metadata the mesh sends
    (``x-mesh-caller``, ``x-mesh-attempt``): what grpc costs for what the mesh changes on the wire;
  * ``mesh``: the meshlib channel (discovery, balancing, breakers, retries, telemetry).
And the mesh's Python alone: the meshlib channel over a stand-in multicallable that answers at once, telemetry on
and off. Reported: medians over rounds of time and client CPU per call, and each side's ratio to ``plain``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_overhead import bench_server  # noqa: E402

import grpc  # noqa: E402
import meshlib  # noqa: E402
import meshlib.grpc  # noqa: E402
from grpc_support import stubs  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402
from meshlib.grpc import facade  # noqa: E402

pb2, pb2_grpc = stubs()
MESH_METADATA = (("x-mesh-caller", "bench"), ("x-mesh-attempt", "1"))


def _mesh(port: int, telemetry: bool = True) -> meshlib.Mesh:
    discovery = StaticDiscovery({"echo": [Endpoint("127.0.0.1", port)]})
    return meshlib.Mesh(service="bench", discovery=discovery, control_plane="", telemetry=telemetry)


def sides(port: int, mesh: meshlib.Mesh) -> dict[str, Callable[[], Any]]:
    hello = pb2.Hello(text="")
    plain = pb2_grpc.EchoStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    authority = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "echo")])
    authority_stub = pb2_grpc.EchoStub(authority)
    channel = mesh.grpc_channel("echo")
    meshed = pb2_grpc.EchoStub(channel)
    meshed.Say(hello)  # opens the endpoint's channel
    (record,) = channel.endpoints._live.values()
    endpoint = pb2_grpc.EchoStub(record.channel)
    return {
        "plain": lambda: plain.Say(hello),
        "authority": lambda: authority_stub.Say(hello),
        "endpoint": lambda: endpoint.Say(hello, metadata=MESH_METADATA),
        "mesh": lambda: meshed.Say(hello),
    }


def parts(port: int, rounds: int, calls: int) -> None:
    mesh = _mesh(port)
    ones = sides(port, mesh)
    for one in ones.values():
        for _ in range(300):
            one()
    wall: dict[str, list[float]] = {side: [] for side in ones}
    cpu: dict[str, list[float]] = {side: [] for side in ones}
    for n in range(rounds):
        order = list(ones) if n % 2 == 0 else list(reversed(ones))
        for side in order:
            one = ones[side]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                one()
            wall[side].append((time.perf_counter() - wall0) / calls)
            cpu[side].append((time.process_time() - cpu0) / calls)
    mesh.close()
    print(f"\nsync empty unary, {rounds} rounds x {calls} calls a side")
    print(f"{'':10} {'per call':>10} {'ratio':>7} {'client CPU':>11} {'ratio':>7}")
    base_wall, base_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    for side in ones:
        w, c = statistics.median(wall[side]), statistics.median(cpu[side])
        print(f"{side:10} {w * 1e6:8.1f}us {w / base_wall:6.3f}x {c * 1e6:9.1f}us {c / base_cpu:6.3f}x")


def python_alone(calls: int) -> None:
    """The mesh's own Python per call, over a stand-in for the endpoint's multicallable."""
    reply = pb2.Hello(text="")
    real_on = facade.Method.on
    facade.Method.on = lambda self, record: lambda request, *args, **kwargs: reply  # type: ignore[method-assign]
    try:
        for telemetry in (True, False):
            mesh = _mesh(1, telemetry)
            stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
            hello = pb2.Hello(text="")
            for _ in range(2000):
                stub.Say(hello)
            best = float("inf")
            for _ in range(5):
                cpu0 = time.process_time()
                for _ in range(calls):
                    stub.Say(hello)
                best = min(best, (time.process_time() - cpu0) / calls)
            mesh.close()
            print(f"mesh's Python alone, telemetry {'on' if telemetry else 'off'}: {best * 1e6:.1f} us a call")
    finally:
        facade.Method.on = real_on  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with bench_server() as (port, _):
        print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}")
        parts(port, args.rounds, args.calls)
        python_alone(20 * args.calls)


if __name__ == "__main__":
    main()
