"""Traffic mirroring: the rule, the per-call decision (pure), and copies against real servers (upstream processes):
a mirror target that is slow and failing costs the caller nothing, gets its share, and is counted apart."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest

import meshlib
from harness import Upstream, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.rules.model import RulesValidationError, validate_rules

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

RULES = {
    "services": {
        "shop": {
            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
            "routes": [{"to": [{"subset": "v1"}], "mirror": {"subset": "v2", "percent": 20}}],
        }
    }
}


def test_a_mirror_needs_a_defined_subset_and_counts_as_using_it():
    rules = validate_rules(RULES, 1)
    assert rules.warnings == (), "v2 is used by the mirror: no 'unused subset' warning"
    route = rules.for_service("shop").routes[0]
    assert route.mirror is not None and route.mirror.subset == "v2" and route.mirror.percent == 20
    bad = {
        "services": {
            "shop": {
                "subsets": {"v1": {"tags": ["v1"]}},
                "routes": [{"to": [{"subset": "v1"}], "mirror": {"subset": "v3", "percent": 200}}],
            }
        }
    }
    with pytest.raises(RulesValidationError) as caught:
        validate_rules(bad)
    assert [e.path for e in caught.value.errors] == ["services.shop.routes[0].mirror.subset"]


@pytest.mark.parametrize(("draw", "mirrored"), [(0.0, True), (0.19, True), (0.2, False), (0.99, False)])
def test_the_mirror_decision_follows_the_percent(draw, mirrored):
    from meshlib.policy.service import ServiceState

    state = ServiceState("shop", lambda: 0.0)
    state.set_rules(validate_rules(RULES).for_service("shop"))
    plan = state.plan("GET", "/", lambda name: None, lambda: draw)
    assert plan.mirror == ("v2" if mirrored else None)
    assert plan.choice.subset == "v1"
    copy = state.mirror_plan("v2")
    assert copy.choice.label == "mirror:v2" and copy.mirror is None


@pytest.fixture
def shop() -> Iterator[tuple[list[Upstream], Upstream]]:
    primaries = [Upstream(name) for name in ("v1-a", "v1-b")]
    target = Upstream("v2")
    try:
        yield [u.wait_listening() for u in primaries], target.wait_listening()
    finally:
        for u in (*primaries, target):
            u.stop()


def test_a_slow_failing_mirror_costs_the_caller_nothing_and_gets_its_share(shop):
    primaries, target = shop
    target.behave(status=500, delay=0.5)
    endpoints = [Endpoint("127.0.0.1", u.port, tags=frozenset({"v1"})) for u in primaries]
    endpoints.append(Endpoint("127.0.0.1", target.port, tags=frozenset({"v2"})))
    mesh = meshlib.Mesh(service="front", discovery=StaticDiscovery({"shop": endpoints}), control_plane="")

    def latencies(client: meshlib.Client, n: int) -> list[float]:
        took = []
        for _ in range(n):
            started = time.perf_counter()
            response = client.get("http://shop/items", params={"q": "x"})
            took.append(time.perf_counter() - started)
            assert response.status_code == 200 and response.json()["instance"].startswith("v1")
        return took

    no_mirror = {"services": {"shop": {**RULES["services"]["shop"], "routes": [{"to": [{"subset": "v1"}]}]}}}
    mesh.apply_rules(validate_rules(no_mirror, 1))
    with mesh, mesh.client(timeout=5) as client:
        latencies(client, 50)  # warm-up
        before = latencies(client, 300)
        mesh.apply_rules(validate_rules(RULES, 2))
        during = latencies(client, 2000)
        wait_for(lambda: target.hits() >= 300, timeout=30, what="copies to reach the mirror target")
        wait_for(lambda: mesh.mirror.pending == 0, timeout=30, what="every copy to be sent")
        copies = target.hits()
        metrics = mesh.telemetry.metrics.prometheus()

    base, mirrored = statistics.median(before), statistics.median(during)
    # within noise: the copies run on a background loop of this process, so a little CPU is shared with the caller
    assert mirrored < base * 1.25 + 0.002, f"p50 {base * 1000:.2f} ms without the mirror, {mirrored * 1000:.2f} ms with"
    assert 340 <= copies <= 460, f"{copies} copies for 2000 calls at 20% (±3%)"
    assert primaries[0].hits() + primaries[1].hits() == 2350, "the primaries got every call, once"
    # a failing mirror target is not ejected by its copies (they measure it, they do not steer traffic)
    # and the copies are counted apart: route mirror:v2, all 5xx, next to the primary's route
    assert 'mesh_route="mirror:v2"' in metrics and 'http_response_status_class="5xx"' in metrics
    counts = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("http_client_request_duration_seconds_count")
    }
    mirror_calls = sum(v for k, v in counts.items() if 'mesh_route="mirror:v2"' in k)
    assert mirror_calls == copies


def test_the_receiving_side_labels_mirrored_copies():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from harness import ThreadedServer
    from meshlib.contrib.asgi import MeshMiddleware

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    receiver_mesh = meshlib.Mesh(service="shop", discovery=StaticDiscovery({}), control_plane="")
    server = ThreadedServer(MeshMiddleware(Starlette(routes=[Route("/items", hello)]), receiver_mesh))
    try:
        endpoint = Endpoint("127.0.0.1", server.port, tags=frozenset({"v1", "v2"}))
        mesh = meshlib.Mesh(service="front", discovery=StaticDiscovery({"shop": [endpoint]}), control_plane="")
        mesh.apply_rules(
            validate_rules(
                {
                    "services": {
                        "shop": {
                            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
                            "routes": [{"to": [{"subset": "v1"}], "mirror": {"subset": "v2", "percent": 100}}],
                        }
                    }
                },
                1,
            )
        )
        with mesh, mesh.client() as client:
            for _ in range(10):
                assert client.get("http://shop/items").text == "ok"

            def mirrored() -> float:
                text = receiver_mesh.telemetry.metrics.prometheus()
                return sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("http_server_request_duration_seconds_count") and 'mesh_mirror="1"' in line
                )

            wait_for(lambda: mirrored() == 10, timeout=10, what="ten mirrored copies counted by the receiver")
        from meshlib.telemetry import signals

        rows = signals.parse(receiver_mesh.telemetry.metrics.prometheus())
        assert rows["shop"].count == 10 and rows["shop (mirror)"].count == 10
    finally:
        server.stop()
