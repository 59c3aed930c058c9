"""The HTTP data plane against real uvicorn upstream processes on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import meshlib
from conftest import static_mesh
from harness import free_port, wait_for
from meshlib.policy.config import BreakerPolicy, RetryBudgetPolicy, RetryPolicy, ServicePolicy

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def instances_of(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.json()["instance"] for r in responses)


def test_requests_spread_over_all_instances(upstreams):
    ups = upstreams(3)
    with static_mesh({"svc": [u.port for u in ups]}) as mesh, mesh.client() as client, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: client.get("http://svc/spread"), range(600)))
    assert all(r.status_code == 200 for r in responses)
    seen = instances_of(responses)
    assert set(seen) == {u.name for u in ups}, seen
    # every instance takes a share. Neither an upper bound nor an even split: the balancer is peak-EWMA, which keeps a
    # slow sample (a connect, a thread kept waiting for the GIL on a loaded machine) for seconds, and this test lasts
    # well under one. One instance took 63% in a full-suite run, another 6% (both before garbage-collection pauses
    # were left out of the estimates). In isolation the split is about 30/33/37%.
    assert min(seen.values()) >= 0.02 * len(responses), seen


def test_httpx_features_keep_working(upstreams):
    (up,) = upstreams(1)
    hooks: list[str] = []
    with (
        static_mesh({"svc": [up.port]}) as mesh,
        mesh.client(
            base_url="http://svc.mesh",
            headers={"x-app": "1"},
            event_hooks={"request": [lambda r: hooks.append(str(r.url))]},
            timeout=3,
        ) as client,
    ):
        r = client.post("/echo?a=1", params={"b": "2"}, json={"k": "v"}, headers={"x-req": "2"})
        body = r.json()
        assert r.status_code == 200
        assert body["path"] == "/echo" and body["query"] == "b=2"  # httpx: params replace the URL query
        assert body["body"] == '{"k":"v"}'
        headers = body["headers"]
        assert headers["x-app"] == "1" and headers["x-req"] == "2"
        assert headers["host"] == "svc.mesh"
        assert headers["x-mesh-caller"] == "tester"
        assert headers["x-mesh-attempt"] == "1"
        assert "traceparent" not in headers  # outside a trace nothing to carry (the rule gRPC calls follow too)
        deadline_ms = int(headers["x-mesh-deadline"])
        assert 0 < deadline_ms / 1000 - time.time() <= 3.1
        assert hooks == ["http://svc.mesh/echo?b=2"]
        with client.stream("GET", "/stream") as streamed:
            chunks = b"".join(streamed.iter_bytes())
        assert b'"instance"' in chunks
    # External hosts pass straight through (here: an IP literal) with the same client.
    with static_mesh({}) as mesh, mesh.client() as client:
        assert client.get(up.url + "/direct").json()["path"] == "/direct"


def test_unknown_service_fails_at_once_with_typed_error():
    with static_mesh({"svc": [free_port()]}) as mesh, mesh.client() as client:
        started = time.monotonic()
        with pytest.raises(meshlib.NoEndpointsError, match="nosuch"):
            client.get("http://nosuch/x")
        # at once: not after the 5 s that discovery may take to answer about a name it is watching
        assert time.monotonic() - started < mesh.settings.discovery_timeout / 2
        with pytest.raises(httpx.TransportError):  # existing except clauses keep working
            client.get("http://nosuch/x")


def _hammer(client: meshlib.Client, stop: threading.Event, results: list[object]) -> None:
    while not stop.is_set():
        try:
            r = client.get("http://svc/load")
            results.append(r.status_code)
        except Exception as exc:  # recorded, asserted on below
            results.append(exc)


def test_instance_killed_mid_load_fails_no_gets(upstreams):
    ups = upstreams(3)
    with static_mesh({"svc": [u.port for u in ups]}) as mesh, mesh.client() as client:
        stop = threading.Event()
        results: list[object] = []
        threads = [threading.Thread(target=_hammer, args=(client, stop, results)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 200, what="warm-up load")
            ups[0].kill()
            before = len(results)
            wait_for(lambda: len(results) >= before + 400, what="load after the kill")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    failures = [r for r in results if r != 200]
    assert failures == [], failures[:3]


def test_instance_answering_503_is_hidden_and_starved(upstreams):
    ups = upstreams(3)
    ups[0].behave(status=503)
    with static_mesh({"svc": [u.port for u in ups]}) as mesh, mesh.client() as client:
        responses = [client.get("http://svc/x") for _ in range(300)]
    assert [r.status_code for r in responses] == [200] * 300
    assert ups[0].hits() <= 10, ups[0].hits()  # ejected after 5 consecutive failures


def test_slow_instance_gets_a_small_share(upstreams):
    ups = upstreams(3)
    ups[0].behave(delay=0.05)
    with static_mesh({"svc": [u.port for u in ups]}) as mesh, mesh.client() as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.get("http://svc/x"), range(400)))
    seen = instances_of(responses)
    assert seen[ups[0].name] < 0.1 * len(responses), seen


def test_post_not_retried_on_503_but_retried_on_connection_refused(upstreams):
    a, b = upstreams(2, status=503)
    with static_mesh({"svc": [a.port, b.port]}) as mesh, mesh.client() as client:
        r = client.post("http://svc/pay", json={"amount": 1})
        assert r.status_code == 503
        assert a.hits("POST") + b.hits("POST") == 1
        r = client.get("http://svc/read")  # the same 503 on a GET is retried: 3 attempts, alternating
        assert r.status_code == 503
        assert sorted([a.hits("GET"), b.hits("GET")]) == [1, 2]

    (live,) = upstreams(1)
    dead = free_port()
    policy = ServicePolicy(load_balancer="round_robin")
    with static_mesh({"svc": [dead, live.port]}, policies={"svc": policy}) as mesh, mesh.client() as client:
        codes = [client.post("http://svc/pay", json={"n": i}).status_code for i in range(4)]
        dead_handle = next(h for h in mesh.service_state("svc").handles if h.endpoint.port == dead)
    assert codes == [200] * 4
    assert live.hits("POST") == 4  # each POST reached a server exactly once
    assert dead_handle.load.ewma > 0  # and some of them did try the dead instance first


def test_all_instances_down_typed_error_then_fast_failure():
    ports = [free_port() for _ in range(3)]
    # every instance may be ejected (the default caps ejection at half of them: see the next test), and with the
    # panic threshold off a pool whose instances are all ejected fails fast instead of trying them anyway
    everything = ServicePolicy(circuit_breaker=BreakerPolicy(max_ejection_percent=100, panic_threshold_percent=0))
    with static_mesh({"svc": ports}, policies={"svc": everything}) as mesh, mesh.client() as client:
        with pytest.raises(meshlib.UnavailableError) as info:
            client.get("http://svc/x")
        message = str(info.value)
        assert "svc" in message and "connect-failure" in message and str(ports[0]) in message

        def breakers_open() -> bool:
            try:
                client.get("http://svc/x")
            except meshlib.CircuitOpenError:
                return True
            except meshlib.MeshError:
                return False
            return False

        wait_for(breakers_open, timeout=10, interval=0, what="breakers to open")
        # While every breaker is open, a call fails without trying any instance: listen on the dead ports now and
        # see that not one connection arrives.
        listeners = []
        for port in ports:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
            listener.setblocking(False)
            listeners.append(listener)
        try:
            for _ in range(50):
                with pytest.raises(meshlib.CircuitOpenError, match="reopens in"):
                    client.get("http://svc/x")
            for listener in listeners:
                with pytest.raises(BlockingIOError):
                    listener.accept()
        finally:
            for listener in listeners:
                listener.close()


def test_retry_budget_holds_retry_load_near_20_percent(upstreams):
    a, b = upstreams(2, status=503)
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=3, budget=RetryBudgetPolicy(ratio=0.2, min_per_second=0), backoff_base=0.001),
        circuit_breaker=BreakerPolicy(consecutive_failures=10**6),
    )
    requests = 300
    with static_mesh({"svc": [a.port, b.port]}, policies={"svc": policy}) as mesh, mesh.client() as client:
        codes = [client.get("http://svc/x").status_code for _ in range(requests)]
    assert codes == [503] * requests
    sent = a.hits() + b.hits()
    retries = sent - requests
    assert 0.15 * requests <= retries <= 0.21 * requests, retries


def test_whole_call_timeout_is_a_deadline(upstreams):
    (slow,) = upstreams(1, delay=3.0)
    policy = ServicePolicy(timeout=0.2)
    with static_mesh({"svc": [slow.port]}, policies={"svc": policy}) as mesh, mesh.client() as client:
        started = time.monotonic()
        with pytest.raises(meshlib.DeadlineExceededError) as info:
            client.get("http://svc/x")
        assert time.monotonic() - started < 2.0  # the call's deadline, not the server's 3 s
        assert isinstance(info.value, httpx.TimeoutException)
    slow.kill()  # not a graceful stop: that would wait out the abandoned 3 s request


def test_incoming_deadline_caps_outbound_timeout(upstreams):
    from meshlib.propagation import incoming_deadline

    (slow,) = upstreams(1, delay=3.0)
    with static_mesh({"svc": [slow.port]}) as mesh, mesh.client() as client:
        token = incoming_deadline.set(time.time() + 0.2)
        try:
            started = time.monotonic()
            with pytest.raises(meshlib.DeadlineExceededError):
                client.get("http://svc/x")
            assert time.monotonic() - started < 2.0  # the inherited deadline, not the server's 3 s
        finally:
            incoming_deadline.reset(token)
    slow.kill()  # not a graceful stop: that would wait out the abandoned 3 s request


# -- the async client: the same behaviour through the same policy core ---------------------------


def test_async_client_spread_503_and_kill(upstreams):
    ups = upstreams(3)
    ups[0].behave(status=503)

    async def main() -> tuple[list[int], Counter[str], list[object]]:
        async with static_mesh({"svc": [u.port for u in ups]}).async_client() as client:
            first = await asyncio.gather(*(client.get("http://svc/a") for _ in range(200)))
            seen = instances_of(list(first))
            burst_hits = ups[0].hits()  # a cold burst reaches every instance before any answer is back
            second = await asyncio.gather(*(client.get("http://svc/a") for _ in range(200)))
            assert [r.status_code for r in second] == [200] * 200
            assert ups[0].hits() - burst_hits <= 2  # ejected now: at most a half-open probe
            ups[1].kill()
            after: list[object] = []
            for _ in range(10):
                batch = await asyncio.gather(*(client.get("http://svc/b") for _ in range(20)), return_exceptions=True)
                after.extend(r.status_code if isinstance(r, httpx.Response) else r for r in batch)
            return [r.status_code for r in first], seen, after

    codes, seen, after = asyncio.run(main())
    assert codes == [200] * 200
    assert seen[ups[0].name] == 0 and seen[ups[1].name] > 0 and seen[ups[2].name] > 0, seen
    assert after == [200] * 200, [r for r in after if r != 200][:3]


def test_async_client_typed_errors_and_post_rules(upstreams):
    a, b = upstreams(2, status=503)

    async def main() -> None:
        mesh = static_mesh({"svc": [a.port, b.port], "down": [free_port()]})
        async with mesh.async_client() as client:
            assert (await client.post("http://svc/p")).status_code == 503
            with pytest.raises(meshlib.NoEndpointsError):
                await client.get("http://nosuch/x")
            with pytest.raises(meshlib.UnavailableError):
                await client.get("http://down/x")

    asyncio.run(main())
    assert a.hits("POST") + b.hits("POST") == 1


def test_instance_dying_mid_body_is_retried_not_handed_over(upstreams):
    """Headers arrived, then the instance died before the body: for a small, announced body that is a failed
    attempt (retried on another instance), not a ReadError in the caller's hands."""
    dying, healthy = upstreams(2)
    dying.behave(die_mid_body=1)
    policy = ServicePolicy(load_balancer="round_robin")
    ports = sorted([dying.port, healthy.port])
    with static_mesh({"svc": ports}, policies={"svc": policy}) as mesh, mesh.client() as client:
        codes = [client.get("http://svc/x").status_code for _ in range(4)]
    assert codes == [200] * 4
    assert dying.proc.wait(10) == -signal.SIGKILL  # it did die mid-response


def test_with_every_instance_down_at_most_half_are_ejected_by_default():
    """Envoy's max_ejection_percent (50% here by default): a correlated failure does not eject everything, so the
    load is not piled onto the few instances left; the retry budget bounds what the rest get."""
    ports = [free_port() for _ in range(4)]
    with static_mesh({"svc": ports}) as mesh, mesh.client() as client:
        for _ in range(40):
            with pytest.raises(meshlib.MeshError):
                client.get("http://svc/x")
        states = [h.breaker.state for h in mesh.service_state("svc").handles]
    assert states.count("open") == 2 and states.count("closed") == 2, states
