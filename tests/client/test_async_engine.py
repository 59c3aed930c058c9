"""The async outbound engine (client/async_pools.py: per-endpoint keep-alive stacks) against real servers: many calls in
flight, an instance killed under them, cancelled calls, the per-endpoint cap, and servers that close idle
keep-alive connections."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from harness import Upstream
from meshlib.client.async_pools import AsyncEndpointPools
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


@pytest.fixture
def three() -> Iterator[list[Upstream]]:
    made = [Upstream(name) for name in "abc"]
    try:
        yield [u.wait_listening() for u in made]
    finally:
        for u in made:
            u.stop()


def mesh_over(upstreams: list[Upstream]) -> meshlib.Mesh:
    endpoints = [Endpoint("127.0.0.1", u.port) for u in upstreams]
    return meshlib.Mesh(
        service="tester", discovery=StaticDiscovery({"svc": endpoints}), control_plane="", telemetry=False
    )


def engine_of(client: meshlib.AsyncClient) -> AsyncEndpointPools:
    engine = client.mesh_transport.pool_for("svc")
    assert isinstance(engine, AsyncEndpointPools)
    return engine


def test_512_calls_in_flight_over_three_instances(three):
    for u in three:
        u.behave(delay=0.05)

    async def main() -> tuple[Counter[str], int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with mesh_over(three).async_client(timeout=30, limits=limits) as client:
            replies = await asyncio.gather(*(client.get("http://svc/x") for _ in range(512)))
            return Counter(r.json()["instance"] for r in replies), engine_of(client).connections()

    seen, connections = asyncio.run(main())
    assert sum(seen.values()) == 512 and set(seen) == {"a", "b", "c"}
    assert connections <= 600, "at most max_connections per endpoint"


def test_an_instance_killed_with_256_calls_in_flight_fails_no_get(three):
    for u in three:
        u.behave(delay=0.3)

    async def main() -> Counter[str]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with mesh_over(three).async_client(timeout=30, limits=limits) as client:
            calls = [asyncio.ensure_future(client.get("http://svc/x")) for _ in range(256)]
            await asyncio.sleep(0.15)  # they are in flight (each takes 0.3 s); nothing below depends on it
            three[0].kill()
            replies = await asyncio.gather(*calls)
            return Counter(r.json()["instance"] for r in replies)

    seen = asyncio.run(main())
    assert sum(seen.values()) == 256, "every GET succeeded"
    assert "a" not in seen, "a died before answering anything"


def test_cancelled_calls_leave_no_broken_connections(three):
    for u in three:
        u.behave(delay=0.5)

    async def main() -> tuple[int, int]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with mesh_over(three).async_client(timeout=30, limits=limits) as client:
            calls = [asyncio.ensure_future(client.get("http://svc/x")) for _ in range(200)]
            await asyncio.sleep(0.1)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            engine = engine_of(client)
            assert all(stack.active == 0 for stack in engine.stacks().values()), "every slot came back"
            for u in three:
                u.behave(delay=0)
            ok = 0
            for _ in range(50):
                replies = await asyncio.gather(*(client.get("http://svc/x") for _ in range(20)))
                ok += sum(r.status_code == 200 for r in replies)
            return ok, engine.connections()

    ok, connections = asyncio.run(main())
    assert ok == 1000
    assert connections <= 150


def test_the_per_endpoint_cap_queues_requests_in_order(three):
    one = three[:1]
    one[0].behave(delay=0.05)

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with mesh_over(one).async_client(timeout=10, limits=limits) as client:
            replies = await asyncio.gather(*(client.get("http://svc/x") for _ in range(20)))
            assert engine_of(client).connections() <= 2
            return [r.status_code for r in replies]

    assert asyncio.run(main()) == [200] * 20


def test_a_pool_timeout_when_the_cap_is_reached_says_so():
    up = Upstream("slow", delay=1.0).wait_listening()
    try:

        async def main() -> BaseException | None:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            timeout = httpx.Timeout(10, pool=0.2)
            async with mesh_over([up]).async_client(timeout=timeout, limits=limits) as client:
                first = asyncio.ensure_future(client.get("http://svc/x"))
                await asyncio.sleep(0.1)
                try:
                    await client.get("http://svc/x")
                except httpx.TransportError as exc:
                    error: BaseException | None = exc
                else:
                    error = None
                assert (await first).status_code == 200
                return error

        error = asyncio.run(main())
        assert error is not None and "no connection to" in str(error)
    finally:
        up.stop()


def test_servers_closing_idle_keep_alive_connections_cause_no_error():
    ups = [Upstream(n, extra_args=("--keep-alive", "0.2")) for n in "ab"]
    try:
        for u in ups:
            u.wait_listening()

        async def main() -> int:
            async with mesh_over(ups).async_client(timeout=5) as client:
                ok = 0
                for _ in range(6):
                    # POSTs: never retried, so a stale connection reused would surface as an error here
                    replies = await asyncio.gather(*(client.post("http://svc/x", json={}) for _ in range(10)))
                    ok += sum(r.status_code == 200 for r in replies)
                    await asyncio.sleep(0.35)  # every idle connection is closed by the server meanwhile
                return ok

        assert asyncio.run(main()) == 60
    finally:
        for u in ups:
            u.stop()
