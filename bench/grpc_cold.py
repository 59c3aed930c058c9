"""The mesh's own Python per gRPC unary call, with the CPU's caches cold as they are between real calls (not a CI
test).

    python bench/grpc_cold.py [--samples 600] [--evict-mib 4] [--floor]

Why: against a real server, the mesh's extra per call (40-70 µs client CPU here) is three to five times what the
same Python costs in a tight loop. Between two calls, grpc's C core, the kernel and the server's process run on the
same two CPUs and evict the interpreter's and the mesh's code and data from the L1 and L2 caches, so every call's
Python runs cold. ``bench/grpc_overhead.py`` sees that cost only through the network's noise; this bench measures
it directly: each endpoint channel's multicallables are replaced by stand-ins that answer at once (no network, no
server), and before each timed call a buffer larger than the L2 cache is copied over (``--evict-mib``). Each
form is then called a second time at once (warm). Reported per form (sync ``__call__``, ``with_call``,
``.future().result()``, grpc.aio ``await``), telemetry on (the default) and off: the median µs a call cold and
warm, and the bytecodes the call runs (counted with ``sys.settrace``: exact, a regression check that no machine's
noise blurs). The sync ``future`` stand-in is done when made, so the call takes its completion's shorter branch.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from concurrent import futures
from pathlib import Path
from types import FrameType
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
HELLO = pb2.Hello(text="")


class _DoneFuture:
    """A sync attempt's ``future()``: already answered."""

    def result(self, timeout: float | None = None) -> Any:
        return HELLO

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def cancel(self) -> bool:
        return False


class StandIn:
    """A sync endpoint multicallable that answers at once."""

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None, **options: Any) -> Any:
        return HELLO

    def with_call(self, request: Any, timeout: float | None = None, metadata: Any = None, **options: Any) -> Any:
        return HELLO, None

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None, **options: Any) -> Any:
        return _DoneFuture()


class _AioCall:
    """A grpc.aio unary call that answers when awaited; its done-callback never comes (the awaiter runs the call)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return HELLO
        yield  # a generator: ``await`` takes its return value

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        pass

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return True


class AioStandIn:
    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None, **options: Any) -> Any:
        return _AioCall()


def _stand_in(stub: Any, make: Callable[[], Any]) -> None:
    """Replace the multicallables of the endpoint channels behind ``stub`` (made by a first real call)."""
    for record in stub.Say.facade.endpoints._live.values():
        for key in list(record.callables):
            record.callables[key] = make()


class Evictor:
    """Copies ``mib`` MiB over a buffer of the same size: more than this machine's L2, so the caches the next call
    finds are as grpc's own work leaves them."""

    def __init__(self, mib: float) -> None:
        size = int(mib * (1 << 20))
        self._into = bytearray(size)
        self._from = bytes(b"\x01" * size)

    def __call__(self) -> None:
        self._into[:] = self._from


class _Opcodes:
    """A ``sys.settrace`` function that counts every traced frame's opcode events."""

    def __init__(self) -> None:
        self.count = 0

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.count += 1
        return self.trace


def bytecodes(one: Callable[[], Any]) -> int:
    """The bytecodes one call runs."""
    counter = _Opcodes()
    sys.settrace(counter.trace)
    try:
        one()
    finally:
        sys.settrace(None)
    return counter.count


def timed(one: Callable[[], Any], evict: Evictor, samples: int) -> tuple[float, float]:
    """Median ns of one call cold (caches evicted first) and warm (again at once)."""
    clock = time.perf_counter_ns
    cold, warm = [], []
    for _ in range(samples):
        evict()
        t = clock()
        one()
        cold.append(clock() - t)
        t = clock()
        one()
        warm.append(clock() - t)
    return statistics.median(cold), statistics.median(warm)


async def atimed(one: Callable[[], Awaitable[Any]], evict: Evictor, samples: int) -> tuple[float, float]:
    clock = time.perf_counter_ns
    cold, warm = [], []
    for _ in range(samples):
        evict()
        t = clock()
        await one()
        cold.append(clock() - t)
        t = clock()
        await one()
        warm.append(clock() - t)
    return statistics.median(cold), statistics.median(warm)


async def abytecodes(one: Callable[[], Awaitable[Any]]) -> int:
    counter = _Opcodes()
    sys.settrace(counter.trace)
    try:
        await one()
    finally:
        sys.settrace(None)
    return counter.count


def _form(stub: Any, form: str) -> Callable[[], Any]:
    say = stub.Say
    if form == "with_call":
        return lambda: say.with_call(HELLO)
    if form == "future":
        return lambda: say.future(HELLO).result()
    return lambda: say(HELLO)


def _row(form: str, telemetry: str, cold: float, warm: float, ops: int) -> str:
    return f"{form:22} {telemetry:9} {cold / 1000:8.1f} {warm / 1000:8.1f} {cold / warm:7.1f}x {ops:9d}"


def floor(mesh: Any, stub: Any) -> Callable[[], Any]:
    """The mesh's essential work for one quiet unary call, done straight on its real objects (service state,
    retry budget, balancer, endpoint channels, load estimate, breaker, duration histogram) with none of the layers
    between them: no call object, no flow or driver generator, no per-call checks for features the call does not
    use. Not a way to make calls (no retry, no telemetry choices): a bound on what a leaner quiet path could cost,
    printed beside the real ``__call__`` (``--floor``)."""
    say = stub.Say
    facade = say.facade
    endpoints = facade.endpoints
    metadata = (("x-mesh-caller", mesh.service), ("x-mesh-attempt", "1"))
    metrics = mesh.telemetry.metrics
    labels = metrics.client_labels(facade.service, "default", "POST", "2xx", "success")
    histogram = metrics.client_duration
    clock, rand = mesh.clock, mesh.rand

    def call() -> Any:
        state = mesh.service_state(facade.service)
        now = clock()
        state.budget.deposit(now)
        pick = state.pick(now, rand, (), None, None)
        handle = pick.handle
        load = handle.load
        load.outstanding += 1
        load.sent += 1
        record = endpoints.acquire(handle.endpoint, state)
        try:
            response = say.on(record)(HELLO, None, metadata)
        finally:
            endpoints.release(record)
            load.outstanding -= 1
        end = clock()
        load.observe(end - now, end)
        handle.breaker.record(False, False, True)
        histogram.record(end - now, labels)
        return response

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=600, help="timed calls per form, cold and warm each")
    parser.add_argument("--evict-mib", type=float, default=4.0, help="MiB copied before each cold call")
    parser.add_argument(
        "--floor", action="store_true", help="also the essential work of a quiet sync call done straight (floor())"
    )
    args = parser.parse_args()
    evict = Evictor(args.evict_mib)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb2_grpc.add_EchoServicer_to_server(make_servicer(Behaviour("cold")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    discovery = {"echo": [Endpoint("127.0.0.1", port)]}
    print(
        f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, {args.samples} samples a form, "
        f"{args.evict_mib:g} MiB evicted before each cold call"
    )
    print(f"\n{'form':22} {'telemetry':9} {'cold us':>8} {'warm us':>8} {'cold/warm':>8} {'bytecodes':>9}")
    meshes = []
    rows: list[tuple[str, str, Callable[[], Any]]] = []
    for telemetry in (True, False):
        mesh = meshlib.Mesh(
            service="bench", discovery=StaticDiscovery(discovery), control_plane="", telemetry=telemetry
        )
        meshes.append(mesh)
        stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
        stub.Say(HELLO)  # the endpoint channel is made and connected by a real call
        _stand_in(stub, StandIn)
        label = "on" if telemetry else "off"
        rows += [
            ("sync __call__", label, _form(stub, "__call__")),
            ("sync with_call", label, _form(stub, "with_call")),
            ("sync future().result()", label, _form(stub, "future")),
        ]
        if args.floor and telemetry:
            rows.append(("floor (sync, straight)", label, floor(mesh, stub)))
    for form, label, one in rows:
        for _ in range(200):
            one()
        cold, warm = timed(one, evict, args.samples)
        print(_row(form, label, cold, warm, bytecodes(one)))

    async def aio() -> None:
        for mesh, label in zip(meshes, ("on", "off"), strict=True):
            stub = pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
            await stub.Say(HELLO)
            _stand_in(stub, AioStandIn)
            for _ in range(200):
                await stub.Say(HELLO)
            one = stub.Say.__call__
            cold, warm = await atimed(lambda: one(HELLO), evict, args.samples)  # noqa: B023
            print(_row("grpc.aio await", label, cold, warm, await abytecodes(lambda: one(HELLO))))  # noqa: B023

    asyncio.run(aio())
    for mesh in meshes:
        mesh.close()
    server.stop(0)


if __name__ == "__main__":
    main()
