"""``meshlib.grpc.aio``: the same guarantees for grpc.aio stubs, against real grpc.aio servers made by
``meshlib.grpc.aio.server`` on the test's own event loop."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import grpc
import meshlib
import meshlib.grpc.aio
from grpc_support import Behaviour, make_aio_servicer, stubs
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import BreakerPolicy, ServicePolicy

pb2, pb2_grpc = stubs()


async def start(names: str) -> list[tuple[Behaviour, Any, Endpoint]]:
    made = []
    for name in names:
        behaviour = Behaviour(name)
        mesh = meshlib.Mesh(service="echo", discovery=StaticDiscovery({}), control_plane="", telemetry=False)
        server = meshlib.grpc.aio.server(mesh=mesh, port=0, drain_delay=0)
        pb2_grpc.add_EchoServicer_to_server(make_aio_servicer(behaviour), server)
        await server.start()
        made.append((behaviour, server, Endpoint("127.0.0.1", server.port)))
    return made


def client(endpoints: list[Endpoint]) -> meshlib.Mesh:
    return meshlib.Mesh(
        service="front", discovery=StaticDiscovery({"echo": endpoints}), control_plane="", telemetry=False
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_aio_calls_spread_and_every_call_kind_works():
    async def main() -> None:
        made = await start("abc")
        try:
            mesh = client([e for _, _, e in made])
            async with mesh.grpc_aio_channel("echo") as channel:
                stub = pb2_grpc.EchoStub(channel)
                replies = await asyncio.gather(*(stub.Say(pb2.Hello(text="hi")) for _ in range(150)))
                seen = Counter(r.instance for r in replies)
                assert set(seen) == {"a", "b", "c"} and min(seen.values()) >= 10, seen
                call = stub.Say(pb2.Hello(text="x"))
                assert (await call).text == "x"
                assert await call.code() is grpc.StatusCode.OK
                assert [r.text async for r in stub.Count(pb2.Hello(text="n", n=3))] == ["n-0", "n-1", "n-2"]

                async def hellos() -> Any:
                    for text in "ab":
                        yield pb2.Hello(text=text)

                assert (await stub.Collect(hellos())).text == "a+b"
                assert [r.text async for r in stub.Chat(hellos())] == ["A", "B"]
                chat = stub.Chat()
                await chat.write(pb2.Hello(text="w"))
                await chat.done_writing()
                assert [r.text async for r in chat] == ["W"]
                assert await chat.code() is grpc.StatusCode.OK
        finally:
            for _, server, _ in made:
                await server.stop(0)

    run(main())


def test_aio_retries_unavailable_elsewhere_and_ejects_the_broken_instance():
    async def main() -> None:
        made = await start("abc")
        try:
            (a, _, _), *_ = made
            mesh = client([e for _, _, e in made])
            mesh.set_policy(
                "echo",
                ServicePolicy(
                    load_balancer="round_robin", circuit_breaker=BreakerPolicy(consecutive_failures=3, open_for=60)
                ),
            )
            stub = pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
            a.fail = True
            replies = await asyncio.gather(*(stub.Say(pb2.Hello(text="hi")) for _ in range(60)))
            assert "a" not in {r.instance for r in replies}
            broken = next(h for h in mesh.service_state("echo").handles if h.endpoint == made[0][2])
            assert broken.breaker.state == "open"
            at_ejection = a.calls
            await asyncio.gather(*(stub.Say(pb2.Hello(text="hi")) for _ in range(30)))
            assert a.calls == at_ejection
            with pytest.raises(grpc.RpcError) as caught:
                await stub.Say(pb2.Hello(text="thing", mode="missing"))
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == "no thing"
        finally:
            for _, server, _ in made:
                await server.stop(0)

    run(main())


def test_aio_deadline_and_mesh_errors_are_rpc_errors():
    async def main() -> None:
        made = await start("a")
        try:
            mesh = client([made[0][2]])
            mesh.set_policy("echo", ServicePolicy(timeout=1.0))
            stub = pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
            reply = await stub.Say(pb2.Hello(text="x"))
            assert 0 < reply.remaining_ms <= 1050  # gRPC sends the timeout; the server counts from receipt
            with pytest.raises(grpc.RpcError) as caught:
                await stub.Say(pb2.Hello(text="x", mode="slow", n=3000), timeout=0.2)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "echo: 1 attempt(s) failed" in caught.value.details()
            nowhere = pb2_grpc.EchoStub(mesh.grpc_aio_channel("ecko"))
            with pytest.raises(grpc.RpcError) as caught:
                await nowhere.Say(pb2.Hello(text="x"))
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "did you mean echo?" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                [r async for r in nowhere.Count(pb2.Hello(text="x", n=1))]
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            await made[0][1].stop(0)

    run(main())


def test_aio_endpoint_changes_do_not_cancel_calls_in_flight():
    async def main() -> None:
        made = await start("ab")
        try:
            (a, _, ea), (_b, _, eb) = made
            mesh = client([ea])
            channel = mesh.grpc_aio_channel("echo")
            stub = pb2_grpc.EchoStub(channel)
            assert (await stub.Say(pb2.Hello(text="warm"))).instance == "a"
            slow = asyncio.ensure_future(stub.Say(pb2.Hello(text="slow", mode="slow", n=1000), timeout=10))
            while a.calls < 2:  # the slow call has reached a's handler (the test's own timeout bounds this)
                await asyncio.sleep(0.01)
            mesh.discovery.set("echo", [eb])  # type: ignore[attr-defined]
            replies = [await stub.Say(pb2.Hello(text="x")) for _ in range(5)]
            assert {r.instance for r in replies} == {"b"}
            reply = await slow
            assert reply.instance == "a"
            assert not channel.endpoints.retiring()
        finally:
            for _, server, _ in made:
                await server.stop(0)

    run(main())


def test_aio_hedged_unary_calls_overtake_a_slow_instance():
    from meshlib.rules.model import validate_rules

    async def main() -> None:
        made = await start("ab")
        try:
            (a, _, ea), (_, _, eb) = made
            a.delay = 0.3
            mesh = client([ea, eb])
            mesh.apply_rules(
                validate_rules(
                    {
                        "services": {
                            "echo": {
                                "hedging": {"delay": "20ms", "budget_percent": 100},
                                "load_balancer": "round_robin",
                            }
                        }
                    },
                    1,
                )
            )
            stub = pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
            loop = asyncio.get_running_loop()
            took = []
            for _ in range(20):
                started = loop.time()
                reply = await stub.Say(pb2.Hello(text="x", mode="slow", n=0), timeout=5)
                took.append(loop.time() - started)
                assert reply.instance == "b"
            assert a.calls >= 8
            assert sum(t >= 0.29 for t in took) <= 2, took
            assert all(h.load.outstanding == 0 for h in mesh.service_state("echo").handles)
            for _ in range(100):  # the server sees each cancellation as it happens
                if a.cancelled >= a.calls - 1:
                    break
                await asyncio.sleep(0.05)
            assert a.cancelled >= a.calls - 1, (a.cancelled, a.calls)
        finally:
            for _, server, _ in made:
                await server.stop(0)

    run(main())
