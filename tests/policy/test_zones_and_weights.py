"""Zones and weights in the policy core: a caller prefers its zone's endpoints while one of them can take the call
and fails over to the others (xDS's priorities), and endpoints share the calls in proportion to their weights."""

from __future__ import annotations

import random
from collections import Counter

from meshlib.endpoints import Endpoint, EndpointSet, endpoint_from_fields
from meshlib.policy.breaker import OPEN
from meshlib.policy.config import BreakerPolicy, ServicePolicy
from meshlib.policy.service import ServiceState


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoint(port: int, zone: str = "", weight: int = 1) -> Endpoint:
    meta = {"zone": zone} if zone else {}
    return endpoint_from_fields("10.0.0.1", port, [], meta, f"i{port}", weight)


def service(endpoints: list[Endpoint], zone: str = "", panic: float = 0) -> ServiceState:
    policy = ServicePolicy(circuit_breaker=BreakerPolicy(consecutive_failures=1, panic_threshold_percent=panic))
    state = ServiceState("svc", Clock(), policy, zone=zone)
    state.set_endpoints(EndpointSet.of("svc", endpoints))
    return state


def ports(state: ServiceState, n: int = 400, seed: int = 7) -> Counter[int]:
    rand = random.Random(seed).random
    picks: Counter[int] = Counter()
    for _ in range(n):
        pick = state.pick(state.clock(), rand)
        assert pick is not None
        picks[pick.handle.endpoint.port] += 1
    return picks


def test_a_caller_keeps_to_its_zone_while_one_of_its_endpoints_is_healthy():
    state = service([endpoint(1, "a"), endpoint(2, "a"), endpoint(3, "b")], zone="a")
    assert set(ports(state)) == {1, 2}
    state.handles[0].breaker.record(True, False)  # port 1 ejected: port 2 still carries zone a
    assert state.handles[0].breaker.state == OPEN
    assert set(ports(state)) == {2}
    state.handles[1].breaker.record(True, False)  # zone a has nothing healthy: the other zone takes the calls
    assert set(ports(state)) == {3}


def test_a_retry_fails_over_once_the_zone_is_tried():
    state = service([endpoint(1, "a"), endpoint(2, "b")], zone="a")
    rand = random.Random(1).random
    first = state.pick(state.clock(), rand)
    assert first is not None and first.handle.endpoint.port == 1
    retry = state.pick(state.clock(), rand, tried=[first.handle])
    assert retry is not None and retry.handle.endpoint.port == 2


def test_no_zone_or_no_endpoint_in_it_means_every_endpoint():
    endpoints = [endpoint(1, "a"), endpoint(2, "b"), endpoint(3)]
    assert set(ports(service(endpoints))) == {1, 2, 3}
    assert set(ports(service(endpoints, zone="c"))) == {1, 2, 3}


def test_subsets_keep_their_zone_preference_apart():
    state = service([endpoint(1, "a"), endpoint(2, "b"), endpoint(3, "b")], zone="b")
    pool = (state.handles[0], state.handles[1])  # a subset's pool: one endpoint in each zone
    rand = random.Random(3).random
    picked = {state.pick(state.clock(), rand, pool=pool, subset="v1").handle.endpoint.port for _ in range(50)}
    assert picked == {2}
    assert set(ports(state)) == {2, 3}


def test_endpoints_share_calls_in_proportion_to_their_weights():
    state = service([endpoint(1, weight=3), endpoint(2, weight=1), endpoint(3, weight=1)])
    picks = ports(state, n=5000)
    share = picks[1] / 5000
    assert 0.56 < share < 0.64, picks  # 3 / (3 + 1 + 1) = 0.6
    assert abs(picks[2] - picks[3]) < 250, picks


def test_weight_and_zone_come_from_meta_and_bad_ones_are_ignored():
    assert endpoint_from_fields("10.0.0.1", 1, [], {"weight": "5", "zone": "eu-1a"}, "x").weight == 5
    assert endpoint_from_fields("10.0.0.1", 1, [], {"weight": "5"}, "x", 2).weight == 2  # Consul's own weight wins
    odd = endpoint_from_fields("10.0.0.1", 1, [], {"weight": "-1", "zone": "no spaces"}, "x")
    assert (odd.weight, odd.zone) == (1, "")
    assert endpoint_from_fields("10.0.0.1", 1, [], {"weight": "99999"}, "x").weight == 1
