"""A garbage-collection pause in the calling process is not charged to the endpoint whose answer waited it out.

Peak-EWMA keeps a slow sample for tens of seconds: before this, one pause during an attempt made its instance look
hundreds of times slower than the others, and power-of-two-choices sent it nothing until the sample decayed (about a
minute for a 300 ms pause against millisecond answers)."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from conftest import static_mesh
from meshlib.endpoints import Endpoint, EndpointSet
from meshlib.policy.classify import classify_status
from meshlib.policy.config import HedgingPolicy, ServicePolicy
from meshlib.policy.flow import HEDGE_DUE, Result, Send, call_flow
from meshlib.policy.service import ServiceState
from meshlib.policy.steps import no_pauses

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

PAUSE = 0.3


class Stall:
    """Garbage whose finalizer stands the process still, inside a real collection (between gc's start and stop
    callbacks), as a long collection of a large heap does."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        time.sleep(PAUSE)


def pause_in_collection() -> None:
    Stall()
    gc.collect()


@pytest.mark.parametrize("hedged", [False, True], ids=["plain", "hedged"])
def test_a_pause_while_an_answer_waits_is_left_out_of_its_endpoints_estimate(upstreams, hedged):
    ups = upstreams(2)
    mesh = static_mesh({"svc": [u.port for u in ups]}, telemetry=False)
    if hedged:  # the hedged call flow keeps its own attempt clocks (a backup never fires here: 5 s delay)
        mesh.set_policy("svc", ServicePolicy(hedging=HedgingPolicy(delay=5.0)))

    async def main() -> float:
        async with mesh.async_client(timeout=5) as client:
            for _ in range(20):
                await client.get("http://svc/x")
            handles = mesh.service_state("svc").handles
            started = time.monotonic()
            call = asyncio.ensure_future(client.get("http://svc/x"))
            while not any(h.load.outstanding for h in handles):  # the attempt is out: its clock has started
                await asyncio.sleep(0)
            pause_in_collection()  # the event loop stands still; the answer arrives and waits in the socket
            await call
            return time.monotonic() - started

    with mesh:
        took = asyncio.run(main())
        assert (mesh.service_state("svc").hedger is not None) is hedged
        estimates = {h.endpoint.port: h.load.ewma for h in mesh.service_state("svc").handles}
    assert took >= PAUSE, "the pause happened while the call was out"
    # before, the instance in flight was recorded as 0.3 s slow, and got no traffic for about a minute
    assert max(estimates.values()) < PAUSE / 3, f"a pause was charged to an endpoint: {estimates}"


def test_the_meter_counts_collections_only_when_the_clock_is_real():
    with static_mesh({"svc": [1]}, telemetry=False) as mesh:
        before = mesh.paused()
        pause_in_collection()
        assert mesh.paused() - before >= PAUSE
    fake: Any = lambda: 0.0  # noqa: E731 - a test's fake clock
    with static_mesh({"svc": [1]}, telemetry=False, clock=fake) as mesh:
        assert mesh.paused is no_pauses


@pytest.mark.parametrize("hedging", [None, HedgingPolicy(delay=5.0)], ids=["plain", "hedged"])
def test_the_call_flow_records_an_attempts_time_less_the_pauses_during_it(hedging):
    """The pure core, with a fake clock and a fake meter: 300 ms out, 250 ms of it paused, records 50 ms."""
    now = [1000.0]
    paused = [7.0]  # what the meter read before the call: not part of it either
    state = ServiceState("svc", lambda: now[0], ServicePolicy(hedging=hedging))
    state.set_endpoints(EndpointSet.of("svc", [Endpoint("10.0.0.1", 1)]))
    flow = call_flow(
        state,
        method="GET",
        replayable=True,
        deadline=None,
        clock=lambda: now[0],
        rand=lambda: 0.5,
        paused=lambda: paused[0],
    )
    send = next(flow)
    assert isinstance(send, Send)
    now[0] += 0.3
    paused[0] += 0.25
    with pytest.raises(StopIteration):
        flow.send(Result(classify_status(200)))
    assert state.handles[0].load.ewma == pytest.approx(0.05)


def test_a_hedged_calls_loser_is_charged_its_time_less_the_pauses():
    now = [1000.0]
    paused = [7.0]
    state = ServiceState("svc", lambda: now[0], ServicePolicy(hedging=HedgingPolicy(delay=0.02)))
    state.set_endpoints(EndpointSet.of("svc", [Endpoint("10.0.0.1", 1), Endpoint("10.0.0.1", 2)]))
    assert state.hedger is not None
    for _ in range(100):  # earlier requests: the hedge budget is a share of them
        state.hedger.budget.deposit(now[0])
    flow = call_flow(
        state,
        method="GET",
        replayable=True,
        deadline=None,
        clock=lambda: now[0],
        rand=lambda: 0.5,
        paused=lambda: paused[0],
    )
    first = next(flow)
    assert isinstance(first, Send)
    now[0] += 0.02
    backup = flow.send(HEDGE_DUE)
    assert isinstance(backup, Send) and backup.endpoint != first.endpoint
    now[0] += 0.3
    paused[0] += 0.25
    with pytest.raises(StopIteration):
        flow.send(Result(classify_status(200), attempt=backup.attempt))
    ewma = {h.endpoint: h.load.ewma for h in state.handles}
    assert ewma[backup.endpoint] == pytest.approx(0.05)
    assert ewma[first.endpoint] == pytest.approx(0.07), "the loser, cancelled: 320 ms out, 250 ms of it paused"
