"""What a gRPC call through the mesh records and sends, on its common path and off it: the duration histogram's
labels (a call that ends quietly is counted as the full recording would count it), the decision log (built when
something reads it: access log, DEBUG, a span), and the metadata each attempt sends (one shared value for plain
attempts, never mixed with another call's). Real grpc servers in this process, sync and aio stubs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc_instances import Instance
from grpc_support import stubs
from harness import free_port, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import ServicePolicy

pb2, pb2_grpc = stubs()


class MetadataEcho(pb2_grpc.EchoServicer):  # type: ignore[misc, name-defined]
    """Answers with the ``x-`` metadata it was sent, in order; ``mode="fail"`` answers UNAVAILABLE."""

    def Say(self, request: Any, context: Any) -> Any:
        sent = [f"{k}={v}" for k, v in context.invocation_metadata() if k.startswith("x-")]
        if request.mode == "fail":
            context.abort(grpc.StatusCode.UNAVAILABLE, "told to fail")
        return pb2.Reply(text=",".join(sent), instance="md")


@pytest.fixture
def servers() -> Iterator[list[Instance]]:
    made = [Instance(name) for name in "ab"]
    yield made
    for server in made:
        server.stop()


@pytest.fixture
def echo_md() -> Iterator[Instance]:
    server = Instance("md", servicer=MetadataEcho())
    yield server
    server.stop()


def _caller(endpoints: list[Endpoint], **kwargs: Any) -> meshlib.Mesh:
    policies = {"echo": ServicePolicy(load_balancer="round_robin")}
    return meshlib.Mesh(
        service="front",
        discovery=StaticDiscovery({"echo": endpoints}),
        control_plane="",
        policies=policies,
        **kwargs,
    )


def _durations(mesh: meshlib.Mesh) -> dict[tuple[str, str, str], int]:
    """(status class, outcome, route) -> calls counted, for calls from ``front`` to ``echo`` by POST."""
    assert mesh.telemetry is not None
    counted: dict[tuple[str, str, str], int] = {}
    for point in mesh.telemetry.metrics.client_duration.points():
        labels = point.attributes
        assert labels["mesh.service"] == "front" and labels["http.request.method"] == "POST"
        if labels["mesh.peer_service"] == "echo":
            key = (labels["http.response.status_class"], labels["mesh.outcome"], labels["mesh.route"])
            counted[key] = counted.get(key, 0) + point.count
    return counted


def test_a_quiet_end_is_counted_under_the_labels_the_full_recording_uses(servers: list[Instance]) -> None:
    """A plain success takes the short way (duration only); a call the application fails and a retried call take
    the full recording. Each lands in the series it belongs to, sync and aio alike."""
    dead = Endpoint("127.0.0.1", _closed_port())
    with _caller([servers[0].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        for _ in range(3):
            assert stub.Say(pb2.Hello(text="ok")).text == "ok"
        with pytest.raises(grpc.RpcError) as failed:
            stub.Say(pb2.Hello(text="thing", mode="missing"))
        assert failed.value.code() is grpc.StatusCode.NOT_FOUND

        async def aio_calls() -> None:
            async with mesh.grpc_aio_channel("echo") as aio_channel:
                assert (await pb2_grpc.EchoStub(aio_channel).Say(pb2.Hello(text="aio"))).text == "aio"

        asyncio.run(aio_calls())
        assert _durations(mesh) == {("2xx", "success", "default"): 4, ("4xx", "client-error", "default"): 1}

    # round robin over [dead, live]: one of every two calls is retried on the live one (attempts > 1: the full way)
    with _caller([dead, servers[1].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        assert [stub.Say(pb2.Hello(text="r")).text for _ in range(2)] == ["r", "r"]
        assert _durations(mesh) == {("2xx", "success", "default"): 2}
        assert mesh.telemetry is not None
        retried = sum(value for _, value in mesh.telemetry.metrics.retries.points())
        assert retried == 1


def test_the_decision_log_of_a_grpc_call_is_there_for_whoever_reads_it(
    servers: list[Instance], caplog: pytest.LogCaptureFixture
) -> None:
    """With the access log on, a retried gRPC call's line names both attempts and why the first was retried; at
    DEBUG on ``meshlib.policy`` the same entries are logged. (With neither, nothing is built, and the call is
    retried all the same: tests/policy/test_decision_log.py runs the flow both ways.)"""
    dead = Endpoint("127.0.0.1", _closed_port())
    caplog.set_level(logging.INFO, logger="meshlib.access")
    caplog.set_level(logging.DEBUG, logger="meshlib.policy")
    with _caller([dead, servers[0].endpoint], access_log=True) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        assert [stub.Say(pb2.Hello(text="d")).text for _ in range(2)] == ["d", "d"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    client_lines = [line for line in lines if line.get("kind") == "client" and line["destination"] == "echo"]
    assert len(client_lines) == 2
    retried = [line for line in client_lines if line["attempts"] == 2]
    assert len(retried) == 1, client_lines
    first, second = retried[0]["decisions"]
    assert f"-> 127.0.0.1:{dead.port}" in first and "unavailable" in first and "retried because" in first
    assert f"-> 127.0.0.1:{servers[0].endpoint.port}" in second and second.endswith(": ok")
    debug = [r.getMessage() for r in caplog.records if r.name == "meshlib.policy"]
    assert any("retried because unavailable" in message for message in debug), debug


def test_each_attempt_sends_its_own_metadata_and_plain_ones_share_one_value(echo_md: Instance) -> None:
    """A plain call sends the caller and its attempt number; a call with metadata of its own sends it first and
    keeps the mesh's keys the mesh's; the plain call after it sends nothing of that call's (the plain value is
    shared between calls: it must never pick up another call's pairs). Sync and aio."""
    plain = "x-mesh-caller=front,x-mesh-attempt=1"
    own = (("x-tenant", "t1"), ("x-mesh-caller", "forged"))
    with _caller([echo_md.endpoint], telemetry=False) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        assert stub.Say(pb2.Hello()).text == plain
        assert stub.Say(pb2.Hello(), metadata=own).text == "x-tenant=t1,x-mesh-caller=front,x-mesh-attempt=1"
        assert stub.Say(pb2.Hello()).text == plain
        assert stub.Say.future(pb2.Hello()).result().text == plain
        timed = stub.Say(pb2.Hello(), timeout=30).text.split(",")
        assert timed[:2] == plain.split(",") and timed[2].startswith("x-mesh-deadline=")
        assert stub.Say(pb2.Hello()).text == plain

        async def aio_calls() -> list[str]:
            async with mesh.grpc_aio_channel("echo") as aio_channel:
                aio_stub = pb2_grpc.EchoStub(aio_channel)
                return [
                    (await aio_stub.Say(pb2.Hello())).text,
                    (await aio_stub.Say(pb2.Hello(), metadata=own)).text,
                    (await aio_stub.Say(pb2.Hello())).text,
                ]

        assert asyncio.run(aio_calls()) == [plain, "x-tenant=t1,x-mesh-caller=front,x-mesh-attempt=1", plain]


def test_a_retried_attempt_says_it_is_the_second(echo_md: Instance) -> None:
    """The attempt number in the metadata is the attempt's: a call whose first instance is down reaches the live
    one as attempt 2, and a call that starts at the live one is attempt 1 (sync and aio)."""
    dead = Endpoint("127.0.0.1", _closed_port())
    with _caller([dead, echo_md.endpoint], telemetry=False) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        seen = sorted(stub.Say(pb2.Hello()).text for _ in range(2))
        assert seen == ["x-mesh-caller=front,x-mesh-attempt=1", "x-mesh-caller=front,x-mesh-attempt=2"]

        async def aio_calls() -> set[str]:
            async with mesh.grpc_aio_channel("echo") as aio_channel:
                aio_stub = pb2_grpc.EchoStub(aio_channel)
                return {(await aio_stub.Say(pb2.Hello())).text for _ in range(3)}

        # (the round-robin position is the service's, moved on by every pick, retries too: which aio call starts
        # at the dead instance depends on the sync calls before; at least one of three does)
        got = asyncio.run(aio_calls())
        assert "x-mesh-caller=front,x-mesh-attempt=2" in got and got <= set(seen)


def _closed_port() -> int:
    """A loopback port nothing listens on (the instance that is down)."""
    return free_port()


def test_an_aio_call_starts_at_once_and_ends_the_usual_way_unawaited_or_cancelled_before_its_await(
    servers: list[Instance],
) -> None:
    """grpc.aio starts a call's RPC when the call is made; so does the mesh (its first attempt is begun in the
    call itself). A call nobody awaits is still recorded when its RPC ends; one cancelled before anyone awaited
    it (at once, or once its RPC is in flight) cancels that RPC, says CANCELLED, and leaves nothing counted as in
    flight: not on the endpoint's channel, not in the balancer's load."""
    endpoint = servers[0].endpoint

    async def main(mesh: meshlib.Mesh) -> None:
        async with mesh.grpc_aio_channel("echo") as channel:
            stub = pb2_grpc.EchoStub(channel)
            unawaited = stub.Say(pb2.Hello(text="alone"))
            deadline = asyncio.get_running_loop().time() + 10
            while sum(_durations(mesh).values()) < 1:  # recorded by itself, when its RPC ended
                assert asyncio.get_running_loop().time() < deadline, "an unawaited call was never recorded"
                await asyncio.sleep(0.01)
            assert unawaited.done() and (await unawaited).text == "alone"

            at_once = stub.Say(pb2.Hello(text="x", mode="slow", n=3000), timeout=10)
            assert at_once.cancel() and at_once.cancelled()
            in_flight = stub.Say(pb2.Hello(text="x", mode="slow", n=3000), timeout=10)
            await asyncio.sleep(0.2)  # its RPC reaches the server
            assert in_flight.cancel() and in_flight.cancelled()
            for call in (at_once, in_flight):
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert await call.code() is grpc.StatusCode.CANCELLED
            (record,) = channel.endpoints._live.values()
            handle = mesh.service_state("echo").handles[0]
            while record.inflight or handle.load.outstanding:
                assert asyncio.get_running_loop().time() < deadline, (record.inflight, handle.load.outstanding)
                await asyncio.sleep(0.01)
            assert (await stub.Say(pb2.Hello(text="after"), timeout=10)).text == "after"

    with _caller([endpoint]) as mesh:
        asyncio.run(main(mesh))
        assert _durations(mesh)[("2xx", "success", "default")] == 2
    behaviour = servers[0].behaviour
    wait_for(lambda: behaviour.cancelled >= 1, timeout=10, what="the server to see the in-flight RPC cancelled")


def test_an_aio_call_s_outcome_reads_the_same_however_it_is_waited_for(servers: list[Instance]) -> None:
    """A unary aio call keeps its outcome itself (a future is made only for what waits beside its awaiter): a
    done callback added before the end or after it runs once with the call; ``code()`` awaited in another task
    while the call is in flight waits for its end; awaiting twice answers twice, an answer or the same error;
    ``done()`` is false until the end."""
    endpoint = servers[0].endpoint

    async def main(mesh: meshlib.Mesh) -> None:
        async with mesh.grpc_aio_channel("echo") as channel:
            stub = pb2_grpc.EchoStub(channel)
            seen: list[Any] = []
            call = stub.Say(pb2.Hello(text="slow", mode="slow", n=200), timeout=10)
            call.add_done_callback(seen.append)
            code = asyncio.ensure_future(call.code())
            await asyncio.sleep(0.05)
            assert not call.done() and not code.done() and not seen
            assert (await call).text == "slow" and (await call).text == "slow"
            assert await code is grpc.StatusCode.OK and call.done()
            await asyncio.sleep(0)
            assert seen == [call]
            late: list[Any] = []
            call.add_done_callback(late.append)
            await asyncio.sleep(0)
            assert late == [call] and seen == [call]

            servers[0].behaviour.fail = True
            failing = stub.Say(pb2.Hello(text="x"), timeout=10)
            errors = []
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await failing
                errors.append(raised.value)
            assert errors[0] is errors[1] and errors[0].code() is grpc.StatusCode.UNAVAILABLE
            assert await failing.code() is grpc.StatusCode.UNAVAILABLE and failing.done()
            assert not failing.cancel() and not failing.cancelled()

    with _caller([endpoint]) as mesh:
        asyncio.run(main(mesh))


def test_a_sampled_access_log_draws_once_a_grpc_call(
    servers: list[Instance], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``MESH_ACCESS_LOG_SAMPLE=0.25``: about a quarter of 400 calls get a line (the short end must not draw a
    sample of its own before the full recording draws another)."""
    monkeypatch.setenv("MESH_ACCESS_LOG_SAMPLE", "0.25")
    caplog.set_level(logging.INFO, logger="meshlib.access")
    with _caller([servers[0].endpoint], access_log=True) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        for _ in range(400):
            stub.Say(pb2.Hello(text="s"))
    lines = [r for r in caplog.records if r.name == "meshlib.access" and '"kind":"client"' in r.getMessage()]
    assert 60 <= len(lines) <= 140, len(lines)  # 0.25 of 400: 100, and 4.6 standard deviations either side
