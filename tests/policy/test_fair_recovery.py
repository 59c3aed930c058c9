"""Fair recovery against real servers: an instance ejected for 503s, then recovered, gets its share again at once
(the probe that closes its breaker revives its load estimate), so when another instance turns slow the balancer
moves away from the slow one instead of starving the recovered one."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import pytest

import meshlib
from harness import Upstream, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.config import BreakerPolicy, RetryPolicy, ServicePolicy

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def test_a_recovered_instance_takes_traffic_and_a_slow_one_loses_it_within_five_seconds():
    ups = [Upstream(name) for name in "abc"]
    try:
        a, b, c = (u.wait_listening() for u in ups)
        endpoints = [Endpoint("127.0.0.1", u.port) for u in (a, b, c)]
        mesh = meshlib.Mesh(
            service="tester", discovery=StaticDiscovery({"svc": endpoints}), control_plane="", telemetry=False
        )
        policy = ServicePolicy(
            retries=RetryPolicy(attempts=3),
            circuit_breaker=BreakerPolicy(consecutive_failures=1, open_for=1.0, max_ejection_percent=100),
        )
        mesh.set_policy("svc", policy)
        state = mesh.service_state("svc")
        handle_b = next(h for h in state.handles if h.endpoint.port == b.port)
        with mesh, mesh.client(timeout=5) as client:

            def call() -> str:
                response = client.get("http://svc/x")
                assert response.status_code == 200
                return str(response.json()["instance"])

            for _ in range(30):
                call()
            # b fails and is ejected. Round robin for this phase only, so that b is sure to be tried (P2C may skip
            # an endpoint whose estimate is the highest for a while); P2C is back before anything is measured.
            mesh.set_policy("svc", replace(policy, load_balancer="round_robin"))
            b.behave(status=503)
            wait_for(
                lambda: call() and handle_b.breaker.state == "open", timeout=20, interval=0, what="b to be ejected"
            )
            mesh.set_policy("svc", policy)
            b.behave(status=200)
            wait_for(
                lambda: call() and handle_b.breaker.state == "closed",
                timeout=20,
                interval=0.01,
                what="b's probe to close its breaker",
            )
            c.behave(delay=0.15)
            seen: Counter[str] = Counter()
            started = time.monotonic()
            while time.monotonic() - started < 5.0:
                who = call()
                if time.monotonic() - started > 2.0:  # the share over the last three seconds
                    seen[who] += 1
            names = {u.port: u.name for u in (a, b, c)}
            estimates = {names[h.endpoint.port]: round(h.load.ewma, 4) for h in state.handles}
        total = sum(seen.values())
        why = f"latency estimates {estimates}, {mesh.paused():.2f} s paused in garbage collection"
        assert seen["c"] / total < 0.10, f"the slow instance kept {seen['c']} of {total} calls; {why}"
        assert seen["b"] / total > 0.25, f"the recovered instance got {seen['b']} of {total} calls; {why}"
    finally:
        for u in ups:
            u.stop()
