"""gRPC channels through the mesh (sync): real grpc servers made by ``meshlib.grpc.server`` in this process, stubs
generated from tests/protos/echo.proto at test time, static discovery."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from harness import wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import BreakerPolicy, ServicePolicy

pb2, pb2_grpc = stubs()


class Instance:
    """One Echo instance: a real grpc server on a free loopback port."""

    def __init__(self, name: str, mesh: meshlib.Mesh | None = None) -> None:
        self.behaviour = Behaviour(name)
        self.mesh = mesh or meshlib.Mesh(
            service="echo", discovery=StaticDiscovery({}), control_plane="", telemetry=False
        )
        self.server = meshlib.grpc.server(mesh=self.mesh, port=0, drain_delay=0)
        pb2_grpc.add_EchoServicer_to_server(make_servicer(self.behaviour), self.server)
        self.server.start()
        self.port = self.server.port
        self.endpoint = Endpoint("127.0.0.1", self.port)

    def stop(self, grace: float | None = 0) -> None:
        self.server.stop(grace).wait(10)


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    made = [Instance(name) for name in "abc"]
    yield made
    for instance in made:
        instance.stop()


def client_mesh(endpoints: list[Endpoint], **kwargs: Any) -> meshlib.Mesh:
    return meshlib.Mesh(
        service="front", discovery=StaticDiscovery({"echo": endpoints}), control_plane="", telemetry=False, **kwargs
    )


def hammer(stub: Any, threads: int, calls: int) -> tuple[Counter[str], list[BaseException]]:
    """``calls`` unary calls from each of ``threads`` threads at once: who answered, and what failed."""
    seen: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(calls):
            try:
                reply = stub.Say(pb2.Hello(text="hi"), timeout=10)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    seen[reply.instance] += 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return seen, errors


def test_generated_stubs_work_unchanged_and_calls_spread(instances):
    mesh = client_mesh([i.endpoint for i in instances])
    with mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        seen, errors = hammer(stub, threads=6, calls=50)
    assert not errors
    assert sum(seen.values()) == 300
    assert set(seen) == {"a", "b", "c"}, seen
    assert min(seen.values()) >= 20, f"every instance takes a share of concurrent calls: {seen}"


def test_all_four_call_kinds(instances):
    mesh = client_mesh([instances[0].endpoint])
    stub = pb2_grpc.EchoStub(meshlib.grpc.insecure_channel("echo", mesh=mesh))
    assert stub.Say(pb2.Hello(text="x")).text == "x"
    response, call = stub.Say.with_call(pb2.Hello(text="y"))
    assert response.text == "y" and call.code() is grpc.StatusCode.OK
    assert stub.Say.future(pb2.Hello(text="z")).result(10).text == "z"
    assert [r.text for r in stub.Count(pb2.Hello(text="n", n=4))] == ["n-0", "n-1", "n-2", "n-3"]
    assert stub.Collect(iter([pb2.Hello(text="a"), pb2.Hello(text="b")])).text == "a+b"
    assert [r.text for r in stub.Chat(iter([pb2.Hello(text="p"), pb2.Hello(text="q")]))] == ["P", "Q"]
    # the streams' ends were recorded: nothing stays counted as in flight on the endpoint
    state = mesh.service_state("echo")
    wait_for(lambda: all(h.load.outstanding == 0 for h in state.handles), what="streams to be accounted")


def test_an_application_status_is_passed_through_unchanged_and_not_a_failure(instances):
    mesh = client_mesh([instances[0].endpoint])
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    for _ in range(10):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Say(pb2.Hello(text="thing", mode="missing"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no thing"
    assert instances[0].behaviour.calls == 10, "NOT_FOUND is not retried"
    handle = mesh.service_state("echo").handles[0]
    assert handle.breaker.state == "closed", "application statuses never open a breaker"


def test_unavailable_is_retried_on_another_instance_and_the_broken_one_avoided(instances):
    a, _b, _c = instances
    mesh = client_mesh([i.endpoint for i in instances])
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    a.behaviour.fail = True
    seen, errors = hammer(stub, threads=4, calls=50)
    assert not errors, f"every UNAVAILABLE was retried elsewhere: {errors[:1]}"
    assert "a" not in seen and sum(seen.values()) == 200
    # each failure is charged to a's load estimate (as a 1 s answer): the balancer stops choosing it at once
    assert a.behaviour.calls <= 8, a.behaviour.calls


def test_a_broken_instance_is_ejected_by_its_breaker(instances):
    a, _b, _c = instances
    mesh = client_mesh([i.endpoint for i in instances])
    # round robin keeps sending a its share, so its breaker is what must stop it
    mesh.set_policy(
        "echo",
        ServicePolicy(load_balancer="round_robin", circuit_breaker=BreakerPolicy(consecutive_failures=3, open_for=60)),
    )
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    a.behaviour.fail = True
    _seen, errors = hammer(stub, threads=2, calls=30)
    assert not errors, errors[:1]
    state = mesh.service_state("echo")
    broken = next(h for h in state.handles if h.endpoint.port == a.port)
    assert broken.breaker.state == "open"
    calls_at_ejection = a.behaviour.calls
    assert calls_at_ejection >= 3
    hammer(stub, threads=2, calls=30)
    assert a.behaviour.calls == calls_at_ejection, "an ejected instance gets no calls"


def test_when_every_attempt_fails_the_error_names_the_service_and_each_endpoint(instances):
    for i in instances:
        i.behaviour.fail = True
    mesh = client_mesh([i.endpoint for i in instances])
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Say(pb2.Hello(text="x"))
    error = caught.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert details.startswith("echo: 3 attempt(s) failed")
    assert sum(f"127.0.0.1:{i.port}" in details for i in instances) >= 2, details
    assert "is broken" in details, "the server's own details are kept"


def test_unknown_service_is_an_rpc_error_that_says_what_to_do():
    mesh = client_mesh([])
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("ecko"))
    mesh.discovery.set("echo", [Endpoint("127.0.0.1", 1)])  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Say(pb2.Hello(text="x"))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "ecko" in caught.value.details()
    assert "did you mean echo?" in caught.value.details()


def test_streams_are_balanced_but_never_retried(instances):
    a, b, c = instances
    a.behaviour.fail = True
    mesh = client_mesh([a.endpoint])
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    # streaming calls whose handler fails: the caller sees each failure; none is sent a second time
    with pytest.raises(grpc.RpcError) as caught:
        stub.Collect(iter([pb2.Hello(text="x")]))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Count(pb2.Hello(text="x", n=2)))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert a.behaviour.calls == 2, "not retried"
    # and they are balanced: spread over healthy instances, their ends recorded
    mesh.discovery.set("echo", [b.endpoint, c.endpoint])  # type: ignore[attr-defined]
    wait_for(lambda: len(mesh.service_state("echo").handles) == 2)
    for _ in range(40):
        assert [r.text for r in stub.Count(pb2.Hello(text="s", n=2))] == ["s-0", "s-1"]
    assert b.behaviour.calls > 0 and c.behaviour.calls > 0
    assert b.behaviour.calls + c.behaviour.calls == 40


def test_the_grpc_deadline_is_capped_by_the_policy_and_sent_as_both_deadlines(instances):
    mesh = client_mesh([instances[0].endpoint])
    mesh.set_policy("echo", ServicePolicy(timeout=1.5))
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    no_timeout = stub.Say(pb2.Hello(text="x"))
    assert 0 < no_timeout.remaining_ms <= 1550, "the service's timeout is the call's gRPC deadline"
    shorter = stub.Say(pb2.Hello(text="x"), timeout=0.8)
    assert 0 < shorter.remaining_ms <= 850
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Say(pb2.Hello(text="x", mode="slow", n=3000), timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5


def test_endpoint_changes_are_followed_without_cancelling_calls_in_flight(instances):
    a, b, _c = instances
    mesh = client_mesh([a.endpoint])
    channel = mesh.grpc_channel("echo")
    stub = pb2_grpc.EchoStub(channel)
    assert stub.Say(pb2.Hello(text="warm")).instance == "a"
    slow: dict[str, Any] = {}

    def long_call() -> None:
        try:
            slow["reply"] = stub.Say(pb2.Hello(text="slow", mode="slow", n=1500), timeout=10)
        except grpc.RpcError as exc:
            slow["error"] = exc

    caller = threading.Thread(target=long_call)
    a.behaviour.handled.clear()
    caller.start()
    assert a.behaviour.handled.wait(10)
    # a leaves discovery, b arrives: new calls go to b at once; the call on a finishes on a's channel
    mesh.discovery.set("echo", [b.endpoint])  # type: ignore[attr-defined]
    wait_for(lambda: [h.endpoint for h in mesh.service_state("echo").handles] == [b.endpoint])
    assert {stub.Say(pb2.Hello(text="x")).instance for _ in range(10)} == {"b"}
    assert f"127.0.0.1:{a.port}" not in channel.endpoints.labels()
    caller.join(10)
    assert "error" not in slow, f"the call in flight was cancelled: {slow.get('error')}"
    assert slow["reply"].instance == "a"
    assert not channel.endpoints.retiring(), "a's channel closed once its last call was done"


def test_an_instance_leaving_under_load_fails_no_unary_call(instances):
    """The graceful path: the instance leaves discovery, then stops with a grace period. Calls in flight on it
    finish; new ones go elsewhere at once. (A SIGKILLed instance is tests/test_grpc_processes.py. A server stopping
    while still listed may refuse new calls with CANCELLED, which gRPC does not retry, and neither do we.)"""
    a, b, c = instances
    mesh = client_mesh([i.endpoint for i in instances])
    channel = mesh.grpc_channel("echo")
    stub = pb2_grpc.EchoStub(channel)
    results: dict[str, Any] = {}

    def load() -> None:
        results["seen"], results["errors"] = hammer(stub, threads=4, calls=150)

    runner = threading.Thread(target=load)
    runner.start()
    wait_for(lambda: a.behaviour.calls >= 20, what="load to reach a")
    mesh.discovery.set("echo", [b.endpoint, c.endpoint])  # type: ignore[attr-defined]
    # the drain: a's channel retired, and closed once its last call is done (what meshlib.grpc.server's
    # drain_delay gives callers), then a stops
    wait_for(
        lambda: f"127.0.0.1:{a.port}" not in channel.endpoints.labels() and not channel.endpoints.retiring(),
        what="a's channel to be retired and drained",
    )
    a.server.server.stop(5)
    runner.join(60)
    assert results["errors"] == [], results["errors"][:1]
    assert sum(results["seen"].values()) == 600


def test_secure_channel_without_mesh_tls_says_what_to_set():
    mesh = client_mesh([])
    with pytest.raises(meshlib.ConfigurationError, match="MESH_TLS=strict or permissive"):
        meshlib.grpc.secure_channel("echo", mesh=mesh)


def test_hedged_unary_calls_overtake_a_slow_instance(instances):
    """Hedging in the sync facade (gRPC futures side by side): every call that starts on the slow instance gets a
    backup after 20 ms, the backup's answer wins and the slow attempt is cancelled."""
    from meshlib.rules.model import validate_rules

    a, b, _ = instances
    a.behaviour.delay = 0.3
    mesh = client_mesh([a.endpoint, b.endpoint])
    mesh.apply_rules(
        validate_rules(
            {
                "services": {
                    "echo": {"hedging": {"delay": "20ms", "budget_percent": 100}, "load_balancer": "round_robin"}
                }
            },
            1,
        )
    )
    stub = pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
    took, answered_by = [], []
    for _ in range(20):
        started = time.monotonic()
        response, call = stub.Say.with_call(pb2.Hello(text="x"), timeout=5)
        took.append(time.monotonic() - started)
        answered_by.append(response.instance)
        assert call.code() is grpc.StatusCode.OK
    assert a.behaviour.calls >= 8, "half the calls started on the slow instance"
    # a loaded machine may hold a backup up past the slow answer once or twice; more means hedging is broken
    assert answered_by.count("a") <= 2, f"the backups did not win: {answered_by}"
    assert sum(t >= 0.29 for t in took) <= 2, f"the slow attempts were not waited for: {took}"
    wait_for(lambda: all(h.load.outstanding == 0 for h in mesh.service_state("echo").handles))
    wait_for(lambda: a.behaviour.cancelled >= a.behaviour.calls - 1, what="the slow attempts to be cancelled")


def test_endpoints_connect_early_without_a_polling_thread_a_close_could_kill(
    instances: list[Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call opens a channel to every endpoint and starts each connecting; grpc's way of doing that from outside
    (``subscribe``) starts a polling thread, which a close under it killed, printing "Channel closed!" to stderr."""
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    mesh = client_mesh([i.endpoint for i in instances])
    channel = mesh.grpc_channel("echo")
    assert pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="hi"), timeout=10).instance in "abc"
    records = list(channel.endpoints._live.values())
    assert len(records) == 3  # all three opened by the first call
    # (grpc's own threads are named after their runner, "Thread-N (_run)"; the servers' pools are named)
    assert [t.name for t in started if t.name.endswith("(_run)")] == []
    wait_for(  # the two not called are connecting (or ready) all the same
        lambda: all(r.channel._channel.check_connectivity_state(False) != 0 for r in records),
        timeout=10,
        what="every endpoint's channel to leave IDLE",
    )
    mesh.close()
